package bench

// Opening ws:// connections without a goroutine: the agent creates a
// non-blocking socket, starts connect() and hands the socket to a poller at
// once. The poller then drives the connection through its states on epoll
// events: connected → upgrade request sent → 101 read → #handshake sent →
// reply read → (#subscribe sent → reply read) → open. Nothing blocks, and
// there is no Go netpoller registration, no dup and no scheduler hand-off per
// step. This matters because opening connections is where the bench spends
// most of its CPU: `conns` and `churn` run at thousands per second on the
// same two cores as the server. wss:// keeps the synchronous path in conn.go.

import (
	"bytes"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// Opening states.
const (
	stConnecting = iota + 1 // connect() in progress, waiting for EPOLLOUT
	stUpgrade               // upgrade request sent, waiting for the 101
	stHandshake             // #handshake sent, waiting for its reply
	stSubscribe             // #subscribe sent, waiting for its reply
)

// maxUpgradeResponse bounds the HTTP response the bench will buffer.
const maxUpgradeResponse = 8 << 10

// errSubscribe marks a failure of the #subscribe step, so it is counted
// apart from connection failures.
type errSubscribe struct{ error }

// opening is a connection's state until it is open; it is dropped (set to
// nil) then, so an idle connection keeps none of it.
type opening struct {
	state    int
	accept   string // the Sec-WebSocket-Accept the server must answer
	cid      uint64 // cid of the invoke being waited for
	token    string
	t0       time.Time
	deadline time.Time
	closeMsg string // the server's close frame, if it sent one while opening
	done     func(c *conn, err error)
}

// target is one server URL, resolved once per agent.
type target struct {
	sa4  unix.SockaddrInet4 // copied per connect: x/sys/unix writes into it
	sa6  unix.SockaddrInet6
	v6   bool
	host string // Host header
	path string // request URI
	tls  bool
}

func resolveTarget(raw string) (*target, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, err
	}
	t := &target{host: u.Host, path: u.RequestURI(), tls: u.Scheme == "wss"}
	port, _ := strconv.Atoi(u.Port())
	if port == 0 {
		port = 80
		if t.tls {
			port = 443
		}
	}
	h := u.Hostname()
	if h == "localhost" {
		h = "127.0.0.1"
	}
	ip := net.ParseIP(h)
	if ip == nil {
		return nil, fmt.Errorf("bench: %q is not an IP address", h)
	}
	if v4 := ip.To4(); v4 != nil {
		t.sa4.Port = port
		copy(t.sa4.Addr[:], v4)
	} else {
		t.sa6.Port = port
		copy(t.sa6.Addr[:], ip.To16())
		t.v6 = true
	}
	return t, nil
}

// open starts connecting c to t from source address src (nil = any) and
// hands it to the poller. done is called exactly once, on the poller's
// goroutine, with the open connection or an error; an error that happens
// before the poller owns the socket is returned instead, and done is not
// called.
func (p *poller) open(c *conn, t *target, src net.IP, timeout time.Duration, token string, done func(*conn, error)) error {
	family := unix.AF_INET
	if t.v6 {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	fail := func(what string, err error) error {
		unix.Close(fd)
		return fmt.Errorf("%s: %w", what, err)
	}
	// Small frames must leave at once; the bench never wants Nagle's delay.
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	if src4 := src.To4(); src4 != nil && !t.v6 {
		// See bindNoPort: the port is chosen at connect time.
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
		sa := &unix.SockaddrInet4{}
		copy(sa.Addr[:], src4)
		if err := unix.Bind(fd, sa); err != nil {
			return fail("bind "+src.String(), err)
		}
	}
	var sa unix.Sockaddr
	if t.v6 {
		sa6 := t.sa6
		sa = &sa6
	} else {
		sa4 := t.sa4
		sa = &sa4
	}
	if err := unix.Connect(fd, sa); err != nil && err != unix.EINPROGRESS {
		return fail("connect", err)
	}
	var key [16]byte
	_, _ = rand.Read(key[:])
	k := base64.StdEncoding.EncodeToString(key[:])
	now := time.Now()
	c.fd, c.p = fd, p
	c.op = &opening{state: stConnecting, accept: acceptKey(k), token: token, t0: now, deadline: now.Add(timeout), done: done}
	req := appendUpgradeRequest(nil, t, k)
	// On loopback the TCP handshake has usually completed by the time
	// connect returns (the SYN-ACK is processed when connect releases the
	// socket), so the request goes out now: that saves the poller a wake-up
	// and the SO_ERROR and getpeername calls of onWritable per connection.
	// A socket still connecting refuses the write with EAGAIN; then the
	// request waits for EPOLLOUT as before. This runs before the poller can
	// see c, so c needs no lock yet.
	switch n, err := unix.Write(fd, req); {
	case err == nil && n == len(req):
		c.op.state = stUpgrade
	case err == nil && n > 0:
		c.op.state = stUpgrade
		c.out = req[n:] // flushed on EPOLLOUT
	case err == unix.EAGAIN || err == unix.EINTR:
		c.out = req // the poller flushes it once connected (onWritable)
	default:
		return fail("connect", err) // e.g. ECONNREFUSED, reported by the write
	}
	p.mu.Lock()
	p.conns[fd] = c
	p.pending[c] = true
	p.mu.Unlock()
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(fd)}
	if err := unix.EpollCtl(p.ep.FD(), unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		p.mu.Lock()
		delete(p.conns, fd)
		delete(p.pending, c)
		p.mu.Unlock()
		return fail("epoll_ctl", err)
	}
	return nil
}

// acceptKey is RFC 6455's Sec-WebSocket-Accept for a client key.
func acceptKey(key string) string {
	h := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	return base64.StdEncoding.EncodeToString(h[:])
}

func appendUpgradeRequest(dst []byte, t *target, key string) []byte {
	dst = append(dst, "GET "...)
	dst = append(dst, t.path...)
	dst = append(dst, " HTTP/1.1\r\nHost: "...)
	dst = append(dst, t.host...)
	dst = append(dst, "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "...)
	dst = append(dst, key...)
	return append(dst, "\r\n\r\n"...)
}

// checkUpgrade validates the server's response head (through the blank line).
func checkUpgrade(head []byte, accept string) error {
	line, rest, _ := bytes.Cut(head, []byte("\r\n"))
	if !bytes.HasPrefix(line, []byte("HTTP/1.1 101")) {
		return fmt.Errorf("upgrade refused: %q", line)
	}
	for len(rest) > 0 {
		var h []byte
		h, rest, _ = bytes.Cut(rest, []byte("\r\n"))
		name, value, ok := bytes.Cut(h, []byte(":"))
		if ok && bytes.EqualFold(bytes.TrimSpace(name), []byte("Sec-WebSocket-Accept")) {
			if string(bytes.TrimSpace(value)) != accept {
				return errors.New("upgrade: wrong Sec-WebSocket-Accept")
			}
			return nil
		}
	}
	return errors.New("upgrade: no Sec-WebSocket-Accept")
}

// onWritable advances a connecting socket once connect() has finished.
func (p *poller) onWritable(c *conn) {
	if c.op == nil || c.op.state != stConnecting {
		c.flush()
		return
	}
	if errno, err := unix.GetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || errno != 0 {
		if err == nil {
			err = unix.Errno(errno)
		}
		p.fail(c, fmt.Errorf("connect: %w", err))
		return
	}
	if _, err := unix.Getpeername(c.fd); err != nil {
		// Still connecting: a stale event for an earlier socket with the same
		// descriptor number. The real one comes with EPOLLOUT.
		return
	}
	c.op.state = stUpgrade
	c.flush() // the upgrade request queued by open
}

// onUpgradeData buffers the HTTP response and, once its head is complete,
// checks it and sends #handshake. It returns the bytes after the head (the
// start of the frame stream) and false if the connection failed.
func (p *poller) onUpgradeData(c *conn, data []byte) ([]byte, bool) {
	buf := append(c.partial, data...)
	end := bytes.Index(buf, []byte("\r\n\r\n"))
	if end < 0 {
		if len(buf) > maxUpgradeResponse {
			p.fail(c, errors.New("upgrade: response head too long"))
			return nil, false
		}
		c.partial = buf
		return nil, true
	}
	c.partial = nil
	if err := checkUpgrade(buf[:end+4], c.op.accept); err != nil {
		p.fail(c, err)
		return nil, false
	}
	tok := []byte("null")
	if c.op.token != "" {
		tok = strconv.AppendQuote(nil, c.op.token)
	}
	data = append(append([]byte(`{"authToken":`), tok...), '}')
	c.op.state, c.op.cid = stHandshake, 1
	if err := c.write(appendClientFrame(nil, opText, appendInvoke(nil, "#handshake", data, 1))); err != nil {
		p.fail(c, fmt.Errorf("#handshake: %w", err))
		return nil, false
	}
	return buf[end+4:], true
}

// onReply handles the reply to the invoke an opening connection waits for.
func (p *poller) onReply(c *conn, errValue []byte) {
	op := c.op
	switch op.state {
	case stHandshake:
		if errValue != nil {
			p.fail(c, fmt.Errorf("#handshake: error response: %s", errValue))
			return
		}
		p.a.connect.Record(time.Since(op.t0))
		if c.channel == "" {
			p.finish(c)
			return
		}
		op.state, op.cid = stSubscribe, 2
		d := append([]byte(`{"channel":`), strconv.Quote(c.channel)...)
		if err := c.write(appendClientFrame(nil, opText, appendInvoke(nil, "#subscribe", append(d, '}'), 2))); err != nil {
			p.fail(c, errSubscribe{fmt.Errorf("#subscribe %s: %w", c.channel, err)})
		}
	case stSubscribe:
		if errValue != nil {
			p.fail(c, errSubscribe{fmt.Errorf("#subscribe %s: error response: %s", c.channel, errValue)})
			return
		}
		p.finish(c)
	}
}

// finish marks an opening connection open and reports it.
func (p *poller) finish(c *conn) {
	op := c.op
	p.mu.Lock()
	delete(p.pending, c)
	p.mu.Unlock()
	c.op = nil
	if c.pub != nil {
		c.pub.nextCID = op.cid + 1 // publishes continue the connection's cids
	}
	op.done(c, nil)
}

// fail closes an opening connection and reports err.
func (p *poller) fail(c *conn, err error) {
	op := c.op
	if op == nil {
		return
	}
	c.op = nil
	p.forget(c)
	c.closeFD()
	c.partial, c.frag = nil, nil
	op.done(nil, err)
}

// forget removes c from the poller's tables (it is not closed here).
func (p *poller) forget(c *conn) {
	p.mu.Lock()
	delete(p.pending, c)
	if c.tc != nil {
		delete(p.tls, c)
	} else if p.conns[c.fd] == c {
		delete(p.conns, c.fd)
	}
	p.mu.Unlock()
	if c.tc == nil && c.fd >= 0 {
		_ = unix.EpollCtl(p.ep.FD(), unix.EPOLL_CTL_DEL, c.fd, nil)
	}
}

// sweep fails opening connections past their deadline.
func (p *poller) sweep(now time.Time) {
	var late []*conn
	p.mu.Lock()
	for c := range p.pending {
		if c.op != nil && now.After(c.op.deadline) {
			late = append(late, c)
		}
	}
	p.mu.Unlock()
	for _, c := range late {
		p.fail(c, fmt.Errorf("timed out %s", stateName(c.op.state)))
	}
}

func stateName(s int) string {
	switch s {
	case stConnecting:
		return "connecting"
	case stUpgrade:
		return "waiting for the upgrade response"
	case stHandshake:
		return "waiting for the #handshake reply"
	case stSubscribe:
		return "waiting for the #subscribe reply"
	}
	return "opening"
}

// closeConn ends an open connection on purpose (churn): a WebSocket close
// frame, then a reset (SO_LINGER 0) so the client side keeps no TIME_WAIT
// socket; without it a churn run at thousands of cycles per second exhausts
// the ephemeral ports of its source addresses within seconds.
func (p *poller) closeConn(c *conn) {
	p.forget(c)
	_ = c.write(appendClientFrame(nil, opClose, []byte{0x03, 0xE8}))
	if c.tc != nil {
		if tc, ok := c.tc.(interface{ NetConn() net.Conn }); ok {
			if tcp, ok := tc.NetConn().(*net.TCPConn); ok {
				_ = tcp.SetLinger(0)
			}
		}
	} else {
		_ = unix.SetsockoptLinger(c.fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	}
	c.closeFD()
}
