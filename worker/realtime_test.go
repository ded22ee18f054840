package worker

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gobwas/ws/wsutil"
	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/broker"
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/worker/netpoll"
)

var realtimeRules = []configs.ChannelRule{
	{Match: "hist/**", History: configs.History{Size: 100000}},
	{Match: "room/**", Presence: true, JoinLeave: true},
}

// startBroker runs one real broker in process with the channel rules.
func startBroker(t *testing.T) control.Topology {
	t.Helper()
	_, topo := startBrokerChild(t, realtimeRules)
	return topo
}

// startBrokerChild runs one real broker in process (no ring) with rules,
// and returns it and the topology that points workers at it.
func startBrokerChild(t *testing.T, rules []configs.ChannelRule) (*broker.Child, control.Topology) {
	t.Helper()
	cfg := configs.Default()
	cfg.Cluster.Gossip = "" // no ring: never the default port 7946
	cfg.Channels = rules
	js, _ := json.Marshal(cfg)
	b := broker.New(hclog.NewNullLogger())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := b.Start(ctx, control.StartParams{Role: control.RoleBroker, Name: "broker-1", Config: js, RunDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = b.Stop(ctx)
	})
	return b, control.Topology{Version: 1, Peers: []control.Peer{{Name: "broker-1", Role: control.RoleBroker, State: control.StateReady, Addrs: res.Addrs}}}
}

func withRules(c *configs.Config) { c.Channels = realtimeRules }

type wirePub struct {
	Event string `json:"event"`
	RID   int    `json:"rid"`
	Data  struct {
		Channel   string          `json:"channel"`
		Data      json.RawMessage `json:"data"`
		Offset    uint64          `json:"offset"`
		Epoch     string          `json:"epoch"`
		Recovered bool            `json:"recovered"`
		Join      json.RawMessage `json:"join"`
		Leave     json.RawMessage `json:"leave"`
	} `json:"data"`
}

func (c *wsClient) packet() wirePub {
	c.t.Helper()
	r := c.recvData()
	var p wirePub
	if err := json.Unmarshal([]byte(r), &p); err != nil {
		c.t.Fatalf("%s: %v", r, err)
	}
	return p
}

// TestRecoverySeamUnderLoad: while a socket on worker-2 publishes without
// pause, a socket on worker-1 reads, leaves, and a new socket on the same
// worker (which keeps the channel through a third socket, the harder case)
// recovers from the last offset it saw: it gets every later offset exactly
// once, in order, across the seam between recovered and live messages.
func TestRecoverySeamUnderLoad(t *testing.T) {
	topo := startBroker(t)
	_, _, addr1 := startNamedChild(t, "worker-1", topo, withRules)
	_, _, addr2 := startNamedChild(t, "worker-2", topo, withRules)
	const ch = "hist/seam"

	keep := dialWS(t, addr1)
	keep.handshake("")
	keep.send(`{"event":"#subscribe","data":{"channel":"` + ch + `"},"cid":2}`)
	if p := keep.packet(); p.RID != 2 {
		t.Fatalf("keep: subscribe ack %+v", p)
	}
	// keep reads everything, so it stays subscribed (not closed as a slow
	// consumer) and worker-1 keeps its interest in the channel throughout.
	_ = keep.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	var kwg sync.WaitGroup
	kwg.Add(1)
	go func() {
		defer kwg.Done()
		for i := 0; i < 1000000; i++ {
			if _, _, err := wsutil.ReadServerData(keep.c); err != nil {
				return
			}
		}
	}()
	defer kwg.Wait()
	defer keep.c.Close()
	a := dialWS(t, addr1)
	a.handshake("")
	a.send(`{"event":"#subscribe","data":{"channel":"` + ch + `"},"cid":2}`)
	if p := a.packet(); p.RID != 2 {
		t.Fatalf("a: subscribe ack %+v", p)
	}

	pub := dialWS(t, addr2)
	pub.handshake("")
	// worker-2's broker link comes up asynchronously: wait for an
	// acknowledged publish (to another channel) before the load starts.
	cid := 100
	waitFor(t, 5*time.Second, "worker-2 publishing", func() bool {
		cid++
		pub.send(fmt.Sprintf(`{"event":"#publish","data":{"channel":"hist/probe","data":0},"cid":%d}`, cid))
		return pub.recvData() == fmt.Sprintf(`{"rid":%d}`, cid)
	})
	stop := make(chan struct{})
	published := make(chan int, 1)
	// Flow control: the publisher stays at most window messages ahead of
	// the test's reader, so the reading socket (4096-message send queue)
	// is never closed as a slow consumer on a loaded machine.
	const window = 2000
	credits := make(chan struct{}, window)
	for range window {
		credits <- struct{}{}
	}
	credit := func() {
		select {
		case credits <- struct{}{}:
		default:
		}
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		n := 0
		defer func() { published <- n }()
		for n < 20000 {
			select {
			case <-stop:
				return
			case <-credits:
			}
			// Transmits: no acks to read back; the worker publishes a
			// socket's messages in order.
			if err := writeText(pub, fmt.Sprintf(`{"event":"#publish","data":{"channel":"%s","data":%d}}`, ch, n+1)); err != nil {
				return
			}
			n++
		}
	}()
	var last wirePub
	for i := 0; i < 200; i++ {
		last = a.packet()
		credit()
		if last.Event != "#publish" || last.Data.Offset == 0 || last.Data.Epoch == "" {
			t.Fatalf("a: %+v", last)
		}
	}
	a.c.Close()

	b := dialWS(t, addr1)
	b.handshake("")
	b.send(fmt.Sprintf(`{"event":"#subscribe","data":{"channel":"%s","data":{"recover":{"offset":%d,"epoch":"%s"}}},"cid":2}`, ch, last.Data.Offset, last.Data.Epoch))
	ack := b.packet()
	if ack.RID != 2 || !ack.Data.Recovered {
		t.Fatalf("b: recovering subscribe ack %+v", ack)
	}
	if p := b.packet(); p.Event != "#recovery" || !p.Data.Recovered {
		t.Fatalf("b: want #recovery, got %+v", p)
	}
	want := last.Data.Offset + 1
	// Read well past the seam while publishing goes on, then stop and read
	// up to the last published offset.
	for i := 0; i < 500; i++ {
		p := b.packet()
		credit()
		if p.Data.Offset != want {
			t.Fatalf("b: offset %d, want %d (gap or duplicate)", p.Data.Offset, want)
		}
		want++
	}
	close(stop)
	wg.Wait()
	n := uint64(<-published)
	for want <= n {
		p := b.packet()
		if p.Data.Offset != want || string(p.Data.Data) != fmt.Sprint(want) {
			t.Fatalf("b: offset %d data %s, want %d", p.Data.Offset, p.Data.Data, want)
		}
		want++
	}
	t.Logf("recovered from %d, read through %d live without gap or duplicate", last.Data.Offset, n)
}

// writeText writes without failing the test (for a writer goroutine).
func writeText(c *wsClient, s string) error {
	return wsutil.WriteClientText(c.c, []byte(s))
}

// TestPresenceEvents: subscribers of a join_leave channel are told of each
// join and leave (#presence), with the worker that hosts the connection.
func TestPresenceEvents(t *testing.T) {
	topo := startBroker(t)
	_, _, addr := startNamedChild(t, "worker-1", topo, withRules)
	a := dialWS(t, addr)
	a.handshake("")
	a.send(`{"event":"#subscribe","data":{"channel":"room/1"},"cid":2}`)
	if p := a.packet(); p.RID != 2 {
		t.Fatalf("ack %+v", p)
	}
	if p := a.packet(); p.Event != "#presence" || !strings.Contains(string(p.Data.Join), `"worker":"worker-1"`) {
		t.Fatalf("a's own join: %+v", p)
	}
	b := dialWS(t, addr)
	hs := b.handshake("")
	var h struct {
		Data struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	_ = json.Unmarshal([]byte(hs), &h)
	b.send(`{"event":"#subscribe","data":{"channel":"room/1"},"cid":2}`)
	if p := a.packet(); p.Event != "#presence" || !strings.Contains(string(p.Data.Join), `"conn":"`+h.Data.ID+`"`) {
		t.Fatalf("b's join seen by a: %+v", p)
	}
	b.send(`{"event":"#unsubscribe","data":"room/1"}`)
	if p := a.packet(); p.Event != "#presence" || !strings.Contains(string(p.Data.Leave), `"conn":"`+h.Data.ID+`"`) {
		t.Fatalf("b's leave seen by a: %+v", p)
	}
}

// TestInternalChannelsRefused: clients can neither subscribe nor publish to
// "#" channels (the cluster's control channels).
func TestInternalChannelsRefused(t *testing.T) {
	_, _, addr := startNamedChild(t, "worker-1", control.Topology{}, nil)
	c := dialWS(t, addr)
	c.handshake("")
	c.send(`{"event":"#subscribe","data":{"channel":"#user/alice"},"cid":2}`)
	if r := c.recvData(); !strings.Contains(r, `"rid":2,"error"`) || !strings.Contains(r, "InvalidActionError") {
		t.Fatalf("subscribe #user/alice: %s", r)
	}
	c.send(`{"event":"#publish","data":{"channel":"#bans","data":{"op":"ban"}},"cid":3}`)
	if r := c.recvData(); !strings.Contains(r, `"rid":3,"error"`) || !strings.Contains(r, "InvalidActionError") {
		t.Fatalf("publish #bans: %s", r)
	}
}

// TestDeliverWithPositionFramesOnce: a history channel's publish carries
// offset and epoch and is still framed once for every subscriber (one
// allocation: the frame).
func TestDeliverWithPositionFramesOnce(t *testing.T) {
	e, err := NewEngine(EngineConfig{Name: "w", Channels: realtimeRules, Frame: netpoll.AppendTextFrame, ErrQueueFull: netpoll.ErrQueueFull})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	conns := make([]*nullConn, 100)
	for i := range conns {
		conns[i] = &nullConn{}
		s := e.Open(conns[i])
		e.Message(s, []byte(`{"event":"#handshake","data":{},"cid":1}`))
		e.Message(s, []byte(`{"event":"#subscribe","data":{"channel":"hist/a"},"cid":2}`))
	}
	data := []byte(`{"text":"hi"}`)
	allocs := testing.AllocsPerRun(100, func() { e.DeliverPub("hist/a", data, 42, 1234567) })
	if allocs > 1 {
		t.Fatalf("%.1f allocations per delivery to 100 subscribers; want 1 (the shared frame)", allocs)
	}
	if got := string(appendPublishPos(nil, "hist/a", data, 42, 1234567)); got != `{"event":"#publish","data":{"channel":"hist/a","data":{"text":"hi"},"offset":42,"epoch":"qglj"}}` {
		t.Fatalf("frame payload %s", got)
	}
}
