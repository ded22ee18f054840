package handoff

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Listener is the worker's end: it accepts sender connections (one per
// balancer) and yields the fds they pass. Goroutines: one accept loop and one
// reader per connected sender, all joined by Close.
type Listener struct {
	path string
	ln   *net.UnixListener

	// out is unbuffered on purpose: a reader hands an fd over only when
	// Accept takes it, so a worker that stops accepting pushes back on the
	// balancer (its Send times out) instead of piling fds up here.
	out  chan received
	done chan struct{}

	mu     sync.Mutex // guards conns and closed
	conns  map[*net.UnixConn]struct{}
	closed bool

	wg  sync.WaitGroup
	bad atomic.Int64
}

type received struct {
	fd     int
	prebuf []byte
	meta   Meta
}

// Listen creates the handoff socket at path (mode 0600: whoever can connect
// can inject connections into the worker). A stale socket file left by a
// crashed process is replaced; a live one is an error.
func Listen(path string) (*Listener, error) {
	ln, err := listenUnixpacket(path)
	if err != nil {
		return nil, err
	}
	// A listener we created removes its file on Close.
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(path, 0o600); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("handoff: listen %s: chmod: %w", path, err)
	}
	l := &Listener{
		path:  path,
		ln:    ln,
		out:   make(chan received),
		done:  make(chan struct{}),
		conns: make(map[*net.UnixConn]struct{}),
	}
	l.wg.Add(1)
	go l.acceptLoop()
	return l, nil
}

func listenUnixpacket(path string) (*net.UnixListener, error) {
	addr := &net.UnixAddr{Name: path, Net: "unixpacket"}
	ln, err := net.ListenUnix("unixpacket", addr)
	if err == nil {
		return ln, nil
	}
	if !errors.Is(err, syscall.EADDRINUSE) {
		return nil, fmt.Errorf("handoff: listen %s: %w", path, err)
	}
	// In use: either a live listener (refuse) or a stale file (replace).
	if c, derr := net.DialUnix("unixpacket", nil, addr); derr == nil {
		_ = c.Close()
		return nil, fmt.Errorf("handoff: listen %s: a live process already listens there", path)
	}
	if rerr := os.Remove(path); rerr != nil {
		return nil, fmt.Errorf("handoff: listen %s: remove stale socket: %w", path, rerr)
	}
	ln, err = net.ListenUnix("unixpacket", addr)
	if err != nil {
		return nil, fmt.Errorf("handoff: listen %s: %w", path, err)
	}
	return ln, nil
}

// Path is the socket path.
func (l *Listener) Path() string { return l.path }

// BadMessages counts malformed messages that were dropped (their fds closed).
func (l *Listener) BadMessages() int64 { return l.bad.Load() }

// Accept blocks until a sender passes an fd, and returns it with the bytes
// the sender had already read from it. The caller owns fd (close-on-exec is
// set; blocking mode is whatever the sender had, so set it explicitly). After
// Close, Accept returns an error matching net.ErrClosed.
func (l *Listener) Accept() (fd int, prebuf []byte, err error) {
	fd, prebuf, _, err = l.AcceptMeta()
	return fd, prebuf, err
}

// AcceptMeta is Accept with what the sender said about the socket (zero
// Meta from a sender that said nothing): the caller need not set or ask
// for what m already says.
func (l *Listener) AcceptMeta() (fd int, prebuf []byte, m Meta, err error) {
	select {
	case r := <-l.out:
		return r.fd, r.prebuf, r.meta, nil
	case <-l.done:
		return -1, nil, Meta{}, fmt.Errorf("handoff: accept on %s: %w", l.path, net.ErrClosed)
	}
}

// Close stops accepting, disconnects every sender, closes any fd not yet
// taken by Accept and waits for the listener's goroutines. Idempotent.
func (l *Listener) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	close(l.done)
	err := l.ln.Close()
	for c := range l.conns {
		_ = c.Close()
	}
	l.mu.Unlock()
	l.wg.Wait()
	if err != nil {
		return fmt.Errorf("handoff: close listener %s: %w", l.path, err)
	}
	return nil
}

func (l *Listener) acceptLoop() {
	defer l.wg.Done()
	var backoff time.Duration
	for {
		c, err := l.ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and friends: pause (growing, capped) instead of
			// spinning; the sender retries its dial.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			t := time.NewTimer(backoff)
			select {
			case <-l.done:
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		backoff = 0
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			_ = c.Close()
			return
		}
		l.conns[c] = struct{}{}
		l.wg.Add(1)
		l.mu.Unlock()
		go l.readLoop(c)
	}
}

func (l *Listener) readLoop(c *net.UnixConn) {
	defer l.wg.Done()
	defer func() {
		l.mu.Lock()
		delete(l.conns, c)
		l.mu.Unlock()
		_ = c.Close()
	}()
	// One byte more than the largest valid message, so an oversized one is
	// seen (MSG_TRUNC) rather than silently cut to a valid-looking length.
	buf := make([]byte, maxHeader+MaxPrebuf+1)
	oob := make([]byte, oobSpace)
	for {
		n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
		fds := parseFDs(oob[:oobn])
		if err != nil || (n == 0 && len(fds) == 0) {
			// Peer gone or connection closed by Close.
			closeAll(fds)
			return
		}
		meta, rest, ok := parseHeader(buf[:n])
		if flags&(syscall.MSG_TRUNC|syscall.MSG_CTRUNC) != 0 || !ok || len(fds) != 1 {
			closeAll(fds)
			l.bad.Add(1)
			continue
		}
		var prebuf []byte
		if len(rest) > 0 {
			prebuf = append([]byte(nil), rest...)
		}
		select {
		case l.out <- received{fd: fds[0], prebuf: prebuf, meta: meta}:
		case <-l.done:
			closeAll(fds)
			return
		}
	}
}

// parseFDs returns every fd in the control messages; it never drops one, so
// the caller can close what it does not keep.
func parseFDs(oob []byte) []int {
	if len(oob) == 0 {
		return nil
	}
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for i := range msgs {
		rights, err := syscall.ParseUnixRights(&msgs[i])
		if err != nil {
			continue
		}
		fds = append(fds, rights...)
	}
	return fds
}

func closeAll(fds []int) {
	for _, fd := range fds {
		_ = syscall.Close(fd)
	}
}
