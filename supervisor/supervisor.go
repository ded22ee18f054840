// Package supervisor is the parent of every Shoal process on a node. It
// launches the brokers, workers and balancers as go-plugin children of the
// same binary, keeps the process table and pushes it to every child as the
// control.Topology, restarts crashed children with backoff and crash-loop
// detection, writes every process's log lines into one central log, and
// serves the admin HTTP API.
//
// Lock order: Supervisor.reloadMu before Supervisor.mu; Supervisor.cfgMu is
// a leaf. No RPC to a child is made while holding mu.
package supervisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/logfile"
	"github.com/shoalhq/shoal/proto/control"
)

// Options are what `shoal run` hands the supervisor besides the config.
type Options struct {
	// Stdout receives the startup report: one line per process as it becomes
	// ready, then the public URL, the admin URL and the log path.
	Stdout io.Writer
	// Stderr receives a one-line copy of every warning and error logged.
	Stderr io.Writer
	// ConfigName says where the config came from ("<default>" or a file).
	ConfigName string
	// Reload re-reads the config source, for a rolling restart (POST
	// /api/reload, SIGUSR2) and for a config reload (SIGHUP). Nil: a rolling
	// restart uses the running config and a config reload does nothing.
	Reload func() (configs.Config, error)
	// ReloadRequests triggers a rolling restart of the workers per receive
	// (SIGUSR2, `shoal reload`).
	ReloadRequests <-chan struct{}
	// ConfigReloadRequests triggers a config reload in place per receive
	// (SIGHUP): every child that implements control.Reloader gets the new
	// config; no process restarts and no connection drops.
	ConfigReloadRequests <-chan struct{}
	// Executable is the shoal binary to re-execute for children; default
	// os.Executable().
	Executable string
}

// Internal process states besides the control.State* ones.
const (
	statePending = "pending" // not launched yet (startup)
	stateFailed  = "failed"  // crash loop: not restarted any more
	stateStopped = "stopped" // shut down
)

// proc is one slot of the process table ("worker-2"); its OS process may be
// replaced many times.
type proc struct {
	role      control.Role
	name      string
	index     int
	restartCh chan *restartReq // planned restarts (rolling reload)

	// Guarded by Supervisor.mu.
	state    string
	inst     *instance
	pid      int
	addrs    map[string]string
	restarts int
	since    time.Time // when the current instance started
	lastExit string
	stats    control.Stats
	statFail int // consecutive failed Stats polls of the current instance

	hist CrashHistory // only the supervise goroutine touches it
}

type restartReq struct{ done chan error }

// Supervisor is one running node; see Run.
type Supervisor struct {
	opts    Options
	exe     string
	sink    *logfile.Writer
	log     hclog.Logger
	level   hclog.Level
	runDir  string
	policy  Policy
	started time.Time

	cfgMu sync.RWMutex
	cfgV  configs.Config
	cfgJ  []byte
	// ports pins port-0 public addresses when workers bind them
	// (balancers: 0, reuseport.go); set once before any child starts.
	ports *portReservation

	mu        sync.Mutex
	procs     []*proc
	version   int64
	adminURL  string
	publicURL string
	tlsURL    string

	kick     chan struct{} // coalesced "topology changed"
	pushed   int64         // guarded by mu: version of the last finished push round
	pushedCh chan struct{} // guarded by mu: closed (and replaced) when a round finishes
	reloadMu sync.Mutex
	bg       sync.WaitGroup
}

// Run starts the node described by cfg and supervises it until ctx ends,
// then drains and stops every child and returns nil. A problem that keeps
// the node from starting (log file, admin or public port in use, a child's
// Start failing) is returned as one clear error.
func Run(ctx context.Context, cfg configs.Config, opts Options) error {
	if opts.Stdout == nil {
		opts.Stdout = os.Stdout
	}
	if opts.Stderr == nil {
		opts.Stderr = os.Stderr
	}
	if opts.ConfigName == "" {
		opts.ConfigName = "<default>"
	}
	exe := opts.Executable
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return fmt.Errorf("finding the shoal binary to start children: %w", err)
		}
	}
	s := &Supervisor{
		opts: opts, exe: exe, level: hclogLevel(cfg.Log.Level),
		policy: PolicyFromConfig(cfg.Cluster.Restart), started: time.Now(),
		kick: make(chan struct{}, 1), pushedCh: make(chan struct{}),
	}
	if err := s.setCfg(cfg); err != nil {
		return err
	}

	// Warnings echoed to stderr are held back until the node is up: if it
	// fails to start, the user reads one line (the error), not every
	// child's complaint on the way down; the log has them all.
	echo := &gatedWriter{dst: opts.Stderr}
	sink, err := logfile.Open(logfile.Options{
		Path: cfg.Log.File, MaxSize: int64(cfg.Log.Rotate.Size), Keep: cfg.Log.Rotate.Keep,
		Echo: echo, EchoLevel: logfile.LevelWarn,
	})
	if err != nil {
		return fmt.Errorf("log.file %s: %w", cfg.Log.File, err)
	}
	defer sink.Close()
	s.sink = sink
	s.log = newProcLogger(sink, "supervisor", os.Getpid, s.level)

	var adminLn net.Listener
	if cfg.Listen.Admin != "" {
		adminLn, err = net.Listen("tcp", cfg.Listen.Admin)
		if err != nil {
			return portError("listen.admin", cfg.Listen.Admin, err)
		}
		s.adminURL = "http://" + displayAddr(adminLn.Addr().String())
	}
	closeAdmin := func() {
		if adminLn != nil {
			adminLn.Close()
		}
	}
	if err := checkPortFree("listen.public", cfg.Listen.Public); err != nil {
		closeAdmin()
		return err
	}
	if err := checkPortFree("listen.tls.listen", cfg.Listen.TLS.Listen); err != nil {
		closeAdmin()
		return err
	}
	ports, err := reservePorts(cfg)
	if err != nil {
		closeAdmin()
		return err
	}
	defer ports.release()
	s.cfgMu.Lock()
	s.ports = ports
	s.cfgMu.Unlock()
	if err := s.setCfg(cfg); err != nil { // now with the reserved ports
		closeAdmin()
		return err
	}

	// Unix socket paths must stay under 108 bytes: a short private directory
	// under the system temp dir, not under storage.dir. Those of supervisors
	// that were SIGKILLed are removed first (rundir.go).
	if stale := sweepRunDirs(os.TempDir()); len(stale) > 0 {
		s.log.Info("removed run directories of supervisors that are gone", "count", len(stale))
	}
	s.runDir, err = makeRunDir()
	if err != nil {
		closeAdmin()
		return fmt.Errorf("creating the run directory for unix sockets: %w", err)
	}
	defer os.RemoveAll(s.runDir)

	s.buildTable(cfg)
	if hint := migrateReqHint(cfg); hint != "" {
		s.log.Info(hint)
	}
	s.log.Info("starting node", "config", opts.ConfigName, "brokers", cfg.Cluster.Brokers,
		"workers", cfg.Cluster.Workers.N(), "balancers", cfg.Cluster.BalancerCount(),
		"run_dir", s.runDir, "log", cfg.Log.File)

	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.goBG(func() { s.pushLoop(rctx) })
	var admin *adminServer
	if adminLn != nil {
		admin = s.serveAdmin(rctx, adminLn)
	}

	if err := s.startAll(rctx); err != nil {
		interrupted := ctx.Err() != nil
		if interrupted {
			s.log.Info("interrupted during startup; stopping")
		} else {
			s.log.Error("startup failed; stopping", "error", err)
		}
		cancel()
		s.bg.Wait()
		s.shutdown()
		admin.close()
		echo.discard()
		if interrupted {
			return nil // the user asked for it: a clean stop, not a failure
		}
		return err
	}
	s.printReady()
	echo.open()

	s.mu.Lock()
	procs := append([]*proc(nil), s.procs...)
	s.mu.Unlock()
	for _, p := range procs {
		s.goBG(func() { s.supervise(rctx, p) })
	}
	s.goBG(func() { s.statsLoop(rctx) })
	if opts.ReloadRequests != nil {
		s.goBG(func() { s.reloadLoop(rctx, opts.ReloadRequests) })
	}
	if opts.ConfigReloadRequests != nil {
		s.goBG(func() { s.configReloadLoop(rctx, opts.ConfigReloadRequests) })
	}

	<-ctx.Done()
	s.log.Info("shutting down: draining workers and stopping every process")
	cancel()
	s.bg.Wait()
	s.shutdown()
	admin.close()
	s.log.Info("stopped", "uptime", time.Since(s.started).Round(time.Millisecond))
	return nil
}

// gatedWriter holds writes back (up to a bound) until open passes them on,
// or discard drops them.
type gatedWriter struct {
	mu      sync.Mutex
	dst     io.Writer
	opened  bool
	dropped bool
	held    []byte
}

const maxHeldEcho = 64 << 10

func (g *gatedWriter) Write(p []byte) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case g.opened:
		return g.dst.Write(p)
	case g.dropped || len(g.held)+len(p) > maxHeldEcho:
		return len(p), nil
	}
	g.held = append(g.held, p...)
	return len(p), nil
}

func (g *gatedWriter) open() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.held) > 0 {
		_, _ = g.dst.Write(g.held)
	}
	g.held, g.opened = nil, true
}

func (g *gatedWriter) discard() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.held, g.dropped = nil, true
}

func (s *Supervisor) goBG(f func()) {
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		f()
	}()
}

func (s *Supervisor) setCfg(cfg configs.Config) error {
	s.cfgMu.RLock()
	s.ports.apply(&cfg) // a reloaded config still says port 0
	s.cfgMu.RUnlock()
	j, err := json.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("encoding the config for children: %w", err)
	}
	s.cfgMu.Lock()
	s.cfgV, s.cfgJ = cfg, j
	s.cfgMu.Unlock()
	return nil
}

func (s *Supervisor) cfg() configs.Config {
	s.cfgMu.RLock()
	defer s.cfgMu.RUnlock()
	return s.cfgV
}

func (s *Supervisor) cfgJSON() []byte {
	s.cfgMu.RLock()
	defer s.cfgMu.RUnlock()
	return s.cfgJ
}

// buildTable creates every slot in start order: brokers, workers, balancers.
func (s *Supervisor) buildTable(cfg configs.Config) {
	add := func(role control.Role, n int) {
		for i := 1; i <= n; i++ {
			s.procs = append(s.procs, &proc{
				role: role, name: string(role) + "-" + strconv.Itoa(i), index: i,
				restartCh: make(chan *restartReq), state: statePending,
			})
		}
	}
	add(control.RoleBroker, cfg.Cluster.Brokers)
	add(control.RoleWorker, cfg.Cluster.Workers.N())
	add(control.RoleBalancer, cfg.Cluster.BalancerCount())
}

// startAll launches role by role (a role's processes in parallel): workers
// need the brokers' addresses, the balancer the workers'.
func (s *Supervisor) startAll(ctx context.Context) error {
	for _, role := range []control.Role{control.RoleBroker, control.RoleWorker, control.RoleBalancer} {
		var group []*proc
		for _, p := range s.procs {
			if p.role == role {
				group = append(group, p)
			}
		}
		errs := make([]error, len(group))
		var wg sync.WaitGroup
		for i, p := range group {
			wg.Add(1)
			go func() {
				defer wg.Done()
				inst, err := s.launch(ctx, p)
				if err != nil {
					errs[i] = err
					s.setDead(p, "failed to start")
					return
				}
				s.markReady(p, inst)
				fmt.Fprintf(s.opts.Stdout, "  %-12s ready  pid %d\n", p.name, inst.pid)
				s.childLog(p.name, inst.pid).Info("ready", "addrs", inst.addrs)
			}()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("interrupted while starting: %w", ctx.Err())
			}
			for _, e := range errs {
				if e != nil {
					return e // the first is the one clear line; the log has all
				}
			}
		}
	}
	return nil
}

func (s *Supervisor) printReady() {
	cfg := s.cfg()
	s.mu.Lock()
	// The balancer's bound addresses (or, with balancers: 0, a worker's).
	find := func(key string) string {
		for _, role := range []control.Role{control.RoleBalancer, control.RoleWorker} {
			for _, p := range s.procs {
				if p.role == role && p.addrs[key] != "" {
					return p.addrs[key]
				}
			}
		}
		return ""
	}
	public, tls := find(control.AddrPublic), find(control.AddrTLS)
	if public == "" {
		public = cfg.Listen.Public
	}
	s.publicURL = "ws://" + displayAddr(public) + cfg.Listen.Path
	if tls != "" {
		s.tlsURL = "wss://" + displayAddr(tls) + cfg.Listen.Path
	}
	publicURL, tlsURL, adminURL := s.publicURL, s.tlsURL, s.adminURL
	s.mu.Unlock()
	w := s.opts.Stdout
	fmt.Fprintf(w, "shoal is running (%d processes)\n", len(s.procs))
	fmt.Fprintf(w, "  public  %s\n", publicURL)
	if tlsURL != "" {
		fmt.Fprintf(w, "  tls     %s\n", tlsURL)
		if path, fp := devCertFingerprint(cfg); fp != "" {
			// Whoever terminates TLS (balancers or workers) serves this one
			// file: one fingerprint for the node.
			fmt.Fprintf(w, "  cert    %s (self-signed, trust it explicitly) sha256 %s\n", path, fp)
		}
	}
	if adminURL != "" {
		fmt.Fprintf(w, "  admin   %s\n", adminURL)
	}
	fmt.Fprintf(w, "  log     %s\n", cfg.Log.File)
	s.log.Info("node ready", "public", publicURL, "tls", tlsURL, "admin", adminURL)
}

// displayAddr shows an unspecified host as 127.0.0.1, so that the printed
// URL can be pasted into a client.
func displayAddr(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

// portError is the one line for a listen failure.
func portError(key, addr string, err error) error {
	if errors.Is(err, syscall.EADDRINUSE) {
		return fmt.Errorf("%s %s: address already in use (is another shoal running?)", key, addr)
	}
	if errors.Is(err, syscall.EACCES) {
		return fmt.Errorf("%s %s: permission denied (ports below 1024 need privileges)", key, addr)
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		return fmt.Errorf("%s %s: %v", key, addr, op.Err)
	}
	return fmt.Errorf("%s %s: %w", key, addr, err)
}

// checkPortFree catches a busy public port before any child starts, so the
// user gets one line naming the key instead of a child's start error. The
// child binds it for real later (port 0 cannot be checked and is skipped).
func checkPortFree(key, addr string) error {
	if addr == "" {
		return nil
	}
	if _, port, err := net.SplitHostPort(addr); err != nil || port == "0" {
		return nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return portError(key, addr, err)
	}
	return ln.Close()
}

// ---- the process table ----

func (s *Supervisor) changedLocked() {
	s.version++
	select {
	case s.kick <- struct{}{}:
	default: // a push is already pending; it will read the latest table
	}
}

func (s *Supervisor) setStarting(p *proc, inst *instance) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p.state, p.pid, p.since = control.StateStarting, inst.pid, inst.started
	p.stats, p.statFail = control.Stats{}, 0
	s.changedLocked()
}

// markReady puts a started instance in its slot and returns the topology
// version that announces it.
func (s *Supervisor) markReady(p *proc, inst *instance) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	p.state, p.inst, p.pid, p.addrs, p.since = control.StateReady, inst, inst.pid, inst.addrs, inst.started
	s.changedLocked()
	return s.version
}

// setState changes a slot's state and returns the topology version that
// carries the change.
func (s *Supervisor) setState(p *proc, state string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	p.state = state
	s.changedLocked()
	return s.version
}

func (s *Supervisor) setDead(p *proc, why string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p.state, p.inst, p.lastExit = control.StateDead, nil, why
	p.stats = control.Stats{}
	s.changedLocked()
}

// topologyLocked is the table as children see it.
func (s *Supervisor) topologyLocked() control.Topology {
	t := control.Topology{Version: s.version}
	for _, p := range s.procs {
		if p.state == statePending {
			continue
		}
		st := p.state
		if st == stateFailed || st == stateStopped {
			st = control.StateDead
		}
		addrs := make(map[string]string, len(p.addrs))
		for k, v := range p.addrs {
			addrs[k] = v
		}
		t.Peers = append(t.Peers, control.Peer{
			Name: p.name, Role: p.role, State: st, Addrs: addrs,
			Connections: p.stats.Connections, Pid: p.pid,
		})
	}
	return t
}

func (s *Supervisor) topology() control.Topology {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.topologyLocked()
}

// pushLoop sends the whole topology to every child that has finished Start,
// each time the table changes (coalesced: a burst of changes is one push of
// the latest table).
func (s *Supervisor) pushLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.kick:
		}
		s.mu.Lock()
		topo := s.topologyLocked()
		var targets []*instance
		for _, p := range s.procs {
			if p.inst != nil && (p.state == control.StateReady || p.state == control.StateDraining) {
				targets = append(targets, p.inst)
			}
		}
		s.mu.Unlock()
		var wg sync.WaitGroup
		for _, inst := range targets {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cctx, cancel := context.WithTimeout(ctx, rpcTimeout)
				defer cancel()
				if err := inst.child.SetTopology(cctx, topo); err != nil && ctx.Err() == nil {
					// The child may be dying; its exit is handled by supervise.
					s.log.Debug("pushing topology failed", "to", inst.name, "version", topo.Version, "error", rpcErrText(err))
				}
			}()
		}
		wg.Wait()
		s.mu.Lock()
		s.pushed = topo.Version
		close(s.pushedCh)
		s.pushedCh = make(chan struct{})
		s.mu.Unlock()
	}
}

// waitPushed waits (at most timeout) until a topology of at least version v
// has been pushed to every child: a worker about to drain must first be out
// of the balancer's rotation, or reconnecting clients would be routed to it.
func (s *Supervisor) waitPushed(ctx context.Context, v int64, timeout time.Duration) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		s.mu.Lock()
		done, ch := s.pushed >= v, s.pushedCh
		s.mu.Unlock()
		if done {
			return
		}
		select {
		case <-ch:
		case <-t.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

// statsLoop polls every ready child's Stats for the table and /metrics.
func (s *Supervisor) statsLoop(ctx context.Context) {
	every := statsInterval
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		s.mu.Lock()
		type target struct {
			p    *proc
			inst *instance
		}
		var targets []target
		for _, p := range s.procs {
			if p.inst != nil && p.state == control.StateReady {
				targets = append(targets, target{p, p.inst})
			}
		}
		s.mu.Unlock()
		results := make([]*control.Stats, len(targets))
		var wg sync.WaitGroup
		for i, tg := range targets {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cctx, cancel := context.WithTimeout(ctx, statsTimeout(every))
				defer cancel()
				st, err := tg.inst.child.Stats(cctx)
				if err != nil {
					if ctx.Err() == nil {
						s.log.Debug("stats failed", "from", tg.inst.name, "error", rpcErrText(err))
					}
					return
				}
				results[i] = &st
			}()
		}
		wg.Wait()
		s.mu.Lock()
		changed := false
		var hung []*instance
		for i, tg := range targets {
			if tg.p.inst != tg.inst {
				continue
			}
			if results[i] == nil {
				tg.p.statFail++
				if tg.p.statFail == hungPolls {
					hung = append(hung, tg.inst)
				}
				continue
			}
			tg.p.statFail = 0
			if tg.p.stats.Connections != results[i].Connections {
				changed = true
			}
			tg.p.stats = *results[i]
		}
		if changed {
			s.changedLocked() // balancers weigh workers by connections
		}
		s.mu.Unlock()
		for _, inst := range hung {
			// Alive but deaf (deadlocked, stuck in a syscall): kill it so that
			// supervise treats it as a crash and starts a fresh one.
			s.childLog(inst.name, inst.pid).Error(fmt.Sprintf("%s has not answered its control plane for %d polls; killing it", inst.name, hungPolls))
			_ = inst.cmd.Process.Signal(syscall.SIGKILL)
		}
	}
}

// hungPolls failed Stats polls in a row mark a child as hung: with the
// default interval that is ten seconds or more without an answer, far beyond
// what a busy but healthy child needs (killing it drops its connections).
const hungPolls = 5

// statsTimeout bounds one Stats call: rpcTimeout, or the poll interval when
// a test makes that shorter.
func statsTimeout(every time.Duration) time.Duration {
	if every < time.Second {
		return every
	}
	return rpcTimeout
}

// statsInterval is how often children's Stats are polled (a variable so
// that a test can shorten it).
var statsInterval = 2 * time.Second

// ---- restarts ----

type crashInfo struct {
	pid    int
	status string
	stderr string
	ranFor time.Duration
}

// supervise watches one slot's process and replaces it when it exits or a
// reload asks for it, until ctx ends or the slot is given up as a crash loop.
func (s *Supervisor) supervise(ctx context.Context, p *proc) {
	s.mu.Lock()
	inst := p.inst
	s.mu.Unlock()
	if inst == nil {
		return
	}
	for inst != nil { // each round: one instance's life; ends on ctx or give-up
		var planned *restartReq
		select {
		case <-ctx.Done():
			return // shutdown takes over p.inst
		case <-inst.exited:
		case planned = <-p.restartCh:
		}
		if ctx.Err() != nil && planned == nil {
			// Shutting down: a child that exits now (say, SIGTERMed with the
			// whole service) is not a crash; shutdown reaps it.
			return
		}
		var crash *crashInfo
		if planned != nil {
			v := s.setState(p, control.StateDraining)
			s.waitPushed(ctx, v, rpcTimeout+time.Second) // out of the balancer's rotation first
			s.drainAndStop(inst, true, true)
			inst.kill()
			s.setDead(p, "replaced by reload")
		} else {
			crash = &crashInfo{pid: inst.pid, status: inst.exitStatus(), ranFor: time.Since(inst.started)}
			inst.kill() // reaps go-plugin's goroutines; the process is gone already
			crash.stderr = inst.stderr.Report()
			s.setDead(p, crash.status)
		}
		inst = s.restart(ctx, p, crash, planned)
	}
}

// restart brings a slot back. After a crash it applies the policy (backoff,
// crash loop); a failed start counts as another crash. Returns nil when ctx
// ends or the slot is given up.
func (s *Supervisor) restart(ctx context.Context, p *proc, crash *crashInfo, planned *restartReq) *instance {
	reply := func(err error) {
		if planned != nil {
			planned.done <- err
			planned = nil
		}
	}
	// Bounded: every failed attempt is a crash, and crash-loop detection ends
	// the loop after Policy.Crashes of them within the window.
	for {
		if crash != nil {
			d := s.policy.OnCrash(&p.hist, time.Now(), crash.ranFor)
			s.reportCrash(p, crash, d)
			if d.GiveUp {
				s.mu.Lock()
				p.state = stateFailed
				s.changedLocked()
				s.mu.Unlock()
				reply(fmt.Errorf("%s is crash-looping", p.name))
				return nil
			}
			t := time.NewTimer(d.Delay)
			select {
			case <-ctx.Done():
				t.Stop()
				reply(ctx.Err())
				return nil
			case <-t.C:
			}
			s.mu.Lock()
			p.restarts++
			s.mu.Unlock()
		}
		if ctx.Err() != nil { // shutting down: do not start what would be stopped at once
			reply(ctx.Err())
			return nil
		}
		inst, err := s.launch(ctx, p)
		if err == nil {
			v := s.markReady(p, inst)
			s.childLog(p.name, inst.pid).Info("ready", "restarts", s.restartsOf(p), "addrs", inst.addrs)
			if planned != nil {
				// A rolling reload drains the next worker only once the
				// balancer routes to this one, so capacity never drops by two.
				s.waitPushed(ctx, v, rpcTimeout+time.Second)
			}
			reply(nil)
			return inst
		}
		reply(err)
		if ctx.Err() != nil {
			return nil
		}
		s.setDead(p, "failed to start")
		crash = &crashInfo{status: err.Error()}
	}
}

func (s *Supervisor) restartsOf(p *proc) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return p.restarts
}

// reportCrash logs a crash at error level under the crashed process's name
// and pid, so `shoal logs --proc worker-1` shows it next to its last lines.
func (s *Supervisor) reportCrash(p *proc, c *crashInfo, d Decision) {
	l := s.childLog(p.name, c.pid)
	args := []any{"exit", c.status, "ran_for", c.ranFor.Round(time.Millisecond), "crashes_in_window", d.Recent}
	if c.stderr != "" {
		args = append(args, "stderr", c.stderr)
	}
	what := "crashed"
	if c.pid == 0 {
		what = "failed to start"
	}
	if d.GiveUp {
		l.Error(fmt.Sprintf("%s %s; CRASH LOOP: %d crashes within %s, not restarting it again (the rest of the node keeps running)",
			p.name, what, d.Recent, s.policy.Window), args...)
		return
	}
	args = append(args, "restart_in", d.Delay)
	l.Error(fmt.Sprintf("%s %s; restarting in %s", p.name, what, d.Delay), args...)
}

// childLog writes lines about a child (its lifecycle, as the supervisor sees
// it) under the child's own name and pid, so `shoal logs --proc worker-1`
// tells that worker's whole story.
func (s *Supervisor) childLog(name string, pid int) hclog.Logger {
	return newProcLogger(s.sink, name, func() int { return pid }, s.level).With("reporter", "supervisor")
}

// drainAndStop asks a child to finish its work (a worker closes its sockets
// with 1001) and stop. Bounded by the drain and RPC timeouts.
func (s *Supervisor) drainAndStop(inst *instance, drain, stop bool) {
	if drain {
		dctx, cancel := context.WithTimeout(context.Background(), drainTimeout+2*time.Second)
		if err := inst.child.Drain(dctx, drainTimeout); err != nil {
			s.log.Warn("drain failed", "proc", inst.name, "error", rpcErrText(err))
		}
		cancel()
	}
	if !stop {
		return
	}
	sctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	if err := inst.child.Stop(sctx); err != nil {
		s.log.Debug("stop failed", "proc", inst.name, "error", rpcErrText(err))
	}
	cancel()
}

// shutdown stops every child: balancers first (no new connections), then
// workers (drain: sockets closed with 1001), then brokers; then every process
// is ended. Runs after the supervise goroutines have returned.
func (s *Supervisor) shutdown() {
	s.mu.Lock()
	procs := append([]*proc(nil), s.procs...)
	s.mu.Unlock()
	// Balancers first stop accepting but keep their proxied (TLS) streams
	// open, so the workers' 1001 closes reach TLS clients too; only after the
	// workers have drained are the balancers stopped.
	phases := []struct {
		role        control.Role
		drain, stop bool
	}{
		{control.RoleBalancer, true, false},
		{control.RoleWorker, true, true},
		{control.RoleBalancer, false, true},
		{control.RoleBroker, true, true},
	}
	for _, ph := range phases {
		var wg sync.WaitGroup
		for _, p := range procs {
			s.mu.Lock()
			inst := p.inst
			if p.role == ph.role && inst != nil {
				p.state = control.StateDraining
			}
			s.mu.Unlock()
			if p.role != ph.role || inst == nil {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				select {
				case <-inst.exited:
					return
				default:
				}
				s.drainAndStop(inst, ph.drain, ph.stop)
			}()
		}
		wg.Wait()
	}
	var wg sync.WaitGroup
	for _, p := range procs {
		s.mu.Lock()
		inst := p.inst
		p.inst = nil
		if p.state != stateFailed {
			p.state = stateStopped
		}
		s.mu.Unlock()
		if inst == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			inst.kill()
		}()
	}
	wg.Wait()
}
