package netpoll

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/shoalhq/shoal/internal/epoll"
)

// httpIdleTimeout closes keep-alive HTTP connections idle this long.
const httpIdleTimeout = 30 * time.Second

// Server serves WebSocket connections from sockets handed to Serve, with one
// epoll poller goroutine and a fixed pool of goroutines for reads, flushes
// and Handler calls.
type Server struct {
	cfg      Config
	log      hclog.Logger
	upgrader ws.Upgrader

	ep     *epoll.Instance // waited for in Go's own netpoller (see poll)
	wakefd int             // eventfd that wakes the poller for Shutdown
	// readers run read tasks (and Handler calls); flushers run flush tasks.
	// Separate, so that Handler calls that block cannot stall writes to
	// every other connection.
	readers  pool
	flushers pool

	tabMu  sync.RWMutex
	table  []*Conn // indexed by fd
	closed bool    // guarded by tabMu: Serve refuses new sockets

	nextID atomic.Uint64
	open   atomic.Int64 // upgraded conns not yet released (Len)
	owned  atomic.Int64 // fds we own, handshaking ones included
	idle   chan struct{}
	stats  counters

	// Inbound flow control (stall.go): how many connections have a deep
	// send queue, and the open connections whose reads are paused.
	deep         atomic.Int64
	nstalled     atomic.Int32
	stallMu      sync.Mutex
	stalled      []*Conn
	stallSince   int64 // unix ns: when the current stall began
	noStallUntil int64 // unix ns: no pause before this (after a stall ran out)
	stallTimer   *time.Timer
	stallArmed   bool

	httpSrv *http.Server
	httpLn  *memListener

	pollDone     chan struct{}
	httpDone     chan struct{}
	shutdownOnce sync.Once
	shutdownErr  error
}

// counters are the Server's statistics.
type counters struct {
	accepted, upgraded, rejected, http         atomic.Uint64
	msgsIn, bytesIn, msgsOut, bytesOut         atomic.Uint64
	queueFull, timeouts, protoErrors, released atomic.Uint64
	panics, writes, stalls                     atomic.Uint64
}

// Stats is a snapshot of a Server's counters.
type Stats struct {
	Conns       int64  // open WebSocket connections (Len)
	Accepted    uint64 // sockets given to Serve
	Upgraded    uint64 // successful WebSocket upgrades
	Rejected    uint64 // upgrades and requests answered with an HTTP error
	HTTP        uint64 // sockets handed to the HTTP handler
	MsgsIn      uint64 // data messages delivered to OnMessage
	BytesIn     uint64 // bytes read, HTTP heads included
	MsgsOut     uint64 // frames accepted by WriteFrame/WriteText
	BytesOut    uint64 // bytes written
	Writes      uint64 // writev calls: MsgsOut ÷ Writes is how well frames coalesce
	Stalls      uint64 // reads paused because the send queues were over the pressure mark
	QueueFull   uint64 // writes refused with ErrQueueFull
	Timeouts    uint64 // handshake, write and close timeouts
	ProtoErrors uint64 // connections closed for a protocol violation
	Panics      uint64 // Handler panics recovered (the connection was closed with 1011)
}

// Stats returns the current counters.
func (s *Server) Stats() Stats {
	c := &s.stats
	return Stats{
		Conns: s.open.Load(), Accepted: c.accepted.Load(), Upgraded: c.upgraded.Load(),
		Rejected: c.rejected.Load(), HTTP: c.http.Load(),
		MsgsIn: c.msgsIn.Load(), BytesIn: c.bytesIn.Load(), MsgsOut: c.msgsOut.Load(), BytesOut: c.bytesOut.Load(),
		QueueFull: c.queueFull.Load(), Timeouts: c.timeouts.Load(), ProtoErrors: c.protoErrors.Load(),
		Panics: c.panics.Load(), Writes: c.writes.Load(), Stalls: c.stalls.Load(),
	}
}

// New creates a Server and starts its poller and pool (and the HTTP server
// when Config.HTTP is set). Stop them with Shutdown.
func New(cfg Config) (*Server, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	s := &Server{
		cfg:      cfg,
		log:      cfg.Logger,
		upgrader: newUpgrader(cfg.Path, parseOrigins(cfg.Origins), cfg.MaxHeaderBytes),
		idle:     make(chan struct{}, 1),
		pollDone: make(chan struct{}),
	}
	// The poller waits for our epoll fd through Go's runtime netpoller
	// instead of in a blocking epoll_wait: a goroutine blocked in a system
	// call keeps its P until sysmon retakes it, which with GOMAXPROCS=1
	// (the worker's default) stalls the pool for up to 10 ms per wake-up.
	if s.ep, err = epoll.New(256); err != nil {
		return nil, fmt.Errorf("netpoll: %w", err)
	}
	s.wakefd, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		_ = s.ep.Close()
		return nil, fmt.Errorf("netpoll: create eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(s.wakefd)}
	if err := unix.EpollCtl(s.ep.FD(), unix.EPOLL_CTL_ADD, s.wakefd, &ev); err != nil {
		_ = unix.Close(s.wakefd)
		_ = s.ep.Close()
		return nil, fmt.Errorf("netpoll: register eventfd: %w", err)
	}
	// Size the fd table for the process's file limit (20,000 here) so it
	// rarely grows; tablePut grows it past 64 Ki if a bigger limit is used.
	var rl unix.Rlimit
	size := 1024
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &rl) == nil && rl.Cur > 0 {
		size = int(min(rl.Cur, 1<<16))
	}
	s.table = make([]*Conn, size)

	if cfg.HTTP != nil {
		s.httpLn = newMemListener()
		s.httpSrv = &http.Server{
			Handler:           cfg.HTTP,
			ReadHeaderTimeout: cfg.HandshakeReadTimeout,
			// Keep-alive HTTP conns hold a goroutine each: do not keep
			// idle ones for ever.
			IdleTimeout:    httpIdleTimeout,
			MaxHeaderBytes: cfg.MaxHeaderBytes,
			ErrorLog:       log.New(s.log.StandardWriter(&hclog.StandardLoggerOptions{InferLevels: true}), "", 0),
		}
		s.httpDone = make(chan struct{})
		go func() {
			defer close(s.httpDone)
			if err := s.httpSrv.Serve(s.httpLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("HTTP server stopped", "error", err)
			}
		}()
	}
	s.readers.start(cfg.Pool, readBufSize, s.runTask)
	s.flushers.start(max(2, runtime.GOMAXPROCS(0)), 0, s.runTask)
	go s.poll()
	return s, nil
}

func (s *Server) runTask(sc *scratch, t task) {
	if t.kind == taskRead {
		t.c.readTask(sc)
	} else {
		t.c.flush(sc)
	}
}

// Len is the number of open WebSocket connections.
func (s *Server) Len() int { return int(s.open.Load()) }

// Serve takes ownership of an accepted stream socket: it reads the HTTP
// request (prebuf holds bytes already read from it), upgrades it and serves
// WebSocket frames, all without a goroutine of its own. remote nil means the
// socket's peer address. On error the fd is closed.
func (s *Server) Serve(fd int, prebuf []byte, remote net.Addr) error {
	return s.ServePrepared(fd, prebuf, remote, 0)
}

// Prepared says what a caller of ServePrepared has already made sure of
// about a socket. Each system call it spares costs several µs per new
// connection, a good part of the worker's accept path.
type Prepared uint8

const (
	// Nonblocking: O_NONBLOCK is set (accept4 with SOCK_NONBLOCK, a
	// socketpair made non-blocking, or a dup of a Go net.Conn's fd).
	Nonblocking Prepared = 1 << iota
	// NoDelay: TCP_NODELAY is set (inherited from the listening socket or
	// set by Go's net package), or the socket is not TCP.
	NoDelay
)

// ServePrepared is Serve for a socket of which p says what is already set:
// Serve sets O_NONBLOCK and TCP_NODELAY itself otherwise. A wrong p is a
// caller bug: a blocking socket would stall a pool goroutine.
func (s *Server) ServePrepared(fd int, prebuf []byte, remote net.Addr, p Prepared) error {
	if fd < 0 {
		return fmt.Errorf("netpoll: serve: invalid fd %d", fd)
	}
	if p&Nonblocking == 0 {
		if err := unix.SetNonblock(fd, true); err != nil {
			_ = unix.Close(fd)
			return fmt.Errorf("netpoll: serve fd %d: set non-blocking: %w", fd, err)
		}
	}
	if remote == nil {
		remote = peerAddr(fd)
	}
	if p&NoDelay == 0 {
		// Frames are written whole and coalesced by the queue, so Nagle
		// would only add latency. Not a TCP socket (tests use unix ones):
		// no matter.
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	}

	c := &Conn{srv: s, id: s.nextID.Add(1), remote: remote, fd: int32(fd)}
	c.seq = uint32(c.id)
	// c.mu is held until the fd is registered: a Shutdown that finds c in
	// the table waits for that instead of closing the fd under our feet,
	// and an event can only arrive once c is in the table.
	c.mu.Lock()
	s.owned.Add(1)
	if !s.tablePut(c) {
		c.mu.Unlock()
		_ = unix.Close(fd)
		s.released() // wakes a Shutdown waiting for this count
		return ErrServerClosed
	}
	s.stats.accepted.Add(1)
	c.setDeadlineLocked(s.cfg.HandshakeReadTimeout)
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(fd), Pad: int32(c.seq)}
	if len(prebuf) > 0 {
		c.stash = append(make([]byte, 0, len(prebuf)), prebuf...)
		c.reading = true
		c.pendRead = true
		ev.Events = unix.EPOLLONESHOT
	}
	if err := unix.EpollCtl(s.ep.FD(), unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		c.pendRead, c.reading = false, false
		c.abortLocked(ws.StatusAbnormalClosure, "epoll add")
		c.unlockAndRun() // closes the fd
		return fmt.Errorf("netpoll: serve fd %d: epoll add: %w", fd, err)
	}
	c.unlockAndRun()
	return nil
}

// tablePut records c under its fd; false once Shutdown started.
func (s *Server) tablePut(c *Conn) bool {
	s.tabMu.Lock()
	defer s.tabMu.Unlock()
	if s.closed {
		return false
	}
	fd := int(c.fd)
	if fd >= len(s.table) {
		grown := make([]*Conn, max(2*len(s.table), fd+1))
		copy(grown, s.table)
		s.table = grown
	}
	s.table[fd] = c
	return true
}

// tableRemove forgets c, before its fd is closed or handed on, so that a new
// socket with the same number cannot be confused with it.
func (s *Server) tableRemove(c *Conn) {
	s.tabMu.Lock()
	if fd := int(c.fd); fd < len(s.table) && s.table[fd] == c {
		s.table[fd] = nil
	}
	s.tabMu.Unlock()
}

// lookup returns the conn registered under fd.
func (s *Server) lookup(fd int32) *Conn {
	s.tabMu.RLock()
	defer s.tabMu.RUnlock()
	if fd < 0 || int(fd) >= len(s.table) {
		return nil
	}
	return s.table[fd]
}

// released accounts for an fd we no longer own.
func (s *Server) released() {
	s.stats.released.Add(1)
	if s.owned.Add(-1) == 0 {
		select {
		case s.idle <- struct{}{}:
		default:
		}
	}
}

// poll waits for readiness and schedules work; it never reads or writes a
// connection itself.
func (s *Server) poll() {
	defer close(s.pollDone)
	for {
		events, err := s.ep.Wait()
		if err != nil {
			s.log.Error("epoll wait failed, poller stops", "error", err)
			return
		}
		for i := range events {
			ev := &events[i]
			if ev.Fd == int32(s.wakefd) {
				return
			}
			if c := s.lookup(ev.Fd); c != nil {
				c.ready(ev.Events, uint32(ev.Pad))
			}
		}
	}
}

// ready handles one epoll event for c.
func (c *Conn) ready(events, seq uint32) {
	c.mu.Lock()
	if c.seq != seq || c.phase >= phaseDead {
		c.mu.Unlock()
		return
	}
	if events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		c.pendRead = c.pendRead || c.scheduleReadLocked()
	}
	if events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 && c.waitOut {
		c.waitOut = false
		c.pendFlush = c.pendFlush || c.scheduleFlushLocked()
	}
	c.armLocked()
	c.unlockAndRun()
}

// Shutdown closes every connection with code and reason (1001 when a worker
// drains), waits until all sockets are released or ctx ends, then stops the
// poller, the pool and the HTTP server. Sockets still open when ctx ends are
// cut without a close handshake. Serve refuses sockets once it started.
// Calling it again returns the first call's result.
func (s *Server) Shutdown(ctx context.Context, code ws.StatusCode, reason string) error {
	s.shutdownOnce.Do(func() { s.shutdownErr = s.shutdown(ctx, code, reason) })
	return s.shutdownErr
}

func (s *Server) shutdown(ctx context.Context, code ws.StatusCode, reason string) error {
	s.tabMu.Lock()
	s.closed = true
	var conns []*Conn
	for _, c := range s.table {
		if c != nil {
			conns = append(conns, c)
		}
	}
	s.tabMu.Unlock()
	for _, c := range conns {
		c.Close(code, reason)
	}
	var err error
	// idle may hold a token from an earlier moment with no sockets: the
	// count is checked again after every wake-up.
	for err == nil && s.owned.Load() > 0 {
		select {
		case <-s.idle:
		case <-ctx.Done():
			err = fmt.Errorf("netpoll: shutdown: %d sockets still open: %w", s.owned.Load(), ctx.Err())
			for _, c := range conns {
				c.mu.Lock()
				c.abortLocked(ws.StatusAbnormalClosure, "shutdown deadline")
				c.unlockAndRun()
			}
		}
	}
	if s.httpSrv != nil {
		if herr := s.httpSrv.Shutdown(ctx); herr != nil {
			_ = s.httpSrv.Close()
			err = errors.Join(err, fmt.Errorf("netpoll: shutdown HTTP server: %w", herr))
		}
		<-s.httpDone
	}
	var one = [8]byte{1}
	if _, werr := unix.Write(s.wakefd, one[:]); werr != nil {
		err = errors.Join(err, fmt.Errorf("netpoll: wake poller: %w", werr))
	} else {
		<-s.pollDone
	}
	s.stopStalls()
	s.readers.stop()
	s.flushers.stop()
	// After a Shutdown deadline, tasks can still be pushed by connections
	// that were cut (a read task owes OnClose): run them here.
	sc := &scratch{buf: make([]byte, readBufSize), iovs: make([]unix.Iovec, maxIovecs)}
	for range 1 << 16 {
		t, ok := s.readers.take()
		if !ok {
			if t, ok = s.flushers.take(); !ok {
				break
			}
		}
		s.runTask(sc, t)
	}
	_ = unix.Close(s.wakefd)
	_ = s.ep.Close()
	return err
}
