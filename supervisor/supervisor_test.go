package supervisor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/logfile"
	"github.com/shoalhq/shoal/proto/control"
)

func TestMain(m *testing.M) {
	// Re-executed by the supervisor under test as a child process.
	if len(os.Args) == 3 && os.Args[1] == "child" && os.Getenv(control.Handshake.MagicCookieKey) != "" {
		runFakeChild(os.Args[2])
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// syncBuffer is a bytes.Buffer safe for the supervisor's writes and the
// test's reads.
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

// node is one supervisor.Run under test.
type node struct {
	t       *testing.T
	cfg     configs.Config
	dir     string // fake children's instructions and topology files
	stdout  *syncBuffer
	stderr  *syncBuffer
	cancel  context.CancelFunc
	done    chan error
	admin   string // http://host:port once started
	stopped bool
}

func testConfig(t *testing.T, workers int) configs.Config {
	t.Helper()
	y := fmt.Sprintf(`
cluster:
  workers: %d
  brokers: 1
  balancers: 1
  restart: {backoff_min: 50ms, backoff_max: 200ms, crash_loop: {crashes: 3, window: 60s}}
listen:
  public: 127.0.0.1:0
  admin: 127.0.0.1:0
storage:
  dir: %s
log:
  level: debug
  rotate: {size: 1MiB, keep: 2}
`, workers, t.TempDir())
	cfg, err := configs.Load([]byte(y), "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// startNode runs the supervisor with this test binary as the child binary.
// do maps a process name to its fake behaviour (see fakechild_test.go).
func startNode(t *testing.T, cfg configs.Config, do map[string]string, opts ...func(*Options)) *node {
	t.Helper()
	dir := t.TempDir()
	for name, what := range do {
		if err := os.WriteFile(filepath.Join(dir, name+".do"), []byte(what), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv(fakeDirEnv, dir)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	n := &node{t: t, cfg: cfg, dir: dir, stdout: &syncBuffer{}, stderr: &syncBuffer{}, cancel: cancel, done: make(chan error, 1)}
	o := Options{Stdout: n.stdout, Stderr: n.stderr, ConfigName: "test.yaml", Executable: exe}
	for _, f := range opts {
		f(&o)
	}
	go func() {
		n.done <- Run(ctx, cfg, o)
	}()
	t.Cleanup(func() { n.stop() })
	return n
}

// pluginSockets lists the go-plugin sockets in the run directory of the
// supervisor running in this process.
func pluginSockets(t *testing.T) []string {
	t.Helper()
	pidFiles, _ := filepath.Glob(filepath.Join(os.TempDir(), runDirPrefix+"*", runPIDFile))
	for _, f := range pidFiles {
		b, err := os.ReadFile(f)
		if err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(os.Getpid()) {
			continue
		}
		socks, _ := filepath.Glob(filepath.Join(filepath.Dir(f), "plugin*"))
		return socks
	}
	t.Fatal("no run directory of this supervisor")
	return nil
}

var adminLine = regexp.MustCompile(`(?m)^  admin   (http://\S+)$`)

// waitReady waits for the startup report and returns the admin URL.
func (n *node) waitReady() string {
	n.t.Helper()
	waitFor(n.t, 30*time.Second, "the startup report", func() bool {
		select {
		case err := <-n.done:
			n.done <- err
			n.t.Fatalf("Run returned during startup: %v\nstdout:\n%s", err, n.stdout)
		default:
		}
		return adminLine.MatchString(n.stdout.String())
	})
	n.admin = adminLine.FindStringSubmatch(n.stdout.String())[1]
	return n.admin
}

func (n *node) stop() error {
	if n.stopped {
		return nil
	}
	n.stopped = true
	n.cancel()
	select {
	case err := <-n.done:
		return err
	case <-time.After(60 * time.Second):
		n.t.Fatal("Run did not return after cancel")
		return nil
	}
}

func (n *node) cluster() ClusterInfo {
	n.t.Helper()
	var ci ClusterInfo
	resp, err := http.Get(n.admin + "/api/cluster")
	if err != nil {
		n.t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&ci); err != nil {
		n.t.Fatal(err)
	}
	return ci
}

func (n *node) proc(name string) ProcessInfo {
	n.t.Helper()
	for _, p := range n.cluster().Processes {
		if p.Name == name {
			return p
		}
	}
	n.t.Fatalf("no process %s in the table", name)
	return ProcessInfo{}
}

func (n *node) logEntries(f logfile.Filter) []logfile.Entry {
	n.t.Helper()
	var out []logfile.Entry
	if err := logfile.Read(n.cfg.Log.File, f, func(e logfile.Entry) error { out = append(out, e); return nil }); err != nil {
		n.t.Fatal(err)
	}
	return out
}

func alive(pid int) bool {
	return pid > 0 && syscall.Kill(pid, 0) == nil
}

func TestRunRestartTopologyLogShutdown(t *testing.T) {
	cfg := testConfig(t, 2)
	n := startNode(t, cfg, nil)
	n.waitReady()

	ci := n.cluster()
	if len(ci.Processes) != 4 {
		t.Fatalf("want broker-1, worker-1, worker-2, balancer-1; got %+v", ci.Processes)
	}
	// Each child's go-plugin control socket is in the run directory, which
	// goes away with the supervisor, and not loose in /tmp.
	if socks := pluginSockets(t); len(socks) != 4 {
		t.Errorf("go-plugin sockets in the run directory: %v, want one per child", socks)
	}
	pids := map[string]int{}
	for i, want := range []string{"broker-1", "worker-1", "worker-2", "balancer-1"} {
		p := ci.Processes[i]
		if p.Name != want || p.State != control.StateReady || !alive(p.Pid) || p.Restarts != 0 {
			t.Fatalf("row %d: %+v, want %s ready with a live pid", i, p, want)
		}
		pids[p.Name] = p.Pid
	}
	for _, line := range []string{"broker-1     ready", "worker-2     ready", "balancer-1   ready", "  public  ws://127.0.0.1:", "  log     " + cfg.Log.File} {
		if !strings.Contains(n.stdout.String(), line) {
			t.Errorf("startup report lacks %q:\n%s", line, n.stdout)
		}
	}

	// The children's hclog lines land in the central log under their
	// process name, pid and level, with their fields.
	waitFor(t, 10*time.Second, "worker-1's warning in the central log", func() bool {
		for _, e := range n.logEntries(logfile.Filter{Procs: []string{"worker-1"}, MinLevel: logfile.LevelWarn}) {
			if e.Msg == "fake warning" && e.Pid == pids["worker-1"] && e.Level == logfile.LevelWarn && e.GetString("detail") == "something odd" {
				return true
			}
		}
		return false
	})
	sub := n.logEntries(logfile.Filter{Procs: []string{"broker-1"}, MinLevel: logfile.LevelError})
	if len(sub) == 0 || sub[0].Msg != "fake sub-logger error" || sub[0].GetString("module") != "broker.sub" || sub[0].GetString("code") != "42" {
		t.Fatalf("sub-logger line: %+v", sub)
	}
	if !strings.Contains(n.stderr.String(), "WARN  worker-1[") {
		t.Errorf("warnings are not echoed to stderr: %q", n.stderr)
	}

	// The balancer has been told about every peer.
	balTopo := func() control.Topology {
		var topo control.Topology
		b, err := os.ReadFile(filepath.Join(n.dir, "balancer-1.topo"))
		if err == nil {
			_ = json.Unmarshal(b, &topo)
		}
		return topo
	}
	peer := func(topo control.Topology, name string) control.Peer {
		for _, p := range topo.Peers {
			if p.Name == name {
				return p
			}
		}
		return control.Peer{}
	}
	waitFor(t, 10*time.Second, "the balancer's topology", func() bool {
		topo := balTopo()
		return len(topo.Peers) == 4 && peer(topo, "worker-1").State == control.StateReady && peer(topo, "worker-1").Addrs["fake"] == "worker-1"
	})

	// SIGKILL a worker: it is restarted with a new pid, the balancer hears
	// of it, and the crash is in the log at error level.
	if err := syscall.Kill(pids["worker-1"], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "worker-1 restarted", func() bool {
		p := n.proc("worker-1")
		return p.State == control.StateReady && p.Pid != pids["worker-1"] && p.Restarts == 1
	})
	newPid := n.proc("worker-1").Pid
	waitFor(t, 10*time.Second, "the balancer to learn worker-1's new pid", func() bool {
		return peer(balTopo(), "worker-1").Pid == newPid
	})
	crashes := n.logEntries(logfile.Filter{MinLevel: logfile.LevelError, Procs: []string{"worker-1"}})
	found := false
	for _, e := range crashes {
		if strings.Contains(e.Msg, "crashed") && strings.Contains(e.GetString("exit"), "SIGKILL") && e.Pid == pids["worker-1"] {
			found = true
		}
	}
	if !found {
		t.Fatalf("no crash report for worker-1 in the log: %+v", crashes)
	}
	if p := n.proc("worker-2"); p.Pid != pids["worker-2"] || p.Restarts != 0 {
		t.Fatalf("worker-2 must be untouched: %+v", p)
	}

	// Stats reach the table and /metrics.
	waitFor(t, 10*time.Second, "stats in the table", func() bool { return n.proc("worker-2").Connections == 3 })
	resp, err := http.Get(n.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	var mb bytes.Buffer
	_, _ = mb.ReadFrom(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`shoal_connections{proc="worker-2",role="worker"} 3`, `shoal_process_restarts_total{proc="worker-1",role="worker"} 1`, `shoal_counter{proc="worker-2",role="worker",name="fake_total"} 7`} {
		if !strings.Contains(mb.String(), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}

	// The dashboard page is served.
	resp, err = http.Get(n.admin + "/")
	if err != nil {
		t.Fatal(err)
	}
	mb.Reset()
	_, _ = mb.ReadFrom(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(mb.String(), "/api/cluster") {
		t.Errorf("dashboard: %d", resp.StatusCode)
	}

	// Shutdown: Run returns nil, no child is left, the run dir is gone.
	all := n.cluster().Processes
	if err := n.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	for _, p := range all {
		if alive(p.Pid) {
			t.Errorf("%s (pid %d) outlived the supervisor", p.Name, p.Pid)
		}
	}
	if alive(pids["worker-1"]) {
		t.Error("the killed worker is still there")
	}
	for _, e := range n.logEntries(logfile.Filter{Procs: []string{"supervisor"}}) {
		if rd := e.GetString("run_dir"); rd != "" {
			if _, err := os.Stat(rd); err == nil {
				t.Errorf("run dir %s left behind", rd)
			}
		}
	}
}

func TestCrashLoopGivesUpOthersKeepRunning(t *testing.T) {
	cfg := testConfig(t, 2)
	n := startNode(t, cfg, map[string]string{"worker-2": "panic"})
	admin := n.waitReady()
	waitFor(t, 20*time.Second, "worker-2 marked failed", func() bool { return n.proc("worker-2").State == stateFailed })
	if p := n.proc("worker-2"); p.Restarts != 2 {
		t.Errorf("crash_loop.crashes=3: want 2 restarts before giving up, got %d", p.Restarts)
	}
	for _, name := range []string{"broker-1", "worker-1", "balancer-1"} {
		if p := n.proc(name); p.State != control.StateReady || p.Restarts != 0 {
			t.Errorf("%s should keep running: %+v", name, p)
		}
	}
	// The crash report carries the panic and its stack; the give-up is loud.
	var report, loop bool
	for _, e := range n.logEntries(logfile.Filter{MinLevel: logfile.LevelError, Procs: []string{"worker-2"}}) {
		st := e.GetString("stderr")
		if strings.Contains(st, "panic: fake boom in worker-2") && strings.Contains(st, "goroutine ") {
			report = true
		}
		if strings.Contains(e.Msg, "CRASH LOOP") {
			loop = true
		}
	}
	if !report || !loop {
		t.Fatalf("crash report with the panic: %v, crash-loop line: %v", report, loop)
	}
	// The raw panic lines are in the log as well (not only in the report).
	raw := false
	for _, e := range n.logEntries(logfile.Filter{MinLevel: logfile.LevelError, Procs: []string{"worker-2"}}) {
		if strings.HasPrefix(e.Msg, "panic: fake boom") {
			raw = true
		}
	}
	if !raw {
		t.Error("the child's panic line is not in the central log")
	}
	resp, err := http.Get(admin + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("/healthz with a failed worker = %d, want 503", resp.StatusCode)
	}
	if err := n.stop(); err != nil {
		t.Fatal(err)
	}
}

func TestHungChildIsKilledAndRestarted(t *testing.T) {
	old := statsInterval
	statsInterval = 100 * time.Millisecond
	t.Cleanup(func() { statsInterval = old })
	cfg := testConfig(t, 1)
	n := startNode(t, cfg, map[string]string{"worker-1": "hang-stats"})
	n.waitReady()
	first := n.proc("worker-1").Pid
	waitFor(t, 20*time.Second, "the hung worker to be replaced", func() bool {
		p := n.proc("worker-1")
		return p.Pid != first && p.Restarts >= 1
	})
	var told bool
	for _, e := range n.logEntries(logfile.Filter{MinLevel: logfile.LevelError, Procs: []string{"worker-1"}}) {
		if strings.Contains(e.Msg, "has not answered its control plane") && e.Pid == first {
			told = true
		}
	}
	if !told {
		t.Error("killing a hung child must be logged at error level")
	}
	if err := n.stop(); err != nil {
		t.Fatal(err)
	}
}

func TestFailedRestartsCountAsCrashes(t *testing.T) {
	cfg := testConfig(t, 1)
	n := startNode(t, cfg, nil)
	n.waitReady()
	// From now on worker-1 cannot start; then it dies.
	if err := os.WriteFile(filepath.Join(n.dir, "worker-1.do"), []byte("start-error no port for you"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(n.proc("worker-1").Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "worker-1 given up", func() bool { return n.proc("worker-1").State == stateFailed })
	var failed, loop int
	for _, e := range n.logEntries(logfile.Filter{MinLevel: logfile.LevelError, Procs: []string{"worker-1"}}) {
		if strings.Contains(e.Msg, "failed to start") && strings.Contains(e.GetString("exit"), "no port for you") {
			failed++
		}
		if strings.Contains(e.Msg, "CRASH LOOP") {
			loop++
		}
	}
	if failed != 2 || loop != 1 {
		t.Fatalf("want the kill, then 2 failed starts (the second one is the crash loop): failed=%d loop=%d", failed, loop)
	}
	if p := n.proc("broker-1"); p.State != control.StateReady {
		t.Fatalf("the rest keeps running: %+v", p)
	}
	if err := n.stop(); err != nil {
		t.Fatal(err)
	}
}

func TestStartErrorIsFatal(t *testing.T) {
	cfg := testConfig(t, 1)
	n := startNode(t, cfg, map[string]string{"balancer-1": "start-error listen tcp 127.0.0.1:8000: bind: address already in use"})
	var err error
	select {
	case err = <-n.done:
		n.stopped = true
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not fail")
	}
	if err == nil || err.Error() != "balancer-1: listen tcp 127.0.0.1:8000: bind: address already in use" {
		t.Fatalf("want one clear line naming the process, got %q", err)
	}
	if e := n.stderr.String(); e != "" {
		t.Errorf("a failed start must leave the error as the only thing to read; stderr had:\n%s", e)
	}
	// Whatever had started was stopped again.
	for _, e := range n.logEntries(logfile.Filter{}) {
		if e.Msg == "ready" && alive(e.Pid) {
			t.Errorf("%s (pid %d) left running after a failed start", e.Proc, e.Pid)
		}
	}
}

func TestBusyPortsAreOneLine(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	addr := busy.Addr().String()
	for _, key := range []string{"listen.admin", "listen.public"} {
		t.Run(key, func(t *testing.T) {
			cfg := testConfig(t, 1)
			if key == "listen.admin" {
				cfg.Listen.Admin = addr
			} else {
				cfg.Listen.Public = addr
			}
			err := Run(context.Background(), cfg, Options{Stdout: &syncBuffer{}, Stderr: &syncBuffer{}, Executable: "/nonexistent"})
			want := key + " " + addr + ": address already in use"
			if err == nil || !strings.HasPrefix(err.Error(), want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("got %v, want one line starting %q", err, want)
			}
		})
	}
}

func TestReloadReplacesWorkersOneByOne(t *testing.T) {
	cfg := testConfig(t, 2)
	n := startNode(t, cfg, nil)
	admin := n.waitReady()
	before := map[string]int{}
	for _, p := range n.cluster().Processes {
		before[p.Name] = p.Pid
	}
	resp, err := http.Post(admin+"/api/reload", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	var res ReloadResult
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || strings.Join(res.Restarted, ",") != "worker-1,worker-2" {
		t.Fatalf("reload: %d %+v", resp.StatusCode, res)
	}
	for _, p := range n.cluster().Processes {
		changed := p.Pid != before[p.Name]
		if (p.Role == string(control.RoleWorker)) != changed || p.State != control.StateReady || p.Restarts != 0 {
			t.Errorf("after reload %+v (pid before %d): workers get new pids, the rest keep theirs; restarts count crashes only", p, before[p.Name])
		}
		if changed && alive(before[p.Name]) {
			t.Errorf("old %s (pid %d) still running", p.Name, before[p.Name])
		}
	}
	// The replaced workers were drained first.
	drained := 0
	for _, e := range n.logEntries(logfile.Filter{Procs: []string{"worker"}}) {
		if e.Msg == "fake draining" {
			drained++
		}
	}
	if drained != 2 {
		t.Errorf("want 2 drains, saw %d", drained)
	}
	if err := n.stop(); err != nil {
		t.Fatal(err)
	}
}

func TestDisplayAddrAndPortError(t *testing.T) {
	for in, want := range map[string]string{":8000": "127.0.0.1:8000", "0.0.0.0:1": "127.0.0.1:1", "[::]:2": "127.0.0.1:2", "10.0.0.1:3": "10.0.0.1:3"} {
		if got := displayAddr(in); got != want {
			t.Errorf("displayAddr(%q) = %q, want %q", in, got, want)
		}
	}
	err := portError("listen.admin", "x:1", &net.OpError{Op: "listen", Err: errors.New("boom")})
	if err.Error() != "listen.admin x:1: boom" {
		t.Errorf("portError = %q", err)
	}
}

func TestSIGHUPReloadsConfigInPlace(t *testing.T) {
	cfg := testConfig(t, 2)
	reloads := make(chan struct{}, 1)
	next := cfg
	next.Protocol.PingInterval = configs.Duration(3 * time.Second)
	n := startNode(t, cfg, nil, func(o *Options) {
		o.Reload = func() (configs.Config, error) { return next, nil }
		o.ConfigReloadRequests = reloads
	})
	admin := n.waitReady()
	before := pidsByName(t, admin)
	reloads <- struct{}{}
	for name := range before {
		waitFor(t, 10*time.Second, name+" to get the new config", func() bool {
			b, err := os.ReadFile(filepath.Join(n.dir, name+".reload"))
			return err == nil && strings.Contains(string(b), `"ping_interval":"3s"`)
		})
	}
	after := pidsByName(t, admin)
	for name, pid := range before {
		if after[name] != pid {
			t.Errorf("%s restarted on a config reload (pid %d → %d)", name, pid, after[name])
		}
	}
}

func pidsByName(t *testing.T, admin string) map[string]int {
	t.Helper()
	resp, err := http.Get(admin + "/api/cluster")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct {
		Processes []struct {
			Name string `json:"name"`
			Pid  int    `json:"pid"`
		} `json:"processes"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, p := range body.Processes {
		out[p.Name] = p.Pid
	}
	if len(out) == 0 {
		t.Fatal("no processes in /api/cluster")
	}
	return out
}
