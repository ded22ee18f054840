package balancer

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/shoalhq/shoal/handoff"
)

// Accept-error pauses: EMFILE and its kin persist until something closes, so
// accepting again at once would spin on the same error. The pause doubles
// from acceptPauseMin to acceptPauseMax and resets after a success.
const (
	acceptPauseMin = 5 * time.Millisecond
	acceptPauseMax = time.Second
)

// acceptLoop accepts on ln until it is closed and gives each connection to
// handle, which must not block for long (it runs on the accept path).
func (c *Child) acceptLoop(ln net.Listener, handle func(net.Conn)) {
	defer c.wg.Done()
	var pause time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || c.unlistened.Load() {
				return
			}
			c.stats.add(ctrAcceptErrors, 1)
			if pause == 0 {
				// Once per streak, not once per retry.
				c.log.Warn("accept failed; pausing before retrying", "listener", ln.Addr().String(), "error", err)
			}
			pause = min(max(2*pause, acceptPauseMin), acceptPauseMax)
			t := time.NewTimer(pause)
			select {
			case <-c.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		pause = 0
		handle(conn)
	}
}

// acceptPlain is the public port's accept loop when it carries only plain
// traffic. It takes connections with accept4(2) straight from the listening
// socket and hands the raw fd over: no net.Conn, no netpoll registration,
// no per-connection allocation beyond the kernel's; three syscalls per
// connection (accept4, sendmsg, close). The worker is told what accept4
// already established (peer address, O_NONBLOCK, TCP_NODELAY inherited from
// the listener, see rawListener), which spares it three more. lf is the
// listening socket as a pollable *os.File (see rawListener); closing it ends
// the loop.
func (c *Child) acceptPlain(lf *os.File, name string) {
	defer c.wg.Done()
	rc, err := lf.SyscallConn()
	if err != nil {
		if !errors.Is(err, os.ErrClosed) { // closed already: a Drain right after Start
			c.log.Error("public listener unusable; not accepting", "error", err)
		}
		return
	}
	var pause time.Duration
	for {
		nfd := -1
		var sa syscall.Sockaddr
		var aerr error
		err := rc.Read(func(fd uintptr) bool {
			nfd, sa, aerr = syscall.Accept4(int(fd), syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK)
			// Wait (in the netpoller) only while there is nothing to take.
			return aerr != syscall.EAGAIN
		})
		if err != nil {
			return // listener closed (Drain or Stop)
		}
		if aerr != nil {
			if aerr == syscall.ECONNABORTED || aerr == syscall.EINTR {
				continue // that client gave up; nothing to pause for
			}
			if c.unlistened.Load() {
				return // Drain or Stop shut the socket down
			}
			c.stats.add(ctrAcceptErrors, 1)
			if pause == 0 {
				c.log.Warn("accept failed; pausing before retrying", "listener", name, "error", aerr)
			}
			pause = min(max(2*pause, acceptPauseMin), acceptPauseMax)
			t := time.NewTimer(pause)
			select {
			case <-c.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		pause = 0
		m := handoff.Meta{Peer: sockaddrPort(sa), Nonblock: true, NoDelay: true}
		if c.local != nil {
			c.stats.add(ctrHanded, 1)
			c.local.Plain(nfd, m) // the worker owns it now
			continue
		}
		c.routeFD(nfd, m)
		_ = syscall.Close(nfd) // the balancer's copy; the worker holds its own
	}
}

// rawListener turns a TCP listener into its socket as a pollable *os.File
// (net.TCPListener's RawConn cannot wait for readability; an *os.File on a
// non-blocking fd can). The listener's own fd is closed; the file is now
// the only handle on the socket.
//
// It also sets TCP_NODELAY on the listening socket: Linux copies it to
// every socket accept4 returns (TestAcceptedSocketsInheritNoDelay), so the
// worker need not set it per connection (one setsockopt, several µs, saved
// per connection; the worker wants Nagle off since it coalesces frames
// itself).
func rawListener(ln net.Listener) (*os.File, error) {
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return nil, fmt.Errorf("listener is %T, not TCP", ln)
	}
	f, err := tl.File() // a dup sharing the non-blocking open file
	if err != nil {
		return nil, fmt.Errorf("dup public listener: %w", err)
	}
	_ = tl.Close()
	// Through SyscallConn: f.Fd() would put the socket in blocking mode.
	rc, err := f.SyscallConn()
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("public listener raw conn: %w", err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	}); err != nil || serr != nil {
		_ = f.Close()
		return nil, fmt.Errorf("set TCP_NODELAY on the public listener: %w", errors.Join(err, serr))
	}
	return f, nil
}

// sockaddrPort is a TCP peer address as accept4 returned it; zero (the
// worker asks the socket) for anything else and for a zoned IPv6 address.
func sockaddrPort(sa syscall.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *syscall.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *syscall.SockaddrInet6:
		if a.ZoneId != 0 {
			return netip.AddrPort{}
		}
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	}
	return netip.AddrPort{}
}

// connMeta is what the balancer knows about a plain net.Conn from its own
// accept loop: Go's net package made it non-blocking and set TCP_NODELAY.
func connMeta(conn net.Conn) handoff.Meta {
	m := handoff.Meta{Nonblock: true, NoDelay: true}
	if ta, ok := conn.RemoteAddr().(*net.TCPAddr); ok && ta.Zone == "" {
		m.Peer = ta.AddrPort()
	}
	return m
}

// routePlain hands a plain net.Conn (from the shared-port sniffer) to a
// worker and closes the balancer's copy.
func (c *Child) routePlain(conn net.Conn) {
	defer conn.Close()
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return // cannot happen for TCP; nothing to hand over
	}
	m := connMeta(conn)
	if c.local != nil {
		c.localPlain(sc, m)
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) { c.routeFD(int(fd), m) })
}

// routeFD hands a plain connection to the least-loaded live worker, with m
// (the client's address and the socket's flags) in the handoff message. It
// reads nothing (no prebuf): the worker sees the stream from its first byte.
// The caller closes fd afterwards.
func (c *Child) routeFD(fd int, m handoff.Meta) {
	var triedBuf [4]*worker // no allocation on the common path
	tried := triedBuf[:0]
	for range maxAttempts {
		w := c.pool.pick(kindPlain, tried)
		if w == nil {
			break
		}
		tried = append(tried, w)
		err := w.send(fd, m, nil)
		if err == nil {
			c.pool.markAlive(w)
			c.stats.addWorker(ctrHanded, w.name, 1)
			return
		}
		c.pool.release(w)
		if isLocalExhaustion(err) {
			// Our own fd table is full (dialling the worker needs one):
			// not the worker's fault, so do not mark it dead.
			c.stats.add(ctrFDExhausted, 1)
			return
		}
		c.pool.markDead(w)
		c.stats.add(ctrHandoffFailures, 1)
		c.stats.addWorker("failures", w.name, 1)
		c.log.Warn("worker handoff failed; marked dead, trying the next", "worker", w.name, "error", err)
	}
	c.stats.add(ctrNoWorker, 1)
}

// maxAttempts bounds the workers tried for one connection; a node never has
// more workers than this is worth trying in the accept path.
const maxAttempts = 64

// ctrFDExhausted counts connections dropped because this process ran out of
// file descriptors while routing them.
const ctrFDExhausted = "fd_exhausted"

func isLocalExhaustion(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ENOBUFS)
}
