package netpoll

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
	"golang.org/x/sys/unix"
)

func TestEcho(t *testing.T) {
	ts := startServer(t, Config{})
	c := ts.dial(t)
	for _, msg := range []string{"hello", "", string(make([]byte, 300)), string(make([]byte, 70000)), string(make([]byte, 300000))} {
		c.send(t, msg)
		if got := c.read(t); got != msg {
			t.Fatalf("echo of %d bytes: got %d bytes", len(msg), len(got))
		}
	}
	// A binary message is delivered too (SocketCluster clients may send them).
	if err := wsutil.WriteClientBinary(c, []byte("bin")); err != nil {
		t.Fatal(err)
	}
	if got := c.read(t); got != "bin" {
		t.Fatalf("binary echo: %q", got)
	}
	st := ts.Stats()
	if st.Conns != 1 || st.Upgraded != 1 || st.MsgsIn != 6 {
		t.Fatalf("stats: %+v", st)
	}
}

func TestManyMessagesInOneWrite(t *testing.T) {
	ts := startServer(t, Config{})
	c := ts.dial(t)
	// Many frames in one TCP write, then the reverse: one frame dribbled
	// byte by byte, so the parser must resume mid-header and mid-payload.
	var buf bytes.Buffer
	for i := range 200 {
		if err := wsutil.WriteClientText(&buf, []byte(strings.Repeat("x", i))); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	for i := range 200 {
		if got := c.read(t); len(got) != i {
			t.Fatalf("message %d: got %d bytes", i, len(got))
		}
	}
	buf.Reset()
	if err := wsutil.WriteClientText(&buf, []byte(strings.Repeat("y", 200))); err != nil {
		t.Fatal(err)
	}
	for _, b := range buf.Bytes() {
		if _, err := c.Write([]byte{b}); err != nil {
			t.Fatal(err)
		}
	}
	if got := c.read(t); got != strings.Repeat("y", 200) {
		t.Fatalf("dribbled message: %q", got)
	}
}

func TestUpgradeRejections(t *testing.T) {
	ts := startServer(t, Config{Origins: []string{"example.com:*", "*:8443"}})
	for _, tc := range []struct {
		name, req, want string
	}{
		{"wrong path", upgradeRequest("/other/", ""), "HTTP/1.1 400 Bad Request"},
		{"bad origin", upgradeRequest("/socketcluster/", "http://evil.com"), "HTTP/1.1 403 Forbidden"},
		{"allowed origin", upgradeRequest("/socketcluster/?x=1", "https://example.com"), "HTTP/1.1 101 Switching Protocols"},
		{"allowed port", upgradeRequest("/socketcluster/", "https://other.org:8443"), "HTTP/1.1 101 Switching Protocols"},
		{"null origin", upgradeRequest("/socketcluster/", "null"), "HTTP/1.1 101 Switching Protocols"},
		{"no origin", upgradeRequest("/socketcluster/", ""), "HTTP/1.1 101 Switching Protocols"},
		{"plain GET without handler", "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 404 Not Found"},
		{"missing key", "GET /socketcluster/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n", "HTTP/1.1 400 Bad Request"},
		{"garbage", "\x00\x01\x02 nonsense\r\n\r\n", "HTTP/1.1 400 Bad Request"},
		{"lower-case headers", "GET /socketcluster/ HTTP/1.1\r\nhost: x\r\nupgrade: WebSocket\r\nconnection: keep-alive, Upgrade\r\n" +
			"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n", "HTTP/1.1 101 Switching Protocols"},
		{"head too long", "GET /socketcluster/ HTTP/1.1\r\nX-Pad: " + strings.Repeat("p", 9000) + "\r\n\r\n", "HTTP/1.1 431 Request Header Fields Too Large"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := rawRequest(t, ts.addr, tc.req); got != tc.want {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
	// No subprotocol is echoed even if the client offers one.
	conn, _, hs, err := ws.Dialer{Protocols: []string{"chat"}}.Dial(context.Background(), "ws://"+ts.addr+"/socketcluster/")
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.Close()
	if hs.Protocol != "" {
		t.Fatalf("subprotocol %q echoed", hs.Protocol)
	}
	waitFor(t, 5*time.Second, "all conns closed", func() bool { return ts.Len() == 0 })
}

func TestOriginPatterns(t *testing.T) {
	rules := parseOrigins([]string{"a.com", "b.com:8080", "c.com:*", "*:9000", "[::1]:80"})
	for origin, want := range map[string]bool{
		"http://a.com":         true,
		"http://A.com:1234":    true,
		"http://b.com:8080":    true,
		"http://b.com":         false,
		"https://c.com":        true,
		"http://d.com:9000":    true,
		"http://d.com":         false,
		"http://[::1]":         true,
		"null":                 true,
		"":                     true,
		"not a url":            false,
		"https://b.com.evil:8": false,
	} {
		if got := originAllowed(rules, origin); got != want {
			t.Errorf("origin %q: got %v, want %v", origin, got, want)
		}
	}
	if !originAllowed(parseOrigins([]string{"*"}), "http://x.y") || !originAllowed(nil, "http://x.y") {
		t.Error("wildcard or empty list must allow everything")
	}
}

func TestFragmentedMessage(t *testing.T) {
	ts := startServer(t, Config{MaxPayload: 100})
	c := ts.dial(t)
	frames := []ws.Frame{
		ws.NewFrame(ws.OpText, false, []byte("hel")),
		ws.NewPingFrame([]byte("between")), // control frames may interleave
		ws.NewFrame(ws.OpContinuation, false, []byte("lo ")),
		ws.NewFrame(ws.OpContinuation, true, []byte("world")),
	}
	for _, f := range frames {
		if err := ws.WriteFrame(c, ws.MaskFrame(f)); err != nil {
			t.Fatal(err)
		}
	}
	if got := c.read(t); got != "hello world" {
		t.Fatalf("got %q", got)
	}
	// Fragments summing over MaxPayload are refused even though each fits.
	for i := range 3 {
		op := ws.OpContinuation
		if i == 0 {
			op = ws.OpText
		}
		if err := ws.WriteFrame(c, ws.MaskFrame(ws.NewFrame(op, false, make([]byte, 40)))); err != nil {
			t.Fatal(err)
		}
	}
	if code, _ := c.readClose(t); code != ws.StatusMessageTooBig {
		t.Fatalf("close code %d, want 1009", code)
	}
}

func TestProtocolViolations(t *testing.T) {
	h := &recorder{echo: true}
	ts := startServer(t, Config{Handler: h})
	for _, tc := range []struct {
		name  string
		frame []byte
		code  ws.StatusCode
	}{
		{"unmasked", ws.MustCompileFrame(ws.NewTextFrame([]byte("hi"))), ws.StatusProtocolError},
		{"reserved bits", ws.MustCompileFrame(ws.MaskFrame(ws.Frame{Header: ws.Header{Fin: true, Rsv: 4, OpCode: ws.OpText, Length: 1}, Payload: []byte("x")})), ws.StatusProtocolError},
		{"reserved opcode", ws.MustCompileFrame(ws.MaskFrame(ws.NewFrame(ws.OpCode(3), true, nil))), ws.StatusProtocolError},
		{"bare continuation", ws.MustCompileFrame(ws.MaskFrame(ws.NewFrame(ws.OpContinuation, true, []byte("x")))), ws.StatusProtocolError},
		{"invalid utf8", ws.MustCompileFrame(ws.MaskFrame(ws.NewTextFrame([]byte{0xff, 0xfe}))), ws.StatusInvalidFramePayloadData},
		{"bad close code", ws.MustCompileFrame(ws.MaskFrame(ws.NewCloseFrame([]byte{0x03, 0xe6}))), ws.StatusProtocolError},
		{"one-byte close body", ws.MustCompileFrame(ws.MaskFrame(ws.NewCloseFrame([]byte{0x03}))), ws.StatusProtocolError},
		{"close reason not utf8", ws.MustCompileFrame(ws.MaskFrame(ws.NewCloseFrame([]byte{0x03, 0xe8, 0xff}))), ws.StatusInvalidFramePayloadData},
		{"ping over 125 bytes", ws.MustCompileFrame(ws.MaskFrame(ws.NewPingFrame(make([]byte, 126)))), ws.StatusProtocolError},
		{"fragmented ping", ws.MustCompileFrame(ws.MaskFrame(ws.NewFrame(ws.OpPing, false, nil))), ws.StatusProtocolError},
		{"text inside a fragmented message", append(ws.MustCompileFrame(ws.MaskFrame(ws.NewFrame(ws.OpText, false, []byte("a")))),
			ws.MustCompileFrame(ws.MaskFrame(ws.NewTextFrame([]byte("b"))))...), ws.StatusProtocolError},
		{"64-bit length with the top bit set", []byte{0x81, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4}, ws.StatusProtocolError},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := ts.dial(t)
			if _, err := c.Write(tc.frame); err != nil {
				t.Fatal(err)
			}
			if code, _ := c.readClose(t); code != tc.code {
				t.Fatalf("close code %d, want %d", code, tc.code)
			}
		})
	}
	waitFor(t, 5*time.Second, "OnClose for every conn", func() bool { return h.closeCount() == 12 })
}

func TestOversizedMessageClosesOnlyThatConn(t *testing.T) {
	h := &recorder{echo: true}
	ts := startServer(t, Config{Handler: h, MaxPayload: 1000})
	good, bad := ts.dial(t), ts.dial(t)
	good.send(t, "before")
	if got := good.read(t); got != "before" {
		t.Fatal(got)
	}
	// Only the header is sent: the server must not wait for (or buffer)
	// the payload to refuse it.
	hdr := ws.Header{Fin: true, OpCode: ws.OpText, Masked: true, Length: 1 << 40, Mask: ws.NewMask()}
	if err := ws.WriteHeader(bad, hdr); err != nil {
		t.Fatal(err)
	}
	if code, _ := bad.readClose(t); code != ws.StatusMessageTooBig {
		t.Fatalf("close code %d, want 1009", code)
	}
	good.send(t, "after")
	if got := good.read(t); got != "after" {
		t.Fatal(got)
	}
	waitFor(t, 5*time.Second, "OnClose(1009)", func() bool { return h.closeCount() == 1 })
	if h.closes()[0].code != ws.StatusMessageTooBig {
		t.Fatalf("OnClose code %d", h.closes()[0].code)
	}
}

func TestPingPong(t *testing.T) {
	ts := startServer(t, Config{})
	c := ts.dial(t)
	if err := ws.WriteFrame(c, ws.MaskFrame(ws.NewPingFrame([]byte("are you there")))); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	f, err := readFrame(c.rw)
	if err != nil {
		t.Fatal(err)
	}
	if f.Header.OpCode != ws.OpPong || string(f.Payload) != "are you there" || f.Header.Masked {
		t.Fatalf("got %+v %q", f.Header, f.Payload)
	}
}

func TestClientCloseCodeReachesOnClose(t *testing.T) {
	h := &recorder{}
	ts := startServer(t, Config{Handler: h})
	c := ts.dial(t)
	waitFor(t, 5*time.Second, "OnOpen", func() bool { return h.openCount() == 1 })
	id := h.conn(0).ID()
	body := ws.NewCloseFrameBody(4321, "bye now")
	if err := ws.WriteFrame(c, ws.MaskFrame(ws.NewCloseFrame(body))); err != nil {
		t.Fatal(err)
	}
	// The server echoes the code, then hangs up.
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	f, err := readFrame(c.rw)
	if err != nil {
		t.Fatal(err)
	}
	if f.Header.OpCode != ws.OpClose || len(f.Payload) < 2 || ws.StatusCode(f.Payload[0])<<8|ws.StatusCode(f.Payload[1]) != 4321 {
		t.Fatalf("echo: %+v %q", f.Header, f.Payload)
	}
	_ = c.Close()
	waitFor(t, 5*time.Second, "OnClose", func() bool { _, ok := h.closeOf(id); return ok })
	if e, _ := h.closeOf(id); e.code != 4321 || e.reason != "bye now" {
		t.Fatalf("OnClose got %d %q", e.code, e.reason)
	}
	waitFor(t, 5*time.Second, "conn released", func() bool { return ts.Len() == 0 })
}

func TestAbruptCloseIs1006(t *testing.T) {
	h := &recorder{}
	ts := startServer(t, Config{Handler: h})
	c := ts.dial(t)
	waitFor(t, 5*time.Second, "OnOpen", func() bool { return h.openCount() == 1 })
	_ = c.Close()
	waitFor(t, 5*time.Second, "OnClose", func() bool { return h.closeCount() == 1 })
	if h.closes()[0].code != ws.StatusAbnormalClosure {
		t.Fatalf("code %d", h.closes()[0].code)
	}
	waitFor(t, 5*time.Second, "conn released", func() bool { return ts.Len() == 0 })
}

func TestServerCloseCodeReachesClient(t *testing.T) {
	h := &recorder{}
	ts := startServer(t, Config{Handler: h})
	c := ts.dial(t)
	waitFor(t, 5*time.Second, "OnOpen", func() bool { return h.openCount() == 1 })
	sc := h.conn(0)
	frame := AppendTextFrame(nil, []byte("last words"))
	if err := sc.WriteFrame(frame); err != nil {
		t.Fatal(err)
	}
	sc.Close(4001, "Client pong timed out")
	if err := sc.WriteFrame(frame); !errors.Is(err, ErrClosed) {
		t.Fatalf("write after Close: %v", err)
	}
	if got := c.read(t); got != "last words" {
		t.Fatalf("data queued before Close: %q", got)
	}
	code, reason := c.readClose(t)
	if code != 4001 || reason != "Client pong timed out" {
		t.Fatalf("client got %d %q", code, reason)
	}
	waitFor(t, 5*time.Second, "OnClose", func() bool { return h.closeCount() == 1 })
	if e := h.closes()[0]; e.code != 4001 {
		t.Fatalf("OnClose code %d", e.code)
	}
	waitFor(t, 5*time.Second, "conn released", func() bool { return ts.Len() == 0 })
}

func TestCloseFromOnMessage(t *testing.T) {
	h := &recorder{}
	h.onMsg = func(c *Conn, p []byte) {
		if string(p) == "quit" {
			c.Close(4500, "asked to")
		}
	}
	ts := startServer(t, Config{Handler: h})
	c := ts.dial(t)
	// "after" arrives in the same read but must not be delivered.
	var buf bytes.Buffer
	_ = wsutil.WriteClientText(&buf, []byte("quit"))
	_ = wsutil.WriteClientText(&buf, []byte("after"))
	if _, err := c.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	if code, _ := c.readClose(t); code != 4500 {
		t.Fatalf("code %d", code)
	}
	waitFor(t, 5*time.Second, "OnClose", func() bool { return h.closeCount() == 1 })
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.messages) != 1 {
		t.Fatalf("messages after Close delivered: %q", h.messages)
	}
}

func TestSlowReaderQueueFull(t *testing.T) {
	h := &recorder{}
	var probed atomic.Pointer[Conn]
	h.onMsg = func(c *Conn, p []byte) { probed.Store(c) }
	ts := startServer(t, Config{Handler: h, SendQueueBytes: 64 << 10, SendQueueMsgs: 100000, WriteTimeout: time.Minute})
	_ = ts.dial(t) // the slow client: never reads
	fast := ts.dial(t)
	waitFor(t, 5*time.Second, "both open", func() bool { return h.openCount() == 2 })
	// Which server conn is which: the fast client sends a probe.
	fast.send(t, "probe")
	waitFor(t, 5*time.Second, "probe", func() bool { return probed.Load() != nil })
	fastConn, slowConn := probed.Load(), h.conn(0)
	if slowConn == fastConn {
		slowConn = h.conn(1)
	}
	frame := AppendTextFrame(nil, bytes.Repeat([]byte("z"), 4096))
	full := false
	// Kernel buffers on loopback hold a few MiB; the bound is generous.
	for i := 0; i < 100000 && !full; i++ {
		switch err := slowConn.WriteFrame(frame); {
		case errors.Is(err, ErrQueueFull):
			full = true
		case err != nil:
			t.Fatal(err)
		}
		if i%64 == 0 {
			// Give the flush a chance to fill the socket buffers.
			runtime.Gosched()
		}
	}
	if !full {
		t.Fatal("queue never reported full")
	}
	if ts.Stats().QueueFull == 0 {
		t.Fatal("QueueFull counter not incremented")
	}
	// The other connection is unaffected.
	for i := range 10 {
		if err := fastConn.WriteText([]byte("ok")); err != nil {
			t.Fatalf("fast write %d: %v", i, err)
		}
		if got := fast.read(t); got != "ok" {
			t.Fatal(got)
		}
	}
	// The caller's policy: drop the slow consumer.
	slowConn.Close(4100, "slow consumer")
}

func TestWriteTimeout(t *testing.T) {
	h := &recorder{}
	ts := startServer(t, Config{Handler: h, WriteTimeout: 200 * time.Millisecond, SendQueueBytes: 64 << 20, SendQueueMsgs: 1 << 20})
	c := ts.dial(t)
	_ = c // never reads
	waitFor(t, 5*time.Second, "OnOpen", func() bool { return h.openCount() == 1 })
	sc := h.conn(0)
	frame := AppendTextFrame(nil, make([]byte, 64<<10))
	// Fill the socket buffers until the conn stalls, then wait for the
	// timeout to cut it.
	for range 1000 {
		if err := sc.WriteFrame(frame); err != nil {
			break
		}
	}
	waitFor(t, 10*time.Second, "write timeout", func() bool { return h.closeCount() == 1 })
	if e := h.closes()[0]; e.code != ws.StatusAbnormalClosure || e.reason != "write timeout" {
		t.Fatalf("OnClose %d %q", e.code, e.reason)
	}
	if ts.Stats().Timeouts == 0 {
		t.Fatal("timeout not counted")
	}
}

func TestHandshakeTimeout(t *testing.T) {
	ts := startServer(t, Config{HandshakeReadTimeout: 100 * time.Millisecond})
	conn, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "GET /socketcluster/ HTTP/1.1\r\n"); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := conn.Read(make([]byte, 1))
	if n != 0 || err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("expected the server to hang up, got n=%d err=%v", n, err)
	}
}

func TestHTTPFallback(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "ok from "+r.RemoteAddr)
	})
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) {
		// HTTP/1 handlers read the whole body before answering.
		body, _ := io.ReadAll(r.Body)
		_, _ = w.Write(body)
	})
	ts := startServer(t, Config{HTTP: mux})
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: false}, Timeout: 5 * time.Second}
	defer hc.CloseIdleConnections()
	for range 3 { // keep-alive: later requests reuse the handed-off conn
		resp, err := hc.Get("http://" + ts.addr + "/healthz")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.HasPrefix(string(body), "ok from 127.0.0.1:") {
			t.Fatalf("GET /healthz: %d %q", resp.StatusCode, body)
		}
	}
	resp, err := hc.Post("http://"+ts.addr+"/echo", "text/plain", strings.NewReader(strings.Repeat("b", 100000)))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if len(body) != 100000 {
		t.Fatalf("POST body echoed %d bytes", len(body))
	}
	// An upgrade on another path goes to the handler too (404 from the mux).
	if got := rawRequest(t, ts.addr, upgradeRequest("/elsewhere", "")); got != "HTTP/1.1 404 Not Found" {
		t.Fatal(got)
	}
	// WebSocket still works next to it.
	c := ts.dial(t)
	c.send(t, "ws")
	if got := c.read(t); got != "ws" {
		t.Fatal(got)
	}
	if ts.Stats().HTTP < 2 {
		t.Fatalf("stats: %+v", ts.Stats())
	}
}

func TestPrebufAndPipelinedFrames(t *testing.T) {
	h := &recorder{echo: true}
	srv, err := New(Config{Handler: h})
	if err != nil {
		t.Fatal(err)
	}
	// Registered before the client's cleanup, so it runs after the client
	// hung up and Shutdown has nothing to wait for.
	t.Cleanup(func() { _ = srv.Shutdown(context.Background(), ws.StatusGoingAway, "") })
	fds, err := socketpair()
	if err != nil {
		t.Fatal(err)
	}
	cl := fileConn(t, fds[1])
	// The balancer read the first half of the request; the client sent a
	// frame right behind its request without waiting for 101.
	req := upgradeRequest("/socketcluster/", "")
	var frame bytes.Buffer
	_ = wsutil.WriteClientText(&frame, []byte("early"))
	if err := srv.Serve(fds[0], []byte(req[:20]), &net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 5}); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(cl, req[20:]+frame.String()); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(cl)
	_ = cl.SetReadDeadline(time.Now().Add(5 * time.Second))
	status, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(status, "HTTP/1.1 101") {
		t.Fatalf("status %q %v", status, err)
	}
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if line == "\r\n" {
			break
		}
	}
	p, _, err := wsutil.ReadServerData(struct {
		io.Reader
		io.Writer
	}{br, cl})
	if err != nil || string(p) != "early" {
		t.Fatalf("echo %q %v", p, err)
	}
	if got := h.conn(0).RemoteAddr().String(); got != "10.1.2.3:5" {
		t.Fatalf("RemoteAddr %s", got)
	}
}

func TestIdleConnsAddNoGoroutines(t *testing.T) {
	h := &recorder{}
	srv, err := New(Config{Handler: h})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown(context.Background(), ws.StatusGoingAway, "")
	// Raw fds on the client side, so the client adds no goroutine either.
	before := runtime.NumGoroutine()
	const n = 1000
	clients := make([]int, 0, n)
	defer func() {
		for _, fd := range clients {
			closeFD(fd)
		}
	}()
	for range n {
		cfd, err := rawUpgraded(srv)
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, cfd)
	}
	waitFor(t, 10*time.Second, "all open", func() bool { return srv.Len() == n })
	// Timers, pool and poller are fixed: the count must not grow with conns.
	waitFor(t, 5*time.Second, "goroutines settle", func() bool { return runtime.NumGoroutine() <= before+2 })
	t.Logf("goroutines: %d before, %d with %d idle conns", before, runtime.NumGoroutine(), n)
}

func TestShutdownClosesAllWith1001(t *testing.T) {
	h := &recorder{}
	srv, err := New(Config{Handler: h})
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{Server: srv}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ts.addr = ln.Addr().String()
	accepted := make(chan error, 1)
	const n = 20
	go func() {
		for range n {
			nc, err := ln.Accept()
			if err != nil {
				accepted <- err
				return
			}
			fd, err := dupConnFD(nc)
			_ = nc.Close()
			if err == nil {
				err = srv.Serve(fd, nil, nil)
			}
			if err != nil {
				accepted <- err
				return
			}
		}
		accepted <- nil
	}()
	// A connection that came and went earlier leaves the server with no
	// sockets once: Shutdown must still wait for the ones open later.
	early, err := rawUpgraded(srv)
	if err != nil {
		t.Fatal(err)
	}
	closeFD(early)
	waitFor(t, 5*time.Second, "early conn released", func() bool { return srv.owned.Load() == 0 })
	clients := make([]*client, n)
	for i := range clients {
		clients[i] = ts.dial(t)
	}
	if err := <-accepted; err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "all open", func() bool { return srv.Len() == n })
	// Clients answer the close frame as they read it (wsutil does).
	codes := make(chan ws.StatusCode, n)
	for _, c := range clients {
		go func() {
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, _, err := wsutil.ReadServerData(c.rw)
			var ce wsutil.ClosedError
			errors.As(err, &ce)
			codes <- ce.Code
		}()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx, ws.StatusGoingAway, "draining"); err != nil {
		t.Fatal(err)
	}
	for range n {
		if code := <-codes; code != ws.StatusGoingAway {
			t.Fatalf("client got close code %d", code)
		}
	}
	if h.closeCount() != n+1 || srv.Len() != 0 {
		t.Fatalf("OnClose %d, Len %d", h.closeCount(), srv.Len())
	}
	for _, e := range h.closes()[1:] {
		if e.code != ws.StatusGoingAway {
			t.Fatalf("OnClose code %d", e.code)
		}
	}
	fds, _ := socketpair()
	if err := srv.Serve(fds[0], nil, nil); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve after Shutdown: %v", err)
	}
	closeFD(fds[1])
}

func TestNoFDLeak(t *testing.T) {
	before := openFDs(t)
	func() {
		h := &recorder{echo: true}
		ts := startServer(t, Config{Handler: h})
		for i := range 50 {
			c, err := ts.tryDial(ws.Dialer{Timeout: 5 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			c.send(t, "x")
			_ = c.read(t)
			if i%2 == 0 {
				_ = ws.WriteFrame(c, ws.MaskFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(1000, ""))))
				c.readClose(t)
			}
			_ = c.Close()
		}
		rawRequest(t, ts.addr, upgradeRequest("/nope", ""))
		waitFor(t, 5*time.Second, "all closed", func() bool { return ts.Len() == 0 && ts.owned.Load() == 0 })
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := ts.Shutdown(ctx, ws.StatusGoingAway, ""); err != nil {
			t.Fatal(err)
		}
		_ = ts.ln.Close()
		<-ts.done
	}()
	waitFor(t, 5*time.Second, "fds back to the start", func() bool { return openFDs(t) <= before })
}

func TestConcurrentWritersAndClose(t *testing.T) {
	h := &recorder{}
	ts := startServer(t, Config{Handler: h, SendQueueMsgs: 1 << 20, SendQueueBytes: 1 << 30})
	c := ts.dial(t)
	waitFor(t, 5*time.Second, "OnOpen", func() bool { return h.openCount() == 1 })
	sc := h.conn(0)
	const writers, per = 4, 500
	var sent atomic.Int64
	done := make(chan struct{})
	for w := range writers {
		go func() {
			defer func() { done <- struct{}{} }()
			for i := range per {
				if sc.WriteText([]byte{byte('a' + w), byte('0' + i%10)}) == nil {
					sent.Add(1)
				}
			}
		}()
	}
	for range writers {
		<-done
	}
	for range sent.Load() {
		c.read(t)
	}
	sc.Close(1000, "")
	if code, _ := c.readClose(t); code != 1000 {
		t.Fatal(code)
	}
}

// TestLargeWritesInOrder forces partial writes and EAGAIN (two concurrent
// writers queue ~10 MiB, more than the socket buffers, before the client
// reads) and checks that the client gets every frame whole and in each
// writer's order. (A tiny SO_SNDBUF would show the same paths but stalls on
// the client's delayed ACKs.)
func TestLargeWritesInOrder(t *testing.T) {
	h := &recorder{}
	ts := startServer(t, Config{Handler: h, SendQueueMsgs: 1 << 16, SendQueueBytes: 1 << 30})
	c := ts.dial(t)
	waitFor(t, 5*time.Second, "OnOpen", func() bool { return h.openCount() == 1 })
	sc := h.conn(0)
	const per = 40
	errs := make(chan error, 2)
	for w := range 2 {
		go func() {
			for i := range per {
				size := 16 + (i*7919)%(256<<10)
				p := bytes.Repeat([]byte{byte('a' + w)}, size)
				copy(p, fmt.Sprintf("%d:%03d:", w, i))
				if err := sc.WriteFrame(AppendTextFrame(nil, p)); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	next := [2]int{}
	for range 2 * per {
		msg := c.read(t)
		var w, i int
		if _, err := fmt.Sscanf(msg, "%d:%03d:", &w, &i); err != nil || w < 0 || w > 1 {
			t.Fatalf("bad message prefix %q", msg[:min(len(msg), 10)])
		}
		if i != next[w] {
			t.Fatalf("writer %d: got frame %d, want %d", w, i, next[w])
		}
		if want := 16 + (i*7919)%(256<<10); len(msg) != want || msg[len(msg)-1] != byte('a'+w) {
			t.Fatalf("writer %d frame %d: %d bytes, want %d", w, i, len(msg), want)
		}
		next[w]++
	}
}

// TestCloseRaces closes connections from every side at once: the client's
// close frame, the client hanging up, server Close and Shutdown. OnClose must
// come exactly once per conn (the recorder panics otherwise) and every fd
// must be released.
func TestCloseRaces(t *testing.T) {
	h := &recorder{echo: true}
	srv, err := New(Config{Handler: h, WriteTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	const n = 200
	fds := make([]int, n)
	for i := range fds {
		if fds[i], err = rawUpgraded(srv); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 5*time.Second, "all open", func() bool { return h.openCount() == n })
	h.mu.Lock()
	conns := append([]*Conn(nil), h.opened...)
	h.mu.Unlock()
	closeFrame := ws.MustCompileFrame(ws.MaskFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(1000, ""))))
	text := ws.MustCompileFrame(ws.MaskFrame(ws.NewTextFrame([]byte("x"))))
	both := append(append([]byte(nil), text...), closeFrame...)
	done := make(chan struct{})
	for i, fd := range fds {
		go func() {
			defer func() { done <- struct{}{} }()
			switch i % 4 {
			case 0:
				_, _ = unix.Write(fd, closeFrame)
			case 1:
				_, _ = unix.Write(fd, both)
			case 2:
				_, _ = unix.Write(fd, text)
			}
			closeFD(fd)
		}()
		go func() {
			defer func() { done <- struct{}{} }()
			if i%3 == 0 {
				conns[i].Close(4000+ws.StatusCode(i), "server side")
			}
			_ = conns[i].WriteText([]byte("racing"))
		}()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx, ws.StatusGoingAway, "shutdown"); err != nil {
		t.Fatal(err)
	}
	for range 2 * n {
		<-done
	}
	if got := h.closeCount(); got != n {
		t.Fatalf("OnClose %d times for %d conns", got, n)
	}
	if srv.Len() != 0 || srv.owned.Load() != 0 {
		t.Fatalf("Len %d, owned %d", srv.Len(), srv.owned.Load())
	}
}

// TestIdleConnHoldsNoBuffers checks the memory promise: once a frame that
// arrived in pieces, a fragmented message and a burst of writes are done,
// the connection keeps no stash, no reassembly buffer, no send queue and no
// timer.
func TestIdleConnHoldsNoBuffers(t *testing.T) {
	h := &recorder{echo: true}
	ts := startServer(t, Config{Handler: h})
	c := ts.dial(t)
	var buf bytes.Buffer
	_ = ws.WriteFrame(&buf, ws.MaskFrame(ws.NewFrame(ws.OpText, false, bytes.Repeat([]byte("a"), 1000))))
	_ = ws.WriteFrame(&buf, ws.MaskFrame(ws.NewFrame(ws.OpContinuation, true, bytes.Repeat([]byte("b"), 100000))))
	raw := buf.Bytes()
	// Split mid-header and mid-payload, with pauses, so partial frames are
	// stashed between reads.
	want := ts.Stats().BytesIn
	for _, part := range [][]byte{raw[:1], raw[1:500], raw[500:1100], raw[1100:50000], raw[50000:]} {
		if _, err := c.Write(part); err != nil {
			t.Fatal(err)
		}
		want += uint64(len(part))
		waitFor(t, 5*time.Second, "part read", func() bool { return ts.Stats().BytesIn >= want })
	}
	if got := c.read(t); len(got) != 101000 {
		t.Fatalf("echo %d bytes", len(got))
	}
	sc := h.conn(0)
	for range 50 {
		_ = sc.WriteText([]byte("burst"))
	}
	for range 50 {
		c.read(t)
	}
	waitFor(t, 5*time.Second, "conn idle with nothing held", func() bool {
		sc.mu.Lock()
		defer sc.mu.Unlock()
		return sc.q == nil && !sc.flushing && !sc.reading && sc.timer == nil
	})
	// The input state belongs to the read task; none is running now.
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.stash != nil || sc.frag != nil || sc.need != 0 {
		t.Fatalf("idle conn holds stash %d bytes, frag %d bytes", cap(sc.stash), cap(sc.frag))
	}
}

func TestOversizedFrameIntoEmptyQueue(t *testing.T) {
	h := &recorder{}
	ts := startServer(t, Config{Handler: h, SendQueueBytes: 1000, SendQueueMsgs: 2})
	c := ts.dial(t)
	waitFor(t, 5*time.Second, "OnOpen", func() bool { return h.openCount() == 1 })
	sc := h.conn(0)
	// The 101 may still be queued; wait until the queue is empty.
	waitFor(t, 5*time.Second, "queue empty", func() bool { sc.mu.Lock(); defer sc.mu.Unlock(); return sc.q == nil })
	big := AppendTextFrame(nil, bytes.Repeat([]byte("x"), 5000))
	if err := sc.WriteFrame(big); err != nil {
		t.Fatalf("a frame over SendQueueBytes into an empty queue: %v", err)
	}
	if got := c.read(t); len(got) != 5000 {
		t.Fatal(len(got))
	}
}

func TestCloseWithReservedCodes(t *testing.T) {
	h := &recorder{}
	ts := startServer(t, Config{Handler: h})
	for _, tc := range []struct {
		code  ws.StatusCode
		frame bool // a close frame is sent
	}{{ws.StatusAbnormalClosure, false}, {ws.StatusNoStatusRcvd, true}, {0, true}} {
		c := ts.dial(t)
		waitFor(t, 5*time.Second, "OnOpen", func() bool { return ts.Len() == 1 })
		sc := h.conn(h.openCount() - 1)
		sc.Close(tc.code, "x")
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		f, err := readFrame(c.rw)
		switch {
		case tc.frame && (err != nil || f.Header.OpCode != ws.OpClose || len(f.Payload) != 0):
			t.Fatalf("code %d: want an empty close frame, got %+v %v", tc.code, f.Header, err)
		case !tc.frame && err == nil:
			t.Fatalf("code %d: want no frame, got %+v", tc.code, f.Header)
		}
		_ = c.Close()
		waitFor(t, 5*time.Second, "OnClose", func() bool { e, ok := h.closeOf(sc.ID()); return ok && e.code == tc.code })
		waitFor(t, 5*time.Second, "released", func() bool { return ts.Len() == 0 })
	}
}

func TestHandlerPanicClosesOnlyThatConn(t *testing.T) {
	h := &recorder{echo: true}
	h.onMsg = func(c *Conn, p []byte) {
		if string(p) == "boom" {
			panic("handler bug")
		}
	}
	ts := startServer(t, Config{Handler: h})
	bad, good := ts.dial(t), ts.dial(t)
	bad.send(t, "boom")
	if code, _ := bad.readClose(t); code != ws.StatusInternalServerError {
		t.Fatalf("close code %d, want 1011", code)
	}
	good.send(t, "still here")
	if got := good.read(t); got != "still here" {
		t.Fatal(got)
	}
	if ts.Stats().Panics != 1 {
		t.Fatalf("stats %+v", ts.Stats())
	}
}

// TestManyConnsConcurrently runs many clients at once, each pipelining
// messages of mixed sizes and checking its echoes, while the server also
// pushes a shared frame to everyone: reads, writes and fan-out interleave.
func TestManyConnsConcurrently(t *testing.T) {
	h := &recorder{echo: true}
	ts := startServer(t, Config{Handler: h, SendQueueMsgs: 1 << 14, SendQueueBytes: 64 << 20})
	const clients, msgs = 50, 40
	cs := make([]*client, clients)
	for i := range cs {
		cs[i] = ts.dial(t)
	}
	waitFor(t, 5*time.Second, "all open", func() bool { return h.openCount() == clients })
	h.mu.Lock()
	conns := append([]*Conn(nil), h.opened...)
	h.mu.Unlock()
	errs := make(chan error, clients)
	for i, c := range cs {
		go func() {
			var buf bytes.Buffer
			for j := range msgs {
				_ = wsutil.WriteClientText(&buf, []byte(fmt.Sprintf("%d/%d/%s", i, j, strings.Repeat("p", (j*131)%5000))))
			}
			if _, err := c.Write(buf.Bytes()); err != nil {
				errs <- err
				return
			}
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			next, shared := 0, 0
			for next < msgs || shared < 5 {
				p, _, err := wsutil.ReadServerData(c.rw)
				if err != nil {
					errs <- fmt.Errorf("client %d: %w", i, err)
					return
				}
				if string(p) == "shared" {
					shared++
					continue
				}
				var ci, cj int
				if _, err := fmt.Sscanf(string(p), "%d/%d/", &ci, &cj); err != nil || ci != i || cj != next {
					errs <- fmt.Errorf("client %d: got %.20q, want message %d", i, p, next)
					return
				}
				next++
			}
			errs <- nil
		}()
	}
	frame := AppendTextFrame(nil, []byte("shared"))
	for range 5 {
		for _, sc := range conns {
			if err := sc.WriteFrame(frame); err != nil {
				t.Fatal(err)
			}
		}
	}
	for range clients {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// TestBlockedHandlerDoesNotStallWrites: with every read goroutine stuck in
// a Handler call, writes to other connections still go out.
func TestBlockedHandlerDoesNotStallWrites(t *testing.T) {
	release := make(chan struct{})
	blocked := make(chan struct{}, 1)
	h := &recorder{}
	h.onMsg = func(c *Conn, p []byte) {
		if string(p) == "block" {
			blocked <- struct{}{}
			<-release
		}
	}
	ts := startServer(t, Config{Handler: h, Pool: 1})
	a, b := ts.dial(t), ts.dial(t)
	waitFor(t, 5*time.Second, "both open", func() bool { return h.openCount() == 2 })
	a.send(t, "block")
	<-blocked
	defer close(release)
	for _, sc := range []*Conn{h.conn(0), h.conn(1)} {
		if err := sc.WriteText([]byte("pushed")); err != nil {
			t.Fatal(err)
		}
	}
	// b's conn is not the blocked one; its write must arrive now. (a's
	// may wait for its own handler: its read task owns its flush.)
	if got := b.read(t); got != "pushed" {
		t.Fatal(got)
	}
}

func TestData(t *testing.T) {
	var c Conn
	if c.Data() != nil {
		t.Fatal("zero Conn has data")
	}
	c.SetData("session")
	if c.Data() != "session" {
		t.Fatal(c.Data())
	}
	c.SetData(nil)
	if c.Data() != nil {
		t.Fatal(c.Data())
	}
}

func TestMaxPayloadBoundary(t *testing.T) {
	h := &recorder{}
	ts := startServer(t, Config{Handler: h, MaxPayload: 1000})
	c := ts.dial(t)
	c.send(t, strings.Repeat("x", 1000)) // exactly the limit: delivered
	waitFor(t, 5*time.Second, "message at the limit", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		return len(h.messages) == 1 && len(h.messages[0]) == 1000
	})
	c.send(t, strings.Repeat("x", 1001))
	if code, _ := c.readClose(t); code != ws.StatusMessageTooBig {
		t.Fatalf("close code %d, want 1009", code)
	}
}

// A client that sends a whole oversized message (as browsers and Node's ws
// do) keeps writing after the server has refused it. The server must read
// past the refused frame, so the client finishes its write without a reset,
// reads the 1009 and ends with a clean close, not 1006.
func TestOversizedMessageIsReadPastSoThePeerGetsTheClose(t *testing.T) {
	h := &recorder{}
	ts := startServer(t, Config{Handler: h, MaxPayload: 1000})
	c := ts.dial(t)
	big := ws.MaskFrameInPlace(ws.NewFrame(ws.OpText, true, make([]byte, 2<<20)))
	bye := ws.MaskFrameInPlace(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusMessageTooBig, "")))
	wrote := make(chan error, 1)
	go func() {
		_ = c.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if err := ws.WriteFrame(c, big); err != nil {
			wrote <- err
			return
		}
		wrote <- ws.WriteFrame(c, bye)
	}()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	f, err := readFrame(c.rw)
	if err != nil {
		t.Fatalf("reading the close frame: %v", err)
	}
	if f.Header.OpCode != ws.OpClose {
		t.Fatalf("got opcode %v, want close", f.Header.OpCode)
	}
	if code, _ := ws.ParseCloseFrameData(f.Payload); code != ws.StatusMessageTooBig {
		t.Fatalf("close code %d, want 1009", code)
	}
	if err := <-wrote; err != nil {
		t.Fatalf("the client's write was cut off (the server reset the connection): %v", err)
	}
	if _, err := c.rw.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after the close handshake: %v, want EOF", err)
	}
	waitFor(t, 5*time.Second, "OnClose(1009)", func() bool { return h.closeCount() == 1 })
}

func TestUpgradeHookAcceptsWithDataAndRefusesWithStatus(t *testing.T) {
	h := &recorder{}
	var seen []UpgradeRequest
	var mu sync.Mutex
	ts := startServer(t, Config{Handler: h, Upgrade: func(r *UpgradeRequest) (any, int, string) {
		mu.Lock()
		seen = append(seen, *r)
		mu.Unlock()
		if r.Header.Get("X-Deny") != "" {
			return nil, http.StatusForbidden, "denied by rule cidr\r\n"
		}
		return "identity-of-" + r.Header.Get("X-User"), 0, ""
	}})
	d := ws.Dialer{Timeout: 5 * time.Second, Header: ws.HandshakeHeaderHTTP(http.Header{"X-User": {"alice"}, "Origin": {"http://app.example"}})}
	c, err := ts.tryDial(d)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitFor(t, 5*time.Second, "OnOpen", func() bool { return h.openCount() == 1 })
	if got := h.conn(0).UpgradeData(); got != "identity-of-alice" {
		t.Fatalf("UpgradeData = %v", got)
	}
	mu.Lock()
	r := seen[0]
	mu.Unlock()
	if r.Origin != "http://app.example" || r.RequestURI != "/socketcluster/" || r.Remote == nil {
		t.Fatalf("request seen by the hook: %+v", r)
	}
	d.Header = ws.HandshakeHeaderHTTP(http.Header{"X-Deny": {"1"}})
	_, err = ts.tryDial(d)
	var se ws.StatusError
	if !errors.As(err, &se) || int(se) != http.StatusForbidden {
		t.Fatalf("refused upgrade: %v, want status 403", err)
	}
	if h.openCount() != 1 {
		t.Fatalf("a refused upgrade reached OnOpen")
	}
}

// releaseCount is upgrade data that counts its Release calls.
type releaseCount struct{ n atomic.Int32 }

func (r *releaseCount) Release() { r.n.Add(1) }

// An upgrade whose handshake times out while the hook decides never reaches
// OnOpen: the data the hook returned is released (the worker's conn_limit
// places would leak otherwise).
func TestUpgradeDataReleasedWhenHandshakeTimesOut(t *testing.T) {
	h := &recorder{}
	data := &releaseCount{}
	ts := startServer(t, Config{Handler: h, HandshakeReadTimeout: 100 * time.Millisecond,
		Upgrade: func(r *UpgradeRequest) (any, int, string) {
			time.Sleep(400 * time.Millisecond) // past the handshake timeout
			return data, 0, ""
		}})
	conn, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, upgradeRequest("/socketcluster/", "")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the abandoned upgrade's data released", func() bool { return data.n.Load() == 1 })
	if h.openCount() != 0 {
		t.Fatal("a timed-out upgrade reached OnOpen")
	}
}

// QueueFrame's contract (the worker's fan-out): the first frame on an idle
// connection makes the caller owe its flush, the frames queued until then
// owe nothing and wait, and the one Flush writes them all in one writev.
func TestQueueFrameOwesOneFlushForAll(t *testing.T) {
	h := &recorder{}
	ts := startServer(t, Config{Handler: h})
	c := ts.dial(t)
	waitFor(t, 5*time.Second, "open", func() bool { return h.openCount() == 1 })
	sc := h.conn(0)
	// OnOpen runs inside the read task of the upgrade, whose batch defers
	// flushes until it ends: wait until it has, so the connection is idle.
	waitFor(t, 5*time.Second, "the open's read task done", func() bool {
		sc.mu.Lock()
		defer sc.mu.Unlock()
		return !sc.batching && !sc.flushing && !sc.reading
	})
	w0 := ts.Stats().Writes
	for i, msg := range []string{"a", "b", "c"} {
		owed, err := sc.QueueFrame(AppendTextFrame(nil, []byte(msg)))
		if err != nil {
			t.Fatal(err)
		}
		if owed != (i == 0) {
			t.Fatalf("frame %d: owed %v", i, owed)
		}
	}
	if w := ts.Stats().Writes - w0; w != 0 {
		t.Fatalf("%d writes before the owed flush", w)
	}
	NewFlusher().Flush(sc)
	if w := ts.Stats().Writes - w0; w != 1 {
		t.Fatalf("%d writes for three queued frames, want 1", w)
	}
	for _, want := range []string{"a", "b", "c"} {
		if got := c.read(t); got != want {
			t.Fatalf("read %q, want %q", got, want)
		}
	}
	// Flushed: the next frame owes a flush again.
	if owed, err := sc.QueueFrame(AppendTextFrame(nil, []byte("d"))); err != nil || !owed {
		t.Fatalf("after the flush: owed %v, err %v", owed, err)
	}
	NewFlusher().Flush(sc)
	if got := c.read(t); got != "d" {
		t.Fatalf("read %q", got)
	}
}
