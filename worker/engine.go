package worker

import (
	"errors"
	"fmt"
	"hash/maphash"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/auth"
	"github.com/shoalhq/shoal/broker/chanopts"
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/middleware"
	"github.com/shoalhq/shoal/proto/sc"
	"github.com/shoalhq/shoal/webhook"
	"github.com/shoalhq/shoal/worker/netpoll"
)

// Close codes the engine uses (see the protocol reference, §8).
const (
	CodePongTimeout      ws.StatusCode = 4001 // no pong within pingTimeout
	CodeHandshakeTimeout ws.StatusCode = 4005 // no #handshake within handshakeTimeout
	CodeBadHandshake     ws.StatusCode = 4008 // #handshake (or #authenticate) without a numeric cid
	CodeNotHandshaken    ws.StatusCode = 4009 // a packet before the handshake (strict handshake)
	// CodeSlowConsumer closes a socket whose send queue overflowed. It is in
	// the app-defined 4010–4499 range, so the client reconnects with
	// back-off (and recovers what it missed, once recovery exists).
	CodeSlowConsumer ws.StatusCode = 4100
	// CodeMiddlewareBacklog closes a socket that kept sending while its
	// earlier actions waited for a backend hook, past maxQueuedActions or
	// maxQueuedBytes. Reconnect with back-off, like a slow consumer.
	CodeMiddlewareBacklog ws.StatusCode = 4101
	// CodeBanned closes a banned user's or address's socket (the API's
	// default disconnect code, api.DefaultDisconnectCode).
	CodeBanned ws.StatusCode = 4403
	// CodeGoingAway is used when the worker drains.
	CodeGoingAway ws.StatusCode = 1001
)

// MaxChannelLen bounds a channel name (bytes); longer names are refused.
const MaxChannelLen = 1024

// Conn is what the engine needs of a client connection; *netpoll.Conn
// implements it. Methods must be safe for concurrent use and never block.
type Conn interface {
	// WriteFrame queues a complete frame built with EngineConfig.Frame. The
	// slice is shared between connections and never modified afterwards.
	WriteFrame(frame []byte) error
	Close(code ws.StatusCode, reason string)
	RemoteAddr() net.Addr
}

// Broker is what the engine needs of the broker client (*brokerclient.Client).
type Broker interface {
	Subscribe(channel string)
	Unsubscribe(channel string)
	// Publish copies data before returning; done is called exactly once,
	// possibly on the caller's goroutine, and must not block.
	Publish(channel string, data []byte, done func(offset uint64, err error))
}

// EngineConfig configures an Engine.
type EngineConfig struct {
	Name     string // worker name, for logs
	Protocol configs.Protocol
	Keys     *auth.Keys // nil: every token is refused
	// Middleware is the compiled middleware chain; nil: no rules.
	Middleware *middleware.Chain
	// Channels are the per-channel settings; the engine uses SlowConsumer.
	Channels []configs.ChannelRule
	Broker   Broker // nil: channels stay local to the worker (tests)
	// Frame builds a WebSocket text frame around payload (netpoll.AppendTextFrame).
	Frame func(dst, payload []byte) []byte
	// ErrQueueFull is the Conn.WriteFrame error that means the socket's send
	// queue is full (netpoll.ErrQueueFull).
	ErrQueueFull error
	// Webhooks receives channel.occupied/vacated and user.online/offline
	// as this worker sees them (nil: none).
	Webhooks *webhook.Sender
	// Bans is the cluster-wide ban store (nil: no bans). The engine checks
	// it at the handshake and applies the bans other workers publish.
	Bans   *ClusterBans
	Logger hclog.Logger
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
}

// Engine runs the SocketCluster protocol for every session of a worker:
// handshake, heartbeat, events, pub/sub and auth. It does not own sockets;
// the transport calls Open, Message and Closed.
type Engine struct {
	cfg       EngineConfig
	proto     configs.Protocol
	log       hclog.Logger
	hub       *Hub
	pingFrame []byte // shared by every ping
	tick      time.Duration

	seed     maphash.Seed
	sessions [hubShards]sessionShard

	bufs   sync.Pool // *[]byte scratch for building payloads
	inputs sync.Pool // *middleware.Input, for the chain's Run

	// Swapped as a whole on reload (SetChain, SetKeys, SetChannels), so a
	// session reads one consistent generation per action.
	chain atomic.Pointer[middleware.Chain]
	keys  atomic.Pointer[auth.Keys]
	slow  atomic.Pointer[slowPolicies]
	rules atomic.Pointer[chanopts.Rules] // history/presence options per channel

	users users // users hosted here (users.go)

	stop chan struct{}
	done chan struct{}
	once sync.Once
	bg   sync.WaitGroup // background tasks that end on stop (StartControl)

	events        chan clusterEvent // nil: webhooks off (clusterevents.go)
	eventsPending atomic.Int64

	stats engineStats
}

type sessionShard struct {
	mu sync.RWMutex
	m  map[string]*Session
}

type engineStats struct {
	connections, handshakes                   atomic.Int64
	msgsIn, msgsOut, bytesIn, bytesOut        atomic.Int64
	subscriptions                             atomic.Int64
	invalidFrames, transmitsDropped           atomic.Int64
	unknownProcedures, publishesIn, pubErrors atomic.Int64
	authFailures, deauthExpired               atomic.Int64
	slowConsumers, pingTimeouts, hsTimeouts   atomic.Int64
	strictViolations, fanouts, rawPackets     atomic.Int64
	mwDenied, mwDropped, mwPending, mwBacklog atomic.Int64
	slowDropped, slowConflated                atomic.Int64
	eventsLocal                               atomic.Int64
}

// NewEngine validates cfg and starts the heartbeat sweeper (stop it with Close).
func NewEngine(cfg EngineConfig) (*Engine, error) {
	p := cfg.Protocol
	d := configs.Default().Protocol
	if p.Version == 0 {
		p.Version = d.Version
	}
	if p.Version != 1 && p.Version != 2 {
		return nil, fmt.Errorf("protocol.version %d: must be 1 or 2", p.Version)
	}
	if p.PingInterval <= 0 {
		p.PingInterval = d.PingInterval
	}
	if p.PingTimeout <= 0 {
		p.PingTimeout = d.PingTimeout
	}
	if p.HandshakeTimeout <= 0 {
		p.HandshakeTimeout = d.HandshakeTimeout
	}
	if cfg.Frame == nil {
		return nil, errors.New("worker engine: EngineConfig.Frame is required")
	}
	if cfg.ErrQueueFull == nil {
		return nil, errors.New("worker engine: EngineConfig.ErrQueueFull is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	e := &Engine{
		cfg:   cfg,
		proto: p,
		log:   cfg.Logger,
		hub:   newHub(cfg.Broker, cfg.ErrQueueFull),
		seed:  maphash.MakeSeed(),
		stop:  make(chan struct{}),
		done:  make(chan struct{}),
	}
	chain := cfg.Middleware
	if chain == nil {
		var err error
		if chain, err = middleware.Compile(configs.Config{}); err != nil {
			return nil, fmt.Errorf("worker engine: empty middleware chain: %w", err)
		}
	}
	e.users.m = make(map[string]map[*Session]struct{})
	e.hub.occupied = e.occupied
	if cfg.Bans != nil {
		cfg.Bans.e = e
	}
	e.chain.Store(chain)
	// Before the first session: the first upgrade's cluster conn_limit
	// check must already count across workers (connlimit.go).
	e.installConnCounter(chain)
	e.keys.Store(cfg.Keys)
	if err := e.SetChannels(cfg.Channels); err != nil {
		return nil, err
	}
	e.pingFrame = cfg.Frame(nil, sc.PingPayload(p.Version))
	for i := range e.sessions {
		e.sessions[i].m = make(map[string]*Session)
	}
	e.bufs.New = func() any { b := make([]byte, 0, 512); return &b }
	e.inputs.New = func() any { return new(middleware.Input) }
	// The sweeper's resolution: a quarter of the shortest timer, so pings
	// and timeouts fire within 25% of their configured time.
	shortest := min(p.PingInterval.D(), p.PingTimeout.D(), p.HandshakeTimeout.D())
	e.tick = min(max(shortest/4, 5*time.Millisecond), time.Second)
	if p.PingInterval.D()+e.tick >= p.PingTimeout.D() {
		// Clients drop the link (4000) when no ping arrives within
		// pingTimeout, and pings may come up to one tick late.
		cfg.Logger.Warn("protocol.ping_interval is not comfortably below protocol.ping_timeout: clients will time out",
			"ping_interval", p.PingInterval.D(), "ping_timeout", p.PingTimeout.D())
	}
	go e.sweep()
	e.hub.flushq.start()
	e.startClusterEvents()
	return e, nil
}

// SetServer gives the fan-out's publisher flow control the netpoll server
// whose send-queue pressure it watches (the server is built after the
// engine, which is its handler). Until then the worker is never behind.
func (e *Engine) SetServer(srv *netpoll.Server) { e.hub.flow.srv.Store(srv) }

// Close stops the sweeper. Sessions are closed by the transport.
func (e *Engine) Close() {
	e.once.Do(func() { close(e.stop) })
	<-e.done
	e.bg.Wait()
	e.hub.flushq.stop()
	e.hub.flow.stop()
}

// Hub is the engine's channel table.
func (e *Engine) Hub() *Hub { return e.hub }

func (e *Engine) now() time.Time { return e.cfg.Now() }

func (e *Engine) shard(id string) *sessionShard {
	return &e.sessions[maphash.String(e.seed, id)%hubShards]
}

// Session returns the live session with this id, or nil.
func (e *Engine) Session(id string) *Session {
	sh := e.shard(id)
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	return sh.m[id]
}

// Len is the number of open sessions.
func (e *Engine) Len() int { return int(e.stats.connections.Load()) }

// Open starts a session for a new connection.
func (e *Engine) Open(c Conn) *Session {
	s := &Session{e: e, c: c, id: newSessionID(), opened: e.now()}
	s.initMiddleware(c.RemoteAddr())
	sh := e.shard(s.id)
	sh.mu.Lock()
	sh.m[s.id] = s
	sh.mu.Unlock()
	e.stats.connections.Add(1)
	return s
}

// Closed ends a session: it leaves every channel. Safe to call twice.
func (e *Engine) Closed(s *Session, code ws.StatusCode, reason string) {
	s.mu.Lock()
	if s.state == stateClosed {
		s.mu.Unlock()
		return
	}
	s.state = stateClosed
	chans := s.channels
	s.channels = nil
	e.setUser(s, s.user, "")
	s.user = ""
	// Under mu: the identity snapshot is replaced under mu too.
	e.chain.Load().Close(s.ident.Load())
	s.hold.Release() // a socket that closed before its handshake was accepted
	s.mu.Unlock()
	s.dropQueued()
	for ch := range chans {
		if e.hub.remove(ch, s) {
			e.stats.subscriptions.Add(-1)
			s.presenceLeave(ch)
		}
	}
	sh := e.shard(s.id)
	sh.mu.Lock()
	delete(sh.m, s.id)
	sh.mu.Unlock()
	e.stats.connections.Add(-1)
	if e.log.IsDebug() {
		e.log.Debug("session closed", "id", s.id, "code", int(code), "reason", reason)
	}
}

// Deliver is the broker client's OnMessage: frame the publish once and
// write the same bytes to every local subscriber. data is only read here.
func (e *Engine) Deliver(channel string, data []byte, offset uint64) {
	e.DeliverPub(channel, data, offset, 0)
}

// DeliverPub is the broker client's OnPublication: as Deliver, and on a
// channel with history the #publish carries offset and epoch (the same
// bytes for every subscriber: the position is per message). Messages on
// internal "#" channels are control messages for the worker itself.
func (e *Engine) DeliverPub(channel string, data []byte, offset, epoch uint64) {
	if len(channel) > 0 && channel[0] == '#' {
		e.deliverControl(channel, data)
		return
	}
	if e.hub.Subscribers(channel) == 0 {
		return
	}
	bp := e.bufs.Get().(*[]byte)
	var payload []byte
	if epoch != 0 && e.channelOptions(channel).History() {
		payload = appendPublishPos((*bp)[:0], channel, data, offset, epoch)
	} else {
		payload = sc.AppendPublish((*bp)[:0], channel, data)
	}
	frame := e.cfg.Frame(make([]byte, 0, len(payload)+14), payload)
	*bp = payload[:0]
	e.bufs.Put(bp)
	pol := e.policyFor(channel)
	var n int
	if e.chain.Load().HasRules(middleware.PublishOut) {
		n = e.fanoutFiltered(channel, data, frame, pol)
	} else {
		n = e.hub.fanout(channel, frame, pol, e.overflow)
	}
	e.stats.fanouts.Add(1)
	e.stats.msgsOut.Add(int64(n))
	e.stats.bytesOut.Add(int64(n * len(frame)))
}

// Publish sends data (raw JSON) to channel through the brokers, as a client
// #publish would: every subscriber on every worker gets it. done (may be
// nil) is called once with the broker's verdict. For server-side senders
// (the HTTP API, hooks).
func (e *Engine) Publish(channel string, data []byte, done func(error)) {
	if done == nil {
		done = func(error) {}
	}
	if err := sc.Valid(data); err != nil {
		done(fmt.Errorf("publishing to %q: data is not valid JSON: %w", channel, err))
		return
	}
	if e.cfg.Broker == nil {
		e.Deliver(channel, data, 0)
		done(nil)
		return
	}
	e.cfg.Broker.Publish(channel, data, func(_ uint64, err error) {
		if err != nil {
			err = fmt.Errorf("publishing to %q: %w", channel, err)
		}
		done(err)
	})
}

// slowConsumer closes a socket whose send queue is full (policy disconnect,
// and any frame that is not a publish).
func (e *Engine) slowConsumer(s *Session) {
	e.stats.slowConsumers.Add(1)
	e.log.Warn("slow consumer: send queue full, disconnecting", "id", s.id, "remote", addrString(s.c.RemoteAddr()))
	s.close(CodeSlowConsumer, "Slow consumer: send queue full")
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// sweep is the one heartbeat goroutine for all sessions: handshake
// timeouts, pings every pingInterval and pong timeouts. No session has a
// timer of its own.
func (e *Engine) sweep() {
	defer close(e.done)
	t := time.NewTicker(e.tick)
	defer t.Stop()
	var batch []*Session
	for {
		select {
		case <-e.stop:
			return
		case <-t.C:
		}
		now := e.now()
		for i := range e.sessions {
			sh := &e.sessions[i]
			sh.mu.RLock()
			for _, s := range sh.m {
				batch = append(batch, s)
			}
			sh.mu.RUnlock()
			// Act outside the shard lock: Close may end in Closed, which
			// takes it.
			for _, s := range batch {
				s.heartbeat(now)
			}
			clear(batch)
			batch = batch[:0]
		}
	}
}

// Stats is a snapshot of the engine's counters.
type Stats struct {
	Connections, MessagesIn, MessagesOut, BytesIn, BytesOut int64
	Counters                                                map[string]int64
}

// Stats returns the engine's counters.
func (e *Engine) Stats() Stats {
	s := &e.stats
	st := Stats{
		Connections: s.connections.Load(),
		MessagesIn:  s.msgsIn.Load(),
		MessagesOut: s.msgsOut.Load(),
		BytesIn:     s.bytesIn.Load(),
		BytesOut:    s.bytesOut.Load(),
		Counters: map[string]int64{
			"handshakes":              s.handshakes.Load(),
			"subscriptions":           s.subscriptions.Load(),
			"channels":                int64(e.hub.Channels()),
			"invalid_frames":          s.invalidFrames.Load(),
			"raw_packets":             s.rawPackets.Load(),
			"transmits_dropped":       s.transmitsDropped.Load(),
			"unknown_procedures":      s.unknownProcedures.Load(),
			"publishes_in":            s.publishesIn.Load(),
			"publish_errors":          s.pubErrors.Load(),
			"auth_failures":           s.authFailures.Load(),
			"auth_expired":            s.deauthExpired.Load(),
			"slow_consumer_closes":    s.slowConsumers.Load(),
			"pong_timeouts":           s.pingTimeouts.Load(),
			"handshake_timeouts":      s.hsTimeouts.Load(),
			"strict_handshake":        s.strictViolations.Load(),
			"fanouts":                 s.fanouts.Load(),
			"middleware_denied":       s.mwDenied.Load(),
			"middleware_dropped":      s.mwDropped.Load(),
			"middleware_pending":      s.mwPending.Load(),
			"middleware_backlog":      s.mwBacklog.Load(),
			"slow_consumer_drops":     s.slowDropped.Load(),
			"slow_consumer_conflated": s.slowConflated.Load(),
			"cluster_events_local":    s.eventsLocal.Load(),
		},
	}
	e.addRuleStats(st.Counters)
	return st
}

// addRuleStats adds the chain's per-rule counts to counters.
func (e *Engine) addRuleStats(counters map[string]int64) {
	for _, r := range e.chain.Load().Stats() {
		counters["middleware."+r.Rule+".allowed"] = int64(r.Allowed)
		counters["middleware."+r.Rule+".denied"] = int64(r.Denied)
	}
	// conn_limit count queries the brokers could not answer (the rule fell
	// back to this worker's own count).
	counters["middleware.conn_limit.unavailable"] = int64(e.chain.Load().ConnLimitUnavailable())
}

// Chain is the current middleware chain.
func (e *Engine) Chain() *middleware.Chain { return e.chain.Load() }

// SetChain swaps the middleware chain (reload). Sessions pick it up at their
// next action; connection counts live in the chain's shared state.
func (e *Engine) SetChain(c *middleware.Chain) {
	if c != nil {
		e.installConnCounter(c)
		e.chain.Store(c)
	}
}

// SetKeys swaps the auth keys (reload). Tokens already verified stay valid
// until they expire.
func (e *Engine) SetKeys(k *auth.Keys) { e.keys.Store(k) }
