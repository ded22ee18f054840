package broker

import (
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/proto/control"
)

func TestPlanGossip(t *testing.T) {
	cfg := configs.Default()
	cfg.Cluster.Brokers = 3
	p, err := PlanGossip(cfg, "broker-2", 2)
	if err != nil || p.Bind != "127.0.0.1:7947" || strings.Join(p.Join, ",") != "127.0.0.1:7946,127.0.0.1:7948" || p.Name != "broker-2" || p.CrossHost {
		t.Fatalf("single node: %+v %v", p, err)
	}
	cfg.Cluster.Gossip = "10.0.0.5:7000"
	cfg.Cluster.Join = []string{"10.0.0.9:7000"}
	p, err = PlanGossip(cfg, "broker-1", 1)
	if err != nil || p.Bind != "10.0.0.5:7000" || p.Name != "broker-1@10.0.0.5:7000" || !p.CrossHost || p.Join[len(p.Join)-1] != "10.0.0.9:7000" {
		t.Fatalf("multi node: %+v %v", p, err)
	}
	cfg.Cluster.Gossip = "nonsense"
	if _, err := PlanGossip(cfg, "b", 1); err == nil {
		t.Fatal("bad gossip address accepted")
	}
}

type ringNode struct {
	c     *Child
	addrs map[string]string
}

func startRingBroker(t *testing.T, dir, name string, index int, mutate func(*configs.Config)) *ringNode {
	t.Helper()
	cfg := configs.Default()
	cfg.Cluster.Gossip = "127.0.0.1:0"
	cfg.Cluster.Brokers = 3
	if mutate != nil {
		mutate(&cfg)
	}
	b, _ := json.Marshal(cfg)
	c := New(nil)
	res, err := c.Start(context.Background(), control.StartParams{Role: control.RoleBroker, Name: name, Index: index, RunDir: dir, Config: b})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Stop(context.Background()) })
	return &ringNode{c: c, addrs: res.Addrs}
}

// ringClient is a worker's client that follows the ring: the topology gives
// it one broker to start from, members reports give it the rest.
func ringClient(t *testing.T, name string, onMsg func(string, []byte, uint64)) *brokerclient.Client {
	t.Helper()
	var self atomic.Pointer[brokerclient.Client]
	cl := brokerclient.New(brokerclient.Options{
		Name:      name,
		OnMessage: onMsg,
		// The worker's glue: the ring's view replaces the topology's.
		OnMembers: func(eps []brokerclient.Endpoint) { self.Load().SetBrokers(eps) },
	})
	self.Store(cl)
	t.Cleanup(cl.Close)
	return cl
}

func TestRingThreeBrokersFailover(t *testing.T) {
	dir := shortDir(t)
	var nodes []*ringNode
	var topo control.Topology
	for i := 1; i <= 3; i++ {
		n := startRingBroker(t, dir, "broker-"+strconv.Itoa(i), i, nil)
		nodes = append(nodes, n)
		topo.Peers = append(topo.Peers, control.Peer{Name: "broker-" + strconv.Itoa(i), Role: control.RoleBroker, State: control.StateReady, Addrs: n.addrs})
	}
	// The supervisor's topology introduces the brokers to each other
	// (ephemeral gossip ports cannot be computed).
	for _, n := range nodes {
		if err := n.c.SetTopology(context.Background(), topo); err != nil {
			t.Fatal(err)
		}
	}
	for i, n := range nodes {
		waitFor(t, "ring of 3 at broker-"+strconv.Itoa(i+1), func() bool { return n.c.ring.NumMembers() == 3 })
	}

	var mu sync.Mutex
	got := map[string][]uint64{}
	sub := ringClient(t, "worker-1", func(ch string, _ []byte, off uint64) {
		mu.Lock()
		got[ch] = append(got[ch], off)
		mu.Unlock()
	})
	pub := ringClient(t, "worker-2", nil)
	boot := []brokerclient.Endpoint{{Name: "broker-1", Addr: nodes[0].addrs[control.AddrLink]}}
	sub.SetBrokers(boot)
	pub.SetBrokers(boot)
	waitFor(t, "clients learn all 3 brokers from the ring", func() bool {
		return sub.Stats().Connected == 3 && pub.Stats().Connected == 3
	})

	// One channel per broker.
	owned := map[string]string{}
	for i := 0; len(owned) < 3; i++ {
		ch := "room/" + strconv.Itoa(i)
		if _, ok := owned[sub.Owner(ch)]; !ok {
			owned[sub.Owner(ch)] = ch
			sub.Subscribe(ch)
		}
	}
	for name, ch := range owned {
		n := nodes[name[len(name)-1]-'1']
		waitFor(t, "interest in "+ch, func() bool { return n.c.Server().Interest(ch) == 1 })
	}
	publish := func(ch string) error {
		res := make(chan error, 1)
		pub.Publish(ch, []byte(`"x"`), func(_ uint64, err error) { res <- err })
		return <-res
	}
	for _, ch := range owned {
		if err := publish(ch); err != nil {
			t.Fatal(err)
		}
	}

	// broker-2 dies without leaving (Stop = crash-like for the ring).
	victim := owned["broker-2"]
	start := time.Now()
	_ = nodes[1].c.Stop(context.Background())
	failed := 0
	waitFor(t, "publishing to broker-2's channel resumes", func() bool {
		if err := publish(victim); err != nil {
			failed++
			return false
		}
		return true
	})
	gap := time.Since(start)
	t.Logf("publish gap after a broker crash: %v (%d publishes failed meanwhile)", gap, failed)
	if sub.Owner(victim) == "broker-2" || sub.Stats().Brokers != 2 {
		t.Fatalf("ring change not applied: owner %s, stats %+v", sub.Owner(victim), sub.Stats())
	}
	// The subscriber's worker applies its own ring report, possibly a
	// moment after the publisher's: publish until one reaches it.
	waitFor(t, "delivery on the moved channel", func() bool {
		_ = publish(victim)
		mu.Lock()
		defer mu.Unlock()
		return len(got[victim]) >= 2
	})
	// The survivors' channels never moved.
	for _, name := range []string{"broker-1", "broker-3"} {
		if sub.Owner(owned[name]) != name {
			t.Fatalf("%s's channel moved to %s", name, sub.Owner(owned[name]))
		}
	}
}

func TestRingCrossHostUsesTCPLinks(t *testing.T) {
	dir := shortDir(t)
	a := startRingBroker(t, dir, "broker-1", 1, nil)
	b := startRingBroker(t, dir, "broker-1b", 1, func(c *configs.Config) { c.Cluster.Join = []string{a.addrs[control.AddrGossip]} })
	waitFor(t, "two-member ring", func() bool { return b.c.ring.NumMembers() == 2 && a.c.ring.NumMembers() == 2 })
	var link string
	for _, m := range a.c.ring.Members() {
		if strings.HasPrefix(m.Name, "broker-1b@") {
			link = m.Meta.Link
		}
	}
	if !strings.HasPrefix(link, "tcp:127.0.0.1:") {
		t.Fatalf("joined broker advertises link %q, want tcp", link)
	}
	var mu sync.Mutex
	n := 0
	c := ringClient(t, "w", func(string, []byte, uint64) { mu.Lock(); n++; mu.Unlock() })
	c.SetBrokers([]brokerclient.Endpoint{{Name: "x", Addr: link}})
	// Reports from the joined broker name both members.
	waitFor(t, "both brokers from the ring", func() bool { return c.Stats().Connected == 2 })
	c.Subscribe("c")
	waitFor(t, "interest", func() bool {
		return a.c.Server().Interest("c")+b.c.Server().Interest("c") == 1
	})
	res := make(chan error, 1)
	c.Publish("c", []byte("1"), func(_ uint64, err error) { res <- err })
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	waitFor(t, "delivery", func() bool { mu.Lock(); defer mu.Unlock(); return n == 1 })
}
