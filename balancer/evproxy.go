package balancer

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Epoll-driven proxying of established TLS connections.
//
// After its handshake (done on a short-lived goroutine through Go's
// netpoller), a proxied connection is moved onto an event loop: both of its
// descriptors go into the loop's epoll set and every read, write and close
// happens on the loop's goroutine. An idle connection therefore costs no
// goroutine and no copy buffer: one 16 KiB buffer per loop serves every
// connection, and only a peer that is slow to read gets a pending-bytes
// buffer, for as long as it is behind.
//
// crypto/tls runs over evConn, which after the handshake reads and writes
// the raw non-blocking socket: a read that would block returns a timeout
// error (crypto/tls keeps those non-fatal, even inside a record), and a
// write that would block is queued in evConn and flushed on EPOLLOUT, so
// crypto/tls never sees a short write.
//
// Epoll is level-triggered. Back-pressure: while bytes for one side are
// pending, the other side's EPOLLIN is switched off, so a connection holds
// at most one burst in memory. Because crypto/tls may hold decrypted records
// the socket no longer shows, a connection whose client side is re-enabled
// is also put on the loop's run list and read once without waiting.
//
// Lock order: loop.mu only guards the hand-over list; connection state
// belongs to the loop goroutine alone.

// evBufSize is each loop's shared read buffer (one TLS record).
const evBufSize = 16 << 10

// evTick is how often a loop checks write and half-close deadlines.
const evTick = 500 * time.Millisecond

// errWouldBlock is what evConn.Read returns when the socket is drained; a
// timeout, so crypto/tls treats it as retryable.
var errWouldBlock = &wouldBlockError{}

type wouldBlockError struct{}

func (*wouldBlockError) Error() string   { return "balancer: socket would block" }
func (*wouldBlockError) Timeout() bool   { return true }
func (*wouldBlockError) Temporary() bool { return true }

var _ net.Error = errWouldBlock

// evConn is the transport under a proxied tls.Conn. Before detach it is the
// accepted *net.TCPConn (the handshake blocks through Go's netpoller); after
// detach it is a raw non-blocking fd owned by one event loop.
type evConn struct {
	tcp *net.TCPConn // nil after detach
	fd  int          // -1 until detach, -2 once closed
	out []byte
	err error // sticky write error
}

func (c *evConn) Read(b []byte) (int, error) {
	if c.tcp != nil {
		return c.tcp.Read(b)
	}
	if c.fd < 0 {
		return 0, net.ErrClosed
	}
	// crypto/tls reads into the free end of its ciphertext buffer and asks
	// for bytes.MinRead of room before each read; leaving that room keeps
	// a buffer lent by the loop from being replaced by a larger copy.
	if len(b) > 2*bytes.MinRead {
		b = b[:len(b)-bytes.MinRead]
	}
	for {
		n, err := syscall.Read(c.fd, b)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return 0, errWouldBlock
		case err != nil:
			return 0, err
		case n == 0 && len(b) > 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

// Write never writes short: what the socket does not take now is queued
// and flushed by the loop. The loop stops feeding crypto/tls while anything
// is queued, so the queue stays at about one record.
func (c *evConn) Write(b []byte) (int, error) {
	if c.tcp != nil {
		return c.tcp.Write(b)
	}
	if c.err != nil {
		return 0, c.err
	}
	if len(c.out) > 0 {
		c.out = append(c.out, b...)
		return len(b), nil
	}
	n, err := writeNB(c.fd, b)
	if err != nil {
		c.err = err
		return 0, err
	}
	if n < len(b) {
		c.out = append(c.out, b[n:]...)
	}
	return len(b), nil
}

// flush writes queued bytes; it reports whether the queue is now empty.
func (c *evConn) flush() (bool, error) {
	if len(c.out) == 0 {
		return true, nil
	}
	n, err := writeNB(c.fd, c.out)
	if err != nil {
		c.err = err
		return false, err
	}
	c.out = c.out[n:]
	if len(c.out) == 0 {
		c.out = nil // let the buffer go
		return true, nil
	}
	return false, nil
}

func (c *evConn) Close() error {
	if c.tcp != nil {
		return c.tcp.Close()
	}
	if c.fd < 0 {
		return net.ErrClosed
	}
	fd := c.fd
	c.fd = -2 // closed; a late Read or Write fails
	c.err = net.ErrClosed
	return syscall.Close(fd)
}

// LocalAddr and RemoteAddr are nil once the socket belongs to a loop: the
// closed TCPConn and its addresses are let go (~300 bytes per idle
// connection), and nothing asks a proxied connection for them.
func (c *evConn) LocalAddr() net.Addr {
	if c.tcp == nil {
		return nil
	}
	return c.tcp.LocalAddr()
}

func (c *evConn) RemoteAddr() net.Addr {
	if c.tcp == nil {
		return nil
	}
	return c.tcp.RemoteAddr()
}

// Deadlines apply during the handshake; afterwards the loop enforces its
// own (crypto/tls sets some around close_notify: harmless no-ops).
func (c *evConn) SetDeadline(t time.Time) error {
	if c.tcp != nil {
		return c.tcp.SetDeadline(t)
	}
	return nil
}

func (c *evConn) SetReadDeadline(t time.Time) error {
	if c.tcp != nil {
		return c.tcp.SetReadDeadline(t)
	}
	return nil
}

func (c *evConn) SetWriteDeadline(t time.Time) error {
	if c.tcp != nil {
		return c.tcp.SetWriteDeadline(t)
	}
	return nil
}

// detach takes the socket out of Go's netpoller: it duplicates the fd and
// closes the TCPConn (whose own fd is deregistered and closed). The
// duplicate shares the open file description, which Go already made
// non-blocking.
func (c *evConn) detach() error {
	fd, err := dupConn(c.tcp)
	if err != nil {
		return err
	}
	_ = c.tcp.Close()
	c.tcp = nil
	c.fd = fd
	return nil
}

// dupConn returns a close-on-exec duplicate of a connection's descriptor.
func dupConn(sc syscall.Conn) (int, error) {
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("raw conn: %w", err)
	}
	fd := -1
	var derr error
	if err := rc.Control(func(s uintptr) {
		r, _, e := syscall.Syscall(syscall.SYS_FCNTL, s, syscall.F_DUPFD_CLOEXEC, 0)
		if e != 0 {
			derr = e
			return
		}
		fd = int(r)
	}); err != nil {
		return -1, fmt.Errorf("raw conn: %w", err)
	}
	if derr != nil {
		return -1, fmt.Errorf("dup: %w", derr)
	}
	return fd, nil
}

func writeNB(fd int, b []byte) (int, error) {
	total := 0
	for total < len(b) {
		n, err := syscall.Write(fd, b[total:])
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return total, nil
		case err != nil:
			return total, err
		}
		total += n
	}
	return total, nil
}

// evProxy is one proxied connection on a loop.
type evProxy struct {
	tc   *tls.Conn
	ec   *evConn // client transport (under tc)
	wfd  int     // worker's proxy socket
	wOut []byte  // plaintext queued for the worker
	done func()  // accounting when the connection ends (once)

	clientEOF bool // client finished sending; worker's write side shut
	closing   bool // worker finished: flush to the client, half-close, drain, close
	closed    bool
	// sink drops client plaintext instead of passing it on: the worker has
	// stopped reading (it closed, e.g. after refusing an oversized message
	// with 1009). The client may still be sending; closing its socket with
	// that data unread would reset the connection and the client would lose
	// the close frame, so its input is read and dropped until its EOF.
	sink       bool
	notified   bool // close_notify queued for the client
	clientShut bool // client's write side shut (FIN sent after close_notify)

	// Deadlines (zero = none), checked by the loop's tick.
	cStall, wStall time.Time // since when bytes queued for the client / worker made no progress (worker.write_timeout)
	lingerTill     time.Time // half-closed: how long the worker may take to finish

	// Interest currently registered, per fd.
	cEvents, wEvents uint32
}

// evLoop is one epoll event loop.
type evLoop struct {
	epfd   int
	wakeR  int // pipe: the read end is in the epoll set
	wakeW  int
	buf    []byte   // plaintext, shared by every connection of the loop
	inBufs [][]byte // ciphertext buffers to lend to reading connections (tlsmem.go)
	byFD   map[int]*evProxy
	runq   []*evProxy   // client sides to read without waiting for epoll
	wt     atomic.Int64 // worker.write_timeout (ns); Reload may change it
	stats  *stats       // byte counters (shared with the Child)
	linger time.Duration

	wakeups atomic.Int64 // epoll_wait returns, for the no-spin test

	mu       sync.Mutex // guards incoming and stopping
	incoming []*evProxy
	stopping bool
}

func newEvLoop(wt, linger time.Duration, st *stats) (*evLoop, error) {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	var p [2]int
	if err := syscall.Pipe2(p[:], syscall.O_NONBLOCK|syscall.O_CLOEXEC); err != nil {
		_ = syscall.Close(epfd)
		return nil, fmt.Errorf("pipe2: %w", err)
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(p[0])}
	if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, p[0], &ev); err != nil {
		_ = syscall.Close(epfd)
		_ = syscall.Close(p[0])
		_ = syscall.Close(p[1])
		return nil, fmt.Errorf("epoll_ctl wake pipe: %w", err)
	}
	l := &evLoop{epfd: epfd, wakeR: p[0], wakeW: p[1], buf: make([]byte, evBufSize),
		byFD: map[int]*evProxy{}, linger: linger, stats: st}
	l.setWriteTimeout(wt)
	return l, nil
}

// setWriteTimeout changes how long queued bytes may wait without progress.
func (l *evLoop) setWriteTimeout(d time.Duration) {
	if d <= 0 {
		d = 10 * time.Second
	}
	l.wt.Store(int64(d))
}

func (l *evLoop) wake() {
	_, _ = syscall.Write(l.wakeW, []byte{1}) // EAGAIN: a wake-up is already pending
}

// add hands a detached connection to the loop. It reports false (and the
// caller cleans up) if the loop is stopping.
func (l *evLoop) add(p *evProxy) bool {
	l.mu.Lock()
	if l.stopping {
		l.mu.Unlock()
		return false
	}
	l.incoming = append(l.incoming, p)
	l.mu.Unlock()
	l.wake()
	return true
}

// stop ends the loop; it closes every connection it holds before run returns.
func (l *evLoop) stop() {
	l.mu.Lock()
	l.stopping = true
	l.mu.Unlock()
	l.wake()
}

// run is the loop goroutine. Bounded: it returns once stop was called and
// the wake-up seen; every iteration waits in epoll_wait at most evTick.
func (l *evLoop) run() {
	defer l.closeAll()
	events := make([]syscall.EpollEvent, 128)
	lastTick := time.Now()
	for {
		timeout := int(evTick / time.Millisecond)
		if len(l.runq) > 0 {
			timeout = 0
		}
		n, err := syscall.EpollWait(l.epfd, events, timeout)
		l.wakeups.Add(1)
		if err != nil && err != syscall.EINTR {
			return // the epoll fd is broken; closeAll releases everything
		}
		for i := 0; i < n; i++ {
			ev := events[i]
			fd := int(ev.Fd)
			if fd == l.wakeR {
				var b [64]byte
				for {
					if k, _ := syscall.Read(l.wakeR, b[:]); k <= 0 {
						break
					}
				}
				continue
			}
			p := l.byFD[fd]
			if p == nil || p.closed {
				continue
			}
			l.handle(p, fd, ev.Events)
		}
		// Client sides whose crypto/tls buffer may hold data.
		run := l.runq
		l.runq = nil
		for _, p := range run {
			if !p.closed {
				l.readClient(p)
			}
		}
		l.mu.Lock()
		stopping := l.stopping
		incoming := l.incoming
		l.incoming = nil
		l.mu.Unlock()
		if stopping {
			for _, p := range incoming {
				l.register(p)
			}
			return
		}
		for _, p := range incoming {
			if l.register(p) {
				l.runq = append(l.runq, p) // the handshake may have read the request already
			}
		}
		if now := time.Now(); now.Sub(lastTick) >= evTick {
			lastTick = now
			l.tick(now)
		}
	}
}

func (l *evLoop) register(p *evProxy) bool {
	p.cEvents = evRead
	p.wEvents = evRead
	l.byFD[p.ec.fd] = p
	l.byFD[p.wfd] = p
	ce := syscall.EpollEvent{Events: p.cEvents, Fd: int32(p.ec.fd)}
	we := syscall.EpollEvent{Events: p.wEvents, Fd: int32(p.wfd)}
	if err := syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_ADD, p.ec.fd, &ce); err != nil {
		l.close(p)
		return false
	}
	if err := syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_ADD, p.wfd, &we); err != nil {
		l.close(p)
		return false
	}
	return true
}

func (l *evLoop) handle(p *evProxy, fd int, events uint32) {
	readable := events&(syscall.EPOLLIN|syscall.EPOLLRDHUP|syscall.EPOLLHUP|syscall.EPOLLERR) != 0
	writable := events&(syscall.EPOLLOUT|syscall.EPOLLHUP|syscall.EPOLLERR) != 0
	if fd == p.ec.fd {
		if writable && p.cEvents&syscall.EPOLLOUT != 0 {
			l.flushClient(p)
		}
		if readable && !p.closed && p.cEvents&syscall.EPOLLIN != 0 {
			l.readClient(p)
		}
		return
	}
	if writable && p.wEvents&syscall.EPOLLOUT != 0 {
		l.flushWorker(p)
	}
	if readable && !p.closed && p.wEvents&syscall.EPOLLIN != 0 {
		l.readWorker(p)
	}
}

// readClient moves client plaintext to the worker until crypto/tls has
// nothing more, or the worker stops taking it. crypto/tls reads ciphertext
// into a buffer lent by the loop, which it gives back as soon as the
// connection holds no partial record (tlsmem.go).
func (l *evLoop) readClient(p *evProxy) {
	if p.closed || p.clientEOF || len(p.wOut) > 0 {
		return
	}
	l.lendInBuf(p.tc)
	l.readClientRecords(p)
	l.reclaimInBuf(p.tc)
}

func (l *evLoop) readClientRecords(p *evProxy) {
	for !p.closed && !p.clientEOF && len(p.wOut) == 0 {
		n, err := p.tc.Read(l.buf)
		// Reading can make crypto/tls write (a TLS 1.3 KeyUpdate answer).
		l.clientQueued(p)
		if n > 0 {
			l.stats.bytesIn.Add(int64(n))
		}
		if n > 0 && !p.sink { // sinking: the input is dropped
			w, werr := writeNB(p.wfd, l.buf[:n])
			if werr != nil {
				// The worker stopped reading; what it sent last (a close
				// frame) may still be unread on its socket, so keep
				// reading the worker and drop the client's input.
				p.sink = true
				l.setWorker(p, (p.wEvents|evRead)&^evWrite)
				continue
			}
			if w < n {
				p.wOut = append([]byte(nil), l.buf[w:n]...)
				p.wStall = time.Now()
				l.setClient(p, p.cEvents&^evRead)
				l.setWorker(p, p.wEvents|evWrite)
				return
			}
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return // drained; epoll says when there is more
			}
			if errors.Is(err, io.EOF) && p.closing {
				l.close(p) // both sides are done
				return
			}
			if errors.Is(err, io.EOF) {
				// Clean end of the client's stream: pass it on and give
				// the worker a bounded time to finish.
				p.clientEOF = true
				_ = syscall.Shutdown(p.wfd, syscall.SHUT_WR)
				p.lingerTill = time.Now().Add(l.linger)
				l.setClient(p, p.cEvents&^evRead)
				return
			}
			l.close(p)
			return
		}
	}
}

// readWorker moves worker bytes to the client until the worker socket is
// drained or the client stops taking them.
func (l *evLoop) readWorker(p *evProxy) {
	for !p.closed && !p.closing && len(p.ec.out) == 0 {
		n, err := syscall.Read(p.wfd, l.buf)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return
		case err != nil, n == 0:
			// The worker is done (EOF, or a reset after it closed with our
			// bytes unread): deliver what is queued, then half-close.
			p.closing = true
			p.sink = true
			p.wOut, p.wStall = nil, time.Time{} // nobody will read it
			l.setWorker(p, 0)
			l.finish(p)
			return
		}
		l.stats.bytesOut.Add(int64(n))
		if _, err := p.tc.Write(l.buf[:n]); err != nil {
			l.close(p)
			return
		}
		if l.clientQueued(p) {
			return
		}
	}
}

// clientQueued reports whether bytes wait for the client; if so it pauses
// reading from the worker and waits for the client socket to drain.
func (l *evLoop) clientQueued(p *evProxy) bool {
	if p.closed || len(p.ec.out) == 0 {
		return false
	}
	if p.cEvents&evWrite == 0 {
		p.cStall = time.Now()
		l.setWorker(p, p.wEvents&^evRead)
		l.setClient(p, p.cEvents|evWrite)
	}
	return true
}

func (l *evLoop) flushClient(p *evProxy) {
	before := len(p.ec.out)
	empty, err := p.ec.flush()
	if err != nil {
		l.close(p)
		return
	}
	if !empty {
		if len(p.ec.out) < before {
			p.cStall = time.Now() // progress: the timeout counts from here
		}
		return
	}
	p.cStall = time.Time{}
	l.setClient(p, p.cEvents&^evWrite)
	if p.closing {
		l.finish(p)
		return
	}
	l.setWorker(p, p.wEvents|evRead)
}

func (l *evLoop) flushWorker(p *evProxy) {
	n, err := writeNB(p.wfd, p.wOut)
	if err != nil {
		// The worker stopped reading (it closed); its last bytes may still
		// wait on its socket: read them, and drop the client's input.
		p.sink = true
		p.wOut, p.wStall = nil, time.Time{}
		l.setWorker(p, (p.wEvents|evRead)&^evWrite)
		if !p.clientEOF {
			l.setClient(p, p.cEvents|evRead)
			l.runq = append(l.runq, p)
		}
		return
	}
	p.wOut = p.wOut[n:]
	if len(p.wOut) > 0 {
		if n > 0 {
			p.wStall = time.Now() // progress: the timeout counts from here
		}
		return
	}
	p.wOut = nil
	p.wStall = time.Time{}
	l.setWorker(p, p.wEvents&^evWrite)
	if !p.clientEOF {
		l.setClient(p, p.cEvents|evRead)
		l.runq = append(l.runq, p) // crypto/tls may hold more already
	}
}

// finish ends a connection whose worker is done, as a TCP peer would: once
// everything queued for the client is out it sends close_notify and a FIN,
// then reads (and drops) the client's input until its EOF, bounded by the
// linger time. Closing at once with client data unread would make the
// kernel reset the connection, and the client could lose the worker's last
// bytes (the WebSocket close frame).
func (l *evLoop) finish(p *evProxy) {
	if len(p.ec.out) > 0 {
		l.setClient(p, evWrite)
		return
	}
	if !p.notified {
		p.notified = true
		_ = p.tc.CloseWrite() // queues close_notify
		if len(p.ec.out) > 0 {
			l.setClient(p, evWrite)
			return
		}
	}
	if !p.clientShut {
		p.clientShut = true
		_ = syscall.Shutdown(p.ec.fd, syscall.SHUT_WR)
	}
	if p.clientEOF {
		l.close(p)
		return
	}
	p.lingerTill = time.Now().Add(l.linger)
	l.setClient(p, evRead)
	l.runq = append(l.runq, p) // crypto/tls may hold client input already
}

// Interest bits. Reading always watches EPOLLRDHUP with EPOLLIN, and a side
// with no interest at all is taken out of the epoll set: EPOLLHUP, EPOLLERR
// and a pending EPOLLRDHUP are level-triggered and reported whatever the
// mask, so a side left in the set with its reading paused would wake the
// loop over and over.
const (
	evRead  = syscall.EPOLLIN | syscall.EPOLLRDHUP
	evWrite = syscall.EPOLLOUT
)

func (l *evLoop) setClient(p *evProxy, ev uint32) {
	if !p.closed && ev != p.cEvents {
		old := p.cEvents
		p.cEvents = ev
		l.setInterest(p, p.ec.fd, old, ev)
	}
}

func (l *evLoop) setWorker(p *evProxy, ev uint32) {
	if !p.closed && ev != p.wEvents {
		old := p.wEvents
		p.wEvents = ev
		l.setInterest(p, p.wfd, old, ev)
	}
}

func (l *evLoop) setInterest(p *evProxy, fd int, old, ev uint32) {
	op := syscall.EPOLL_CTL_MOD
	switch {
	case ev == 0:
		op = syscall.EPOLL_CTL_DEL
	case old == 0:
		op = syscall.EPOLL_CTL_ADD
	}
	e := syscall.EpollEvent{Events: ev, Fd: int32(fd)}
	if err := syscall.EpollCtl(l.epfd, op, fd, &e); err != nil {
		l.close(p)
	}
}

// tick closes connections stuck behind a peer that stopped reading
// (worker.write_timeout) or a worker that did not finish after the client's
// EOF.
func (l *evLoop) tick(now time.Time) {
	wt := time.Duration(l.wt.Load())
	seen := make(map[*evProxy]bool)
	for _, p := range l.byFD {
		if seen[p] || p.closed {
			continue
		}
		seen[p] = true
		if stalled(p.cStall, now, wt) || stalled(p.wStall, now, wt) ||
			(!p.lingerTill.IsZero() && now.After(p.lingerTill)) {
			l.close(p)
		}
	}
}

func stalled(since, now time.Time, wt time.Duration) bool {
	return !since.IsZero() && now.Sub(since) > wt
}

// close ends a proxied connection: close_notify to the client (best
// effort: whatever the socket takes now), both fds closed, accounting done.
func (l *evLoop) close(p *evProxy) {
	if p.closed {
		return
	}
	p.closed = true
	if p.cEvents != 0 {
		_ = syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_DEL, p.ec.fd, nil)
	}
	if p.wEvents != 0 {
		_ = syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_DEL, p.wfd, nil)
	}
	for _, fd := range []int{p.ec.fd, p.wfd} {
		if l.byFD[fd] == p {
			delete(l.byFD, fd)
		}
	}
	_ = p.tc.Close() // queues close_notify, writes what it can, closes the fd
	_ = syscall.Close(p.wfd)
	p.wOut, p.ec.out = nil, nil
	p.done()
}

func (l *evLoop) closeAll() {
	for _, p := range l.byFD {
		l.close(p)
	}
	l.mu.Lock()
	incoming := l.incoming
	l.incoming = nil
	l.stopping = true
	l.mu.Unlock()
	for _, p := range incoming {
		l.close(p)
	}
	_ = syscall.Close(l.epfd)
	_ = syscall.Close(l.wakeR)
	_ = syscall.Close(l.wakeW)
}
