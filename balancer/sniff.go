package balancer

import (
	"net"
	"syscall"
	"time"
)

// tlsRecordHandshake is the first byte of every TLS connection (a handshake
// record). No HTTP request starts with it, so one peeked byte tells a shared
// port's two protocols apart.
const tlsRecordHandshake = 0x16

// sniff serves a connection on a port shared by ws:// and wss:// (listen.tls.listen
// equal to listen.public). It waits for the client's first byte without
// reading it (MSG_PEEK: the byte stays in the socket, so a plain connection
// is still handed over untouched) and routes by it. The goroutine lives only
// until that byte arrives, bounded by the handshake timeout.
func (c *Child) sniff(conn net.Conn) {
	defer c.wg.Done()
	if !c.track(conn) { // so Stop can cut the wait short
		_ = conn.Close()
		return
	}
	first, err := peekByte(conn, c.handshakeTimeout())
	c.untrack(conn)
	if err != nil {
		c.stats.add(ctrSniffFailed, 1)
		_ = conn.Close()
		return
	}
	if first == tlsRecordHandshake {
		c.startTLS(conn)
		return
	}
	c.routePlain(conn)
}

// ctrSniffFailed counts shared-port connections that sent nothing in time.
const ctrSniffFailed = "sniff_failed"

func (c *Child) handshakeTimeout() time.Duration {
	c.mu.Lock()
	d := c.cfg.Protocol.HandshakeTimeout.D()
	c.mu.Unlock()
	if d <= 0 {
		d = 10 * time.Second
	}
	return d
}

// peekByte waits (up to timeout) for conn's first byte and returns it
// without consuming it.
func peekByte(conn net.Conn, timeout time.Duration) (byte, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return 0, syscall.EINVAL
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, err
	}
	if err := conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return 0, err
	}
	var b [1]byte
	var n int
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		n, _, perr = syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK)
		return perr != syscall.EAGAIN && perr != syscall.EINTR
	})
	if derr := conn.SetReadDeadline(time.Time{}); err == nil {
		err = derr
	}
	if err == nil {
		err = perr
	}
	if err == nil && n == 0 {
		err = net.ErrClosed // EOF before any byte
	}
	return b[0], err
}
