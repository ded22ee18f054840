// Package balancer is the balancer process role: it accepts client
// connections on the public port (and the TLS port) and spreads them over
// the live workers by least connections.
//
// A plain connection is handed to the chosen worker as a file descriptor
// (package handoff): the balancer reads nothing from it and keeps nothing
// for it. A TLS connection is terminated here and proxied to the worker's
// proxy socket behind a PROXY v2 header (package proxyproto) that names the
// real client. See docs/balancer.md.
//
// With cluster.balancers: 0 there is no balancer process: each worker runs
// the same front end in-process (NewLocal, local.go) on ports shared with
// SO_REUSEPORT.
package balancer

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/internal/procstat"
	"github.com/shoalhq/shoal/proto/control"
)

// Child is the balancer's control-plane implementation.
type Child struct {
	log   hclog.Logger
	pool  pool
	stats *stats

	// ctx ends at Stop; every goroutine the balancer starts watches it.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // accept loops and proxied connections

	mu     sync.Mutex // guards the fields below
	state  string
	cfg    configs.Config
	public net.Listener
	// publicFile is the public socket when it carries only plain traffic:
	// accepted with accept4 directly (acceptPlain); public is then closed.
	publicFile *os.File
	tlsLn      net.Listener
	tlsConf    *tls.Config
	conns      map[net.Conn]struct{} // proxied connections (both ends), closed by Stop
	stopped    bool
	draining   bool
	sharedPort bool // ws:// and wss:// on listen.public (see sniff)
	loops      []*evLoop
	nextLoopIx int
	// proxyLimit caps proxied connections at what the fd limit allows.
	proxyLimit int64
	// linger is halfCloseLinger; tests shorten it before Start.
	linger time.Duration
	// unlistened is set when the listeners are being closed: an accept
	// error from then on is the end of the loop, not a failure to report.
	unlistened atomic.Bool
	// local is set in a worker's own front end (cluster.balancers: 0,
	// local.go): connections go to that worker, not to a pool.
	local *LocalOptions
}

var (
	_ control.Child    = (*Child)(nil)
	_ control.Reloader = (*Child)(nil)
)

// New returns the balancer role, ready to be served by control.Serve.
func New(log hclog.Logger) *Child {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	st := newStats()
	ctx, cancel := context.WithCancel(context.Background())
	return &Child{
		log:    log,
		pool:   pool{stats: st},
		stats:  st,
		ctx:    ctx,
		cancel: cancel,
		state:  control.StateStarting,
		conns:  map[net.Conn]struct{}{},

		proxyLimit: fdLimitProxies(),
		linger:     halfCloseLinger,
	}
}

// Start reads the config, opens the listeners and starts accepting. Workers
// arrive with the topology (p.Topology now, SetTopology later).
func (c *Child) Start(ctx context.Context, p control.StartParams) (control.StartResult, error) {
	cfg := configs.Default()
	if len(p.Config) > 0 {
		if err := json.Unmarshal(p.Config, &cfg); err != nil {
			return control.StartResult{}, fmt.Errorf("balancer: read config: %w", err)
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.public != nil || c.stopped {
		return control.StartResult{}, errors.New("balancer: Start called twice or after Stop")
	}
	if cfg.Listen.Public == "" {
		// configs.Validate requires it; an empty address would mean a
		// random port nobody is told about.
		return control.StartResult{}, errors.New("listen.public: must be set (host:port)")
	}
	c.cfg = cfg
	c.pool.setTopology(p.Topology)
	if c.local == nil && os.Getenv("GOGC") == "" {
		// A balancer process's live heap is almost all long-lived TLS
		// state (~3.4 KB per idle wss:// connection: crypto/tls's Conn and
		// AES-GCM states), and its garbage comes from handshakes. Go's
		// default target (GOGC=100: heap up to twice the live data) costs
		// RSS in proportion: per idle connection ~4.1 KB at 25, 5.2 KB at
		// 50 (SHOAL_BALANCER_COST=1 go test -run TestBalancerCost -v
		// ./balancer; 12.7 against 9.1 KB at 100 and 25 when crypto/tls
		// still kept its read buffers). 10 saves another 0.4 KB but cost
		// ~25% more balancer CPU per handshake with 8,000 connections held
		// (each GC marks all of them). A worker's front end (balancers: 0)
		// leaves the worker's own setting alone: its hot path allocates
		// per message.
		debug.SetGCPercent(balancerGCPercent)
	}

	// Several balancers on one node share the ports with SO_REUSEPORT, as
	// do the workers' own front ends (balancers: 0); a single balancer does
	// not set it, so a stray process on the port is an error rather than a
	// silent split of the traffic.
	shared := cfg.Cluster.BalancerCount() > 1 || c.local != nil
	pub, err := listenTCP(ctx, "listen.public", cfg.Listen.Public, shared)
	if err != nil {
		return control.StartResult{}, err
	}
	addrs := map[string]string{control.AddrPublic: pub.Addr().String()}
	if cfg.Listen.TLS.Listen != "" {
		tconf, err := c.tlsConfig(cfg)
		if err != nil {
			_ = pub.Close()
			return control.StartResult{}, err
		}
		c.tlsConf = tconf
		if cfg.Listen.TLS.Listen == cfg.Listen.Public {
			// One port for ws:// and wss://: told apart by the first byte.
			c.sharedPort = true
			addrs[control.AddrTLS] = addrs[control.AddrPublic]
		} else {
			tln, err := listenTCP(ctx, "listen.tls.listen", cfg.Listen.TLS.Listen, shared)
			if err != nil {
				_ = pub.Close()
				return control.StartResult{}, err
			}
			c.tlsLn = tln
			addrs[control.AddrTLS] = tln.Addr().String()
		}
	}
	if !c.sharedPort {
		f, err := rawListener(pub)
		if err != nil {
			_ = pub.Close()
			if c.tlsLn != nil {
				_ = c.tlsLn.Close()
			}
			return control.StartResult{}, fmt.Errorf("listen.public: %w", err)
		}
		c.publicFile = f
	}
	if c.tlsConf != nil && useEventLoops {
		c.startLoopsLocked(cfg)
	}
	c.public = pub
	c.state = control.StateReady
	c.wg.Add(1)
	if c.sharedPort {
		go c.acceptLoop(pub, c.startSniff)
	} else {
		go c.acceptPlain(c.publicFile, addrs[control.AddrPublic])
	}
	if c.tlsLn != nil {
		c.wg.Add(1)
		go c.acceptLoop(c.tlsLn, c.startTLS)
	}
	if c.tlsConf != nil && c.local == nil {
		// Not in a worker's front end: the worker's heap is mostly its
		// own, and a forced GC there would stall its message path.
		c.wg.Add(1)
		go c.releaseAfterBursts()
	}
	if c.local != nil {
		c.log.Info("worker listening on the public ports (SO_REUSEPORT, shared with the other workers)",
			"public", addrs[control.AddrPublic], "tls", addrs[control.AddrTLS])
	} else {
		c.log.Info("balancer listening", "public", addrs[control.AddrPublic], "tls", addrs[control.AddrTLS],
			"workers", len(c.pool.all()))
	}
	return control.StartResult{Addrs: addrs}, nil
}

// useEventLoops selects epoll-driven proxying (evproxy.go) for TLS; tests
// also run the goroutine-pair fallback with it off.
var useEventLoops = true

// startLoopsLocked starts one event loop per scheduler thread. If epoll is
// unavailable the goroutine-pair proxy is used instead (logged once).
func (c *Child) startLoopsLocked(cfg configs.Config) {
	wt := cfg.Worker.WriteTimeout.D()
	if wt <= 0 {
		wt = 10 * time.Second
	}
	for range max(1, runtime.GOMAXPROCS(0)) {
		l, err := newEvLoop(wt, c.linger, c.stats)
		if err != nil {
			c.log.Warn("epoll event loop unavailable; proxying with goroutines", "error", err)
			break
		}
		c.loops = append(c.loops, l)
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			l.run()
		}()
	}
}

// nextLoop picks an event loop round robin (nil: none running).
func (c *Child) nextLoop() *evLoop {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.loops) == 0 || c.stopped {
		return nil
	}
	c.nextLoopIx = (c.nextLoopIx + 1) % len(c.loops)
	return c.loops[c.nextLoopIx]
}

// startSniff gives a shared-port connection its short-lived sniffing
// goroutine (the accept loop must not wait for a client's first byte).
func (c *Child) startSniff(conn net.Conn) {
	c.wg.Add(1)
	go c.sniff(conn)
}

// listenTCP opens a public listener; "address in use" names the config key.
func listenTCP(ctx context.Context, key, addr string, reusePort bool) (net.Listener, error) {
	lc := net.ListenConfig{}
	if reusePort {
		lc.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, soReusePort, 1)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return nil, fmt.Errorf("%s: address %s already in use", key, addr)
		}
		return nil, fmt.Errorf("%s: listen on %s: %w", key, addr, err)
	}
	return ln, nil
}

// soReusePort is SO_REUSEPORT on Linux (the syscall package lacks the name).
const soReusePort = 0xf

func (c *Child) Health(ctx context.Context) (control.Health, error) {
	c.mu.Lock()
	state := c.state
	c.mu.Unlock()
	h := control.Health{State: state}
	if state == control.StateReady && c.local == nil && c.pool.live() == 0 {
		// Still ready (it accepts and will route as soon as a worker is
		// up), but say why connections are being closed.
		h.Message = "no live worker"
	}
	return h, nil
}

func (c *Child) Stats(ctx context.Context) (control.Stats, error) {
	st := control.Stats{
		Connections: c.stats.active.Load(),
		BytesIn:     c.stats.bytesIn.Load(),
		BytesOut:    c.stats.bytesOut.Load(),
		Counters:    c.stats.snapshot(),
	}
	procstat.Fill(&st)
	return st, nil
}

func (c *Child) SetTopology(ctx context.Context, t control.Topology) error {
	for _, w := range c.pool.setTopology(t) {
		w.closeSender()
	}
	return nil
}

// Reload applies a new config in place (SIGHUP): the TLS certificate (new
// files, or the same files re-read), the handshake and write timeouts. New
// connections use it; open ones are not touched. Moving a port needs a
// restart, and a config that asks for one is refused with the old one kept.
func (c *Child) Reload(ctx context.Context, config []byte) error {
	cfg := configs.Default()
	if err := json.Unmarshal(config, &cfg); err != nil {
		return fmt.Errorf("balancer: reload: read config: %w", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.public == nil || c.stopped {
		return errors.New("balancer: reload: not running")
	}
	old := c.cfg.Listen
	if cfg.Listen.Public != old.Public || cfg.Listen.TLS.Listen != old.TLS.Listen {
		return errors.New("balancer: reload: listen.public or listen.tls.listen changed; restart the balancer to move ports")
	}
	if cfg.Listen.TLS.Listen != "" {
		tconf, err := c.tlsConfig(cfg)
		if err != nil {
			return fmt.Errorf("balancer: reload: %w", err)
		}
		c.tlsConf = tconf
	}
	c.cfg = cfg
	for _, l := range c.loops {
		l.setWriteTimeout(cfg.Worker.WriteTimeout.D())
	}
	if c.local != nil {
		c.log.Info("public listeners reloaded (TLS certificate, timeouts)")
	} else {
		c.log.Info("balancer config reloaded")
	}
	return nil
}

// Drain stops accepting new connections and returns. Proxied TLS
// connections keep flowing: the workers drain them (closing with 1001), and
// Stop closes whatever is left.
func (c *Child) Drain(ctx context.Context, timeout time.Duration) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.draining || c.stopped {
		return nil
	}
	c.draining = true
	c.state = control.StateDraining
	c.closeListenersLocked()
	c.log.Info("balancer draining: no longer accepting")
	return nil
}

func (c *Child) closeListenersLocked() {
	c.unlistened.Store(true)
	if c.local != nil {
		// Sharing the ports with other workers: leave the SO_REUSEPORT
		// group now, synchronously, so that once Drain returns the kernel
		// sends every new connection to the others. Close alone may defer
		// the close(2) until the accept loop wakes up.
		for _, l := range []any{c.publicFile, c.public, c.tlsLn} {
			unlisten(l)
		}
	}
	if c.publicFile != nil {
		_ = c.publicFile.Close()
	}
	if c.public != nil {
		_ = c.public.Close()
	}
	if c.tlsLn != nil {
		_ = c.tlsLn.Close()
	}
}

// Stop closes the listeners and every proxied connection, and waits for the
// balancer's goroutines (bounded by ctx). Idempotent.
func (c *Child) Stop(ctx context.Context) error {
	c.mu.Lock()
	if !c.stopped {
		c.stopped = true
		c.state = control.StateDead
		c.closeListenersLocked()
		c.cancel()
		for _, l := range c.loops {
			l.stop()
		}
		for conn := range c.conns {
			_ = conn.Close()
		}
	}
	c.mu.Unlock()

	done := make(chan struct{})
	go func() {
		c.wg.Wait()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = fmt.Errorf("balancer: stop: waiting for connections to close: %w", ctx.Err())
	}
	for _, w := range c.pool.all() {
		w.closeSender()
	}
	return err
}

// track registers a proxied connection so Stop can close it; it reports
// false (and the caller must close conn) when the balancer is stopping.
func (c *Child) track(conn net.Conn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return false
	}
	c.conns[conn] = struct{}{}
	return true
}

func (c *Child) untrack(conn net.Conn) {
	c.mu.Lock()
	delete(c.conns, conn)
	c.mu.Unlock()
}

// unlisten stops a listening socket (shutdown(2) takes it out of its
// SO_REUSEPORT group at once); x is an *os.File or a net.Listener, or nil.
func unlisten(x any) {
	sc, ok := x.(syscall.Conn)
	if !ok || sc == nil {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return // closed already
	}
	_ = rc.Control(func(fd uintptr) { _ = syscall.Shutdown(int(fd), syscall.SHUT_RD) })
}

// balancerGCPercent is the balancer process's GC target unless GOGC is set
// in its environment (see Start).
const balancerGCPercent = 25
