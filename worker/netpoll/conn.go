package netpoll

import (
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
	"golang.org/x/sys/unix"
)

// phase is a connection's position in its life. It only moves forward.
type phase uint8

const (
	phaseHandshake phase = iota // reading the HTTP request head
	phaseOpen                   // WebSocket open: frames both ways
	phaseClosing                // final bytes (close frame or HTTP error) queued; no new writes
	phaseDraining               // final bytes written and write side shut; waiting for the peer to hang up
	phaseDead                   // to be closed as soon as no task uses the fd
	phaseGone                   // fd closed, resources released
	phaseHanded                 // socket given to the HTTP server; not ours any more
)

// Conn is one WebSocket connection. Its methods are safe for concurrent use.
//
// An idle Conn owns no goroutine and no buffer: reads land in the pool
// goroutine's buffer and only a frame that arrives in pieces is kept (in
// stash) until it is complete.
type Conn struct {
	srv    *Server
	id     uint64
	remote net.Addr
	fd     int32
	// seq tells this connection's epoll events from those of an earlier
	// connection that had the same fd number. (Beside fd: no padding.)
	seq uint32
	// data is the user value: read on every message by the worker, so it
	// is an atomic pointer rather than a field under mu.
	data atomic.Pointer[any]

	mu          sync.Mutex // guards everything below up to the input state
	phase       phase
	reading     bool // a read task is queued or running
	flushing    bool // a flush task is queued or running
	waitOut     bool // the socket said EAGAIN; EPOLLOUT is armed
	opened      bool // the upgrade succeeded (OnOpen called or about to be)
	onCloseDone bool
	closeSet    bool
	peerClosed  bool // the peer sent its close frame or hung up: no need to wait for it
	// batching is set while a read task processes a batch of input: a flush
	// needed meanwhile is left to the read task (flushDeferred), which does
	// it inline when the batch ends, so replies to a batch of messages leave
	// in one writev without a hand-off to another pool goroutine.
	batching      bool
	flushDeferred bool
	// stalled: reads are paused by inbound flow control (stall.go); EPOLLIN
	// stays disarmed until the server releases the connection.
	stalled     bool
	deep        bool // counted in Server.deep (isDeepLocked)
	pendFlush   bool // set under mu: unlockAndRun pushes a flush task
	pendRead    bool // set under mu: unlockAndRun pushes a read task
	closeCode   ws.StatusCode
	closeReason string
	// q is the send queue (frames shared read-only with other conns), nil
	// when empty; outBytes counts its unwritten bytes.
	q        *queue
	outBytes int
	// deadline (unix ns, 0 = none) is when the handshake, a stalled write or
	// the close sequence times out; timer fires at or before it.
	deadline int64
	timer    *time.Timer

	// Input state. Only the read task touches it (Conn.reading serialises
	// read tasks); finish clears it once no read task can run.
	stash    []byte // incomplete input: HTTP head, or a frame still arriving
	need     int    // total size of the frame in stash, 0 while its header is incomplete
	skip     int64  // bytes still to drop of a frame refused for its size (1009)
	frag     []byte // data message being reassembled from fragments
	fragOp   ws.OpCode
	fragging bool
	discard  bool // closing: frames are parsed only to find the peer's close frame
}

// ID is unique among the connections of one Server.
func (c *Conn) ID() uint64 { return c.id }

// RemoteAddr is the address given to Serve or, if none, the socket's peer.
// It may be nil when neither was available.
func (c *Conn) RemoteAddr() net.Addr { return c.remote }

// Data returns the value stored with SetData.
func (c *Conn) Data() any {
	if p := c.data.Load(); p != nil {
		return *p
	}
	return nil
}

// SetData stores a per-connection user value.
func (c *Conn) SetData(v any) {
	c.data.Store(&v)
}

// WriteFrame queues a complete, pre-built frame (see AppendTextFrame). The
// bytes are shared, not copied: they must not change until every connection
// wrote them, so build a new slice per message rather than reusing one. It
// never blocks on the network. It returns ErrQueueFull when the send queue is
// over its bounds (the frame was dropped) and ErrClosed once the connection
// is closing.
func (c *Conn) WriteFrame(frame []byte) error {
	flush, err := c.QueueFrame(frame)
	if flush {
		c.srv.flushers.push(c, taskFlush)
	}
	return err
}

// QueueFrame is WriteFrame for a caller that writes many frames to many
// connections and flushes them afterwards, all together (fan-out): it
// queues the frame but schedules no flush task. When it returns owed, the
// connection is marked as being flushed and the caller must pass it to
// (*Flusher).Flush soon, exactly once; until then no other goroutine
// writes its queue, so every frame queued meanwhile (by this caller or
// others) leaves in that one writev. Errors are WriteFrame's.
func (c *Conn) QueueFrame(frame []byte) (owed bool, err error) {
	if len(frame) == 0 {
		return false, nil
	}
	s := c.srv
	c.mu.Lock()
	if c.phase != phaseOpen {
		c.mu.Unlock()
		return false, ErrClosed
	}
	if queued := c.queuedLocked(); queued > 0 &&
		(c.outBytes+len(frame) > s.cfg.SendQueueBytes || queued >= s.cfg.SendQueueMsgs) {
		c.mu.Unlock()
		s.stats.queueFull.Add(1)
		return false, ErrQueueFull
	}
	c.enqueueLocked(frame)
	flush := c.scheduleFlushLocked()
	c.mu.Unlock()
	s.stats.msgsOut.Add(1)
	return flush, nil
}

// FlushAsync hands a flush that QueueFrame left to the caller (owed) to
// the server's flush pool instead, as WriteFrame would have: for callers
// that run on several cores and want the writes spread over the pool.
func (c *Conn) FlushAsync() {
	c.srv.flushers.push(c, taskFlush)
}

// Flusher writes send queues on its caller's goroutine: the flushes that
// QueueFrame left to the caller. It holds the iovec batch a pool goroutine
// has of its own. Not safe for concurrent use; one per flushing goroutine.
type Flusher struct {
	sc scratch
}

// NewFlusher returns a Flusher (16 KiB of iovecs).
func NewFlusher() *Flusher {
	return &Flusher{sc: scratch{iovs: make([]unix.Iovec, maxIovecs)}}
}

// Flush writes c's send queue (as a flush task would: until it is empty,
// the socket would block, or a round limit sends the rest to the pool).
// Call it once for each QueueFrame that returned owed.
func (f *Flusher) Flush(c *Conn) {
	c.flush(&f.sc)
}

// WriteText frames a private copy of payload as a text message and queues it.
func (c *Conn) WriteText(payload []byte) error {
	return c.WriteFrame(appendFrame(make([]byte, 0, frameSize(len(payload))), ws.OpText, payload))
}

// Close sends a close frame with code and reason after the data already
// queued, then shuts the connection down; OnClose reports code. The whole
// sequence is bounded by WriteTimeout. Closing a closed conn does nothing.
// A code that must not appear on the wire is not sent: 1006 cuts the
// connection without a close frame, others (0, 1005, 1015, out of range)
// send a close frame without a status.
func (c *Conn) Close(code ws.StatusCode, reason string) {
	c.mu.Lock()
	switch {
	case c.phase == phaseOpen && code == ws.StatusAbnormalClosure:
		c.abortLocked(code, reason)
	case c.phase == phaseOpen && !validCloseCode(code):
		c.beginCloseLocked(code, reason, closeFrame(0, ""))
	case c.phase == phaseOpen:
		c.beginCloseLocked(code, reason, closeFrame(code, reason))
	case c.phase == phaseHandshake:
		c.abortLocked(ws.StatusAbnormalClosure, reason)
	}
	c.unlockAndRun()
}

// enqueueLocked appends a frame to the send queue without checking bounds.
func (c *Conn) enqueueLocked(b []byte) {
	if len(b) == 0 {
		return
	}
	if c.q == nil {
		c.q = getQueue(1)
	}
	c.q = c.q.push(b)
	c.outBytes += len(b)
	if !c.deep && c.isDeepLocked() {
		c.deep = true
		c.srv.deep.Add(1)
	}
}

// isDeepLocked reports whether the send queue holds over a quarter of its
// bounds (inbound flow control, stall.go). Connections change state only
// when they cross the mark, so the shared counter is touched rarely.
func (c *Conn) isDeepLocked() bool {
	cfg := &c.srv.cfg
	return c.q != nil && (4*c.q.len() > cfg.SendQueueMsgs || 4*c.outBytes > cfg.SendQueueBytes)
}

// queuedLocked is the number of frames not yet completely written.
func (c *Conn) queuedLocked() int {
	if c.q == nil {
		return 0
	}
	return c.q.len()
}

// scheduleFlushLocked reports whether the caller must push a flush task.
// None is needed while one is queued or running (it writes what we added),
// while the socket waits for EPOLLOUT (the poller schedules one then), or
// while a read task is batching (it flushes when the batch ends).
func (c *Conn) scheduleFlushLocked() bool {
	if c.flushing || c.waitOut {
		return false
	}
	c.flushing = true
	if c.batching {
		c.flushDeferred = true
		return false
	}
	return true
}

// scheduleReadLocked reports whether the caller must push a read task.
func (c *Conn) scheduleReadLocked() bool {
	if c.reading {
		return false
	}
	c.reading = true
	return true
}

// setCloseLocked records the code and reason OnClose will report; the first
// one wins.
func (c *Conn) setCloseLocked(code ws.StatusCode, reason string) {
	if !c.closeSet {
		c.closeSet, c.closeCode, c.closeReason = true, code, reason
	}
}

// beginCloseLocked queues final bytes (a close frame, or an HTTP error
// response during the handshake) and stops accepting writes. The flush that
// writes them shuts the write side; the read task then waits for the peer to
// hang up. The task pushes happen in unlockAndRun.
func (c *Conn) beginCloseLocked(code ws.StatusCode, reason string, final []byte) {
	if c.phase != phaseOpen && c.phase != phaseHandshake {
		return
	}
	c.setCloseLocked(code, reason)
	c.phase = phaseClosing
	c.enqueueLocked(final)
	c.setDeadlineLocked(c.srv.cfg.WriteTimeout)
	c.pendFlush = c.pendFlush || c.scheduleFlushLocked()
	if c.opened {
		// The read task delivers OnClose, after any OnMessage in progress.
		c.pendRead = c.pendRead || c.scheduleReadLocked()
	}
}

// abortLocked marks the connection for immediate closing (no close frame).
func (c *Conn) abortLocked(code ws.StatusCode, reason string) {
	if c.phase >= phaseDead {
		return
	}
	c.setCloseLocked(code, reason)
	c.phase = phaseDead
	c.deadline = 0
	if c.opened && !c.onCloseDone {
		c.pendRead = c.pendRead || c.scheduleReadLocked()
	}
}

// unlockAndRun releases c.mu and then does what the locked section decided:
// push tasks, or close the fd when the connection is dead and no task uses it.
func (c *Conn) unlockAndRun() {
	flush, read := c.pendFlush, c.pendRead
	c.pendFlush, c.pendRead = false, false
	finish := c.phase == phaseDead && !c.reading && !c.flushing
	if finish {
		c.phase = phaseGone
	}
	c.mu.Unlock()
	if flush {
		c.srv.flushers.push(c, taskFlush)
	}
	if read {
		c.srv.readers.push(c, taskRead)
	}
	if finish {
		c.finish()
	}
}

// finish closes the fd and releases everything. It runs exactly once, after
// the phase moved to gone under c.mu with no task queued or running.
func (c *Conn) finish() {
	s := c.srv
	s.tableRemove(c)
	if err := unix.Close(int(c.fd)); err != nil {
		s.log.Debug("close fd", "fd", c.fd, "error", err)
	}
	c.mu.Lock()
	if c.timer != nil {
		c.timer.Stop()
		c.timer = nil
	}
	if c.deep {
		c.deep = false
		s.deep.Add(-1)
	}
	if c.q != nil {
		putQueue(c.q)
		c.q, c.outBytes = nil, 0
	}
	c.stash, c.frag = nil, nil
	c.mu.Unlock()
	if c.opened {
		s.open.Add(-1)
	}
	s.released()
}

// setDeadlineLocked arms the connection's timer d from now.
func (c *Conn) setDeadlineLocked(d time.Duration) {
	c.deadline = time.Now().Add(d).UnixNano()
	if c.timer == nil {
		c.timer = time.AfterFunc(d, c.onTimer)
	} else {
		c.timer.Reset(d)
	}
}

// clearDeadlineLocked disarms the timer.
func (c *Conn) clearDeadlineLocked() {
	c.deadline = 0
	if c.timer != nil {
		c.timer.Stop()
	}
}

// onTimer runs when a deadline may have passed. Deadlines move later without
// resetting the timer (a stalled write that makes progress only bumps
// c.deadline), so it re-arms itself when it fired early.
func (c *Conn) onTimer() {
	c.mu.Lock()
	if c.deadline == 0 || c.phase >= phaseDead {
		c.mu.Unlock()
		return
	}
	if left := time.Until(time.Unix(0, c.deadline)); left > 0 {
		c.timer.Reset(left)
		c.mu.Unlock()
		return
	}
	var reason string
	switch c.phase {
	case phaseHandshake:
		reason = "handshake timeout"
	case phaseOpen:
		reason = "write timeout"
	default:
		reason = "close timeout"
	}
	c.srv.stats.timeouts.Add(1)
	c.abortLocked(ws.StatusAbnormalClosure, reason)
	c.unlockAndRun()
}

// armLocked re-arms the one-shot epoll registration for what the connection
// still waits for: input unless a read task owns the fd, output while a
// write is stalled. One-shot disarms the fd after every event, so each event
// handler and each task calls this when it is done.
func (c *Conn) armLocked() {
	if c.phase >= phaseDead {
		return
	}
	ev := uint32(unix.EPOLLONESHOT)
	if !c.reading && !(c.stalled && c.phase == phaseOpen) {
		ev |= unix.EPOLLIN | unix.EPOLLRDHUP
	}
	if c.waitOut {
		ev |= unix.EPOLLOUT
	}
	if ev == unix.EPOLLONESHOT {
		return
	}
	e := unix.EpollEvent{Events: ev, Fd: c.fd, Pad: int32(c.seq)}
	if err := unix.EpollCtl(c.srv.ep.FD(), unix.EPOLL_CTL_MOD, int(c.fd), &e); err != nil {
		c.srv.log.Warn("epoll re-arm failed, closing connection", "fd", c.fd, "error", err)
		c.abortLocked(ws.StatusAbnormalClosure, "epoll: "+err.Error())
	}
}

// flush writes the send queue with writev until it is empty or the socket
// would block. It runs on a pool goroutine; c.flushing keeps it alone, and
// c.mu is released around the syscall so writers keep queueing meanwhile.
func (c *Conn) flush(sc *scratch) {
	s := c.srv
	c.mu.Lock()
	requeue := false
	for round := 0; ; round++ {
		if c.phase >= phaseDead {
			break
		}
		pending := c.queuedLocked()
		if pending == 0 {
			c.drainedLocked()
			break
		}
		if round == maxFlushRounds {
			// Let other connections' tasks run; this one goes back in line.
			requeue = true
			break
		}
		n := min(pending, len(sc.iovs))
		for i, b := range c.q.frames[c.q.head : c.q.head+n] {
			sc.iovs[i].Base = &b[0]
			sc.iovs[i].SetLen(len(b))
		}
		fd := c.fd
		c.mu.Unlock()
		w, errno := writev(int(fd), sc.iovs[:n])
		s.stats.writes.Add(1)
		// Drop the references so the pool does not keep frames alive.
		for i := range sc.iovs[:n] {
			sc.iovs[i].Base = nil
		}
		c.mu.Lock()
		if w > 0 {
			c.consumeLocked(w)
			s.stats.bytesOut.Add(uint64(w))
			if c.phase == phaseOpen && c.deadline != 0 {
				// Progress: a stalled write gets a fresh WriteTimeout.
				c.deadline = time.Now().Add(s.cfg.WriteTimeout).UnixNano()
			}
		}
		switch errno {
		case 0:
			continue
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			c.waitOut = true
			if c.phase == phaseOpen && c.deadline == 0 {
				c.setDeadlineLocked(s.cfg.WriteTimeout)
			}
			c.armLocked()
		default:
			c.abortLocked(ws.StatusAbnormalClosure, "write: "+errno.Error())
		}
		break
	}
	if requeue {
		c.mu.Unlock()
		s.flushers.push(c, taskFlush)
		return
	}
	c.flushing = false
	c.unlockAndRun()
	if s.nstalled.Load() > 0 && !s.pressured() {
		s.releaseStalled()
	}
}

// maxFlushRounds bounds the writev calls of one flush task.
const maxFlushRounds = 16

// drainedLocked runs when the send queue became empty.
func (c *Conn) drainedLocked() {
	switch c.phase {
	case phaseOpen:
		if c.deadline != 0 {
			c.clearDeadlineLocked()
		}
	case phaseClosing:
		if c.peerClosed {
			// Both close frames were exchanged: the server closes the
			// TCP connection at once (RFC 6455 §7.1.1).
			c.phase = phaseDead
			return
		}
		// Our close frame (or HTTP error) is out: send FIN and wait,
		// bounded, for the peer's close frame or hang-up. Closing now
		// with its data unread would reset the connection, and the peer
		// might lose our close frame.
		if err := unix.Shutdown(int(c.fd), unix.SHUT_WR); err != nil {
			c.abortLocked(ws.StatusAbnormalClosure, "shutdown: "+err.Error())
			return
		}
		c.phase = phaseDraining
		c.setDeadlineLocked(c.srv.cfg.WriteTimeout)
		c.armLocked()
	}
}

// consumeLocked drops w written bytes from the head of the send queue and
// gives the queue back to the pool when it is empty.
func (c *Conn) consumeLocked(w int) {
	c.outBytes -= w
	if c.q.consume(w) {
		putQueue(c.q)
		c.q = nil
	}
	// Hysteresis: a deep queue counts until it is down to half the mark.
	if c.deep && (c.q == nil || (8*c.q.len() <= c.srv.cfg.SendQueueMsgs && 8*c.outBytes <= c.srv.cfg.SendQueueBytes)) {
		c.deep = false
		c.srv.deep.Add(-1)
	}
}
