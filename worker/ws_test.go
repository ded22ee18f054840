package worker

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
	"github.com/golang-jwt/jwt/v5"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/worker/netpoll"
)

// wsEnv is an engine behind a real netpoll server on 127.0.0.1, with the
// in-process loopback broker.
type wsEnv struct {
	*testEnv
	srv  *netpoll.Server
	addr string
}

func newWSEnv(t *testing.T, mod func(*configs.Protocol)) *wsEnv {
	t.Helper()
	// serveWS installs the upgrade hook too, as the worker always does.
	return serveWS(t, newEnvWith(t, mod, netpoll.AppendTextFrame, netpoll.ErrQueueFull))
}

// wsClient speaks raw SocketCluster frames over a gobwas/ws client.
type wsClient struct {
	t *testing.T
	c net.Conn
}

func dialWS(t *testing.T, addr string) *wsClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, _, _, err := ws.Dial(ctx, "ws://"+addr+"/socketcluster/")
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return &wsClient{t: t, c: c}
}

func (c *wsClient) send(s string) {
	c.t.Helper()
	if err := wsutil.WriteClientText(c.c, []byte(s)); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// recv reads the next data frame (waiting at most d).
func (c *wsClient) recvWithin(d time.Duration) (string, error) {
	_ = c.c.SetReadDeadline(time.Now().Add(d))
	b, op, err := wsutil.ReadServerData(c.c)
	if err != nil {
		return "", err
	}
	if op != ws.OpText {
		c.t.Fatalf("server sent a %v frame", op)
	}
	return string(b), nil
}

func (c *wsClient) recv() string {
	c.t.Helper()
	s, err := c.recvWithin(3 * time.Second)
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	return s
}

// recvSkipPings reads the next frame that is not a ping.
func (c *wsClient) recvData() string {
	c.t.Helper()
	for range 100 {
		if s := c.recv(); s != "" && s != "#1" {
			return s
		}
	}
	c.t.Fatal("only pings")
	return ""
}

// expectClose reads until the server's close frame and checks its code.
func (c *wsClient) expectClose(code ws.StatusCode) {
	c.t.Helper()
	for range 1000 {
		_, err := c.recvWithin(5 * time.Second)
		if err == nil {
			continue
		}
		var ce wsutil.ClosedError
		if !errors.As(err, &ce) {
			c.t.Fatalf("want close %d, got %v", code, err)
		}
		if ce.Code != code {
			c.t.Fatalf("closed with %d %q, want %d", ce.Code, ce.Reason, code)
		}
		return
	}
	c.t.Fatal("no close frame")
}

func (c *wsClient) handshake(token string) string {
	c.t.Helper()
	tok := "null"
	if token != "" {
		tok = `"` + token + `"`
	}
	c.send(`{"event":"#handshake","data":{"authToken":` + tok + `},"cid":1}`)
	r := c.recv()
	if !strings.HasPrefix(r, `{"rid":1,"data":{"id":"`) || !strings.Contains(r, `"pingTimeout":`) {
		c.t.Fatalf("handshake response %s", r)
	}
	return r
}

func TestWSHandshakePingPong(t *testing.T) {
	env := newWSEnv(t, func(p *configs.Protocol) {
		p.PingInterval = configs.Duration(100 * time.Millisecond)
		p.PingTimeout = configs.Duration(400 * time.Millisecond)
	})
	c := dialWS(t, env.addr)
	r := c.handshake("")
	if !strings.Contains(r, `"pingTimeout":400,"isAuthenticated":false}}`) {
		t.Fatalf("handshake %s", r)
	}
	// Answer pings past twice the pingTimeout: the socket stays up.
	start := time.Now()
	pings := 0
	for time.Since(start) < 900*time.Millisecond {
		if f := c.recv(); f != "" {
			t.Fatalf("unexpected frame %q", f)
		}
		pings++
		c.send("")
	}
	if pings < 4 || pings > 12 { // loose: the machine may be busy
		t.Fatalf("%d pings in 900ms at a 100ms interval", pings)
	}
	// Stop answering: closed 4001 after about pingTimeout.
	silent := time.Now()
	c.expectClose(CodePongTimeout)
	if el := time.Since(silent); el < 300*time.Millisecond || el > 2*time.Second {
		t.Fatalf("pong timeout after %v", el)
	}
}

func TestWSProtocolV1Ping(t *testing.T) {
	env := newWSEnv(t, func(p *configs.Protocol) {
		p.Version = 1
		p.PingInterval = configs.Duration(50 * time.Millisecond)
	})
	c := dialWS(t, env.addr)
	c.handshake("")
	if f := c.recv(); f != "#1" {
		t.Fatalf("v1 ping %q", f)
	}
	c.send("#2")
	if f := c.recv(); f != "#1" {
		t.Fatalf("v1 ping %q", f)
	}
}

func TestWSHandshakeFailures(t *testing.T) {
	env := newWSEnv(t, func(p *configs.Protocol) { p.HandshakeTimeout = configs.Duration(100 * time.Millisecond) })
	c := dialWS(t, env.addr)
	c.expectClose(CodeHandshakeTimeout)

	c = dialWS(t, env.addr)
	c.send(`{"event":"chat","data":1}`)
	c.expectClose(CodeNotHandshaken)

	c = dialWS(t, env.addr)
	c.send(`{"event":"#handshake","data":{}}`)
	c.expectClose(CodeBadHandshake)
	waitFor(t, 2*time.Second, "sessions gone", func() bool { return env.e.Len() == 0 })
}

func TestWSInvokePubSub(t *testing.T) {
	env := newWSEnv(t, nil)
	a, b := dialWS(t, env.addr), dialWS(t, env.addr)
	a.handshake("")
	b.handshake("")
	a.send(`{"event":"getUser","data":5,"cid":2}`)
	if r := a.recvData(); r != `{"rid":2,"error":{"message":"No handler for procedure getUser","name":"UnknownProcedureError"}}` {
		t.Fatalf("invoke: %s", r)
	}
	a.send(`[{"event":"#subscribe","data":{"channel":"room"},"cid":3},{"event":"#subscribe","data":{"channel":"other"},"cid":4}]`)
	b.send(`{"event":"#subscribe","data":{"channel":"room","waitForAuth":true},"cid":2}`)
	for _, want := range []string{`{"rid":3}`, `{"rid":4}`} {
		if r := a.recvData(); r != want {
			t.Fatalf("got %s want %s", r, want)
		}
	}
	if r := b.recvData(); r != `{"rid":2}` {
		t.Fatalf("b subscribe %s", r)
	}
	b.send(`{"event":"#publish","data":{"channel":"room","data":"hi \u00e9"},"cid":3}`)
	pub := `{"event":"#publish","data":{"channel":"room","data":"hi \u00e9"}}`
	if r := a.recvData(); r != pub {
		t.Fatalf("a got %s", r)
	}
	// The publisher gets its own message, and the ack.
	got := []string{b.recvData(), b.recvData()}
	if !(got[0] == pub && got[1] == `{"rid":3}`) && !(got[1] == pub && got[0] == `{"rid":3}`) {
		t.Fatalf("b got %q", got)
	}
	a.send(`{"event":"#unsubscribe","data":"room"}`)
	a.send(`{"event":"#publish","data":{"channel":"other","data":1},"cid":5}`)
	// Same socket, in order: once the publish is acked, the unsubscribe ran.
	for _, want := range []string{`{"event":"#publish","data":{"channel":"other","data":1}}`, `{"rid":5}`} {
		if r := a.recvData(); r != want {
			t.Fatalf("a got %s want %s", r, want)
		}
	}
	b.send(`{"event":"#publish","data":{"channel":"room","data":2},"cid":4}`)
	for _, want := range []string{`{"event":"#publish","data":{"channel":"room","data":2}}`, `{"rid":4}`} {
		if r := b.recvData(); r != want {
			t.Fatalf("b got %s want %s", r, want)
		}
	}
	// a no longer gets room: its next frames are other's publish and the ack.
	a.send(`{"event":"#publish","data":{"channel":"other","data":3},"cid":6}`)
	for _, want := range []string{`{"event":"#publish","data":{"channel":"other","data":3}}`, `{"rid":6}`} {
		if r := a.recvData(); r != want {
			t.Fatalf("a got %s want %s", r, want)
		}
	}
}

func TestWSGarbageCrashesNothing(t *testing.T) {
	env := newWSEnv(t, nil)
	c := dialWS(t, env.addr)
	c.handshake("")
	for _, f := range []string{`not json`, `{"event":`, `{"data":1}`, strings.Repeat("[", 200000), `[1,2]`} {
		c.send(f)
	}
	// Binary frames are read as UTF-8 JSON, like the official server.
	if err := wsutil.WriteClientBinary(c.c, []byte(`{"event":"ping","cid":7}`)); err != nil {
		t.Fatal(err)
	}
	if r := c.recvData(); !strings.HasPrefix(r, `{"rid":7,"error":`) {
		t.Fatalf("binary invoke answered %s", r)
	}
	c.send(`{"event":"x","cid":8}`)
	if r := c.recvData(); !strings.HasPrefix(r, `{"rid":8,"error":`) {
		t.Fatalf("after garbage: %s", r)
	}
	if cs := env.e.Stats().Counters; cs["invalid_frames"] != 2 || cs["raw_packets"] != 6 {
		t.Fatalf("counters %v", env.e.Stats().Counters)
	}
}

func TestWSAuth(t *testing.T) {
	env := newWSEnv(t, nil)
	good := env.token(jwt.MapClaims{"sub": "alice", "exp": time.Now().Add(time.Hour).Unix()})
	c := dialWS(t, env.addr)
	if r := c.handshake(good); !strings.HasSuffix(r, `"isAuthenticated":true}}`) {
		t.Fatalf("valid token: %s", r)
	}
	bad, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{}).SignedString([]byte("wrong"))
	c = dialWS(t, env.addr)
	if r := c.handshake(bad); !strings.Contains(r, `"authError":{"message":"invalid signature","name":"AuthTokenInvalidError","isBadToken":true}`) {
		t.Fatalf("bad token: %s", r)
	}
	if r := c.recvData(); r != `{"event":"#removeAuthToken"}` {
		t.Fatalf("after bad token: %s", r)
	}
	c.send(`{"event":"#authenticate","data":"` + good + `","cid":2}`)
	if r := c.recvData(); r != `{"rid":2,"data":{"isAuthenticated":true,"authError":null}}` {
		t.Fatalf("authenticate: %s", r)
	}
}

// TestWSSlowConsumer: a subscriber that stops reading is disconnected with
// CodeSlowConsumer once its send queue overflows; a reading subscriber of
// the same channel gets every message and stays connected.
func TestWSSlowConsumer(t *testing.T) {
	env := newWSEnv(t, nil)
	slow, fast := dialWS(t, env.addr), dialWS(t, env.addr)
	for _, c := range []*wsClient{slow, fast} {
		c.handshake("")
		c.send(`{"event":"#subscribe","data":{"channel":"firehose"},"cid":2}`)
		if r := c.recvData(); r != `{"rid":2}` {
			t.Fatalf("subscribe: %s", r)
		}
	}
	got := make(chan int, 1)
	readErr := make(chan error, 1)
	go func() {
		for n := 1; ; n++ {
			_ = fast.c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, _, err := wsutil.ReadServerData(fast.c); err != nil {
				readErr <- err
				return
			}
			got <- n
		}
	}()
	data := []byte(`"` + strings.Repeat("x", 64<<10) + `"`)
	sent := 0
	for ; sent < 2000 && env.e.Stats().Counters["slow_consumer_closes"] == 0; sent++ {
		env.e.Deliver("firehose", data, uint64(sent))
		// Pace on the fast reader so only the slow one can overflow.
		select {
		case <-got:
		case err := <-readErr:
			t.Fatalf("fast subscriber: %v", err)
		case <-time.After(10 * time.Second):
			t.Fatal("fast subscriber stalled")
		}
	}
	if n := env.e.Stats().Counters["slow_consumer_closes"]; n != 1 {
		t.Fatalf("slow consumer closes %d after %d messages", n, sent)
	}
	slow.expectClose(CodeSlowConsumer)
	fast.c.SetReadDeadline(time.Now()) // stop the reader goroutine
	<-readErr
	waitFor(t, 5*time.Second, "the slow session to end", func() bool { return env.e.Len() == 1 })
}
