package bench

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func metric(t *testing.T, r *Result, key string) float64 {
	t.Helper()
	for _, m := range r.Metrics {
		if m.Key == key {
			return m.Value
		}
	}
	t.Fatalf("%s: no metric %q", r.Scenario, key)
	return math.NaN()
}

func run(t *testing.T, o Options) *Result {
	t.Helper()
	if o.Timeout == 0 {
		o.Timeout = 5 * time.Second
	}
	var out strings.Builder
	o.Stdout = &out
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := Run(ctx, o)
	if err != nil {
		t.Fatalf("%s: %v", o.Scenario, err)
	}
	t.Logf("\n%s", out.String())
	return r
}

// checkFanout asserts a fan-out run delivered everything, in order.
func checkFanout(t *testing.T, r *Result) {
	t.Helper()
	if metric(t, r, "published") == 0 || metric(t, r, "delivered") == 0 {
		t.Fatal("nothing published or delivered")
	}
	if l, e := metric(t, r, "lost"), metric(t, r, "expected"); l != 0 || e != metric(t, r, "delivered") {
		t.Errorf("lost %v of %v", l, e)
	}
	for _, k := range []string{"order_violations", "bad_payload", "pub_errors", "setup_failed"} {
		if v := metric(t, r, k); v != 0 {
			t.Errorf("%s = %v", k, v)
		}
	}
	if metric(t, r, "latency_p99_ms") <= 0 {
		t.Error("no latency recorded")
	}
}

func TestScenariosAgainstFakeServer(t *testing.T) {
	s := startFakeSC(t, false)
	u := []string{s.url()}

	r := run(t, Options{Scenario: "conns", URLs: u, Conns: 200, Hold: 100 * time.Millisecond, Sources: 4})
	if c := metric(t, r, "connected"); c != 200 || metric(t, r, "failed") != 0 {
		t.Errorf("connected %v of 200", c)
	}
	// The fake server lives in this process: its pid was found from the port.
	if metric(t, r, "server_rss_per_conn_kib") <= 0 {
		t.Error("server memory not measured")
	}
	if s.pongs.Load() < 200 {
		t.Errorf("%d pongs for 200 handshakes: the client must answer every v2 ping", s.pongs.Load())
	}

	r = run(t, Options{Scenario: "fanout", URLs: u, Channels: 3, Subscribers: 5, Publishers: 2, Rate: 400, Duration: 500 * time.Millisecond, Payload: 200})
	checkFanout(t, r)
	if p := metric(t, r, "publishes_per_s"); p < 200 || p > 600 {
		t.Errorf("publish rate %v, target 400/s", p)
	}

	r = run(t, Options{Scenario: "fanout", URLs: u, Subscribers: 4, Publishers: 1, Transmit: true, Rate: 200, Duration: 300 * time.Millisecond})
	checkFanout(t, r)

	r = run(t, Options{Scenario: "rtt", URLs: u, Conns: 2, Window: 2, Duration: 300 * time.Millisecond})
	if metric(t, r, "round_trips") == 0 || metric(t, r, "pub_errors") != 0 || metric(t, r, "rtt_p50_ms") <= 0 {
		t.Errorf("rtt run measured nothing")
	}

	r = run(t, Options{Scenario: "churn", URLs: u, Conns: 2, Duration: 300 * time.Millisecond})
	if metric(t, r, "cycles") == 0 || metric(t, r, "failed") != 0 {
		t.Errorf("churn: %v cycles, %v failed", metric(t, r, "cycles"), metric(t, r, "failed"))
	}
}

// TestWSS runs the TLS path: connections read by their own goroutines.
func TestWSS(t *testing.T) {
	s := startFakeSC(t, true)
	u := []string{s.url()}
	if !strings.HasPrefix(u[0], "wss://") {
		t.Fatal(u[0])
	}
	r := run(t, Options{Scenario: "conns", URLs: u, Conns: 20, Hold: 50 * time.Millisecond})
	if c := metric(t, r, "connected"); c != 20 {
		t.Errorf("connected %v of 20 over wss", c)
	}
	r = run(t, Options{Scenario: "fanout", URLs: u, Subscribers: 5, Publishers: 2, Rate: 200, Duration: 300 * time.Millisecond})
	checkFanout(t, r)
}

// TestAgentProcesses runs the agents as child processes (this test binary
// re-executed as an agent, as `shoal bench --agent` is in the CLI).
func TestAgentProcesses(t *testing.T) {
	s := startFakeSC(t, false)
	t.Setenv(agentEnv, "1")
	r := run(t, Options{Scenario: "fanout", URLs: []string{s.url()}, Agents: 2, AgentCommand: []string{os.Args[0]},
		Channels: 2, Subscribers: 6, Publishers: 3, Rate: 300, Duration: 400 * time.Millisecond})
	checkFanout(t, r)
	// Publishers sit in fewer agents than there are agents: the rate must
	// still be the run's total.
	r2 := run(t, Options{Scenario: "fanout", URLs: []string{s.url()}, Agents: 2, AgentCommand: []string{os.Args[0]},
		Subscribers: 2, Publishers: 1, Rate: 400, Duration: 400 * time.Millisecond})
	checkFanout(t, r2)
	if p := metric(t, r2, "publishes_per_s"); p < 300 || p > 500 {
		t.Errorf("1 publisher, 2 agents, --rate 400: %v publishes/s", p)
	}
	// Both agents' subscribers count in the window: about 2 × 400/s.
	if d := metric(t, r2, "deliveries_per_s"); d < 600 {
		t.Errorf("deliveries/s in the window %v, want about 800", d)
	}
	if c := metric(t, r, "tool_cpu_cores"); c <= 0 || math.IsNaN(c) {
		t.Errorf("agents' CPU not reported: %v", c)
	}
}

func TestRejectsNonLoopbackTargets(t *testing.T) {
	for _, u := range []string{"ws://10.0.0.1:8000/socketcluster/", "ws://example.com/socketcluster/", "wss://10.1.2.3/x", "ftp://127.0.0.1/", "http://127.0.0.1/"} {
		if _, err := Run(context.Background(), Options{Scenario: "conns", URLs: []string{u}}); err == nil {
			t.Errorf("%s accepted", u)
		}
	}
	if _, err := Run(context.Background(), Options{Scenario: "conns", AdminURL: "http://192.168.1.1:8001"}); err == nil {
		t.Error("non-loopback admin URL accepted")
	}
	if _, err := sourceAddrs("10.0.0.1", 2); err == nil {
		t.Error("source base outside 127.0.0.0/8 accepted")
	}
	got, err := sourceAddrs("127.0.1.254", 3)
	if err != nil || strings.Join(got, " ") != "127.0.1.254 127.0.2.1 127.0.2.2" {
		t.Errorf("sourceAddrs = %v, %v", got, err)
	}
}

// startReference starts the official socketcluster-server from
// test/reference. It skips, saying how to install it, when Node or the npm
// packages are missing; with SHOAL_REFERENCE=1 it fails instead, so a CI
// that installed them cannot pass silently without running this.
func startReference(t *testing.T) (url string, pid int) {
	t.Helper()
	dir, _ := filepath.Abs("../test/reference")
	missing := ""
	if _, err := exec.LookPath("node"); err != nil {
		missing = "node is not installed"
	} else if _, err := os.Stat(filepath.Join(dir, "node_modules", "socketcluster-server")); err != nil {
		missing = "socketcluster-server is not installed: run `npm ci --prefix test/reference`"
	}
	if missing != "" {
		if os.Getenv("SHOAL_REFERENCE") == "1" {
			t.Fatalf("SHOAL_REFERENCE=1 but the reference server cannot run: %s", missing)
		}
		t.Skipf("reference server not available (%s); set SHOAL_REFERENCE=1 to make this a failure", missing)
	}
	cmd := exec.Command("node", filepath.Join(dir, "server.js"), "--port", "0")
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	line := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		if sc.Scan() {
			line <- sc.Text()
		}
		close(line)
		for sc.Scan() { // drain until the process exits
		}
	}()
	select {
	case l := <-line:
		// "listening 127.0.0.1:PORT pid PID"
		f := strings.Fields(l)
		if len(f) != 4 || f[0] != "listening" {
			t.Fatalf("reference server said %q", l)
		}
		pid, _ = strconv.Atoi(f[3])
		return fmt.Sprintf("ws://%s/socketcluster/", f[1]), pid
	case <-time.After(20 * time.Second):
		t.Fatal("reference server did not start within 20s")
	}
	return "", 0
}

func TestAgainstReferenceServer(t *testing.T) {
	url, pid := startReference(t)
	u := []string{url}

	r := run(t, Options{Scenario: "conns", URLs: u, Conns: 300, Hold: 500 * time.Millisecond, PIDs: []int{pid}})
	if c := metric(t, r, "connected"); c != 300 {
		t.Errorf("connected %v of 300", c)
	}
	if m := metric(t, r, "server_rss_per_conn_kib"); m <= 0 {
		t.Errorf("server memory per connection = %v", m)
	}

	r = run(t, Options{Scenario: "fanout", URLs: u, Channels: 2, Subscribers: 20, Publishers: 2, Rate: 500, Duration: time.Second, PIDs: []int{pid}})
	checkFanout(t, r)
	if c := metric(t, r, "server_cpu_cores"); math.IsNaN(c) {
		t.Error("server CPU not measured")
	}

	r = run(t, Options{Scenario: "rtt", URLs: u, Conns: 4, Duration: 500 * time.Millisecond})
	if metric(t, r, "round_trips") == 0 || metric(t, r, "pub_errors") != 0 {
		t.Error("rtt against the reference measured nothing")
	}

	r = run(t, Options{Scenario: "churn", URLs: u, Conns: 2, Duration: 500 * time.Millisecond})
	if metric(t, r, "cycles") == 0 {
		t.Error("churn against the reference made no cycle")
	}
}

func TestAdminPIDs(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/cluster" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprint(w, `{"supervisor_pid":10,"processes":[{"name":"worker-1","pid":12,"addrs":{}},{"name":"broker-1","pid":11},{"pid":12}]}`)
	}))
	defer srv.Close()
	pids, names, err := adminPIDs(context.Background(), srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(pids) != "[10 11 12]" || names[10] != "supervisor" || names[12] != "worker-1" || names[11] != "broker-1" {
		t.Errorf("pids %v names %v", pids, names)
	}
	if _, _, err := adminPIDs(context.Background(), srv.URL+"/nope"); err == nil {
		t.Error("404 accepted")
	}
}

func TestAgentsRaisedPastTheFileLimit(t *testing.T) {
	o := Options{Scenario: "conns", Conns: 40000, Agents: 1, AgentCommand: []string{"x"}}
	if err := o.defaults(); err != nil {
		t.Fatal(err)
	}
	if o.Agents != 3 {
		t.Errorf("40,000 conns: %d agents, want 3 (19,000 each at most)", o.Agents)
	}
	o = Options{Scenario: "fanout", Channels: 100, Subscribers: 2000, Publishers: 10}
	if err := o.defaults(); err == nil {
		t.Error("200,010 conns in-process accepted")
	}
	o = Options{Scenario: "conns", Duration: time.Hour}
	if err := o.defaults(); err == nil {
		t.Error("an hour-long run accepted")
	}
}
