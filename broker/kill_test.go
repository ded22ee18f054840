package broker

import (
	"bufio"
	"context"
	"encoding/json"
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
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/proto/control"
)

// helperEnv makes the test binary run one broker process instead of tests
// (see TestMain): the SIGKILL test needs brokers it can really kill.
const helperEnv = "SHOAL_BROKER_HELPER"

// runHelperBroker runs a broker as its own process: it prints its addresses
// as one JSON line on stdout, joins the gossip addresses in
// SHOAL_BROKER_HELPER_JOIN, and runs until stdin closes or it is killed.
func runHelperBroker() int {
	name, dir := os.Getenv(helperEnv), os.Getenv(helperEnv+"_DIR")
	cfg := configs.Default()
	cfg.Cluster.Gossip = "127.0.0.1:0"
	cfg.Cluster.Brokers = 3
	if g := os.Getenv(helperEnv + "_GOSSIP"); g != "" {
		cfg.Cluster.Gossip = g // a node of its own (netns test): cross-host mode
		cfg.Cluster.Brokers = 1
	}
	if extra := os.Getenv(helperEnv + "_CFG"); extra != "" {
		// Config overrides (JSON over the defaults): channel rules, storage.
		if err := json.Unmarshal([]byte(extra), &cfg); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	if j := os.Getenv(helperEnv + "_CLUSTER_JOIN"); j != "" {
		cfg.Cluster.Join = strings.Split(j, ",")
	}
	b, _ := json.Marshal(cfg)
	c := New(nil)
	res, err := c.Start(context.Background(), control.StartParams{Role: control.RoleBroker, Name: name, Index: 1, RunDir: dir, Config: b})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var topo control.Topology
	for i, g := range strings.Split(os.Getenv(helperEnv+"_JOIN"), ",") {
		if g != "" {
			topo.Peers = append(topo.Peers, control.Peer{Name: "peer-" + strconv.Itoa(i), Role: control.RoleBroker, State: control.StateReady, Addrs: map[string]string{control.AddrGossip: g}})
		}
	}
	_ = c.SetTopology(context.Background(), topo)
	out, _ := json.Marshal(res.Addrs)
	fmt.Println(string(out))
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n') // until the test closes stdin
	_ = c.Stop(context.Background())
	return 0
}

type brokerProc struct {
	cmd   *exec.Cmd
	addrs map[string]string
}

func startBrokerProc(t *testing.T, dir, name string, join []string, extraEnv ...string) *brokerProc {
	t.Helper()
	return startBrokerProcIn(t, "", dir, name, join, extraEnv...)
}

// startBrokerProcIn runs the helper broker, inside network namespace ns
// when ns is not empty.
func startBrokerProcIn(t *testing.T, ns, dir, name string, join []string, extraEnv ...string) *brokerProc {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	if ns != "" {
		// ip execs the test binary after entering the namespace: same pid,
		// so Pdeathsig and Kill still reach the broker.
		cmd = exec.Command("ip", "netns", "exec", ns, exe, "-test.run=^$")
	}
	cmd.Env = append(os.Environ(), helperEnv+"="+name, helperEnv+"_DIR="+dir, helperEnv+"_JOIN="+strings.Join(join, ","))
	cmd.Env = append(cmd.Env, extraEnv...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("broker process %s: %v", name, err)
	}
	p := &brokerProc{cmd: cmd}
	if err := json.Unmarshal([]byte(line), &p.addrs); err != nil {
		t.Fatalf("broker process %s printed %q", name, line)
	}
	return p
}

// TestSIGKILLGap kills a broker process and measures how long publishing to
// its channels fails before the ring (not the test) moves them. The figure
// is logged for docs/brokers.md.
func TestSIGKILLGap(t *testing.T) {
	if testing.Short() {
		t.Skip("starts broker processes")
	}
	dir := shortDir(t)
	p1 := startBrokerProc(t, dir, "broker-1", nil)
	p2 := startBrokerProc(t, dir, "broker-2", []string{p1.addrs[control.AddrGossip]})
	p3 := startBrokerProc(t, dir, "broker-3", []string{p1.addrs[control.AddrGossip]})
	_ = p3

	var mu sync.Mutex
	got := map[string]int{}
	sub := ringClient(t, "worker-1", func(ch string, _ []byte, _ uint64) { mu.Lock(); got[ch]++; mu.Unlock() })
	pub := ringClient(t, "worker-2", nil)
	boot := []brokerclient.Endpoint{{Name: "broker-1", Addr: p1.addrs[control.AddrLink]}}
	sub.SetBrokers(boot)
	pub.SetBrokers(boot)
	waitFor(t, "both clients linked to 3 brokers via the ring", func() bool {
		return sub.Stats().Connected == 3 && pub.Stats().Connected == 3
	})
	var victim string
	for i := 0; victim == ""; i++ {
		if ch := "room/" + strconv.Itoa(i); sub.Owner(ch) == "broker-2" {
			victim = ch
		}
	}
	sub.Subscribe(victim)
	publish := func() error {
		res := make(chan error, 1)
		pub.Publish(victim, []byte("1"), func(_ uint64, err error) { res <- err })
		return <-res
	}
	waitFor(t, "first delivery", func() bool {
		_ = publish()
		mu.Lock()
		defer mu.Unlock()
		return got[victim] > 0
	})

	if err := p2.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	failed := 0
	deadline := start.Add(10 * time.Second)
	for publish() != nil {
		failed++
		if time.Now().After(deadline) {
			t.Fatal("publishing never resumed after SIGKILL")
		}
		time.Sleep(time.Millisecond) // one attempt per ms: the gap's resolution
	}
	gap := time.Since(start)
	mu.Lock()
	before := got[victim]
	mu.Unlock()
	// The subscriber's worker moves its interest on its own ring report,
	// which may come a little after the publisher's.
	waitFor(t, "delivery via the new owner", func() bool {
		_ = publish()
		mu.Lock()
		defer mu.Unlock()
		return got[victim] > before
	})
	t.Logf("SIGKILL of the owning broker: publishes failed for %v (%d attempts), then resumed on %s; deliveries resumed after %v",
		gap, failed, pub.Owner(victim), time.Since(start))
}
