package netpoll

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/gobwas/ws"
	"golang.org/x/sys/unix"
)

var headEnd = []byte("\r\n\r\n")

// handshakeInput looks for a complete HTTP request head in c.stash and acts
// on it: WebSocket upgrade, hand-off to the HTTP server, or an error reply.
// It reports whether the connection left the handshake phase.
func (c *Conn) handshakeInput() bool {
	s := c.srv
	max := s.cfg.MaxHeaderBytes
	end := bytes.Index(c.stash, headEnd)
	if end < 0 || end+len(headEnd) > max {
		if end >= 0 || len(c.stash) >= max {
			c.reject(httpResponse431)
			return true
		}
		return false
	}
	head := c.stash[:end+len(headEnd)]
	target, ok := requestTarget(head)
	if !ok {
		c.reject(httpResponse400)
		return true
	}
	upgrade := headerHasToken(head, "upgrade", "websocket")
	switch {
	case upgrade && (requestPath(target) == s.cfg.Path || s.httpSrv == nil):
		// On another path with no HTTP handler, the Upgrader's request
		// hook answers 400, as SocketCluster's server does.
		c.upgrade(head, c.stash[len(head):])
	case s.httpSrv != nil:
		c.toHTTP()
	default:
		c.reject(httpResponse404)
	}
	return true
}

// upgrade runs the gobwas/ws Upgrader over the request head and queues its
// response: 101, or the 400/403 its hooks decided. Bytes after the head
// (frames the client sent without waiting) are processed as input.
func (c *Conn) upgrade(head, rest []byte) {
	s := c.srv
	var resp bytes.Buffer
	_, err := s.upgrader.Upgrade(struct {
		io.Reader
		io.Writer
	}{bytes.NewReader(head), &resp})
	// The hook may take a while (a backend call): never under c.mu.
	var (
		data   any
		status int
		reason string
	)
	if err == nil && s.cfg.Upgrade != nil {
		data, status, reason = c.decideUpgrade(head)
	}
	c.mu.Lock()
	if c.phase != phaseHandshake {
		// The handshake timed out meanwhile: OnOpen will never see data.
		c.mu.Unlock()
		if r, ok := data.(releaser); ok {
			r.Release()
		}
		return
	}
	if err != nil {
		s.stats.rejected.Add(1)
		if s.log.IsDebug() { // a flood of bad handshakes must not cost log work
			s.log.Debug("upgrade rejected", "remote", c.remote, "error", err)
		}
		c.stash = nil
		c.beginCloseLocked(0, "", resp.Bytes())
		c.unlockAndRun()
		return
	}
	if s.cfg.Upgrade != nil {
		if status != 0 {
			s.stats.rejected.Add(1)
			c.stash = nil
			c.beginCloseLocked(0, "", httpError(status, reason))
			c.unlockAndRun()
			return
		}
		c.SetData(data)
	}
	c.opened = true
	c.phase = phaseOpen
	c.clearDeadlineLocked()
	c.timer = nil // idle conns keep no timer
	c.enqueueLocked(resp.Bytes())
	c.pendFlush = c.pendFlush || c.scheduleFlushLocked()
	c.stash = nil
	s.open.Add(1)
	s.stats.upgraded.Add(1)
	c.unlockAndRun()
	c.callOpen()
	if len(rest) > 0 && c.isOpen() {
		c.input(rest)
	}
}

// releaser is upgrade data that holds something for its connection
// (Config.Upgrade).
type releaser interface{ Release() }

// decideUpgrade runs Config.Upgrade over the request head, which the
// Upgrader has already validated. It is parsed here by parseHead, not with
// net/http: http.ReadRequest cost 5.4 KB and 19 allocations per connection
// (a bufio.Reader, textproto, the URL) for headers the hook mostly ignores.
func (c *Conn) decideUpgrade(head []byte) (any, int, string) {
	r, ok := parseHead(head)
	if !ok {
		return nil, http.StatusBadRequest, "malformed request"
	}
	r.Remote = c.remote
	return c.srv.cfg.Upgrade(&r)
}

// parseHead fills an UpgradeRequest from a complete HTTP request head: the
// request-target and the headers (keys canonical, as net/http has them;
// obsolete line folding is not accepted). Every string shares one copy of
// the head, and all values one backing array.
func parseHead(b []byte) (UpgradeRequest, bool) {
	head := string(b)
	line, rest, _ := strings.Cut(head, "\r\n")
	_, target, ok := strings.Cut(line, " ")
	if !ok {
		return UpgradeRequest{}, false
	}
	target, _, ok = strings.Cut(target, " ")
	if !ok || target == "" {
		return UpgradeRequest{}, false
	}
	n := strings.Count(rest, "\r\n")
	hdr := make(http.Header, n)
	vals := make([]string, 0, n)
	for rest != "" {
		line, rest, _ = strings.Cut(rest, "\r\n")
		if line == "" {
			break
		}
		if line[0] == ' ' || line[0] == '\t' {
			return UpgradeRequest{}, false
		}
		k, v, ok := strings.Cut(line, ":")
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			return UpgradeRequest{}, false
		}
		k = textproto.CanonicalMIMEHeaderKey(k)
		v = strings.Trim(v, " \t")
		if old, dup := hdr[k]; dup {
			hdr[k] = append(old, v)
			continue
		}
		vals = append(vals, v)
		hdr[k] = vals[len(vals)-1 : len(vals) : len(vals)]
	}
	var origin string
	if o := hdr["Origin"]; len(o) > 0 {
		origin = o[0]
	}
	return UpgradeRequest{Origin: origin, Header: hdr, RequestURI: target}, true
}

// UpgradeData is the value Config.Upgrade returned for this connection. It
// is the connection's initial Data(): read it in OnOpen, before SetData.
func (c *Conn) UpgradeData() any { return c.Data() }

// httpError is a complete HTTP error response with a short text body.
func httpError(status int, reason string) []byte {
	text := http.StatusText(status)
	if text == "" {
		text = "Error"
	}
	if len(reason) > 512 {
		reason = reason[:512]
	}
	reason = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, reason)
	return []byte("HTTP/1.1 " + strconv.Itoa(status) + " " + text + "\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: " +
		strconv.Itoa(len(reason)) + "\r\nConnection: close\r\n\r\n" + reason)
}

// reject answers the request with a fixed HTTP error and closes.
func (c *Conn) reject(resp string) {
	c.srv.stats.rejected.Add(1)
	c.mu.Lock()
	c.stash = nil
	c.beginCloseLocked(0, "", []byte(resp))
	c.unlockAndRun()
}

const (
	httpResponse400 = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
	httpResponse404 = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
	httpResponse431 = "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)

// toHTTP takes the socket out of epoll and gives it to the HTTP server as a
// net.Conn whose first reads replay the bytes read so far.
func (c *Conn) toHTTP() {
	s := c.srv
	c.mu.Lock()
	if c.phase != phaseHandshake {
		c.mu.Unlock()
		return
	}
	c.phase = phaseHanded
	c.clearDeadlineLocked()
	c.timer = nil
	pre := c.stash
	c.stash = nil
	fd := int(c.fd)
	c.mu.Unlock()

	// The read task owns the fd now: no flush (nothing was queued), no
	// timer (phase moved on), and the poller ignores a handed conn.
	if err := unix.EpollCtl(s.ep.FD(), unix.EPOLL_CTL_DEL, fd, nil); err != nil {
		s.log.Debug("epoll del for HTTP hand-off", "fd", fd, "error", err)
	}
	s.tableRemove(c)
	f := os.NewFile(uintptr(fd), "netpoll-http")
	nc, err := net.FileConn(f) // dups the fd into Go's own poller
	_ = f.Close()
	s.released()
	if err != nil {
		s.log.Warn("HTTP hand-off: turn fd into net.Conn", "error", err)
		return
	}
	s.stats.http.Add(1)
	rc := &replayConn{Conn: nc, pre: pre, remote: c.remote}
	if !s.httpLn.deliver(rc) {
		_ = nc.Close()
	}
}

// requestTarget returns the request-target of an HTTP request line.
func requestTarget(head []byte) (string, bool) {
	line, _, _ := bytes.Cut(head, []byte("\r\n"))
	_, rest, ok := bytes.Cut(line, []byte(" "))
	if !ok {
		return "", false
	}
	target, proto, ok := bytes.Cut(rest, []byte(" "))
	if !ok || len(target) == 0 || !bytes.HasPrefix(proto, []byte("HTTP/")) {
		return "", false
	}
	return string(target), true
}

// requestPath is the path of a request-target (origin or absolute form).
func requestPath(target string) string {
	if i := strings.Index(target, "://"); i >= 0 {
		rest := target[i+3:]
		j := strings.IndexByte(rest, '/')
		if j < 0 {
			return "/"
		}
		target = rest[j:]
	}
	if i := strings.IndexAny(target, "?#"); i >= 0 {
		target = target[:i]
	}
	return target
}

// headerHasToken reports whether a header (name in lower case) of the request
// head lists token, case-insensitively.
func headerHasToken(head []byte, name, token string) bool {
	lines := head
	// Skip the request line.
	if i := bytes.Index(lines, []byte("\r\n")); i >= 0 {
		lines = lines[i+2:]
	}
	for len(lines) > 0 {
		line, rest, _ := bytes.Cut(lines, []byte("\r\n"))
		lines = rest
		k, v, ok := bytes.Cut(line, []byte(":"))
		if !ok || !strings.EqualFold(string(bytes.TrimSpace(k)), name) {
			continue
		}
		for t := range strings.SplitSeq(string(v), ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// originRule is one parsed Config.Origins pattern; "" or "*" is a wildcard.
type originRule struct {
	host, port string
}

func parseOrigins(patterns []string) []originRule {
	rules := make([]originRule, 0, len(patterns))
	for _, p := range patterns {
		if p == "*" {
			rules = append(rules, originRule{"*", "*"})
			continue
		}
		host, port, err := net.SplitHostPort(p)
		if err != nil {
			// No port: "host" alone matches every port.
			host, port = strings.Trim(p, "[]"), "*"
		}
		rules = append(rules, originRule{strings.ToLower(host), port})
	}
	return rules
}

// originAllowed checks an Origin header value against the rules, as
// SocketCluster does: the port defaults from the scheme, and a missing or
// "null" origin is allowed.
func originAllowed(rules []originRule, origin string) bool {
	if len(rules) == 0 || origin == "" || origin == "null" {
		return true
	}
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" {
		return false
	}
	host, port := strings.ToLower(u.Hostname()), u.Port()
	if port == "" {
		port = "80"
		if u.Scheme == "https" || u.Scheme == "wss" {
			port = "443"
		}
	}
	for _, r := range rules {
		if (r.host == "*" || r.host == host) && (r.port == "*" || r.port == port) {
			return true
		}
	}
	return false
}

// newUpgrader builds the Upgrader whose hooks check the path (400) and the
// origin (403). No subprotocol is negotiated, as SocketCluster clients send
// none and must not get one back.
func newUpgrader(path string, rules []originRule, maxHeader int) ws.Upgrader {
	return ws.Upgrader{
		ReadBufferSize: maxHeader,
		OnRequest: func(uri []byte) error {
			if requestPath(string(uri)) != path {
				return ws.RejectConnectionError(ws.RejectionStatus(400), ws.RejectionReason("unknown path"))
			}
			return nil
		},
		OnHeader: func(key, value []byte) error {
			if strings.EqualFold(string(key), "Origin") && !originAllowed(rules, string(value)) {
				return ws.RejectConnectionError(ws.RejectionStatus(403), ws.RejectionReason("origin not allowed"))
			}
			return nil
		},
	}
}

// memListener is the in-memory net.Listener through which the HTTP server
// receives the sockets that were not WebSocket upgrades.
type memListener struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
	addr net.Addr
}

func newMemListener() *memListener {
	return &memListener{
		ch:   make(chan net.Conn),
		done: make(chan struct{}),
		addr: &net.UnixAddr{Name: "netpoll", Net: "memory"},
	}
}

func (l *memListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close is called by http.Server.Shutdown and by Server.Shutdown.
func (l *memListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *memListener) Addr() net.Addr { return l.addr }

// deliver hands a connection to Accept; false once the listener is closed.
func (l *memListener) deliver(c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	}
}

// replayConn is a net.Conn whose first reads return bytes netpoll had
// already read from the socket, and whose RemoteAddr is the one given to
// Serve (the real client behind a PROXY header, for instance).
type replayConn struct {
	net.Conn
	pre    []byte
	remote net.Addr
}

func (c *replayConn) Read(p []byte) (int, error) {
	if len(c.pre) > 0 {
		n := copy(p, c.pre)
		c.pre = c.pre[n:]
		if len(c.pre) == 0 {
			c.pre = nil
		}
		return n, nil
	}
	return c.Conn.Read(p)
}

func (c *replayConn) RemoteAddr() net.Addr {
	if c.remote != nil {
		return c.remote
	}
	return c.Conn.RemoteAddr()
}
