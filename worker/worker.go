// Package worker is the worker process role: it owns client WebSocket
// connections and speaks the SocketCluster protocol on them.
//
// Pieces: Engine (engine.go, session.go) runs the protocol for every
// session; Hub (hub.go) maps channels to local sessions and keeps the
// worker's broker interest in step; Child (this file) wires them to the
// transport (worker/netpoll: epoll, no goroutine per idle connection), to
// the sockets the balancer hands connections over (handoff: fds; proxy:
// PROXY v2 streams from the TLS terminator) and to the broker tier
// (brokerclient).
package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gobwas/ws"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/shoalhq/shoal/api"
	"github.com/shoalhq/shoal/auth"
	"github.com/shoalhq/shoal/balancer"
	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/handoff"
	"github.com/shoalhq/shoal/internal/procstat"
	"github.com/shoalhq/shoal/middleware"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/proto/link"
	"github.com/shoalhq/shoal/proxyproto"
	"github.com/shoalhq/shoal/webhook"
	"github.com/shoalhq/shoal/worker/netpoll"
)

// proxyHeaderTimeout bounds how long a proxied stream may take to send its
// PROXY v2 header.
const proxyHeaderTimeout = 5 * time.Second

// Child is the worker's control-plane implementation.
type Child struct {
	log hclog.Logger

	mu      sync.Mutex // guards the fields below
	started bool
	stopped bool
	state   string
	name    string
	cfg     configs.Config
	eng     *Engine
	srv     *netpoll.Server
	bc      *brokerclient.Client
	hooks   *webhook.Sender // nil: no webhooks
	api     *api.Handler
	hand    *handoff.Listener
	proxy   *net.UnixListener
	// front serves the public ports in this process when the node has no
	// balancer (cluster.balancers: 0, listen.go); nil otherwise.
	front   *balancer.Child
	fdCap   atomic.Int64 // fds client connections may use (balancers: 0; 0 = no cap)
	topoVer int64

	// brokersMu orders the two sources of the broker set: the supervisor's
	// topology until a broker first reports the ring's members, then the
	// ring only (docs/brokers.md). Never held while taking mu.
	brokersMu sync.Mutex
	ringKnown bool

	loops    sync.WaitGroup // accept loops and PROXY header readers
	refused  atomic.Int64   // sockets refused at max_connections
	badProxy atomic.Int64   // proxied streams refused (no/bad header)
}

var (
	_ control.Child    = (*Child)(nil)
	_ control.Reloader = (*Child)(nil)
)

// New returns the worker role, ready to be served by control.Serve.
func New(log hclog.Logger) *Child {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &Child{log: log, state: control.StateStarting}
}

// wsHandler connects netpoll's callbacks to the engine.
type wsHandler struct{ e *Engine }

func (h wsHandler) OnOpen(c *netpoll.Conn) {
	// UpgradeData is the connection's initial Data: read it before SetData.
	info, _ := c.UpgradeData().(*UpgradeInfo)
	s := h.e.Open(c)
	if info != nil {
		s.SetUpgrade(info)
	}
	c.SetData(s)
}

// upgradeHook is netpoll's Config.Upgrade: the handshakeWS middleware. It is
// set even when the config has no handshake rules, so a reload that adds
// some (say a cidr deny against an attack) applies without a restart; the
// price is netpoll parsing each upgrade request with net/http.
func upgradeHook(e *Engine, limit time.Duration) func(r *netpoll.UpgradeRequest) (any, int, string) {
	return func(r *netpoll.UpgradeRequest) (any, int, string) {
		info, status, reason := e.CheckUpgrade(r.Remote, r.Origin, r.Header, r.RequestURI, limit)
		if info == nil {
			return nil, status, reason // no typed nil in the interface
		}
		return info, status, reason
	}
}

func (h wsHandler) OnMessage(c *netpoll.Conn, p []byte) {
	if s, ok := c.Data().(*Session); ok {
		h.e.Message(s, p)
	}
}

func (h wsHandler) OnClose(c *netpoll.Conn, code ws.StatusCode, reason string) {
	if s, ok := c.Data().(*Session); ok {
		h.e.Closed(s, code, reason)
	}
}

// Start decodes the config, starts the engine, the WebSocket server, the
// broker client and the two listeners, and returns their addresses.
func (c *Child) Start(ctx context.Context, p control.StartParams) (control.StartResult, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.started {
		return control.StartResult{}, errors.New("worker: Start called twice")
	}
	cfg := configs.Default()
	if len(p.Config) > 0 {
		if err := json.Unmarshal(p.Config, &cfg); err != nil {
			return control.StartResult{}, fmt.Errorf("worker %s: decoding config: %w", p.Name, err)
		}
	}
	if cfg.Worker.GoMaxProcs > 0 {
		runtime.GOMAXPROCS(cfg.Worker.GoMaxProcs)
	}
	c.name, c.cfg = p.Name, cfg
	log := c.log

	keys, err := auth.New(cfg.Auth.JWT, os.Getenv)
	if err != nil {
		return control.StartResult{}, fmt.Errorf("worker %s: loading auth keys: %w", p.Name, err)
	}
	if !keys.Enabled() {
		log.Warn("auth: no key configured, every client token will be refused", "reason", keys.Missing())
	}

	bans := NewClusterBans()
	chain, err := middleware.CompileWith(cfg, middleware.Options{Logger: log.Named("middleware"), Bans: bans})
	if err != nil {
		return control.StartResult{}, fmt.Errorf("worker %s: compiling middleware: %w", p.Name, err)
	}

	if err := chain.StartPlugins(); err != nil {
		// Not fatal: the rule denies its actions (PluginError) and the
		// plugin is retried with back-off.
		log.Error("middleware plugin did not start", "error", err)
	}

	hooks, err := webhook.New(webhook.Options{Webhooks: cfg.Webhooks, Source: p.Name, Logger: log.Named("webhook")})
	if err != nil {
		return control.StartResult{}, fmt.Errorf("worker %s: webhooks: %w", p.Name, err)
	}

	var secure *link.Secure
	if secrets, err := cfg.Cluster.Secrets(); err != nil {
		_ = hooks.Close(ctx)
		return control.StartResult{}, fmt.Errorf("worker %s: %w", p.Name, err)
	} else if secrets != nil {
		if secure, err = link.NewSecure(secrets...); err != nil {
			_ = hooks.Close(ctx)
			return control.StartResult{}, fmt.Errorf("worker %s: %w", p.Name, err)
		}
	}
	var eng *Engine
	var bc *brokerclient.Client
	bc = brokerclient.New(brokerclient.Options{
		Secure: secure, // TCP links to brokers (other nodes, or cluster.join)
		Name:   p.Name,
		// Deliveries start only after a Subscribe, which needs eng.
		OnPublication: func(channel string, data []byte, offset, epoch uint64) {
			eng.DeliverPub(channel, data, offset, epoch)
		},
		OnJoinLeave: func(channel string, join bool, entry []byte) { eng.JoinLeave(channel, join, entry) },
		OnVacated:   func(channel string) { eng.Vacated(channel) }, // clusterevents.go (issue #6)
		OnResync:    func(channel string, res brokerclient.RecoverResult, err error) { eng.Resync(channel, res, err) },
		Channels:    cfg.Channels,
		// Runs on a link's reader goroutine; SetBrokers does not wait for
		// readers, so this cannot deadlock.
		OnMembers: func(eps []brokerclient.Endpoint) { c.ringMembers(bc, eps) },
		Logger:    log.Named("brokerclient"),
	})
	eng, err = NewEngine(EngineConfig{
		Name:         p.Name,
		Protocol:     cfg.Protocol,
		Keys:         keys,
		Middleware:   chain,
		Channels:     cfg.Channels,
		Broker:       bc,
		Frame:        netpoll.AppendTextFrame,
		ErrQueueFull: netpoll.ErrQueueFull,
		Webhooks:     hooks,
		Bans:         bans,
		Logger:       log.Named("sc"),
	})
	if err != nil {
		bc.Close()
		_ = hooks.Close(ctx)
		return control.StartResult{}, fmt.Errorf("worker %s: %w", p.Name, err)
	}
	apiH, err := api.New(api.Config{API: cfg.API, Bans: bans, Logger: log.Named("api")}, NewAPIBackend(eng, bc))
	if err != nil {
		eng.Close()
		bc.Close()
		_ = hooks.Close(ctx)
		return control.StartResult{}, fmt.Errorf("worker %s: server API: %w", p.Name, err)
	}
	c.api, c.hooks = apiH, hooks
	srv, err := netpoll.New(netpoll.Config{
		Path:           cfg.Listen.Path,
		Origins:        cfg.Protocol.Origins,
		MaxPayload:     int64(cfg.Protocol.MaxPayload),
		SendQueueBytes: int(cfg.Worker.SendQueue),
		SendQueueMsgs:  cfg.Worker.SendQueueMsgs,
		WriteTimeout:   cfg.Worker.WriteTimeout.D(),
		HTTP:           c.httpHandler(p.Name),
		Handler:        wsHandler{eng},
		Upgrade:        upgradeHook(eng, cfg.Protocol.HandshakeTimeout.D()),
		Logger:         log.Named("netpoll"),
	})
	if err != nil {
		eng.Close()
		bc.Close()
		_ = hooks.Close(ctx)
		return control.StartResult{}, fmt.Errorf("worker %s: starting WebSocket server: %w", p.Name, err)
	}
	eng.SetServer(srv)
	c.eng, c.srv, c.bc = eng, srv, bc
	c.setBrokersLocked(p.Topology)
	eng.StartControl()

	handPath := filepath.Join(p.RunDir, p.Name+".sock")
	hand, err := handoff.Listen(handPath)
	if err != nil {
		c.teardownLocked(ctx)
		return control.StartResult{}, fmt.Errorf("worker %s: listening for handed-over connections: %w", p.Name, err)
	}
	c.hand = hand
	proxyPath := filepath.Join(p.RunDir, p.Name+".proxy.sock")
	_ = os.Remove(proxyPath) // a stale socket of a crashed predecessor
	pl, err := net.ListenUnix("unix", &net.UnixAddr{Name: proxyPath, Net: "unix"})
	if err != nil {
		c.teardownLocked(ctx)
		return control.StartResult{}, fmt.Errorf("worker %s: listening for proxied streams: %w", p.Name, err)
	}
	if err := os.Chmod(proxyPath, 0o600); err != nil {
		_ = pl.Close()
		c.teardownLocked(ctx)
		return control.StartResult{}, fmt.Errorf("worker %s: chmod %s: %w", p.Name, proxyPath, err)
	}
	c.proxy = pl
	c.loops.Add(2)
	go c.acceptHandoff(hand)
	go c.acceptProxy(pl)

	addrs := map[string]string{
		control.AddrHandoff: handPath,
		control.AddrProxy:   proxyPath,
	}
	if cfg.Cluster.BalancerCount() == 0 {
		pub, err := c.startFrontLocked(ctx, p.Name, cfg)
		if err != nil {
			c.teardownLocked(ctx)
			return control.StartResult{}, fmt.Errorf("worker %s: %w", p.Name, err)
		}
		for k, v := range pub {
			addrs[k] = v
		}
	}

	c.started = true
	c.state = control.StateReady
	log.Info("worker started", "handoff", handPath, "proxy", proxyPath, "public", addrs[control.AddrPublic],
		"tls", addrs[control.AddrTLS], "path", cfg.Listen.Path,
		"protocol", cfg.Protocol.Version, "gomaxprocs", runtime.GOMAXPROCS(0))
	return control.StartResult{Addrs: addrs}, nil
}

func (c *Child) httpHandler(name string) http.Handler {
	mux := http.NewServeMux()
	body, _ := json.Marshal(map[string]string{"status": "ok", "worker": name})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(body)
	})
	// The server API (docs/api.md); c.api is set before netpoll serves.
	mux.HandleFunc(api.Prefix, func(w http.ResponseWriter, r *http.Request) { c.api.ServeHTTP(w, r) })
	return mux
}

// serve hands an accepted socket to netpoll unless the worker is full; p
// says what is already set on it (see netpoll.Prepared).
func (c *Child) serve(fd int, prebuf []byte, remote net.Addr, p netpoll.Prepared) {
	if max := c.cfg.Worker.MaxConnections; max > 0 && c.srv.Len() >= max {
		c.refused.Add(1)
		_ = unix.Close(fd)
		return
	}
	if err := c.srv.ServePrepared(fd, prebuf, remote, p); err != nil && !errors.Is(err, netpoll.ErrServerClosed) {
		c.log.Warn("serving handed-over socket", "error", err)
	}
}

// acceptHandoff serves the fds the balancer passes; it ends when the
// listener is closed.
func (c *Child) acceptHandoff(l *handoff.Listener) {
	defer c.loops.Done()
	for {
		fd, prebuf, m, err := l.AcceptMeta()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				c.log.Error("handoff accept failed; no more handed-over connections", "error", err)
			}
			return
		}
		addr, p := handedOver(m)
		c.serve(fd, prebuf, addr, p)
	}
}

// handedOver turns what the balancer said about a handed-over socket into
// netpoll's terms, so that netpoll makes no system call to learn it again
// (getpeername, fcntl, setsockopt: several µs each per connection). A nil
// address makes netpoll ask the socket.
func handedOver(m handoff.Meta) (net.Addr, netpoll.Prepared) {
	var p netpoll.Prepared
	if m.Nonblock {
		p |= netpoll.Nonblocking
	}
	if m.NoDelay {
		p |= netpoll.NoDelay
	}
	if !m.Peer.IsValid() {
		return nil, p
	}
	return net.TCPAddrFromAddrPort(m.Peer), p
}

// acceptProxy accepts streams from the TLS terminator. Each must start with
// a PROXY v2 header carrying the client's address; streams without one are
// refused.
func (c *Child) acceptProxy(l *net.UnixListener) {
	defer c.loops.Done()
	for {
		conn, err := l.AcceptUnix()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				c.log.Error("proxy accept failed; no more proxied connections", "error", err)
			}
			return
		}
		// The header read is bounded by a deadline, so this goroutine is
		// short-lived; it keeps a slow proxy from stalling accepts.
		c.loops.Add(1)
		go func() {
			defer c.loops.Done()
			c.proxied(conn)
		}()
	}
}

func (c *Child) proxied(conn *net.UnixConn) {
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(proxyHeaderTimeout))
	h, err := proxyproto.ReadHeader(conn)
	if err != nil {
		c.badProxy.Add(1)
		c.log.Warn("refusing proxied stream without a valid PROXY v2 header", "error", err)
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	// netpoll takes an fd it owns: duplicate ours (the conn closes its own).
	fd, err := dupFD(conn)
	if err != nil {
		c.log.Warn("proxied stream: duplicating fd", "error", err)
		return
	}
	var remote net.Addr
	if !h.Local && h.Src != nil {
		remote = h.Src
	}
	// dupFD's copy shares the Go conn's open file, non-blocking; a unix
	// socket has no Nagle to turn off.
	c.serve(fd, nil, remote, netpoll.Nonblocking|netpoll.NoDelay)
}

// dupFD returns a close-on-exec duplicate of a connection's descriptor,
// leaving the connection's own descriptor (and its blocking mode) alone.
func dupFD(conn syscall.Conn) (int, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("raw conn: %w", err)
	}
	fd := -1
	var dupErr error
	if err := raw.Control(func(s uintptr) { fd, dupErr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, fmt.Errorf("raw conn control: %w", err)
	}
	if dupErr != nil {
		return -1, fmt.Errorf("dup: %w", dupErr)
	}
	return fd, nil
}

// setBrokersLocked gives the broker client the ready brokers of t, unless
// the brokers already told us the ring's members (which also knows the
// brokers of other nodes).
func (c *Child) setBrokersLocked(t control.Topology) {
	if c.bc == nil || (t.Version != 0 && t.Version < c.topoVer) {
		return
	}
	c.topoVer = t.Version
	var eps []brokerclient.Endpoint
	for _, p := range t.ByRole(control.RoleBroker) {
		if p.State != control.StateReady || p.Addrs[control.AddrLink] == "" {
			continue
		}
		eps = append(eps, brokerclient.Endpoint{Name: p.Name, Addr: p.Addrs[control.AddrLink]})
	}
	c.brokersMu.Lock()
	defer c.brokersMu.Unlock()
	if c.ringKnown {
		return
	}
	c.bc.SetBrokers(eps)
}

// ringMembers adopts the ring's live brokers as reported by a broker.
func (c *Child) ringMembers(bc *brokerclient.Client, eps []brokerclient.Endpoint) {
	c.brokersMu.Lock()
	defer c.brokersMu.Unlock()
	if !c.ringKnown {
		c.log.Info("broker ring reported; following its membership from now on", "brokers", len(eps))
	}
	c.ringKnown = true
	bc.SetBrokers(eps)
}

// SetTopology moves the worker's broker links to the topology's ready
// brokers (until the ring reports its members, see setBrokersLocked).
func (c *Child) SetTopology(ctx context.Context, t control.Topology) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.setBrokersLocked(t)
	return nil
}

func (c *Child) Health(ctx context.Context) (control.Health, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return control.Health{State: c.state}, nil
}

func (c *Child) Stats(ctx context.Context) (control.Stats, error) {
	var st control.Stats
	procstat.Fill(&st)
	c.mu.Lock()
	eng, srv, front := c.eng, c.srv, c.front
	c.mu.Unlock()
	if eng == nil {
		return st, nil
	}
	es := eng.Stats()
	st.Connections = es.Connections
	st.MessagesIn, st.MessagesOut = es.MessagesIn, es.MessagesOut
	st.BytesIn, st.BytesOut = es.BytesIn, es.BytesOut
	st.Counters = es.Counters
	ns := srv.Stats()
	// The transport's byte counts include framing and HTTP: the truth on
	// the wire.
	st.BytesIn, st.BytesOut = int64(ns.BytesIn), int64(ns.BytesOut)
	st.Counters["ws_upgraded"] = int64(ns.Upgraded)
	st.Counters["ws_rejected"] = int64(ns.Rejected)
	st.Counters["ws_queue_full"] = int64(ns.QueueFull)
	st.Counters["ws_timeouts"] = int64(ns.Timeouts)
	st.Counters["ws_protocol_errors"] = int64(ns.ProtoErrors)
	st.Counters["http_requests"] = int64(ns.HTTP)
	// Frames per writev (how well writes coalesce): ws_frames_out ÷ ws_writes.
	st.Counters["ws_frames_out"] = int64(ns.MsgsOut)
	st.Counters["ws_writes"] = int64(ns.Writes)
	st.Counters["ws_stalls"] = int64(ns.Stalls)
	st.Counters["refused_max_connections"] = c.refused.Load()
	st.Counters["proxy_refused"] = c.badProxy.Load()
	if front != nil {
		// The worker's own public listeners (balancers: 0).
		for k, v := range front.Counters() {
			st.Counters["listen_"+k] = v
		}
	}
	return st, nil
}

// Drain stops accepting and closes every connection at once with 1001,
// waiting at most timeout. It is the shutdown path (the whole node is going
// away, so the official client's 10–20 s back-off on 1001 is what we want); a
// rolling restart uses Handover instead (handover.go). After a Handover it
// finds no socket left and returns at once.
func (c *Child) Drain(ctx context.Context, timeout time.Duration) error {
	c.mu.Lock()
	if !c.started || c.stopped {
		c.mu.Unlock()
		return nil
	}
	c.state = control.StateDraining
	c.closeListenersLocked()
	srv := c.srv
	// Health and Stats keep answering while connections close.
	c.mu.Unlock()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	if err := srv.Shutdown(ctx, CodeGoingAway, "Worker is draining"); err != nil {
		return fmt.Errorf("worker %s: draining: %w", c.name, err)
	}
	// The sockets are gone: flush their vacated/offline events.
	c.eng.FlushEvents(ctx)
	if err := c.hooks.Close(ctx); err != nil {
		return fmt.Errorf("worker %s: flushing webhooks: %w", c.name, err)
	}
	return nil
}

// Stop shuts everything down. Idempotent.
func (c *Child) Stop(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.started || c.stopped {
		return nil
	}
	c.stopped = true
	c.state = control.StateDead
	return c.teardownLocked(ctx)
}

func (c *Child) closeListenersLocked() {
	if c.front != nil {
		// The kernel sends new connections to the other workers once this
		// socket is closed; open TLS connections keep flowing until netpoll
		// closes them.
		_ = c.front.Drain(context.Background(), 0)
	}
	if c.hand != nil {
		if err := c.hand.Close(); err != nil {
			c.log.Warn("closing handoff listener", "error", err)
		}
	}
	if c.proxy != nil {
		_ = c.proxy.Close()
	}
}

// teardownLocked stops listeners, the WebSocket server, the engine and the
// broker client, in that order (connections first, so their sessions leave
// the hub before the broker client goes away).
func (c *Child) teardownLocked(ctx context.Context) error {
	c.closeListenersLocked()
	c.loops.Wait()
	var err error
	if c.srv != nil {
		if e := c.srv.Shutdown(ctx, CodeGoingAway, "Worker is stopping"); e != nil {
			err = fmt.Errorf("worker %s: stopping WebSocket server: %w", c.name, e)
		}
	}
	if c.front != nil {
		// After netpoll: the close frames of wss:// clients pass through it.
		if e := c.front.Stop(ctx); e != nil && err == nil {
			err = fmt.Errorf("worker %s: stopping the public listeners: %w", c.name, e)
		}
	}
	if c.eng != nil {
		c.eng.Close()
		// Hook calls still under way answer sockets that are gone now.
		chain := c.eng.Chain()
		chain.Wait()
		chain.CloseIdleConnections()
		chain.Shutdown() // kill go-plugin middleware processes
	}
	if c.bc != nil {
		c.bc.Close()
	}
	if e := c.hooks.Close(ctx); e != nil && err == nil {
		err = fmt.Errorf("worker %s: flushing webhooks: %w", c.name, e)
	}
	return err
}

// Reload applies a new config without dropping connections: the middleware
// chain is recompiled with the old one as Previous (connection counts and
// unchanged rate buckets carry over) and swapped, the auth keys are reloaded
// and the per-channel slow-consumer policies replaced. A config that does
// not compile or whose keys do not load changes nothing and is returned as
// the error. Settings fixed at Start (listen addresses, protocol timers,
// send-queue sizes, pool sizes) keep their old values; the change is logged.
func (c *Child) Reload(ctx context.Context, config []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.started || c.stopped {
		return errors.New("worker: Reload before Start or after Stop")
	}
	cfg := configs.Default()
	if len(config) > 0 {
		if err := json.Unmarshal(config, &cfg); err != nil {
			return fmt.Errorf("worker %s: reload: decoding config: %w", c.name, err)
		}
	}
	keys, err := auth.New(cfg.Auth.JWT, os.Getenv)
	if err != nil {
		return fmt.Errorf("worker %s: reload: loading auth keys: %w", c.name, err)
	}
	old := c.eng.Chain()
	chain, err := middleware.CompileWith(cfg, middleware.Options{Logger: c.log.Named("middleware"), Previous: old})
	if err != nil {
		return fmt.Errorf("worker %s: reload: compiling middleware: %w", c.name, err)
	}
	// Validate the channel policies before swapping anything.
	probe := &Engine{}
	if err := probe.SetChannels(cfg.Channels); err != nil {
		return fmt.Errorf("worker %s: reload: %w", c.name, err)
	}
	newListen, oldListen := cfg.Listen, c.cfg.Listen
	if c.front != nil {
		// The worker's own TLS listener takes new certificates in place.
		newListen.TLS.Cert, newListen.TLS.Key, newListen.TLS.Auto = oldListen.TLS.Cert, oldListen.TLS.Key, oldListen.TLS.Auto
	}
	if !reflect.DeepEqual(cfg.Protocol, c.cfg.Protocol) || !reflect.DeepEqual(newListen, oldListen) || !reflect.DeepEqual(cfg.Worker, c.cfg.Worker) {
		c.log.Warn("reload: listen, protocol and worker settings apply at the next restart only")
	}
	if c.front != nil {
		// Certificates and timeouts of the worker's own TLS listener.
		data, err := frontReloadConfig(cfg, c.cfg)
		if err == nil {
			err = c.front.Reload(ctx, data)
		}
		if err != nil {
			return fmt.Errorf("worker %s: reload: public listeners: %w", c.name, err)
		}
	}
	if err := chain.StartPlugins(); err != nil {
		c.log.Error("reload: middleware plugin did not start", "error", err)
	}
	c.eng.SetChain(chain)
	c.eng.SetKeys(keys)
	keyEnv := cfg.API.KeyEnv
	if keyEnv == "" {
		keyEnv = configs.Default().API.KeyEnv
	}
	c.api.SetKey(os.Getenv(keyEnv))
	_ = c.eng.SetChannels(cfg.Channels)
	c.cfg.Middleware, c.cfg.Auth, c.cfg.Channels = cfg.Middleware, cfg.Auth, cfg.Channels
	c.log.Info("config reloaded", "middleware_rules", len(chain.Stats()), "auth", keys.Enabled())
	return nil
}
