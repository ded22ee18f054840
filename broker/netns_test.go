package broker

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/proto/control"
)

// netnsLab builds three "hosts": network namespaces joined by a bridge in
// the root namespace (which the test's clients use to reach them).
type netnsLab struct {
	bridge string
	nss    []string
	ips    []string
}

func run(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func newNetnsLab(t *testing.T, hosts int) *netnsLab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED, not passed: network namespaces need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("SKIPPED, not passed: the ip command is missing")
	}
	id := os.Getpid() % 200
	lab := &netnsLab{bridge: fmt.Sprintf("shbkbr%d", id)}
	t.Cleanup(func() {
		for _, ns := range lab.nss {
			_ = run("ip", "netns", "del", ns)
		}
		_ = run("ip", "link", "del", lab.bridge)
	})
	subnet := fmt.Sprintf("10.213.%d", id)
	if err := run("ip", "link", "add", lab.bridge, "type", "bridge"); err != nil {
		t.Skipf("SKIPPED, not passed: the kernel refused a bridge: %v", err)
	}
	steps := [][]string{
		{"ip", "addr", "add", subnet + ".1/24", "dev", lab.bridge},
		{"ip", "link", "set", lab.bridge, "up"},
	}
	for i := range hosts {
		ns := fmt.Sprintf("shbk%d-%d", id, i)
		veth := fmt.Sprintf("shbkv%d-%d", id, i)
		ip := fmt.Sprintf("%s.%d", subnet, i+2)
		lab.nss = append(lab.nss, ns)
		lab.ips = append(lab.ips, ip)
		steps = append(steps,
			[]string{"ip", "netns", "add", ns},
			[]string{"ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns},
			[]string{"ip", "link", "set", veth, "master", lab.bridge},
			[]string{"ip", "link", "set", veth, "up"},
			[]string{"ip", "-n", ns, "addr", "add", ip + "/24", "dev", "eth0"},
			[]string{"ip", "-n", ns, "link", "set", "eth0", "up"},
			[]string{"ip", "-n", ns, "link", "set", "lo", "up"},
		)
	}
	for _, s := range steps {
		if err := run(s...); err != nil {
			t.Skipf("SKIPPED, not passed: the kernel refused the namespace setup: %v", err)
		}
	}
	return lab
}

// Three hosts, one broker each, joined by cluster.join over real (virtual)
// network interfaces: links go over TCP to the advertised addresses,
// channels spread over all three, and when host B's broker is SIGKILLed the
// others take its channels while A↔C keeps working.
func TestNetnsThreeHosts(t *testing.T) {
	if testing.Short() {
		t.Skip("builds network namespaces")
	}
	lab := newNetnsLab(t, 3)
	dir := shortDir(t)
	var procs []*brokerProc
	for i, ns := range lab.nss {
		gossip := lab.ips[i] + ":7946"
		var join []string
		if i > 0 {
			join = []string{lab.ips[0] + ":7946"}
		}
		env := []string{helperEnv + "_GOSSIP=" + gossip, helperEnv + "_CLUSTER_JOIN=" + strings.Join(join, ",")}
		if i == 0 {
			env[1] = helperEnv + "_CLUSTER_JOIN=" + lab.ips[1] + ":7946" // A retries B until B exists
		}
		procs = append(procs, startBrokerProcIn(t, ns, dir, "broker-"+string(rune('a'+i)), nil, env...))
	}

	var mu sync.Mutex
	got := map[string]map[string]int{} // client → channel → count
	mk := func(name string) *brokerclient.Client {
		got[name] = map[string]int{}
		return ringClient(t, name, func(ch string, _ []byte, _ uint64) {
			mu.Lock()
			got[name][ch]++
			mu.Unlock()
		})
	}
	// One "worker" per host; each bootstraps from its own host's broker
	// (over the unix socket, as a local worker would) and learns the rest
	// from the ring.
	clients := []*brokerclient.Client{mk("worker-a"), mk("worker-b"), mk("worker-c")}
	for i, c := range clients {
		c.SetBrokers([]brokerclient.Endpoint{{Name: "boot", Addr: procs[i].addrs[control.AddrLink]}})
	}
	for i, c := range clients {
		waitFor(t, "worker "+strconv.Itoa(i)+" linked to all 3 brokers over TCP", func() bool {
			bs := c.Brokers()
			if len(bs) != 3 || c.Stats().Connected != 3 {
				return false
			}
			for _, b := range bs {
				if !strings.HasPrefix(b.Addr, "tcp:10.213.") {
					return false
				}
			}
			return true
		})
	}
	// A channel per broker; B and C subscribe to all of them.
	owned := map[string]string{}
	for i := 0; len(owned) < 3; i++ {
		ch := "room/" + strconv.Itoa(i)
		if _, ok := owned[clients[0].Owner(ch)]; !ok {
			owned[clients[0].Owner(ch)] = ch
		}
	}
	for _, ch := range owned {
		clients[1].Subscribe(ch)
		clients[2].Subscribe(ch)
	}
	publish := func(ch string) error {
		res := make(chan error, 1)
		clients[0].Publish(ch, []byte(`"hi"`), func(_ uint64, err error) { res <- err })
		return <-res
	}
	delivered := func(client, ch string) int {
		mu.Lock()
		defer mu.Unlock()
		return got[client][ch]
	}
	for _, ch := range owned {
		waitFor(t, "A's publish on "+ch+" reaches B and C", func() bool {
			_ = publish(ch)
			return delivered("worker-b", ch) > 0 && delivered("worker-c", ch) > 0
		})
	}

	// Kill host B's broker.
	var victimBroker string
	for name := range owned {
		if strings.HasPrefix(name, "broker-b@") {
			victimBroker = name
		}
	}
	if err := procs[1].cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	victim := owned[victimBroker]
	waitFor(t, "publishing to B's channel resumes", func() bool { return publish(victim) == nil })
	gap := time.Since(start)
	for name, ch := range owned {
		if name == victimBroker {
			continue
		}
		before := delivered("worker-c", ch)
		waitFor(t, "A↔C on "+ch+" after B died", func() bool {
			_ = publish(ch)
			return delivered("worker-c", ch) > before
		})
	}
	before := delivered("worker-c", victim)
	waitFor(t, "B's old channel delivered to C via its new owner", func() bool {
		_ = publish(victim)
		return delivered("worker-c", victim) > before
	})
	t.Logf("3 hosts: SIGKILL of host B's broker; publishes to its channel failed for %v, now owned by %s", gap, clients[0].Owner(victim))
}
