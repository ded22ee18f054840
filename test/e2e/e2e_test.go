// Package e2e runs the real shoal binary: `shoal run` with a temporary
// config on free loopback ports, and checks the process tree, restarts, the
// central log, the CLI and shutdown from the outside, as an operator would.
package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"github.com/shoalhq/shoal/internal/testutil"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
	"go.uber.org/goleak"
)

// shoalBin is the binary built once by TestMain.
var shoalBin string

func TestMain(m *testing.M) {
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	root, err := moduleRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	dir, err := os.MkdirTemp("", "shoal-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	shoalBin = filepath.Join(dir, "shoal")
	build := exec.Command("go", "build", "-o", shoalBin, "./cmd/shoal")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: building shoal: %v\n%s", err, out)
		return 1
	}
	// goleak after the run: the tests' own goroutines (exec pipes, HTTP)
	// must be gone too.
	code := m.Run()
	httpClient.CloseIdleConnections()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "e2e: goroutine leak:", err)
			return 1
		}
	}
	return code
}

// moduleRoot and waitFor are shared with the other cluster test package.
func moduleRoot() (string, error) { return testutil.ModuleRoot() }

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	testutil.WaitFor(t, timeout, what, cond)
}

// freePort returns a free 127.0.0.1 port below the kernel's ephemeral
// range (ip_local_port_range starts at 32768 by default). A port the kernel
// hands out for port 0 could be handed out again, between this check and
// `shoal run` binding it, to a process of the cluster itself (the brokers'
// gossip binds port 0) or of a parallel test; ports below the range are
// never picked that way.
func freePort(t *testing.T) string {
	t.Helper()
	for range 200 {
		addr := "127.0.0.1:" + strconv.Itoa(20000+rand.IntN(12000))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		ln.Close()
		return addr
	}
	t.Fatal("no free port in 20000-31999")
	return ""
}

// alive reports whether any thread of process pid still runs. A process
// whose threads are all zombies (left for a non-reaping init after its
// parent died) has exited; one whose main thread alone is a zombie has not.
func alive(pid int) bool {
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return false
	}
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return false // gone meanwhile
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

// childrenOf lists the pids whose parent is ppid.
func childrenOf(ppid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(ppid) {
			out = append(out, pid)
		}
	}
	return out
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// cluster is one `shoal run` under test.
type cluster struct {
	t       *testing.T
	cfgPath string
	public  string
	tls     string // wss:// address (startClusterMode)
	admin   string
	cmd     *exec.Cmd
	stdout  *syncBuffer
	stderr  *syncBuffer
	waited  chan error
	exitErr error
	exited  bool
}

func writeConfig(t *testing.T, public, admin, gossip string) string {
	t.Helper()
	return writeConfigMode(t, public, admin, gossip, 1, "")
}

// writeConfigMode is writeConfig with cluster.balancers set: 1 (a balancer
// process) or 0 (kernel balancing: the workers share the public port), and
// wss:// with the generated development certificate on tlsAddr if set.
func writeConfigMode(t *testing.T, public, admin, gossip string, balancers int, tlsAddr string) string {
	t.Helper()
	dir := t.TempDir()
	if tlsAddr != "" {
		admin += "\n  tls: {listen: " + tlsAddr + ", auto: true}"
	}
	cfg := fmt.Sprintf(`cluster:
  workers: 2
  brokers: 2
  balancers: %d
  gossip: %s
  restart: {backoff_min: 100ms, backoff_max: 1s}
listen:
  public: %s
  admin: %s
storage:
  dir: %s
log:
  level: info
`, balancers, gossip, public, admin, filepath.Join(dir, "data"))
	path := filepath.Join(dir, "shoal.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func startCluster(t *testing.T) *cluster {
	t.Helper()
	return startClusterMode(t, 1, false)
}

// startClusterMode starts a cluster with cluster.balancers set. With 0 the
// public port is port 0: the supervisor reserves one port for every worker,
// and c.public is filled in from the table by waitReady. withTLS adds
// wss:// with the generated certificate on c.tls.
func startClusterMode(t *testing.T, balancers int, withTLS bool) *cluster {
	t.Helper()
	c := &cluster{t: t, public: freePort(t), admin: freePort(t), stdout: &syncBuffer{}, stderr: &syncBuffer{}, waited: make(chan error, 1)}
	if balancers == 0 {
		c.public = "127.0.0.1:0"
	}
	// Gossip on port 0: each broker binds an ephemeral port (a fixed one
	// would be taken by consecutive ports per broker, which a parallel test
	// run could collide with) and they find each other through the topology.
	// wss:// on a fixed free port (in kernel mode the workers bind it
	// directly, next to the port-0 public port the supervisor reserves).
	if withTLS {
		c.tls = freePort(t)
	}
	c.cfgPath = writeConfigMode(t, c.public, c.admin, "127.0.0.1:0", balancers, c.tls)
	c.cmd = exec.Command(shoalBin, "run", "-c", c.cfgPath)
	c.cmd.Stdout, c.cmd.Stderr = c.stdout, c.stderr
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { c.waited <- c.cmd.Wait() }()
	t.Cleanup(func() {
		if t.Failed() && !c.exited {
			if resp, err := httpClient.Get("http://" + c.admin + "/metrics"); err == nil {
				var b bytes.Buffer
				_, _ = b.ReadFrom(resp.Body)
				resp.Body.Close()
				var counters []string
				for _, l := range strings.Split(b.String(), "\n") {
					if strings.HasPrefix(l, "shoal_counter{") || strings.HasPrefix(l, "shoal_connections{") {
						counters = append(counters, l)
					}
				}
				t.Logf("counters at the failure:\n%s", strings.Join(counters, "\n"))
			}
		}
		if !c.exited {
			_ = c.cmd.Process.Kill()
			c.wait(30 * time.Second)
		}
		if t.Failed() {
			logs, _, _ := shoal(t, "logs", "-c", c.cfgPath, "-n", "60")
			t.Logf("shoal run stdout:\n%s\nlast log lines:\n%s", c.stdout, logs)
		}
	})
	return c
}

// wait waits for `shoal run` to exit and returns its error.
func (c *cluster) wait(timeout time.Duration) error {
	c.t.Helper()
	if c.exited {
		return c.exitErr
	}
	select {
	case err := <-c.waited:
		c.exited, c.exitErr = true, err
		return err
	case <-time.After(timeout):
		c.t.Fatalf("shoal run did not exit within %s", timeout)
		return nil
	}
}

type procInfo struct {
	Name        string            `json:"name"`
	Connections int64             `json:"connections"`
	Role        string            `json:"role"`
	Pid         int               `json:"pid"`
	State       string            `json:"state"`
	Restarts    int               `json:"restarts"`
	Uptime      float64           `json:"uptime"`
	RSS         uint64            `json:"rss_bytes"`
	Addrs       map[string]string `json:"addrs"`
}

type clusterInfo struct {
	SupervisorPid int        `json:"supervisor_pid"`
	Public        string     `json:"public"`
	Processes     []procInfo `json:"processes"`
}

var httpClient = &http.Client{Timeout: 5 * time.Second}

func (c *cluster) table() (clusterInfo, error) {
	var ci clusterInfo
	resp, err := httpClient.Get("http://" + c.admin + "/api/cluster")
	if err != nil {
		return ci, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return ci, fmt.Errorf("GET /api/cluster: %s", resp.Status)
	}
	return ci, json.NewDecoder(resp.Body).Decode(&ci)
}

// waitReady waits until every process of the table is ready.
func (c *cluster) waitReady(timeout time.Duration) clusterInfo {
	c.t.Helper()
	var ci clusterInfo
	waitFor(c.t, timeout, "every process ready in /api/cluster", func() bool {
		if c.exitedEarly() {
			c.t.Fatalf("shoal run exited during startup: %v", c.exitErr)
		}
		var err error
		ci, err = c.table()
		if err != nil || len(ci.Processes) == 0 {
			return false
		}
		for _, p := range ci.Processes {
			if p.State != "ready" {
				return false
			}
		}
		return true
	})
	if strings.HasSuffix(c.public, ":0") {
		// Port 0 (balancers: 0): the port the workers share.
		u, err := url.Parse(ci.Public)
		if err != nil || u.Port() == "" || u.Port() == "0" {
			c.t.Fatalf("/api/cluster public %q: want the bound ws:// URL", ci.Public)
		}
		c.public = u.Host
	}
	return ci
}

func (c *cluster) exitedEarly() bool {
	select {
	case err := <-c.waited:
		c.exited, c.exitErr = true, err
		return true
	default:
		return c.exited
	}
}

func (c *cluster) proc(name string) procInfo {
	c.t.Helper()
	ci, err := c.table()
	if err != nil {
		c.t.Fatal(err)
	}
	for _, p := range ci.Processes {
		if p.Name == name {
			return p
		}
	}
	c.t.Fatalf("no %s in the table", name)
	return procInfo{}
}

// shoal runs a CLI command and returns its stdout, stderr and exit code.
func shoal(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(shoalBin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("running shoal %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

// TestClusterLifecycle runs in both balancing modes: a balancer process
// (balancers: 1) and kernel balancing (balancers: 0, the workers share the
// public port with SO_REUSEPORT).
func TestClusterLifecycle(t *testing.T) {
	for _, mode := range []struct {
		name      string
		balancers int
	}{{"balancer", 1}, {"kernel", 0}} {
		t.Run(mode.name, func(t *testing.T) { testClusterLifecycle(t, mode.balancers) })
	}
}

func testClusterLifecycle(t *testing.T, balancers int) {
	c := startClusterMode(t, balancers, true)
	ci := c.waitReady(30 * time.Second)

	want := []string{"broker-1", "broker-2", "worker-1", "worker-2", "balancer-1"}
	if balancers == 0 {
		want = want[:4]
	}
	if len(ci.Processes) != len(want) {
		t.Fatalf("table has %d processes, want %v: %+v", len(ci.Processes), want, ci.Processes)
	}
	tree := map[int]string{ci.SupervisorPid: "supervisor"}
	for i, p := range ci.Processes {
		if p.Name != want[i] || p.Restarts != 0 || !alive(p.Pid) || p.RSS == 0 {
			t.Fatalf("row %d = %+v, want %s with a live pid and memory", i, p, want[i])
		}
		tree[p.Pid] = p.Name
	}
	if ci.SupervisorPid != c.cmd.Process.Pid {
		t.Fatalf("supervisor_pid %d, started %d", ci.SupervisorPid, c.cmd.Process.Pid)
	}
	if !strings.Contains(c.stdout.String(), "public  ws://"+c.public+"/socketcluster/") {
		t.Errorf("startup report lacks the public URL:\n%s", c.stdout)
	}

	// `shoal status` prints the same table.
	out, errOut, code := shoal(t, "status", "-c", c.cfgPath)
	if code != 0 || !strings.Contains(out, "worker-2") || !strings.Contains(out, "ready") {
		t.Fatalf("shoal status (%d): %s %s", code, out, errOut)
	}
	if !strings.Contains(out, "tls wss://"+c.tls+"/socketcluster/") {
		t.Errorf("shoal status lacks the wss:// URL:\n%s", out)
	}
	if balancers == 0 && !strings.Contains(out, "balancing kernel") {
		t.Errorf("shoal status does not say the workers share the port:\n%s", out)
	}

	// The children's own log lines are in the central log under their
	// names and pids (not only what the supervisor says about them).
	out, _, _ = shoal(t, "logs", "-c", c.cfgPath, "--proc", "worker-2", "--json")
	own := false
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var e struct {
			Proc     string `json:"proc"`
			Pid      int    `json:"pid"`
			Reporter string `json:"reporter"`
		}
		if json.Unmarshal([]byte(line), &e) != nil || e.Proc != "worker-2" {
			t.Fatalf("--proc worker-2 --json printed %q", line)
		}
		if e.Reporter == "" && e.Pid == ci.Processes[3].Pid {
			own = true
		}
	}
	if !own {
		t.Errorf("no line logged by worker-2 itself in the central log:\n%s", out)
	}

	// Traffic reaches a worker through the balancer.
	if ci.Processes[2].Addrs["handoff"] == "" {
		t.Fatalf("worker-1 publishes no handoff address: %+v", ci.Processes[2])
	}
	if balancers == 0 {
		// Each worker bound the one public port itself.
		for _, p := range ci.Processes[2:4] {
			if p.Addrs["public"] != c.public {
				t.Fatalf("%s publishes public %q, want %s: %+v", p.Name, p.Addrs["public"], c.public, p)
			}
		}
	}
	waitFor(t, 10*time.Second, "GET /healthz through the balancer", func() bool {
		resp, err := publicClient.Get("http://" + c.public + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	// wss://: one development certificate for the node, its fingerprint
	// printed once in the ready lines; trusted explicitly here.
	certPEM, err := os.ReadFile(filepath.Join(filepath.Dir(c.cfgPath), "data", "tls", "dev-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(certPEM)
	if block == nil {
		t.Fatal("dev-cert.pem holds no PEM block")
	}
	sum := sha256.Sum256(block.Bytes)
	var hexes []string
	for _, b := range sum {
		hexes = append(hexes, strings.ToUpper(hex.EncodeToString([]byte{b})))
	}
	fp := strings.Join(hexes, ":")
	if n := strings.Count(c.stdout.String(), "  cert    "); n != 1 || !strings.Contains(c.stdout.String(), "sha256 "+fp+"\n") {
		t.Errorf("ready lines: want one cert line with sha256 %s, got %d:\n%s", fp, n, c.stdout)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(certPEM)
	tlsClient := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}}}
	defer tlsClient.CloseIdleConnections()
	if balancers == 0 {
		// The kernel spreads new connections (hashing the client's
		// ephemeral port) over both workers, on both ports.
		for _, base := range []struct {
			url    string
			client *http.Client
		}{{"http://" + c.public, publicClient}, {"https://" + c.tls, tlsClient}} {
			seen := map[string]bool{}
			for i := 0; i < 60 && len(seen) < 2; i++ {
				seen[healthzWorkerAt(t, base.client, base.url)] = true
			}
			if len(seen) < 2 {
				t.Fatalf("60 connections to %s all reached %v; want both workers", base.url, seen)
			}
		}
	} else {
		healthzWorkerAt(t, tlsClient, "https://"+c.tls)
	}
	// `shoal reload` replaces the workers one at a time: a connected client
	// is handed over with 4000 (the official client reconnects at once, not
	// after the 1001 back-off), and traffic goes on to the new ones.
	before := dialSocketCluster(t, c.public)
	out, errOut, code = shoal(t, "reload", "-c", c.cfgPath)
	if code != 0 || strings.TrimSpace(out) != "restarted worker-1, worker-2" {
		t.Fatalf("shoal reload (%d): %q %q", code, out, errOut)
	}
	expectClose(t, before, "reload", 4000)
	for _, name := range []string{"worker-1", "worker-2"} {
		p := c.proc(name)
		if p.State != "ready" || p.Restarts != 0 {
			t.Fatalf("after reload %+v", p)
		}
		if _, old := tree[p.Pid]; old {
			t.Fatalf("%s kept its pid %d through a reload", name, p.Pid)
		}
		tree[p.Pid] = name + " (reloaded)"
	}
	healthz(t, c.public, "right after the reload")

	// A WebSocket client, to see the drain's close code at shutdown.
	wsClosed := dialSocketCluster(t, c.public)

	// `shoal logs -f` is running while the worker crashes.
	follow := exec.Command(shoalBin, "logs", "-f", "-c", c.cfgPath, "--level", "error")
	followOut := &syncBuffer{}
	follow.Stdout, follow.Stderr = followOut, followOut
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	followDone := make(chan error, 1)
	go func() { followDone <- follow.Wait() }()
	defer func() {
		_ = follow.Process.Kill()
		<-followDone
	}()

	// SIGKILL a worker: a new pid within a few seconds, restarts=1. The
	// victim is the worker not holding wsClosed (which must live until the
	// shutdown): with kernel balancing it may be on either.
	var victim string
	waitFor(t, 10*time.Second, "wsClosed counted by its worker", func() bool {
		ci, err := c.table()
		if err != nil {
			return false
		}
		for _, p := range ci.Processes {
			if p.Role == "worker" && p.Connections > 0 {
				victim = map[string]string{"worker-1": "worker-2", "worker-2": "worker-1"}[p.Name]
				return true
			}
		}
		return false
	})
	old := c.proc(victim)
	if err := syscall.Kill(old.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// The balancer stops routing to the dead worker at once: requests made
	// while it is down are answered by the other one. A connection handed
	// over in the very instant of the kill dies with the worker, so this
	// starts once the process is reaped by the supervisor: only then have all
	// its threads exited and its sockets closed (a Go process's main thread
	// shows as a zombie while the others still hold the fd table).
	waitFor(t, 5*time.Second, "the killed worker to be reaped", func() bool {
		_, err := os.Stat("/proc/" + strconv.Itoa(old.Pid))
		return err != nil
	})
	for i := 0; i < 20; i++ {
		healthz(t, c.public, fmt.Sprintf("request %d after SIGKILL of %s", i, victim))
	}
	for i := 0; i < 5; i++ {
		healthzWorkerAt(t, tlsClient, "https://"+c.tls)
	}
	waitFor(t, 10*time.Second, victim+" restarted", func() bool {
		ci, err := c.table()
		if err != nil {
			return false
		}
		for _, p := range ci.Processes {
			if p.Name == victim {
				return p.State == "ready" && p.Pid != old.Pid && p.Restarts == 1
			}
		}
		return false
	})
	tree[old.Pid] = "killed " + victim
	tree[c.proc(victim).Pid] = victim + " (restarted)"
	healthz(t, c.public, "after a worker crash")

	// The crash is in the central log, at error level.
	out, errOut, code = shoal(t, "logs", "-c", c.cfgPath, "--level", "error")
	if code != 0 || !strings.Contains(out, victim+"["+strconv.Itoa(old.Pid)+"]") || !strings.Contains(out, "crashed") || !strings.Contains(out, "SIGKILL") {
		t.Fatalf("shoal logs --level error (%d) lacks the crash:\n%s\n%s", code, out, errOut)
	}
	if strings.Contains(out, " INFO ") {
		t.Errorf("--level error printed info lines:\n%s", out)
	}
	if viaAdmin, _, _ := shoal(t, "logs", "--admin", c.admin, "--level", "error"); viaAdmin != out {
		t.Errorf("shoal logs --admin finds another log:\n%s", viaAdmin)
	}
	out, _, _ = shoal(t, "logs", "-c", c.cfgPath, "--proc", "broker")
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if !strings.Contains(line, " broker-") && !strings.HasPrefix(line, "    ") {
			t.Errorf("--proc broker printed %q", line)
		}
	}

	waitFor(t, 10*time.Second, "shoal logs -f to print the crash", func() bool {
		return strings.Contains(followOut.String(), victim+"["+strconv.Itoa(old.Pid)+"]") && strings.Contains(followOut.String(), "crashed")
	})
	if err := follow.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-followDone:
		followDone <- err // for the deferred cleanup
		if err != nil {
			t.Errorf("shoal logs -f after SIGINT: %v (want exit 0)", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("shoal logs -f did not stop on SIGINT")
	}

	// Every process of the tree, as the kernel sees it.
	for _, pid := range childrenOf(ci.SupervisorPid) {
		if _, ok := tree[pid]; !ok {
			tree[pid] = "unlisted child"
		}
	}

	// SIGTERM: drain, stop, exit 0, nothing left.
	if err := c.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := c.wait(30 * time.Second); err != nil {
		t.Fatalf("shoal run after SIGTERM: %v (want exit 0)", err)
	}
	expectGoingAway(t, wsClosed, "shutdown")
	for pid, name := range tree {
		if alive(pid) {
			t.Errorf("%s (pid %d) is still running after the supervisor exited", name, pid)
		}
	}
	if out, _, _ := shoal(t, "logs", "-c", c.cfgPath, "--proc", "supervisor", "-n", "1"); !strings.Contains(out, "stopped") {
		t.Errorf("the log does not end with the supervisor's stop: %q", out)
	}
}

// publicClient opens a new connection per request: a kept-alive connection
// lives in the worker it was handed to and dies with it, which says nothing
// about where the balancer routes new connections.
var publicClient = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// healthzWorkerAt GETs base/healthz with client (new connections) and
// returns the name of the worker that answered.
func healthzWorkerAt(t *testing.T, client *http.Client, base string) string {
	t.Helper()
	resp, err := client.Get(base + "/healthz")
	if err != nil {
		t.Fatalf("GET /healthz: %v", err)
	}
	defer resp.Body.Close()
	var body struct {
		Worker string `json:"worker"`
	}
	if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&body) != nil || body.Worker == "" {
		t.Fatalf("GET /healthz: %s without a worker name", resp.Status)
	}
	return body.Worker
}

// healthz expects GET /healthz through the balancer to answer 200 now.
func healthz(t *testing.T, public, when string) {
	t.Helper()
	resp, err := publicClient.Get("http://" + public + "/healthz")
	if err != nil {
		t.Fatalf("GET /healthz through the balancer %s: %v", when, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /healthz through the balancer %s: %s", when, resp.Status)
	}
}

// expectGoingAway waits for a client connection to be closed with 1001.
func expectGoingAway(t *testing.T, closed <-chan error, when string) {
	t.Helper()
	expectClose(t, closed, when, ws.StatusGoingAway)
}

// expectClose waits for the connection to end with a close frame of code.
func expectClose(t *testing.T, closed <-chan error, when string, code ws.StatusCode) {
	t.Helper()
	select {
	case err := <-closed:
		var ce wsutil.ClosedError
		if !errors.As(err, &ce) || ce.Code != code {
			t.Errorf("the WebSocket client got %v at %s, want a close with %d", err, when, code)
		}
	case <-time.After(15 * time.Second):
		t.Errorf("the WebSocket client was not closed at %s", when)
	}
}

// dialSocketCluster opens a WebSocket through the balancer, completes the
// SocketCluster handshake, and returns the error that ends the connection.
func dialSocketCluster(t *testing.T, public string) <-chan error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, _, _, err := ws.Dial(ctx, "ws://"+public+"/socketcluster/")
	if err != nil {
		t.Fatalf("WebSocket through the balancer: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second)) // bounds every read below
	if err := wsutil.WriteClientText(conn, []byte(`{"event":"#handshake","data":{"authToken":null},"cid":1}`)); err != nil {
		t.Fatal(err)
	}
	reply, _, err := wsutil.ReadServerData(conn)
	if err != nil || !strings.Contains(string(reply), `"rid":1`) {
		t.Fatalf("SocketCluster handshake: %q, %v", reply, err)
	}
	done := make(chan error, 1)
	go func() {
		for i := 0; i < 10000; i++ { // pings until the server closes (or the deadline)
			msg, _, err := wsutil.ReadServerData(conn)
			if err != nil {
				done <- err
				return
			}
			if len(msg) == 0 || string(msg) == "#1" { // v2 / v1 ping
				_ = wsutil.WriteClientText(conn, []byte(map[bool]string{true: "", false: "#2"}[len(msg) == 0]))
			}
		}
		done <- errors.New("too many messages")
	}()
	return done
}

func TestSupervisorSIGKILLTakesChildren(t *testing.T) {
	c := startCluster(t)
	ci := c.waitReady(30 * time.Second)
	pids := childrenOf(ci.SupervisorPid)
	if len(pids) != len(ci.Processes) {
		t.Fatalf("kernel sees children %v, table %+v", pids, ci.Processes)
	}
	if err := c.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = c.wait(10 * time.Second)
	waitFor(t, 10*time.Second, "every child to die with the supervisor", func() bool {
		for _, pid := range pids {
			if alive(pid) {
				return false
			}
		}
		return true
	})
}

func TestBadInputIsOneLine(t *testing.T) {
	run := func(t *testing.T, args ...string) (string, int) {
		t.Helper()
		cmd := exec.Command(shoalBin, args...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		done := make(chan error, 1)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			}
			return errb.String(), code
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Fatalf("shoal %v did not exit; stdout:\n%s", args, out.String())
			return "", 0
		}
	}
	oneLine := func(t *testing.T, stderr string, code int, wants ...string) {
		t.Helper()
		if code == 0 {
			t.Fatalf("exit 0, want non-zero; stderr %q", stderr)
		}
		if strings.Count(stderr, "\n") != 1 || strings.Contains(stderr, "goroutine ") {
			t.Fatalf("want exactly one line on stderr, got:\n%s", stderr)
		}
		for _, w := range wants {
			if !strings.Contains(stderr, w) {
				t.Fatalf("stderr %q lacks %q", stderr, w)
			}
		}
	}

	t.Run("unknown key", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "bad.yaml")
		if err := os.WriteFile(path, []byte("cluster:\n  brokers: 2\n  wrokers: 3\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		stderr, code := run(t, "run", "-c", path)
		oneLine(t, stderr, code, path+":3", "wrokers")
	})
	t.Run("wrong type", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "bad.yaml")
		if err := os.WriteFile(path, []byte("protocol:\n  ping_interval: soon\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		stderr, code := run(t, "run", "-c", path)
		oneLine(t, stderr, code, path+":2", "ping_interval")
	})
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	addr := busy.Addr().String()
	t.Run("admin port in use", func(t *testing.T) {
		stderr, code := run(t, "run", "-c", writeConfig(t, freePort(t), addr, "127.0.0.1:0"))
		oneLine(t, stderr, code, "listen.admin", addr, "address already in use")
	})
	t.Run("public port in use", func(t *testing.T) {
		stderr, code := run(t, "run", "-c", writeConfig(t, addr, freePort(t), "127.0.0.1:0"))
		oneLine(t, stderr, code, "listen.public", addr, "address already in use")
	})
	t.Run("gossip port in use", func(t *testing.T) {
		// A child's Start fails (broker-1 cannot bind its gossip port): the
		// node does not start, and the user reads that one error.
		stderr, code := run(t, "run", "-c", writeConfig(t, freePort(t), freePort(t), addr))
		oneLine(t, stderr, code, "broker-1", addr, "address already in use")
	})
	t.Run("status without a cluster", func(t *testing.T) {
		stderr, code := run(t, "status", "--admin", freePort(t)) // nobody listens there
		if code == 0 || strings.Count(stderr, "\n") != 1 {
			t.Fatalf("status: %d %q", code, stderr)
		}
	})
}
