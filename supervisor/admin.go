package supervisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shoalhq/shoal/internal/procstat"
	"github.com/shoalhq/shoal/proto/control"
)

// ProcessInfo is one row of GET /api/cluster.
type ProcessInfo struct {
	Name        string            `json:"name"`
	Role        string            `json:"role"`
	Index       int               `json:"index"`
	Pid         int               `json:"pid"`
	State       string            `json:"state"`
	Restarts    int               `json:"restarts"`
	Uptime      float64           `json:"uptime"` // seconds the current process has run
	Connections int64             `json:"connections"`
	RSSBytes    uint64            `json:"rss_bytes"`
	HeapBytes   uint64            `json:"heap_bytes"`
	Goroutines  int               `json:"goroutines"`
	MessagesIn  int64             `json:"messages_in"`
	MessagesOut int64             `json:"messages_out"`
	Addrs       map[string]string `json:"addrs,omitempty"`
	LastExit    string            `json:"last_exit,omitempty"`
}

// ClusterInfo is GET /api/cluster.
type ClusterInfo struct {
	Node   string `json:"node"`
	Config string `json:"config"`
	Public string `json:"public"`
	TLS    string `json:"tls,omitempty"`
	// Balancing is how connections reach workers: "balancer" (balancer
	// processes) or "kernel" (cluster.balancers: 0, workers share the ports
	// with SO_REUSEPORT).
	Balancing       string        `json:"balancing"`
	Admin           string        `json:"admin"`
	Log             string        `json:"log"` // absolute path of the central log
	SupervisorPid   int           `json:"supervisor_pid"`
	SupervisorRSS   uint64        `json:"supervisor_rss_bytes"`
	Uptime          float64       `json:"uptime"`
	TopologyVersion int64         `json:"topology_version"`
	Processes       []ProcessInfo `json:"processes"`
}

type adminServer struct {
	srv  *http.Server
	done chan struct{}
}

func (s *Supervisor) serveAdmin(ctx context.Context, ln net.Listener) *adminServer {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", s.handleDashboard)
	mux.HandleFunc("GET /api/cluster", s.handleCluster)
	mux.HandleFunc("GET /healthz", s.handleHealth)
	mux.HandleFunc("GET /metrics", s.handleMetrics)
	mux.HandleFunc("POST /api/reload", func(w http.ResponseWriter, r *http.Request) { s.handleReload(ctx, w, r) })
	a := &adminServer{
		srv: &http.Server{
			Handler:           mux,
			ReadHeaderTimeout: 5 * time.Second,
			BaseContext:       func(net.Listener) context.Context { return ctx },
		},
		done: make(chan struct{}),
	}
	go func() {
		defer close(a.done)
		if err := a.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("admin HTTP server stopped", "error", err)
		}
	}()
	return a
}

// close stops the admin server; in-flight requests get a moment to finish.
func (a *adminServer) close() {
	if a == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := a.srv.Shutdown(ctx); err != nil {
		a.srv.Close()
	}
	<-a.done
}

// Cluster returns the process table.
func (s *Supervisor) Cluster() ClusterInfo {
	cfg := s.cfg()
	host, _ := os.Hostname()
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	logPath := cfg.Log.File
	if abs, err := filepath.Abs(logPath); err == nil {
		logPath = abs // readers (shoal logs --admin) may run elsewhere
	}
	ci := ClusterInfo{
		Node: host, Config: s.opts.ConfigName, Public: s.publicURL, TLS: s.tlsURL, Admin: s.adminURL, Log: logPath,
		SupervisorPid: os.Getpid(), SupervisorRSS: procstat.RSS(os.Getpid()),
		Uptime: now.Sub(s.started).Seconds(), TopologyVersion: s.version, Balancing: "balancer",
	}
	if cfg.Cluster.BalancerCount() == 0 {
		ci.Balancing = "kernel"
	}
	for _, p := range s.procs {
		pi := ProcessInfo{
			Name: p.name, Role: string(p.role), Index: p.index, Pid: p.pid, State: p.state,
			Restarts: p.restarts, Connections: p.stats.Connections, HeapBytes: p.stats.HeapBytes,
			Goroutines: p.stats.Goroutines, MessagesIn: p.stats.MessagesIn, MessagesOut: p.stats.MessagesOut,
			Addrs: p.addrs, LastExit: p.lastExit,
		}
		if p.inst != nil {
			pi.Uptime = now.Sub(p.since).Seconds()
			// Read by the supervisor itself, so it is there even when the
			// child's Stats is slow or not polled yet.
			pi.RSSBytes = procstat.RSS(p.pid)
		}
		ci.Processes = append(ci.Processes, pi)
	}
	return ci
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func (s *Supervisor) handleCluster(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, s.Cluster())
}

// handleHealth is 200 when every process is ready, 503 (with the ones that
// are not) otherwise; the supervisor answering at all means it is alive.
func (s *Supervisor) handleHealth(w http.ResponseWriter, _ *http.Request) {
	var notReady []string
	s.mu.Lock()
	for _, p := range s.procs {
		if p.state != control.StateReady {
			notReady = append(notReady, p.name+":"+p.state)
		}
	}
	s.mu.Unlock()
	if len(notReady) > 0 {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"status": "degraded", "not_ready": notReady})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"status": "ok"})
}

// handleMetrics writes the table and the children's Stats in the Prometheus
// text format, one series per process.
func (s *Supervisor) handleMetrics(w http.ResponseWriter, _ *http.Request) {
	ci := s.Cluster()
	s.mu.Lock()
	counters := make(map[string]map[string]int64, len(s.procs))
	for _, p := range s.procs {
		counters[p.name] = p.stats.Counters
	}
	s.mu.Unlock()

	var b strings.Builder
	metric := func(name, typ, help string, val func(ProcessInfo) (float64, bool)) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
		for _, p := range ci.Processes {
			if v, ok := val(p); ok {
				fmt.Fprintf(&b, "%s{proc=%q,role=%q} %s\n", name, p.Name, p.Role, strconv.FormatFloat(v, 'g', -1, 64))
			}
		}
	}
	up := func(p ProcessInfo) bool { return p.State == control.StateReady || p.State == control.StateDraining }
	metric("shoal_process_up", "gauge", "1 when the process is ready or draining.", func(p ProcessInfo) (float64, bool) {
		if up(p) {
			return 1, true
		}
		return 0, true
	})
	metric("shoal_process_restarts_total", "counter", "Restarts after crashes.", func(p ProcessInfo) (float64, bool) { return float64(p.Restarts), true })
	metric("shoal_process_uptime_seconds", "gauge", "Seconds the current process has run.", func(p ProcessInfo) (float64, bool) { return p.Uptime, up(p) })
	metric("shoal_process_resident_memory_bytes", "gauge", "Resident set size.", func(p ProcessInfo) (float64, bool) { return float64(p.RSSBytes), up(p) })
	metric("shoal_process_heap_bytes", "gauge", "Go heap in use.", func(p ProcessInfo) (float64, bool) { return float64(p.HeapBytes), up(p) })
	metric("shoal_process_goroutines", "gauge", "Goroutines.", func(p ProcessInfo) (float64, bool) { return float64(p.Goroutines), up(p) })
	metric("shoal_connections", "gauge", "Open client connections.", func(p ProcessInfo) (float64, bool) { return float64(p.Connections), up(p) })
	metric("shoal_messages_in_total", "counter", "Messages received.", func(p ProcessInfo) (float64, bool) { return float64(p.MessagesIn), up(p) })
	metric("shoal_messages_out_total", "counter", "Messages sent.", func(p ProcessInfo) (float64, bool) { return float64(p.MessagesOut), up(p) })

	// Role-specific counters, one series per (process, counter).
	fmt.Fprintf(&b, "# HELP shoal_counter Role-specific counters of each process.\n# TYPE shoal_counter untyped\n")
	for _, p := range ci.Processes {
		names := make([]string, 0, len(counters[p.Name]))
		for k := range counters[p.Name] {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			fmt.Fprintf(&b, "shoal_counter{proc=%q,role=%q,name=%q} %d\n", p.Name, p.Role, k, counters[p.Name][k])
		}
	}
	fmt.Fprintf(&b, "# HELP shoal_supervisor_resident_memory_bytes Supervisor resident set size.\n# TYPE shoal_supervisor_resident_memory_bytes gauge\nshoal_supervisor_resident_memory_bytes %d\n", ci.SupervisorRSS)
	fmt.Fprintf(&b, "# HELP shoal_topology_version Version of the topology pushed to children.\n# TYPE shoal_topology_version counter\nshoal_topology_version %d\n", ci.TopologyVersion)
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	_, _ = w.Write([]byte(b.String()))
}

// ReloadResult is the answer of POST /api/reload.
type ReloadResult struct {
	Restarted []string `json:"restarted"`
	Skipped   []string `json:"skipped,omitempty"`
	Error     string   `json:"error,omitempty"`
}

// errReloadBusy: only one rolling reload runs at a time.
var errReloadBusy = errors.New("a reload is already running")

func (s *Supervisor) handleReload(ctx context.Context, w http.ResponseWriter, r *http.Request) {
	rctx, cancel := mergeCtx(ctx, r.Context())
	defer cancel()
	res, err := s.Reload(rctx)
	switch {
	case errors.Is(err, errReloadBusy):
		res.Error = err.Error()
		writeJSON(w, http.StatusConflict, res)
	case err != nil:
		res.Error = err.Error()
		writeJSON(w, http.StatusInternalServerError, res)
	default:
		writeJSON(w, http.StatusOK, res)
	}
}

// mergeCtx ends when either a or b ends.
func mergeCtx(a, b context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(a)
	stop := context.AfterFunc(b, cancel)
	return ctx, func() { stop(); cancel() }
}

func (s *Supervisor) reloadLoop(ctx context.Context, reqs <-chan struct{}) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-reqs:
		}
		if _, err := s.Reload(ctx); err != nil && ctx.Err() == nil {
			s.log.Error("reload failed", "error", err)
		}
	}
}

func (s *Supervisor) configReloadLoop(ctx context.Context, reqs <-chan struct{}) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-reqs:
		}
		if n, err := s.ReloadConfig(ctx); err != nil && ctx.Err() == nil {
			s.log.Error("config reload failed", "error", err)
		} else if err == nil {
			s.log.Info("config reloaded in place", "processes", n)
		}
	}
}

// ReloadConfig re-reads the config source and hands the new config to every
// live child that can apply it in place (control.Reloader: rules, keys,
// limits, certificates); children that cannot answer Unimplemented and keep
// running on the old one. A config that fails to load changes nothing. It
// returns how many children applied the new config.
func (s *Supervisor) ReloadConfig(ctx context.Context) (int, error) {
	if s.opts.Reload == nil {
		return 0, errors.New("no config source to re-read")
	}
	cfg, err := s.opts.Reload()
	if err != nil {
		return 0, fmt.Errorf("reloading the config: %w", err)
	}
	s.ports.apply(&cfg) // port 0 stays the reserved port (balancers: 0)
	old := s.cfg()
	if !sameJSON(old.Listen.Public, cfg.Listen.Public) || !sameJSON(old.Cluster, cfg.Cluster) || !sameJSON(old.Log, cfg.Log) || !sameJSON(old.Storage, cfg.Storage) {
		s.log.Warn("config reload: changes to listen addresses, cluster, log or storage take effect only after restarting shoal run")
	}
	keepRunningLayout(old, &cfg)
	if err := s.setCfg(cfg); err != nil {
		return 0, err
	}
	data := s.cfgJSON()
	s.mu.Lock()
	var insts []*instance
	for _, p := range s.procs {
		if p.inst != nil {
			insts = append(insts, p.inst)
		}
	}
	s.mu.Unlock()
	applied := 0
	var errs []error
	for _, inst := range insts {
		rl, ok := inst.child.(control.Reloader)
		if !ok {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, rpcTimeout)
		err := rl.Reload(rctx, data)
		cancel()
		switch {
		case err == nil:
			applied++
		case status.Code(err) == codes.Unimplemented:
			s.log.Debug("config reload: role keeps its config", "proc", inst.name)
		default:
			errs = append(errs, fmt.Errorf("%s: %s", inst.name, rpcErrText(err)))
		}
	}
	return applied, errors.Join(errs...)
}

// Reload re-reads the config source (if any) and replaces the workers one at
// a time: each is taken out of the balancer's rotation, hands its clients
// over (see handover), is stopped and started again with the current config,
// and the next one waits until it is ready, so the node never loses more
// than one worker's capacity.
// Brokers and balancers keep running; changes to listen, cluster or log need
// a restart of `shoal run`.
func (s *Supervisor) Reload(ctx context.Context) (ReloadResult, error) {
	var res ReloadResult
	if !s.reloadMu.TryLock() {
		return res, errReloadBusy
	}
	defer s.reloadMu.Unlock()
	if s.opts.Reload != nil {
		cfg, err := s.opts.Reload()
		if err != nil {
			return res, fmt.Errorf("reloading the config: %w", err)
		}
		s.ports.apply(&cfg) // port 0 stays the reserved port (balancers: 0)
		old := s.cfg()
		if !sameJSON(old.Listen, cfg.Listen) || !sameJSON(old.Cluster, cfg.Cluster) || !sameJSON(old.Log, cfg.Log) || !sameJSON(old.Storage, cfg.Storage) {
			s.log.Warn("reload: changes to listen, cluster, log or storage take effect only after restarting shoal run")
		}
		keepRunningLayout(old, &cfg)
		if err := s.setCfg(cfg); err != nil {
			return res, err
		}
	}
	s.log.Info("rolling reload of the workers")
	s.mu.Lock()
	var workers []*proc
	for _, p := range s.procs {
		if p.role == control.RoleWorker {
			workers = append(workers, p)
		}
	}
	s.mu.Unlock()
	for _, p := range workers {
		s.mu.Lock()
		ready := p.state == control.StateReady
		state := p.state
		s.mu.Unlock()
		if !ready {
			res.Skipped = append(res.Skipped, p.name+" ("+state+")")
			continue
		}
		if !s.handover(ctx, p) {
			res.Skipped = append(res.Skipped, p.name+" (exited during the handover; restarted as a crash)")
			continue
		}
		req := &restartReq{done: make(chan error, 1)}
		t := time.NewTimer(10 * time.Second)
		select {
		case p.restartCh <- req:
			t.Stop()
		case <-t.C:
			res.Skipped = append(res.Skipped, p.name+" (busy)")
			continue
		case <-ctx.Done():
			t.Stop()
			return res, fmt.Errorf("reload interrupted: %w", ctx.Err())
		}
		// The slot's own goroutine drains, stops and restarts it; its reply
		// comes once the replacement is ready (or failed to start).
		select {
		case err := <-req.done:
			if err != nil {
				return res, fmt.Errorf("restarting %s: %w", p.name, err)
			}
		case <-ctx.Done():
			return res, fmt.Errorf("reload interrupted: %w", ctx.Err())
		}
		res.Restarted = append(res.Restarted, p.name)
	}
	s.log.Info("rolling reload done", "restarted", strings.Join(res.Restarted, ","), "skipped", strings.Join(res.Skipped, ","))
	return res, nil
}

// Rolling restart close code and reason: 4000 is one of the codes the
// official client reconnects on at once (protocol reference §8), where 1001
// (Drain, the shutdown path) costs each client a 10–20 s back-off.
const (
	handoverCode   = 4000
	handoverReason = "worker restarting"
)

// handover tells a ready worker's clients to reconnect before the slot's
// goroutine stops it: the worker is marked draining and the balancers are
// told (so the reconnects land on the other workers), then it closes its
// sockets with 4000 spread over worker.drain_window (control.Handoverer). A
// worker that cannot (Unimplemented, an older binary) is left to the slot's
// Drain, which closes with 1001 all at once. The slot's Drain and Stop follow
// either way; after a handover Drain finds nothing left. It returns false
// when the worker's process was replaced meanwhile (it exited and the slot
// restarted it as a crash), so the reload must not restart it again.
func (s *Supervisor) handover(ctx context.Context, p *proc) bool {
	s.mu.Lock()
	inst := p.inst
	s.mu.Unlock()
	if inst == nil {
		return false
	}
	v := s.setState(p, control.StateDraining)
	s.waitPushed(ctx, v, rpcTimeout+time.Second) // out of the balancer's rotation first
	window := s.cfg().Worker.DrainWindow.D()
	timeout := window + drainTimeout // the stragglers' close handshakes get what a Drain gets
	start := time.Now()
	if h, ok := inst.child.(control.Handoverer); ok {
		hctx, cancel := context.WithTimeout(ctx, timeout+2*time.Second)
		err := h.Handover(hctx, handoverCode, handoverReason, window, timeout)
		cancel()
		switch {
		case err == nil:
			s.log.Info("worker handed its clients over", "worker", p.name, "code", handoverCode,
				"window", window, "took", time.Since(start).Round(time.Millisecond))
		case status.Code(err) == codes.Unimplemented:
			s.log.Info("worker cannot hand over; draining it (clients reconnect with back-off)", "worker", p.name)
		default:
			// The slot's Drain still closes whatever is left.
			s.log.Warn("handover failed", "worker", p.name, "error", rpcErrText(err))
		}
	}
	s.mu.Lock()
	same := p.inst == inst
	s.mu.Unlock()
	return same
}

func sameJSON(a, b any) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return string(ja) == string(jb)
}
