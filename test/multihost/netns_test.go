package multihost

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/client"
)

// lab is a set of "hosts": network namespaces whose eth0 is one end of a
// veth pair; the other ends sit on a bridge in the root namespace, which
// has an address on the same subnet, so the test's clients (in the root
// namespace) reach every host's public port directly.
type lab struct {
	bridge string
	hosts  []host
	veths  []string // root ends, one per host
}

type host struct {
	ns string // namespace name (unique per test process)
	ip string // address of its eth0
}

func sh(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// labSeq makes names unique across runs in one process (-count=N): a
// deleted namespace is torn down by the kernel asynchronously, so its
// names may linger for a moment after the previous run.
var labSeq atomic.Int32

// refused tells a kernel or permission refusal (skip) from a real failure.
func refused(err error) bool {
	s := err.Error()
	for _, w := range []string{"Operation not permitted", "Permission denied", "not supported", "Not supported", "Unknown device type", "Invalid argument"} {
		if strings.Contains(s, w) {
			return true
		}
	}
	return false
}

// freeSubnet picks a 10.231.N /24 that no interface of the root namespace
// uses yet, starting at N = seed mod 250, so concurrent runs (several test
// processes, other engineers' runs) do not share a subnet.
func freeSubnet(seed int) string {
	out, _ := exec.Command("ip", "-o", "-4", "addr", "show").CombinedOutput()
	used := string(out)
	for i := range 250 {
		sn := fmt.Sprintf("10.231.%d", (seed+i)%250)
		if !strings.Contains(used, sn+".") {
			return sn
		}
	}
	return fmt.Sprintf("10.231.%d", seed%250)
}

func newLab(t *testing.T, n int) *lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED, NOT PASSED: network namespaces need root (CAP_NET_ADMIN); this test binary is not root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("SKIPPED, NOT PASSED: the ip command (iproute2) is missing")
	}
	pid, seq := os.Getpid(), int(labSeq.Add(1)-1)
	id := fmt.Sprintf("%d%c", pid, 'a'+seq%26) // bridge and veth names stay within 15 bytes
	l := &lab{bridge: "shmh" + id}
	subnet := freeSubnet(pid + seq)
	fail := func(what string, err error) {
		t.Helper()
		if refused(err) {
			t.Skipf("SKIPPED, NOT PASSED: the kernel refused %s: %v", what, err)
		}
		t.Fatalf("%s: %v", what, err)
	}
	// Registered before anything exists, so it runs (last) even when a
	// step below fails: first every process still inside a namespace is
	// killed (deleting a namespace's name does not end its processes),
	// then the veths (each takes its peer along at once), the namespaces
	// and the bridge are deleted.
	t.Cleanup(func() {
		for _, h := range l.hosts {
			if left := killNamespace(h.ns, 5*time.Second); len(left) > 0 {
				t.Errorf("processes still in namespace %s after SIGKILL: %v", h.ns, left)
			}
		}
		for _, v := range l.veths {
			_ = sh("ip", "link", "del", v)
		}
		for _, h := range l.hosts {
			if err := sh("ip", "netns", "del", h.ns); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
		if err := sh("ip", "link", "del", l.bridge); err != nil && !strings.Contains(err.Error(), "Cannot find device") {
			t.Errorf("cleanup: %v", err)
		}
	})
	if err := sh("ip", "link", "add", l.bridge, "type", "bridge"); err != nil {
		fail("a bridge", err)
	}
	steps := [][]string{
		{"ip", "addr", "add", subnet + ".1/24", "dev", l.bridge},
		{"ip", "link", "set", l.bridge, "up"},
	}
	for i := range n {
		h := host{ns: fmt.Sprintf("shoal-mh-%s-%c", id, 'a'+i), ip: fmt.Sprintf("%s.%d", subnet, i+2)}
		veth := fmt.Sprintf("shmh%s%d", id, i)
		if err := sh("ip", "netns", "add", h.ns); err != nil {
			fail("a network namespace", err)
		}
		l.hosts = append(l.hosts, h)
		l.veths = append(l.veths, veth)
		steps = append(steps,
			[]string{"ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", h.ns},
			[]string{"ip", "link", "set", veth, "master", l.bridge},
			[]string{"ip", "link", "set", veth, "up"},
			[]string{"ip", "-n", h.ns, "addr", "add", h.ip + "/24", "dev", "eth0"},
			[]string{"ip", "-n", h.ns, "link", "set", "eth0", "up"},
			[]string{"ip", "-n", h.ns, "link", "set", "lo", "up"},
		)
	}
	for _, s := range steps {
		if err := sh(s...); err != nil {
			fail("the namespace network setup", err)
		}
	}
	return l
}

// nsIno identifies a network namespace (device and inode of its nsfs file).
type nsIno struct{ dev, ino uint64 }

func inoOf(path string) (nsIno, bool) {
	fi, err := os.Stat(path)
	if err != nil {
		return nsIno{}, false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nsIno{}, false
	}
	return nsIno{uint64(st.Dev), st.Ino}, true
}

// pidsIn lists the processes whose network namespace is ns.
func pidsIn(ns string) []int {
	want, ok := inoOf("/var/run/netns/" + ns)
	if !ok {
		return nil
	}
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if got, ok := inoOf("/proc/" + e.Name() + "/ns/net"); ok && got == want && alive(pid) {
			out = append(out, pid)
		}
	}
	return out
}

// alive reports whether any thread of pid still runs (a zombie whose
// parent has not reaped it yet has exited).
func alive(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, tk := range tasks {
		b, err := os.ReadFile(dir + "/" + tk.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 || i+2 >= len(s) || (s[i+2] != 'Z' && s[i+2] != 'X') {
			return true
		}
	}
	return false
}

// killNamespace SIGKILLs every process in ns until none is left or the
// timeout passes, and returns those still there.
func killNamespace(ns string, timeout time.Duration) []int {
	deadline := time.Now().Add(timeout)
	for {
		left := pidsIn(ns)
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		for _, p := range left {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// dialIn dials from inside network namespace ns: a goroutine locks itself
// to an OS thread, moves that thread into ns and dials; the socket stays in
// ns for its whole life, whichever thread later uses it. The thread is
// never unlocked, so the runtime throws it away when the goroutine ends
// instead of reusing a thread that sits in another namespace.
func dialIn(ctx context.Context, ns, network, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open("/var/run/netns/" + ns)
		if err != nil {
			ch <- result{nil, err}
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			ch <- result{nil, fmt.Errorf("setns %s: %w", ns, err)}
			return
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

// node is one `shoal run` inside a namespace.
type node struct {
	t       *testing.T
	label   string // "A", "B", "C"
	host    host
	brokers int
	extra   string // YAML appended to the node's config
	// signalled: the tree was SIGKILLed once; never again, since the
	// reaped pids can be reused.
	signalled bool
	dir       string
	cfg       string
	logf      string
	cmd       *exec.Cmd
	out       *syncBuffer
	waited    chan error
	admin     *http.Client // reaches 127.0.0.1:8001 inside the namespace
}

const (
	gossipPort = 7946
	publicPort = 8000
	adminAddr  = "127.0.0.1:8001" // loopback of the node's own namespace
)

func (n *node) gossip() string { return net.JoinHostPort(n.host.ip, strconv.Itoa(gossipPort)) }
func (n *node) public() string { return net.JoinHostPort(n.host.ip, strconv.Itoa(publicPort)) }
func (n *node) url() string    { return "ws://" + n.public() + "/socketcluster/" }

// ringNames are the names this node's brokers have in the ring
// (docs/brokers.md: broker i binds the gossip port + i − 1 and, with
// cluster.join set, is named broker-i@<its gossip host:port>).
func (n *node) ringNames(join []string) []string {
	var out []string
	for i := 1; i <= n.brokers; i++ {
		name := "broker-" + strconv.Itoa(i)
		if len(join) > 0 {
			name += "@" + net.JoinHostPort(n.host.ip, strconv.Itoa(gossipPort+i-1))
		}
		out = append(out, name)
	}
	return out
}

func writeNodeConfig(t *testing.T, dir string, n *node, join []string) {
	t.Helper()
	js := make([]string, len(join))
	for i, j := range join {
		js[i] = strconv.Quote(j)
	}
	cfg := fmt.Sprintf(`cluster:
  workers: 1
  brokers: %d
  balancers: 1
  gossip: %s
  join: [%s]
  restart: {backoff_min: 100ms, backoff_max: 1s}
listen:
  public: %s
  admin: %s
storage:
  dir: %s
log:
  level: info
`, n.brokers, n.gossip(), strings.Join(js, ", "), n.public(), adminAddr, filepath.Join(dir, "data")) + n.extra
	n.cfg = filepath.Join(dir, "shoal.yaml")
	n.logf = filepath.Join(dir, "data", "log", "shoal.log")
	if err := os.WriteFile(n.cfg, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
}

// startNode runs `shoal run` in h's namespace. Node C is given its join
// address with the --join flag instead of cluster.join, so both ways are
// exercised.
func startNode(t *testing.T, label string, h host, join []string, brokers int, extra string) *node {
	t.Helper()
	n := &node{t: t, label: label, host: h, brokers: brokers, extra: extra, dir: t.TempDir(), out: &syncBuffer{}, waited: make(chan error, 1)}
	byFlag := label == "C" && len(join) > 0
	if byFlag {
		writeNodeConfig(t, n.dir, n, nil)
	} else {
		writeNodeConfig(t, n.dir, n, join)
	}
	ns := h.ns
	n.admin = &http.Client{
		Timeout: 3 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return dialIn(ctx, ns, network, addr)
			},
		},
	}
	// `ip netns exec` enters the namespace and execs shoal, so the pid we
	// get is the supervisor's.
	args := []string{"netns", "exec", ns, binary(t), "run", "-c", n.cfg}
	if byFlag {
		args = append(args, "--join", strings.Join(join, ","))
	}
	n.cmd = exec.Command("ip", args...)
	n.cmd.Stdout, n.cmd.Stderr = n.out, n.out
	if err := n.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { n.waited <- n.cmd.Wait() }()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("node %s (%s) output:\n%s\nlast log lines:\n%s", n.label, n.host.ip, n.out, tailLog(n.logf, 40))
		}
		n.kill()
		select {
		case <-n.waited:
		case <-time.After(10 * time.Second):
			t.Errorf("node %s: shoal run not reaped 10 s after SIGKILL", n.label)
		}
	})
	return n
}

// kill SIGKILLs the node's whole process tree and waits until no process
// is left in its namespace.
func (n *node) kill() []int {
	tree, _ := n.signalTree()
	n.waitGone()
	return tree
}

// signalTree SIGKILLs the supervisor (first, so it restarts nothing) and
// every descendant; it returns the pids and when the last signal was sent.
func (n *node) signalTree() ([]int, time.Time) {
	if n.signalled {
		return nil, time.Now() // its pids may belong to others by now
	}
	n.signalled = true
	pid := n.cmd.Process.Pid
	tree := append([]int{pid}, descendants(pid)...)
	for _, p := range tree {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	return tree, time.Now()
}

// waitGone kills whatever is still in the node's namespace (a child forked
// while the tree was being walked) until nothing is left.
func (n *node) waitGone() {
	if left := killNamespace(n.host.ns, 5*time.Second); len(left) > 0 {
		n.t.Errorf("node %s: processes %v still alive 5 s after SIGKILL", n.label, left)
	}
}

func (n *node) exited() bool {
	select {
	case err := <-n.waited:
		n.waited <- err
		return true
	default:
		return false
	}
}

func (n *node) table() (clusterInfo, error) {
	var ci clusterInfo
	resp, err := n.admin.Get("http://" + adminAddr + "/api/cluster")
	if err != nil {
		return ci, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return ci, fmt.Errorf("GET /api/cluster: %s", resp.Status)
	}
	return ci, json.NewDecoder(resp.Body).Decode(&ci)
}

// ringAt returns when every broker of this node had reported a ring of
// want brokers after since (the latest of their first "ring changed" log
// lines saying so).
func (n *node) ringAt(want int, since time.Time) (time.Time, bool) {
	first := map[string]time.Time{}
	for _, l := range readLog(n.logf) {
		if l.Msg == "ring changed" && l.Brokers == want && strings.HasPrefix(l.Proc, "broker-") && !l.Time.Before(since) {
			if _, ok := first[l.Proc]; !ok {
				first[l.Proc] = l.Time
			}
		}
	}
	var last time.Time
	for i := 1; i <= n.brokers; i++ {
		at, ok := first["broker-"+strconv.Itoa(i)]
		if !ok {
			return time.Time{}, false
		}
		if at.After(last) {
			last = at
		}
	}
	return last, true
}

// pickChannels finds one channel owned by each ring member, by the
// workers' rendezvous rule (brokerclient.Owner).
func pickChannels(t *testing.T, names []string) []string {
	t.Helper()
	out := make([]string, len(names))
	found := 0
	for i := 0; found < len(names) && i < 10000; i++ {
		ch := "mh/room-" + strconv.Itoa(i)
		owner := brokerclient.Owner(names, ch)
		for j, nm := range names {
			if nm == owner && out[j] == "" {
				out[j] = ch
				found++
			}
		}
	}
	if found < len(names) {
		t.Fatalf("no channel found for every broker of %v", names)
	}
	return out
}

type stamp struct {
	N int64  `json:"n"`
	T int64  `json:"t"`           // publish time, unix ns
	P string `json:"p,omitempty"` // phase of the test that published it
}

// layout says how many brokers each node runs and in which order the
// nodes start.
type layout struct {
	brokers [3]int
	order   int  // together, seedFirst or seedLast
	returns bool // restart B after its death and check it rejoins
	// partition cuts node `cut` off (its veth down) instead of killing
	// B, then heals the cut and checks that the ring and delivery come
	// back.
	partition bool
	cut       int           // 0 = A, 1 = B
	cutFor    time.Duration // keep the cut at least this long
	ringWait  time.Duration
	// secret runs every node with the same cluster secret: gossip
	// encrypted, links over TLS with the secret's proofs.
	secret bool
	// history gives the test's channels history, so that a returning
	// broker takes its channels' history back from its peers (hand-back)
	// over the links.
	history bool
}

// clusterSecret is the secret of the layouts with secret set.
const clusterSecret = "multihost test cluster secret"

// checkSecured asserts that every broker of every node secured its gossip
// and TCP links with the cluster secret, and that no link failed to.
func checkSecured(t *testing.T, nodes []*node) {
	t.Helper()
	for _, n := range nodes {
		secured := map[string]bool{}
		for _, l := range readLog(n.logf) {
			switch {
			case l.Msg == "gossip and TCP links secured with the cluster secret":
				secured[l.Proc] = true
			case strings.Contains(l.Msg, "cluster secret") || strings.Contains(l.Msg, "securing the broker link"):
				t.Errorf("node %s: %s: %s", n.label, l.Proc, l.Msg)
			}
		}
		for i := 1; i <= n.brokers; i++ {
			if !secured["broker-"+strconv.Itoa(i)] {
				t.Errorf("node %s: broker-%d did not secure its gossip and links", n.label, i)
			}
		}
	}
}

const (
	together  = iota // A, B and C started at once
	seedFirst        // A ready before B and C start (the usual operator order)
	seedLast         // B and C first; A once B's own brokers have met
)

// TestThreeHosts runs three nodes, each in its own network namespace (its
// own interface, address, loopback and ports) with one worker and one
// broker, joined by cluster.join to the first node. A publish on node A
// reaches subscribers on B and C; then node B's whole process tree is
// SIGKILLed and A→C keeps delivering on every channel, including the
// channel B's broker owned.
func TestThreeHosts(t *testing.T) { threeHosts(t, layout{brokers: [3]int{1, 1, 1}}) }

// TestThreeHostsTwoBrokersOnB is the same with two brokers on node B
// (gossip ports 7946 and 7947 by the port rule): a ring of 4 that loses
// two members at once when B dies. A starts first (see the next test).
func TestThreeHostsTwoBrokersOnB(t *testing.T) {
	threeHosts(t, layout{brokers: [3]int{1, 2, 1}, order: seedFirst})
}

// TestThreeHostsSeedStartsLast: B, with two brokers, starts before the
// node its cluster.join names. B's brokers find each other through the
// port rule, and B must still join A's ring once A is up.
func TestThreeHostsSeedStartsLast(t *testing.T) {
	threeHosts(t, layout{brokers: [3]int{1, 2, 1}, order: seedLast, ringWait: 15 * time.Second})
}

// TestThreeHostsPartitionHeals cuts node B off the network for 7 s (its
// veth down, processes alive; longer than memberlist's 5 s
// GossipToTheDeadTime, so only a new join can heal it): A and C drop B and
// keep working; once the link is back, B rejoins and A→B,C delivery
// resumes on the same client connections. Every node has the cluster
// secret: the rejoin goes through encrypted gossip, the links over TLS.
func TestThreeHostsPartitionHeals(t *testing.T) {
	threeHosts(t, layout{brokers: [3]int{1, 1, 1}, partition: true, cut: 1, cutFor: 7 * time.Second, secret: true})
}

// TestThreeHostsPartitionHealsTwoBrokersOnB is the same with two brokers
// on B, which are never alone and so (today) never join again.
func TestThreeHostsPartitionHealsTwoBrokersOnB(t *testing.T) {
	threeHosts(t, layout{brokers: [3]int{1, 2, 1}, order: seedFirst, partition: true, cut: 1, cutFor: 7 * time.Second, ringWait: 15 * time.Second})
}

// TestThreeHostsPartitionHealsSeedCut cuts off node A, the one the others
// joined and which itself has no cluster.join: on the far side of the cut
// B and C are two, so nobody is alone and nobody joins again.
func TestThreeHostsPartitionHealsSeedCut(t *testing.T) {
	threeHosts(t, layout{brokers: [3]int{1, 1, 1}, partition: true, cut: 0, cutFor: 7 * time.Second, ringWait: 15 * time.Second})
}

// TestThreeHostsNodeReturns goes on after B's death: B is started again
// (same namespace, address and config), rejoins the ring, takes its
// channels back, and a publish on A reaches both B and C again. With the
// cluster secret on every node, so the returning broker's hand-back copies
// history from its peers over secured links.
func TestThreeHostsNodeReturns(t *testing.T) {
	threeHosts(t, layout{brokers: [3]int{1, 1, 1}, returns: true, secret: true, history: true})
}

// waitReady waits until every process of the node is ready, asked through
// its own admin API (loopback inside its namespace).
func (n *node) waitReady(t *testing.T) {
	t.Helper()
	waitFor(t, 30*time.Second, "node "+n.label+": every process ready in /api/cluster", func() bool {
		if n.exited() {
			t.Fatalf("node %s: shoal run exited during startup:\n%s", n.label, n.out)
		}
		ci, err := n.table()
		return err == nil && ci.allReady()
	})
}

func threeHosts(t *testing.T, lay layout) {
	if testing.Short() {
		t.Skip("builds network namespaces and runs three nodes")
	}
	brokers, returns := lay.brokers, lay.returns
	if lay.secret {
		t.Setenv("SHOAL_CLUSTER_SECRET", clusterSecret) // inherited by every node
	}
	if lay.ringWait == 0 {
		lay.ringWait = 30 * time.Second
	}
	total := brokers[0] + brokers[1] + brokers[2]
	l := newLab(t, 3)
	binary(t) // built before the clock starts
	labels := []string{"A", "B", "C"}
	nodes := make([]*node, 3)
	joins := make([][]string, 3)
	var names, owners []string
	first := &node{host: l.hosts[0]}
	for i := range nodes {
		if i > 0 {
			joins[i] = []string{first.gossip()}
		}
	}
	start := time.Now()
	extra := ""
	if lay.history {
		extra = "channels:\n  - match: \"mh/**\"\n    history: {size: 100}\n"
	}
	startOne := func(i int) { nodes[i] = startNode(t, labels[i], l.hosts[i], joins[i], brokers[i], extra) }
	switch lay.order {
	case together:
		startOne(0)
		startOne(1)
		startOne(2)
	case seedFirst:
		startOne(0)
		nodes[0].waitReady(t)
		startOne(1)
		startOne(2)
	case seedLast:
		startOne(1)
		startOne(2)
		nodes[1].waitReady(t)
		waitFor(t, 30*time.Second, "node B's own brokers in one ring", func() bool {
			_, ok := nodes[1].ringAt(brokers[1], start)
			return ok
		})
		startOne(0)
	}
	for i := range nodes {
		for j, nm := range nodes[i].ringNames(joins[i]) {
			names = append(names, nm)
			owners = append(owners, fmt.Sprintf("%s/broker-%d", labels[i], j+1))
		}
	}
	a, b, c := nodes[0], nodes[1], nodes[2]
	for _, n := range nodes {
		n.waitReady(t)
	}
	// The ring: every broker has reported all of them (its log line).
	ringFormed := waitRing(t, nodes, total, start, lay.ringWait, "")
	if lay.secret {
		checkSecured(t, nodes)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 80*time.Second)
	defer cancel()
	dial := func(n *node) *client.Client {
		cl, err := client.Dial(ctx, n.url(), client.Options{AckTimeout: 3 * time.Second})
		if err != nil {
			t.Fatalf("node %s: dial %s: %v", n.label, n.url(), err)
		}
		t.Cleanup(func() { cl.Close() })
		return cl
	}
	pub := dial(a)
	subB, subC := dial(b), dial(c)

	// One channel owned by each node's broker, so the publish path crosses
	// every host.
	chans := pickChannels(t, names)
	t.Logf("ring names %v; channels %v (owned by %v)", names, chans, owners)
	subsB := map[string]*client.Subscription{}
	subsC := map[string]*client.Subscription{}
	for _, ch := range chans {
		var err error
		if subsB[ch], err = subB.Subscribe(ctx, ch, 4096); err != nil {
			t.Fatalf("subscribe on B %s: %v", ch, err)
		}
		if subsC[ch], err = subC.Subscribe(ctx, ch, 4096); err != nil {
			t.Fatalf("subscribe on C %s: %v", ch, err)
		}
	}

	// A publish on A reaches both B and C, on every channel.
	probe(t, ctx, pub, chans, map[string]map[string]*client.Subscription{"B": subsB, "C": subsC})
	delivered := time.Now()
	for _, s := range []map[string]*client.Subscription{subsB, subsC} {
		for _, sub := range s {
			drain(sub.C)
		}
	}
	// Then exactly what was published, in order, on both B and C.
	burst(t, ctx, pub, chans, "first", map[string]map[string]*client.Subscription{"B": subsB, "C": subsC})
	// Confirmed by the admin API: every broker has a link from every
	// node's worker (connections, refreshed by the 2 s stats poll).
	for _, n := range nodes {
		waitFor(t, 15*time.Second, "node "+n.label+": every broker linked to the workers of all 3 nodes", func() bool {
			ci, err := n.table()
			if err != nil {
				return false
			}
			seen := 0
			for _, p := range ci.Processes {
				if p.Role == "broker" {
					if p.Connections != 3 {
						return false
					}
					seen++
				}
			}
			return seen == n.brokers
		})
	}
	linked := time.Now()
	t.Logf("MEASURED ring formed (last broker to report %d members) %.2fs after the first node was started; "+
		"first A→B,C delivery on all %d channels after %.2fs; "+
		"every broker seen linked to 3 workers in the admin API after %.2fs (2 s stats poll)",
		total, ringFormed.Sub(start).Seconds(), len(chans), delivered.Sub(start).Seconds(), linked.Sub(start).Seconds())

	if lay.partition {
		partition(t, ctx, l, nodes, lay.cut, brokers, lay.cutFor, lay.ringWait, pub, dial, chans, subsB, subsC)
		return
	}

	// Kill B while A publishes to every channel every 10 ms and C listens.
	killAt, resume, failed, after := killDuringTraffic(t, ctx, b, pub, chans, subsC)
	for i, ch := range chans {
		t.Logf("MEASURED channel %s (owned by %s): first A→C delivery of a message published after B's SIGKILL %.0f ms after the kill; "+
			"%d publishes failed meanwhile; %d delivered after the kill",
			ch, owners[i], float64(resume[ch].Microseconds())/1000, failed[ch], after[ch])
	}
	for _, n := range []*node{a, c} {
		left := total - brokers[1]
		if at, ok := n.ringAt(left, killAt); ok {
			t.Logf("MEASURED node %s's broker reported a ring of %d %.0f ms after the kill", n.label, left, float64(at.Sub(killAt).Microseconds())/1000)
		} else {
			t.Errorf("node %s's broker never logged a ring of %d after B died", n.label, left)
		}
	}
	// A and C are whole and still serving: every process ready.
	for _, n := range []*node{a, c} {
		ci, err := n.table()
		if err != nil || !ci.allReady() {
			t.Errorf("node %s after B's death: %+v %v", n.label, ci, err)
		}
	}
	if !returns || t.Failed() {
		return
	}

	// B comes back: a new `shoal run` in the same namespace with the same
	// config, the way an operator restarts a machine's service.
	restart := time.Now()
	b2 := startNode(t, "B", l.hosts[1], joins[1], brokers[1], extra)
	b2.waitReady(t)
	ringBack := waitRing(t, []*node{a, b2, c}, total, restart, 20*time.Second, " after B's restart")
	subB2 := dial(b2)
	subsB2 := map[string]*client.Subscription{}
	for _, ch := range chans {
		var err error
		if subsB2[ch], err = subB2.Subscribe(ctx, ch, 4096); err != nil {
			t.Fatalf("subscribe on the restarted B %s: %v", ch, err)
		}
	}
	for _, ch := range chans {
		drain(subsC[ch].C)
	}
	probe(t, ctx, pub, chans, map[string]map[string]*client.Subscription{"B": subsB2, "C": subsC})
	back := time.Now()
	burst(t, ctx, pub, chans, "back", map[string]map[string]*client.Subscription{"B": subsB2, "C": subsC})
	t.Logf("MEASURED node B restarted: every broker reports a ring of %d %.2fs after the restart; "+
		"A→B,C delivery on every channel (B's own channels back on B's broker) %.2fs after it",
		total, ringBack.Sub(restart).Seconds(), back.Sub(restart).Seconds())
	if lay.history {
		// B's broker copied the history of the channel it owns back from
		// the peer that served it meanwhile, over the (secured) link.
		took := false
		for _, l := range readLog(b2.logf) {
			switch {
			case l.Msg == "history taken back from peers" && strings.HasPrefix(l.Proc, "broker-"):
				took = true
			case l.Msg == "taking history back from peers":
				t.Errorf("node B: %s: %s", l.Proc, l.Msg)
			}
		}
		if !took {
			t.Error("node B's broker took no history back from its peers")
		}
	}
}

// probe publishes on every channel until each listed subscriber has
// received something on it (interest registration with a remote broker is
// asynchronous, and a broker in warm-up refuses publishes).
func probe(t *testing.T, ctx context.Context, pub *client.Client, chans []string, subs map[string]map[string]*client.Subscription) {
	t.Helper()
	for _, ch := range chans {
		got := map[string]bool{}
		deadline := time.Now().Add(20 * time.Second)
		for k := 0; len(got) < len(subs); k++ {
			if time.Now().After(deadline) {
				t.Fatalf("channel %s: a publish on A reached only %v of %d nodes", ch, got, len(subs))
			}
			if err := pub.Publish(ctx, ch, map[string]any{"probe": k}); err != nil {
				t.Logf("probe publish on %s: %v (retrying)", ch, err)
			}
			// Poll the subscriptions for up to 300 ms before publishing again.
			for until := time.Now().Add(300 * time.Millisecond); len(got) < len(subs) && time.Now().Before(until); {
				for side, m := range subs {
					select {
					case <-m[ch].C:
						got[side] = true
					default:
					}
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
	}
}

// burst publishes 20 messages per channel on A and requires each listed
// subscriber to get all of them, in order (earlier probes and stray
// messages of other phases are skipped).
func burst(t *testing.T, ctx context.Context, pub *client.Client, chans []string, phase string, subs map[string]map[string]*client.Subscription) {
	t.Helper()
	const n = 20
	for _, ch := range chans {
		for i := range n {
			if err := pub.Publish(ctx, ch, stamp{N: int64(i), T: time.Now().UnixNano(), P: phase}); err != nil {
				t.Fatalf("publish %s #%d on A (%s): %v", ch, i, phase, err)
			}
		}
	}
	for _, ch := range chans {
		for side, m := range subs {
			for i := 0; i < n; {
				msg, err := next(m[ch].C, 5*time.Second)
				if err != nil {
					t.Fatalf("node %s, channel %s (%s): message %d of %d: %v", side, ch, phase, i, n, err)
				}
				var s stamp
				if json.Unmarshal(msg.Data, &s) != nil || s.P != phase {
					continue
				}
				if s.N != int64(i) {
					t.Fatalf("node %s, channel %s (%s): got %s, want n=%d", side, ch, phase, msg.Data, i)
				}
				i++
			}
		}
	}
}

// killDuringTraffic publishes on every channel from A every 10 ms, waits
// until C receives on all of them, SIGKILLs node b's process tree and
// measures, per channel, how long after the kill C first receives a
// message that was published after it. It then requires steady delivery
// (≥ 20 more messages per channel) before it stops the publishers.
func killDuringTraffic(t *testing.T, ctx context.Context, b *node, pub *client.Client, chans []string, subs map[string]*client.Subscription) (killAt time.Time, resume map[string]time.Duration, failed, after map[string]int) {
	t.Helper()
	var mu sync.Mutex
	var killed time.Time
	resume, failed, after = map[string]time.Duration{}, map[string]int{}, map[string]int{}
	before := map[string]int{}
	errKinds := map[string]int{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, ch := range chans {
		// Publisher.
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(10 * time.Millisecond)
			defer tick.Stop()
			for n := int64(0); ; n++ {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				err := pub.Publish(pctx, ch, stamp{N: n, T: time.Now().UnixNano()})
				cancel()
				mu.Lock()
				if err != nil && !killed.IsZero() {
					failed[ch]++
					if len(errKinds) < 8 {
						errKinds[err.Error()]++
					} else if _, ok := errKinds[err.Error()]; ok {
						errKinds[err.Error()]++
					}
				}
				mu.Unlock()
			}
		}()
		// Subscriber on C.
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				case m := <-subs[ch].C:
					now := time.Now()
					var s stamp
					if json.Unmarshal(m.Data, &s) != nil {
						continue
					}
					mu.Lock()
					switch {
					case killed.IsZero():
						before[ch]++
					case s.T > killed.UnixNano():
						if after[ch] == 0 {
							resume[ch] = now.Sub(killed)
						}
						after[ch]++
					}
					mu.Unlock()
				}
			}
		}()
	}
	defer func() { close(stop); wg.Wait() }()
	count := func(m map[string]int, min int) bool {
		mu.Lock()
		defer mu.Unlock()
		for _, ch := range chans {
			if m[ch] < min {
				return false
			}
		}
		return true
	}
	waitFor(t, 10*time.Second, "A→C traffic on every channel before the kill", func() bool { return count(before, 10) })

	// The clock starts when the signals have been sent (walking /proc for
	// the tree takes milliseconds, during which B still serves).
	mu.Lock()
	tree, sent := b.signalTree()
	killed, killAt = sent, sent
	mu.Unlock()
	b.waitGone()
	t.Logf("SIGKILLed node B's process tree %v; %d ms to see no process left in its namespace", tree, time.Since(killAt).Milliseconds())
	waitFor(t, 15*time.Second, "A→C delivery of post-kill publishes on every channel", func() bool { return count(after, 1) })
	waitFor(t, 10*time.Second, "steady A→C delivery after B's death (20 messages per channel)", func() bool { return count(after, 20) })
	mu.Lock()
	defer mu.Unlock()
	for e, n := range errKinds {
		t.Logf("publish error after the kill (%d×): %s", n, e)
	}
	return killAt, cloneD(resume), cloneI(failed), cloneI(after)
}

func cloneD(m map[string]time.Duration) map[string]time.Duration {
	o := map[string]time.Duration{}
	for k, v := range m {
		o[k] = v
	}
	return o
}

func cloneI(m map[string]int) map[string]int {
	o := map[string]int{}
	for k, v := range m {
		o[k] = v
	}
	return o
}

func drain(c chan client.Message) {
	for {
		select {
		case <-c:
		default:
			return
		}
	}
}

func next(c chan client.Message, timeout time.Duration) (client.Message, error) {
	select {
	case m := <-c:
		return m, nil
	case <-time.After(timeout):
		return client.Message{}, errors.New("timed out")
	}
}

// partition takes node x's link to the bridge down until the others
// have dropped its brokers and it has dropped theirs, checks that the two
// other nodes still talk (a fresh publisher on the first of them, the
// subscriber on C), keeps the cut for at least cutFor, brings the link
// back, and waits for the whole ring and for A→B,C delivery on the
// clients that were connected all along.
func partition(t *testing.T, ctx context.Context, l *lab, nodes []*node, x int, brokers [3]int, cutFor, healWait time.Duration,
	pub *client.Client, dial func(*node) *client.Client, chans []string, subsB, subsC map[string]*client.Subscription) {
	t.Helper()
	total := brokers[0] + brokers[1] + brokers[2]
	cutNode := nodes[x]
	var others []*node
	for i, n := range nodes {
		if i != x {
			others = append(others, n)
		}
	}
	cut := time.Now()
	if err := sh("ip", "link", "set", l.veths[x], "down"); err != nil {
		t.Fatal(err)
	}
	for _, n := range others {
		waitFor(t, 10*time.Second, fmt.Sprintf("node %s: %s's brokers dropped from the ring", n.label, cutNode.label), func() bool {
			_, ok := n.ringAt(total-brokers[x], cut)
			return ok
		})
	}
	waitFor(t, 10*time.Second, "node "+cutNode.label+": the other nodes dropped from its ring", func() bool {
		_, ok := cutNode.ringAt(brokers[x], cut)
		return ok
	})
	split := time.Now()
	// The other two still talk while the cut lasts.
	sp := pub
	if x == 0 {
		sp = dial(others[0])
	}
	burst(t, ctx, sp, chans, "split", map[string]map[string]*client.Subscription{"C": subsC})
	// A partition that outlasts memberlist's GossipToTheDeadTime (5 s)
	// can only heal by someone joining again.
	if d := time.Until(cut.Add(cutFor)); d > 0 {
		time.Sleep(d)
	}
	heal := time.Now()
	if err := sh("ip", "link", "set", l.veths[x], "up"); err != nil {
		t.Fatal(err)
	}
	whole := waitRing(t, nodes, total, heal, healWait, " after the cut healed")
	for _, ch := range chans {
		drain(subsB[ch].C)
		drain(subsC[ch].C)
	}
	probe(t, ctx, pub, chans, map[string]map[string]*client.Subscription{"B": subsB, "C": subsC})
	back := time.Now()
	burst(t, ctx, pub, chans, "healed", map[string]map[string]*client.Subscription{"B": subsB, "C": subsC})
	t.Logf("MEASURED partition of %s for %.1fs: the others dropped it %.2fs after the cut (and it dropped them); "+
		"after the cut healed, every broker reported the whole ring %.2fs later and A→B,C worked on every channel %.2fs later",
		cutNode.label, heal.Sub(cut).Seconds(), split.Sub(cut).Seconds(), whole.Sub(heal).Seconds(), back.Sub(heal).Seconds())
}

// waitRing waits until every broker of every node has logged a ring of
// want members after since, and returns when the last one did. On timeout
// it fails with the ring size each broker reported last (ever), which
// shows a split ring at a glance.
func waitRing(t *testing.T, nodes []*node, want int, since time.Time, timeout time.Duration, what string) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var last time.Time
		all := true
		for _, n := range nodes {
			at, ok := n.ringAt(want, since)
			if !ok {
				all = false
				break
			}
			if at.After(last) {
				last = at
			}
		}
		if all {
			return last
		}
		if time.Now().After(deadline) {
			var seen []string
			for _, n := range nodes {
				sizes := map[string]int{}
				for _, l := range readLog(n.logf) {
					if l.Msg == "ring changed" && strings.HasPrefix(l.Proc, "broker-") {
						sizes[l.Proc] = l.Brokers
					}
				}
				for i := 1; i <= n.brokers; i++ {
					p := "broker-" + strconv.Itoa(i)
					if sz, ok := sizes[p]; ok {
						seen = append(seen, fmt.Sprintf("%s/%s: %d", n.label, p, sz))
					} else {
						seen = append(seen, fmt.Sprintf("%s/%s: no report", n.label, p))
					}
				}
			}
			t.Fatalf("no ring of %d%s within %s; the ring size each broker reported last: %s",
				want, what, timeout, strings.Join(seen, ", "))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
