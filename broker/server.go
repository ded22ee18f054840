package broker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/broker/chanopts"
	"github.com/shoalhq/shoal/broker/store"
	"github.com/shoalhq/shoal/internal/loglimit"
	"github.com/shoalhq/shoal/proto/link"
)

// Lock order (never take them the other way round):
//
//	shard.mu → link.Writer's internal mutex
//	Server.mu is never held together with a shard.mu.
//
// A blink's chans map is touched only by that link's reader goroutine, and
// by its cleanup, which runs on the same goroutine after the reader stops.

const numShards = 64

// DefaultIdleTimeout is ServerConfig.IdleTimeout's default.
const DefaultIdleTimeout = 9 * time.Second

// ServerConfig configures the link server. Zero fields take the defaults.
type ServerConfig struct {
	Name string // this broker's name, sent in hello
	// Secure secures the links accepted by ServeSecure (TLS and the
	// cluster secret's proofs, proto/link/secure.go) and the hand-back's
	// links to peers over TCP; nil: ServeSecure is Serve.
	Secure *link.Secure
	// MaxSecuring bounds the accepted links in their TLS handshake at once
	// (ServeSecure); past it a new connection is closed at once, so a
	// connection flood on the link port costs no more; default 256.
	MaxSecuring  int
	Epoch        uint64        // base of channel epochs; default: start time in ns
	MaxFrame     int           // largest inbound frame; default link.DefaultMaxFrame
	MaxPending   int           // bytes queued per worker link before fan-out waits for it; default 8 MiB
	SlowTimeout  time.Duration // a full worker link that frees no space this long is dropped; default 2 s
	WriteTimeout time.Duration // a worker that accepts no bytes this long is dropped; default 10 s
	// IdleTimeout: a worker link that sends nothing (not even a ping) this
	// long is dropped, with its interests and presence entries. Default
	// 9 s: three of the workers' 3 s pings (brokerclient.Options
	// PingInterval), so a node that vanishes without closing its
	// connections (power loss, partition) leaves no presence ghosts for
	// more than 9 s (docs/brokers.md, "Link liveness").
	IdleTimeout time.Duration
	ChannelIdle time.Duration // a channel with no interest and no publish this long is forgotten; default 2 min
	Logger      hclog.Logger

	// Rules give channels their options (history, durable, presence,
	// join/leave); nil: no channel has any.
	Rules *chanopts.Rules
	// Store persists durable channels (nil: durable channels are kept in
	// memory only). The server closes it.
	Store store.Store
	// VacatedGrace is how long a vacated notice (presence.go) waits before
	// it is handed to a worker, so that a link that dropped and came back
	// (a blip, not a dead worker) re-announces its entries first; default
	// 2 s.
	VacatedGrace time.Duration
	// CommitDelay makes the group commit wait this long after the first
	// queued durable write to gather more in one fsync (default 0: a batch
	// is whatever queued while the previous fsync ran).
	CommitDelay time.Duration

	// Warm-up (see warmedUp): publishes are refused until every expected
	// worker has re-registered its interest, or WarmUpMax passes; and for at
	// least WarmUpMin (remote workers the broker cannot list). Defaults 0
	// and 1 s.
	WarmUpMin, WarmUpMax time.Duration

	// Publisher flow control (flow section below, docs/brokers.md "Flow
	// control"): the ack of a publish to a channel an interested worker
	// reports behind is held until no worker is behind any more, or for at
	// most FlowMaxHold (default 2 s; negative: acks are never held).
	// FlowMaxHeld bounds the acks held at once (default 65536); beyond it
	// acks go out at once.
	FlowMaxHold time.Duration
	FlowMaxHeld int
	// FlowLinkMark: a worker link with more than this many bytes queued
	// (link.Writer.Pending: messages the worker has not read yet) counts
	// as behind too, until it is down to a quarter of it. Default 256 KiB;
	// negative: only the workers' own reports count.
	FlowLinkMark int
}

// ServerStats are the broker's counters.
type ServerStats struct {
	Channels   int64 // channel states held
	Links      int64 // worker links connected
	Publishes  int64 // pub frames accepted (each got an offset)
	Deliveries int64 // msg frames queued to worker links
	SlowLinks  int64 // links dropped because their queue was full
	BadFrames  int64 // links dropped because of a malformed frame or protocol error
	Refused    int64 // publishes refused during warm-up
	// Flow control: publishes whose ack was held because an interested
	// worker was behind, of which released by FlowMaxHold rather than by
	// the workers catching up; links currently reporting behind.
	AcksHeld, AcksHeldExpired, LinksBehind int64

	HistoryChannels int64 // channel states holding history (owned or replica copies)
	PresenceEntries int64
	DurableCommits  int64 // group-commit transactions (one fsync each)
	DurableWrites   int64 // messages written by them
}

// Server accepts worker links and routes publications: each publish gets the
// channel's next offset and is encoded once, and the same bytes are queued on
// every interested worker link.
type Server struct {
	cfg ServerConfig
	log hclog.Logger

	shards [numShards]shard
	gen    atomic.Uint64 // channel-state generations, for epochs
	commit *committer    // nil without a Store

	mu        sync.Mutex
	closed    bool
	listeners []net.Listener
	securing  map[net.Conn]struct{} // accepted links in their TLS handshake (ServeSecure)
	// refusedLog bounds the warnings about links refused by ServeSecure:
	// anyone who reaches the port can cause one.
	refusedLog loglimit.Limiter
	links      map[*blink]struct{}
	members    []link.Member // latest ring view, sent to every link
	ringName   string        // this broker's name in the ring view (SetRingName)
	orphans    [][]byte      // vacated notices waiting for a worker link (presence.go)
	graced     []gracedVacancy
	vacKick    chan struct{}
	norphans   atomic.Int64 // len(orphans), read without mu on every ping
	wg         sync.WaitGroup
	stopSweep  chan struct{}

	publishes, deliveries, slowLinks, badFrames, nlinks, refused atomic.Int64

	flow flowHold

	started  time.Time
	handback atomic.Int64 // unix ns until which a hand-back holds publishes (0: none)
	warm     atomic.Bool
	warmMu   sync.Mutex
	expected map[string]bool // workers that should re-register before publishes are taken
	ready    map[string]bool // workers whose link sent ready
}

type shard struct {
	mu      sync.Mutex
	chans   map[string]*chanState
	scratch []byte // msg encoding buffer, reused under mu
}

// chanState is one channel's sequence, interest, history and presence.
type chanState struct {
	offset    uint64
	epoch     uint64
	links     []*blink // interested worker links; small, so a slice
	idleSince int64    // unix ns of the last publish or of losing the last link

	name      string // the map key, shared: saves a string per durable write
	opts      chanopts.Options
	hist      histRing
	prevEpoch uint64 // the epoch this one continues (see history.go)
	prevTop   uint64
	foreign   bool                  // history not written by this run: the first own publish starts a new epoch
	pres      map[string]*presEntry // by conn id
	shadow    map[string]*blink     // internal channels: conn id → link of entries owned by another broker (presence.go)
}

// blink is one worker's link.
type blink struct {
	s        *Server
	conn     net.Conn
	w        *link.Writer
	worker   atomic.Pointer[string]         // from hello; read by other goroutines' logs
	chans    map[string]struct{}            // interests; reader goroutine only
	pres     map[string]map[string]struct{} // channel → conn ids announced on this link; reader goroutine only
	shadows  map[string]map[string]struct{} // the same for shadow entries; reader goroutine only
	scratch  []byte                         // reply encoding; reader goroutine only
	ready    atomic.Bool                    // sent ready: a worker with its interests registered
	behind   atomic.Bool                    // reported behind (flow control); set by its reader
	lastPing atomic.Int64                   // unix ns of its last ping (or ready)
	once     sync.Once
}

// NewServer returns a server; call Serve with a listener.
func NewServer(cfg ServerConfig) *Server {
	if cfg.Epoch == 0 {
		cfg.Epoch = uint64(time.Now().UnixNano())
	}
	if cfg.MaxFrame <= 0 {
		cfg.MaxFrame = link.DefaultMaxFrame
	}
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = 8 << 20
	}
	if cfg.MaxSecuring <= 0 {
		cfg.MaxSecuring = 256
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = 10 * time.Second
	}
	if cfg.SlowTimeout <= 0 {
		cfg.SlowTimeout = 2 * time.Second
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.VacatedGrace <= 0 {
		cfg.VacatedGrace = 2 * time.Second
	}
	if cfg.ChannelIdle <= 0 {
		cfg.ChannelIdle = 2 * time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.WarmUpMax <= 0 {
		cfg.WarmUpMax = time.Second
	}
	if cfg.FlowMaxHold == 0 {
		cfg.FlowMaxHold = 2 * time.Second
	}
	if cfg.FlowMaxHeld <= 0 {
		cfg.FlowMaxHeld = 1 << 16
	}
	if cfg.FlowLinkMark == 0 {
		cfg.FlowLinkMark = 256 << 10
	}
	s := &Server{
		cfg: cfg, log: cfg.Logger, links: map[*blink]struct{}{}, stopSweep: make(chan struct{}),
		started: time.Now(), expected: map[string]bool{}, ready: map[string]bool{}, vacKick: make(chan struct{}, 1),
		refusedLog: loglimit.Limiter{Every: 10 * time.Second, Burst: 5},
	}
	for i := range s.shards {
		s.shards[i].chans = map[string]*chanState{}
	}
	if cfg.Store != nil {
		s.commit = newCommitter(cfg.Store, cfg.CommitDelay)
		go s.commit.run(s)
	}
	s.flow.kick = make(chan struct{}, 1)
	s.wg.Add(3)
	go s.sweep()
	go s.vacatedLoop()
	go s.flowLoop()
	return s
}

// Epoch returns the base epoch of this broker run.
func (s *Server) Epoch() uint64 { return s.cfg.Epoch }

// Serve accepts links on ln in a goroutine the server owns, until Close.
func (s *Server) Serve(ln net.Listener) error { return s.serve(ln, false) }

// ServeSecure is Serve for a listener whose links must be secured with the
// cluster secret (ServerConfig.Secure; without one it is Serve): a link
// that does not complete the TLS handshake and prove the secret within
// 10 s is closed.
func (s *Server) ServeSecure(ln net.Listener) error { return s.serve(ln, s.cfg.Secure != nil) }

func (s *Server) serve(ln net.Listener, secure bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("broker: serve after close")
	}
	s.listeners = append(s.listeners, ln)
	s.wg.Add(1)
	go s.acceptLoop(ln, secure)
	return nil
}

// secureLink runs the TLS handshake and the proofs of an accepted link on
// its own goroutine (a slow or silent peer must not stall the accept loop),
// then starts it.
func (s *Server) secureLink(conn net.Conn) {
	defer s.wg.Done()
	ctx, cancel := context.WithTimeout(context.Background(), secureTimeout)
	defer cancel()
	sc, err := s.cfg.Secure.Server(ctx, conn)
	s.mu.Lock()
	delete(s.securing, conn)
	closed := s.closed
	s.mu.Unlock()
	switch {
	case err == nil:
		s.startLink(sc)
	case closed:
	case errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET):
		// The worker hung up during the handshake: it gave up (its ring
		// view replaced this link, or it is stopping), it did not fail.
		s.log.Debug("worker link closed while being secured", "remote", conn.RemoteAddr().String(), "error", err)
	default:
		if ok, held := s.refusedLog.Allow(time.Now()); ok {
			s.log.Warn("worker link refused: it did not prove the cluster secret", "remote", conn.RemoteAddr().String(), "error", err, "more_not_logged", held)
		}
	}
}

// secureTimeout bounds a secured link's TLS handshake and proofs.
const secureTimeout = 10 * time.Second

func (s *Server) acceptLoop(ln net.Listener, secure bool) {
	defer s.wg.Done()
	delay := 5 * time.Millisecond
	for {
		conn, err := ln.Accept()
		if err != nil {
			if s.isClosed() || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: back off instead of spinning.
			s.log.Error("accepting worker link", "addr", ln.Addr().String(), "error", err)
			select {
			case <-time.After(delay):
			case <-s.stopSweep:
				return
			}
			delay = min(2*delay, time.Second)
			continue
		}
		delay = 5 * time.Millisecond
		if !secure {
			s.startLink(conn)
			continue
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			conn.Close()
			return
		}
		if len(s.securing) >= s.cfg.MaxSecuring {
			s.mu.Unlock()
			conn.Close()
			if ok, held := s.refusedLog.Allow(time.Now()); ok {
				s.log.Warn("worker link refused: too many links being secured at once", "remote", conn.RemoteAddr().String(), "limit", s.cfg.MaxSecuring, "more_not_logged", held)
			}
			continue
		}
		if s.securing == nil {
			s.securing = map[net.Conn]struct{}{}
		}
		s.securing[conn] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.secureLink(conn)
	}
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

func (s *Server) startLink(conn net.Conn) {
	l := &blink{s: s, conn: conn, chans: map[string]struct{}{}}
	l.w = link.NewWriter(conn, link.WriterConfig{MaxPending: s.cfg.MaxPending, WriteTimeout: s.cfg.WriteTimeout})
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		conn.Close()
		return
	}
	s.links[l] = struct{}{}
	s.wg.Add(2)
	s.mu.Unlock()
	s.nlinks.Add(1)
	go func() {
		defer s.wg.Done()
		if err := l.w.Run(); err != nil {
			l.fail("writing to worker link", err)
		}
	}()
	go func() {
		defer s.wg.Done()
		l.serve()
	}()
}

// serve is the link's reader: it runs every frame of the link in order.
func (l *blink) serve() {
	s := l.s
	defer l.cleanup()
	dec := link.Decoder{MaxFrame: s.cfg.MaxFrame}
	buf := make([]byte, 64<<10)
	helloDone := false
	err := link.ReadFrames(l.conn, &dec, buf, s.cfg.IdleTimeout, func(f *link.Frame) error {
		if !helloDone {
			if f.Type != link.TypeHello {
				return fmt.Errorf("broker: first frame is %s, want hello: %w", f.Type, errProtocol)
			}
			if f.Version != link.Version {
				return fmt.Errorf("broker: worker speaks link version %d, this broker %d: %w", f.Version, link.Version, errProtocol)
			}
			helloDone = true
			name := string(f.Name)
			l.worker.Store(&name)
			if err := l.w.WriteHello(s.cfg.Epoch, s.cfg.Name); err != nil {
				return fmt.Errorf("broker: answering hello: %w", err)
			}
			s.mu.Lock()
			ms := s.members
			s.mu.Unlock()
			if ms != nil {
				if err := l.w.WriteRaw(link.AppendMembers(nil, ms)); err != nil {
					return fmt.Errorf("broker: sending members: %w", err)
				}
			}
			return nil
		}
		switch f.Type {
		case link.TypePub:
			return l.publish(f)
		case link.TypeSub:
			l.subscribe(f.Channel)
		case link.TypeSubRec:
			l.subscribeRecover(f)
		case link.TypeHistReq:
			return l.historyPage(f)
		case link.TypeRepl:
			return l.replicate(f)
		case link.TypePres:
			return l.presence(f)
		case link.TypeUnsub:
			l.unsubscribe(f.Channel)
		case link.TypeReady:
			s.workerReady(l.name())
			l.linkReady()
		case link.TypePing:
			l.pinged()
			if err := l.w.WriteEmpty(link.TypePong); err != nil && !errors.Is(err, link.ErrQueueFull) {
				return err
			}
		case link.TypePong:
		case link.TypeBehind:
			l.setBehind(true)
		case link.TypeCaughtUp:
			l.setBehind(false)
		default:
			return fmt.Errorf("broker: unexpected %s frame from a worker: %w", f.Type, errProtocol)
		}
		return nil
	})
	var fe *link.FrameError
	switch {
	case errors.As(err, &fe):
		s.badFrames.Add(1)
		s.log.Error("malformed frame on worker link; closing it", "worker", l.name(), "error", err)
	case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || s.isClosed():
		s.log.Debug("worker link closed", "worker", l.name())
	case err != nil:
		if isProtocolError(err) {
			s.badFrames.Add(1)
		}
		s.log.Warn("worker link failed; closing it", "worker", l.name(), "error", err)
	}
}

// errProtocol marks a peer that broke the link protocol (not a network or
// queue failure), for the bad_frames counter.
var errProtocol = errors.New("protocol violation")

func isProtocolError(err error) bool { return errors.Is(err, errProtocol) }

// publish assigns the next offset and fans the message out. The fan-out runs
// under the shard lock so every worker sees a channel's offsets in order even
// when several workers publish to it at once.
//
// Backpressure: a worker link whose queue is full is waited for (up to
// SlowTimeout) rather than dropped at once, so a briefly busy worker slows
// the publishers — whose acks come later, and whose own bounded queues then
// fail new publishes loudly — instead of silently losing acknowledged
// messages. A worker that stays full is dropped (it reconnects and
// re-registers). The wait holds the shard lock: that is the point (order),
// and it cannot deadlock, because a link's writer never takes a shard lock.
func (l *blink) publish(f *link.Frame) error {
	s := l.s
	if !s.warm.Load() && !s.warmedUp() {
		s.refused.Add(1)
		return l.w.WritePubAck(f.ReqID, 0, 0, errWarmingUp)
	}
	sh := s.shard(f.Channel)
	var slow []*blink
	deferred, hold := false, false
	sh.mu.Lock()
	st := s.chanLocked(sh, f.Channel)
	if st.foreign {
		s.takeOver(st)
	}
	st.offset++
	off, epoch := st.offset, st.epoch
	if st.opts.History() {
		now := time.Now().UnixNano()
		st.hist.add(st.opts.HistorySize, off, now, f.Data)
		st.hist.expire(st.opts.HistoryTTL, now)
		if st.opts.Durable && s.commit != nil {
			// Acknowledged after the group commit's fsync (history.go).
			meta := store.Meta{Epoch: st.epoch, PrevEpoch: st.prevEpoch, PrevTop: st.prevTop}
			s.commit.add(st.name, meta, off, now, f.Data, st.hist.first(), l, f.ReqID)
			deferred = true
		}
	}
	if n := len(st.links); n > 0 {
		sh.scratch = link.AppendMsg(sh.scratch[:0], off, epoch, f.Channel, f.Data)
		for _, dl := range st.links {
			hold = hold || dl.behind.Load() || s.linkBacklogged(dl, s.cfg.FlowLinkMark)
			err := dl.w.WriteRaw(sh.scratch)
			if errors.Is(err, link.ErrQueueFull) {
				err = s.waitAndWrite(dl, sh.scratch)
				if errors.Is(err, link.ErrQueueFull) || errors.Is(err, context.DeadlineExceeded) {
					slow = append(slow, dl)
				}
			}
			if err == nil {
				s.deliveries.Add(1)
			}
		}
		if cap(sh.scratch) > 256<<10 {
			sh.scratch = nil
		}
	} else {
		st.idleSince = time.Now().UnixNano()
	}
	sh.mu.Unlock()
	s.publishes.Add(1)
	for _, dl := range slow {
		s.slowLinks.Add(1)
		dl.fail("worker link queue full (slow worker)", link.ErrQueueFull)
	}
	if deferred {
		return nil
	}
	if hold && s.holdAck(l, f.ReqID, off, epoch) {
		return nil
	}
	// The ack goes to the publisher's own link with backpressure: if that
	// worker does not read its acks, its reader (this goroutine) waits,
	// which stops it publishing — bounded by the write timeout.
	for range 2 {
		err := l.w.WritePubAck(f.ReqID, off, epoch, "")
		if !errors.Is(err, link.ErrQueueFull) {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.WriteTimeout)
		err = l.w.WaitSpace(ctx, link.PubAckSize(""))
		cancel()
		if err != nil {
			return fmt.Errorf("broker: queueing puback: %w", err)
		}
	}
	return fmt.Errorf("broker: queueing puback: %w", link.ErrQueueFull)
}

// errWarmingUp is the puback error of a publish refused during warm-up.
const errWarmingUp = "broker starting: worker interest is not registered yet"

// warmedUp decides whether a freshly started broker may take publishes.
//
// A broker restarted after a crash has no interest table: the workers
// re-register on reconnect, each after its own backoff. Taking a publish
// before the subscribers' workers are back would acknowledge a message that
// nobody receives. So publishes are refused — the publisher is told — until
// every worker of the node's topology has sent ready on its link (and at
// least WarmUpMin has passed, for workers of other nodes), or WarmUpMax
// passes. A broker started with no workers in the topology (a fresh
// cluster) is warm at once.
func (s *Server) warmedUp() bool {
	if u := s.handback.Load(); u != 0 && time.Now().UnixNano() < u {
		return false // taking history back from the peers (handback.go)
	}
	s.warmMu.Lock()
	defer s.warmMu.Unlock()
	since := time.Since(s.started)
	done := since >= s.cfg.WarmUpMax
	if !done && since >= s.cfg.WarmUpMin {
		done = true
		for w := range s.expected {
			if !s.ready[w] {
				done = false
				break
			}
		}
	}
	if done {
		s.warm.Store(true)
		s.expected, s.ready = nil, nil
		s.log.Debug("warm: taking publishes", "after", since)
	}
	return done
}

// ExpectWorkers names the workers that must re-register before a starting
// broker takes publishes (the topology's ready workers); no effect once warm.
func (s *Server) ExpectWorkers(names []string) {
	s.warmMu.Lock()
	defer s.warmMu.Unlock()
	if s.warm.Load() {
		return
	}
	s.expected = map[string]bool{}
	for _, n := range names {
		s.expected[n] = true
	}
}

func (s *Server) workerReady(name string) {
	if s.warm.Load() {
		return
	}
	s.warmMu.Lock()
	if s.ready != nil {
		s.ready[name] = true
	}
	s.warmMu.Unlock()
}

// waitAndWrite is the slow path of a fan-out: wait for space, then queue.
func (s *Server) waitAndWrite(dl *blink, frame []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.SlowTimeout)
	defer cancel()
	for range 8 { // space may be taken by other frames between wake and write
		if err := dl.w.WaitSpace(ctx, len(frame)); err != nil {
			return err
		}
		if err := dl.w.WriteRaw(frame); !errors.Is(err, link.ErrQueueFull) {
			return err
		}
	}
	return link.ErrQueueFull
}

func (s *Server) newChan(name string) *chanState {
	// Each new state of a channel gets a fresh epoch, so a channel that was
	// forgotten while idle and comes back restarts its offsets under an
	// epoch nobody has seen: offsets never repeat within an epoch.
	return &chanState{name: name, epoch: s.nextEpoch(), idleSince: time.Now().UnixNano(), opts: s.cfg.Rules.Lookup(name)}
}

func (s *Server) nextEpoch() uint64 { return s.cfg.Epoch + s.gen.Add(1) - 1 }

// chanLocked returns the channel's state, made (newChan) if the shard has
// none. The caller holds sh.mu. The name is bytes so that the lookup of an
// existing channel allocates no string.
func (s *Server) chanLocked(sh *shard, name []byte) *chanState {
	st := sh.chans[string(name)]
	if st == nil {
		st = s.newChan(string(name))
		sh.chans[st.name] = st
	}
	return st
}

func (l *blink) subscribe(ch []byte) {
	if _, ok := l.chans[string(ch)]; ok {
		return
	}
	name := string(ch)
	l.chans[name] = struct{}{}
	sh := l.s.shard(ch)
	sh.mu.Lock()
	st := l.s.chanLocked(sh, ch)
	st.links = append(st.links, l)
	sh.mu.Unlock()
}

func (l *blink) unsubscribe(ch []byte) {
	if _, ok := l.chans[string(ch)]; !ok {
		return
	}
	delete(l.chans, string(ch))
	l.s.dropInterest(l, ch)
}

func (s *Server) dropInterest(l *blink, ch []byte) {
	sh := s.shard(ch)
	sh.mu.Lock()
	if st := sh.chans[string(ch)]; st != nil {
		for i, x := range st.links {
			if x == l {
				last := len(st.links) - 1
				st.links[i] = st.links[last]
				st.links[last] = nil
				st.links = st.links[:last]
				break
			}
		}
		if len(st.links) == 0 {
			st.idleSince = time.Now().UnixNano()
		}
	}
	sh.mu.Unlock()
}

// cleanup runs on the reader goroutine after it stops: the link loses every
// interest, then closes.
func (l *blink) cleanup() {
	l.fail("", nil)
	l.setBehind(false)
	for ch := range l.chans {
		l.s.dropInterest(l, []byte(ch))
	}
	l.chans = nil
	// A dead worker's connections are gone: no ghosts.
	var emptied []string
	for ch, conns := range l.pres {
		for conn := range conns {
			if _, last := l.s.dropPresence(l, ch, conn); last && strings.HasPrefix(ch, "#") && l.s.reportsVacated(ch, false) {
				emptied = append(emptied, ch)
			}
		}
	}
	l.pres = nil
	for ch, conns := range l.shadows {
		for conn := range conns {
			if l.s.dropShadow(l, ch, conn) && l.s.reportsVacated(ch, true) {
				emptied = append(emptied, ch)
			}
		}
	}
	l.shadows = nil
	s := l.s
	s.mu.Lock()
	delete(s.links, l)
	s.mu.Unlock()
	// Internal channels it left empty: a surviving worker reports them
	// (presence.go, "Vacated notices").
	sort.Strings(emptied)
	s.vacated(emptied)
	s.nlinks.Add(-1)
}

// name is the worker's name from its hello ("" before).
func (l *blink) name() string {
	if p := l.worker.Load(); p != nil {
		return *p
	}
	return ""
}

// fail closes the link once; safe from any goroutine.
func (l *blink) fail(why string, err error) {
	l.once.Do(func() {
		if why != "" {
			l.s.log.Warn("closing worker link", "worker", l.name(), "reason", why, "error", err)
		}
		l.w.Close()
		l.conn.Close()
	})
}

// closeGracefully flushes what is queued (up to the deadline), then closes.
func (l *blink) closeGracefully(ctx context.Context) {
	l.w.Close()
	select {
	case <-l.w.Done():
	case <-ctx.Done():
	}
	l.fail("", nil)
}

// shard picks a channel's shard by FNV-1a (inlined: hash.Hash would
// allocate on this path).
func (s *Server) shard(ch []byte) *shard {
	h := uint32(2166136261)
	for _, c := range ch {
		h ^= uint32(c)
		h *= 16777619
	}
	return &s.shards[h%numShards]
}

// SetMembers records the ring's live brokers and pushes them to every link.
func (s *Server) SetMembers(ms []link.Member) {
	frame := link.AppendMembers(nil, ms)
	s.mu.Lock()
	s.members = append([]link.Member(nil), ms...)
	links := make([]*blink, 0, len(s.links))
	for l := range s.links {
		links = append(links, l)
	}
	s.mu.Unlock()
	for _, l := range links {
		// A full queue means a slow link that is about to be dropped; it
		// gets the list again when it reconnects.
		_ = l.w.WriteRaw(frame)
	}
}

// Stats returns the counters.
func (s *Server) Stats() ServerStats {
	var chans, hist, pres int64
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		chans += int64(len(sh.chans))
		for _, st := range sh.chans {
			if st.hist.n > 0 {
				hist++
			}
			pres += int64(len(st.pres))
		}
		sh.mu.Unlock()
	}
	var commits, writes int64
	if s.commit != nil {
		commits, writes = s.commit.commits.Load(), s.commit.writes.Load()
	}
	return ServerStats{
		HistoryChannels: hist,
		PresenceEntries: pres,
		DurableCommits:  commits,
		DurableWrites:   writes,
		Channels:        chans,
		Links:           s.nlinks.Load(),
		Publishes:       s.publishes.Load(),
		AcksHeld:        s.flow.held.Load(),
		AcksHeldExpired: s.flow.expired.Load(),
		LinksBehind:     s.flow.behind.Load(),
		Deliveries:      s.deliveries.Load(),
		SlowLinks:       s.slowLinks.Load(),
		BadFrames:       s.badFrames.Load(),
		Refused:         s.refused.Load(),
	}
}

// sweep forgets idle channel states so that channels used once do not
// accumulate for the life of the broker.
func (s *Server) sweep() {
	defer s.wg.Done()
	t := time.NewTicker(min(s.cfg.ChannelIdle/2, 30*time.Second))
	defer t.Stop()
	for {
		select {
		case <-s.stopSweep:
			return
		case now := <-t.C:
			cutoff := now.Add(-s.cfg.ChannelIdle).UnixNano()
			for i := range s.shards {
				sh := &s.shards[i]
				sh.mu.Lock()
				for name, st := range sh.chans {
					// History outlives interest (that is its point): a
					// history channel is forgotten only once its messages
					// have expired.
					st.hist.expire(st.opts.HistoryTTL, now.UnixNano())
					if len(st.links) == 0 && len(st.pres) == 0 && len(st.shadow) == 0 && st.hist.n == 0 && st.idleSince < cutoff {
						delete(sh.chans, name)
					}
				}
				sh.mu.Unlock()
			}
		}
	}
}

// Close stops accepting, closes every link (flushing what is queued until
// ctx ends) and waits for every goroutine. Idempotent.
func (s *Server) Close(ctx context.Context) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return
	}
	s.closed = true
	close(s.stopSweep)
	for _, ln := range s.listeners {
		ln.Close()
	}
	for c := range s.securing {
		c.Close() // ends its handshake at once
	}
	links := make([]*blink, 0, len(s.links))
	for l := range s.links {
		links = append(links, l)
	}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, l := range links {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l.closeGracefully(ctx)
		}()
	}
	wg.Wait()
	s.wg.Wait()
	if s.commit != nil {
		s.commit.close()
		if err := s.cfg.Store.Close(); err != nil {
			s.log.Error("closing the history store", "error", err)
		}
	}
}

// Interest returns how many worker links are interested in channel; for
// tests and diagnostics.
func (s *Server) Interest(channel string) int {
	sh := s.shard([]byte(channel))
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if st := sh.chans[channel]; st != nil {
		return len(st.links)
	}
	return 0
}

// flowPoll is how often held acks are re-checked against the links'
// backlogs.
const flowPoll = 5 * time.Millisecond

// linkBacklogged reports whether dl has more than mark bytes queued (mark
// <= 0: never).
func (s *Server) linkBacklogged(dl *blink, mark int) bool {
	return mark > 0 && dl.w.Pending() > mark
}

// flowClear reports whether held acks may go: no worker reports behind and
// no link has more than a quarter of FlowLinkMark queued.
func (s *Server) flowClear() bool {
	if s.flow.behind.Load() > 0 {
		return false
	}
	mark := s.cfg.FlowLinkMark / 4
	if mark <= 0 {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for l := range s.links {
		if s.linkBacklogged(l, mark) {
			return false
		}
	}
	return true
}

// Publisher flow control. A publish is acknowledged as soon as this broker
// has it, so a publisher that keeps a window of invokes in flight (the
// SocketCluster client's invokePublish) could outrun delivery: the
// backlog grows in the workers' send queues until subscribers that are
// merely behind, because the whole machine is busy, are cut off as slow
// consumers. So a worker whose local delivery is behind says so on its
// link (behind / caughtup frames, worker/flow.go), and the ack of a
// publish to a channel whose interested workers include one that is
// behind is held: the publisher's window stays full and it waits. The
// message itself is delivered at once as always; only the ack waits.
//
// Bounds: an ack is held at most FlowMaxHold (then it goes out anyway, so
// a worker that never catches up cannot stall publishers for good, and
// the slow-consumer policy decides), and at most FlowMaxHeld acks are held
// at once (beyond that they go out at once). Held acks are released when
// no link of this broker is behind any more (not per channel: simpler,
// and a worker is behind for its machine's sake, rarely for one channel)
// or when their hold expires. A worker link whose queue at this broker
// holds more than FlowLinkMark bytes (the worker does not read its
// messages as fast as they come: its machine is busy) counts as behind
// too, since those messages, already acknowledged, would land in its
// sockets' send queues next. Durable publishes are not held (their ack
// already waits for the group commit). A publisher that does not wait for
// acks (transmitPublish) is not slowed.

// flowHold is the set of held acks, in the order they were held (so
// their deadlines are in order too).
type flowHold struct {
	mu       sync.Mutex
	q        []heldAck
	kick     chan struct{} // cap 1: a link caught up, or the first ack was held
	behind   atomic.Int64  // links reporting behind
	held     atomic.Int64
	expired  atomic.Int64
	nq       atomic.Int64 // len(q), for the lock-free fast path of setBehind
	stopping bool
}

type heldAck struct {
	l          *blink
	id         uint64
	off, epoch uint64
	until      int64 // unix ns
}

// setBehind records a link's flow state (its reader, or cleanup).
func (l *blink) setBehind(v bool) {
	if l.behind.Swap(v) == v {
		return
	}
	f := &l.s.flow
	if v {
		f.behind.Add(1)
		return
	}
	if f.behind.Add(-1) == 0 && f.nq.Load() > 0 {
		select {
		case f.kick <- struct{}{}:
		default:
		}
	}
}

// holdAck queues the ack of a publish instead of writing it; false: not
// held (disabled, the bound is reached, or nobody is behind any more).
func (s *Server) holdAck(l *blink, id, off, epoch uint64) bool {
	if s.cfg.FlowMaxHold < 0 {
		return false
	}
	f := &s.flow
	f.mu.Lock()
	if f.stopping || len(f.q) >= s.cfg.FlowMaxHeld {
		f.mu.Unlock()
		return false
	}
	first := len(f.q) == 0
	f.q = append(f.q, heldAck{l: l, id: id, off: off, epoch: epoch, until: time.Now().Add(s.cfg.FlowMaxHold).UnixNano()})
	f.nq.Store(int64(len(f.q)))
	f.mu.Unlock()
	f.held.Add(1)
	if first {
		select {
		case f.kick <- struct{}{}:
		default:
		}
	}
	return true
}

// flowLoop releases held acks: all of them when no link is behind, else
// those whose hold expired. It ends (releasing everything) on Close.
func (s *Server) flowLoop() {
	defer s.wg.Done()
	f := &s.flow
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	var out []heldAck
	for {
		stop := false
		select {
		case <-f.kick:
		case <-t.C:
		case <-s.stopSweep:
			stop = true
		}
		free := stop || s.flowClear()
		now := time.Now().UnixNano()
		f.mu.Lock()
		n := len(f.q)
		if !free {
			n = 0
			for n < len(f.q) && f.q[n].until <= now {
				n++
			}
			f.expired.Add(int64(n))
		}
		out = append(out[:0], f.q[:n]...)
		rest := copy(f.q, f.q[n:])
		clear(f.q[rest:])
		f.q = f.q[:rest]
		f.nq.Store(int64(rest))
		var next int64
		if rest > 0 {
			next = f.q[0].until
		}
		if stop {
			f.stopping = true
		}
		f.mu.Unlock()
		for i, h := range out {
			// Unbounded write: the ack is a few dozen bytes, and this
			// goroutine must not wait on one slow publisher's link.
			_ = h.l.w.WriteRawAlways(link.AppendPubAck(nil, h.id, h.off, h.epoch, ""))
			out[i] = heldAck{}
		}
		if stop {
			return
		}
		if !t.Stop() {
			select {
			case <-t.C:
			default:
			}
		}
		if next != 0 {
			// Re-checked every flowPoll: a link's backlog drains without
			// telling us.
			t.Reset(min(time.Duration(max(next-time.Now().UnixNano(), int64(time.Millisecond))), flowPoll))
		}
	}
}
