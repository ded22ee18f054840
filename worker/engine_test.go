package worker

import (
	"errors"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/golang-jwt/jwt/v5"

	"github.com/shoalhq/shoal/auth"
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/proto/sc"
)

var errFakeFull = errors.New("fake: queue full")

// fakeConn records what the engine writes; frames are plain payloads
// (the test engine's Frame is the identity).
type fakeConn struct {
	mu     sync.Mutex
	frames []string
	closed bool
	code   ws.StatusCode
	reason string
	full   atomic.Bool
	e      *Engine
	s      *Session
}

func (c *fakeConn) WriteFrame(f []byte) error {
	if c.full.Load() {
		return errFakeFull
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errors.New("closed")
	}
	c.frames = append(c.frames, string(f))
	return nil
}

func (c *fakeConn) Close(code ws.StatusCode, reason string) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed, c.code, c.reason = true, code, reason
	c.mu.Unlock()
	// Like netpoll: OnClose comes later, from another goroutine.
	go c.e.Closed(c.s, code, reason)
}

func (c *fakeConn) RemoteAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1} }

// take returns and forgets the frames written so far.
func (c *fakeConn) take() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	f := c.frames
	c.frames = nil
	return f
}

func (c *fakeConn) closeCode() (ws.StatusCode, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.code, c.closed
}

// loopBroker is an in-process broker: publishes come straight back to
// Deliver when the worker registered interest.
type loopBroker struct {
	mu       sync.Mutex
	e        *Engine
	interest map[string]int // channel → Subscribe calls minus Unsubscribe calls
	subs     int
	fail     error
}

func (b *loopBroker) Subscribe(ch string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.interest[ch]++
	b.subs++
}

func (b *loopBroker) Unsubscribe(ch string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.interest[ch]--
}

func (b *loopBroker) Publish(ch string, data []byte, done func(uint64, error)) {
	b.mu.Lock()
	interested, fail := b.interest[ch] > 0, b.fail
	b.mu.Unlock()
	if fail != nil {
		done(0, fail)
		return
	}
	if interested {
		b.e.Deliver(ch, data, 1)
	}
	done(1, nil)
}

func (b *loopBroker) interestIn(ch string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.interest[ch]
}

type testEnv struct {
	t      testing.TB
	e      *Engine
	broker *loopBroker
	keys   *auth.Keys
	clock  *fakeClock
}

type fakeClock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.off += d
	c.mu.Unlock()
}

const testKey = "test-secret"

func newEnv(t testing.TB, mod func(*configs.Protocol)) *testEnv {
	t.Helper()
	return newEnvWith(t, mod, func(dst, p []byte) []byte { return append(dst, p...) }, errFakeFull)
}

// newEnvWith builds an engine with a loopback broker and the given framing.
func newEnvWith(t testing.TB, mod func(*configs.Protocol), frame func(dst, p []byte) []byte, full error) *testEnv {
	t.Helper()
	p := configs.Default().Protocol
	if mod != nil {
		mod(&p)
	}
	clock := &fakeClock{}
	keys, err := auth.New(configs.Default().Auth.JWT, func(string) string { return testKey }, auth.WithClock(clock.now))
	if err != nil {
		t.Fatal(err)
	}
	b := &loopBroker{interest: map[string]int{}}
	e, err := NewEngine(EngineConfig{
		Name:         "worker-test",
		Protocol:     p,
		Keys:         keys,
		Broker:       b,
		Frame:        frame,
		ErrQueueFull: full,
		Now:          clock.now,
	})
	if err != nil {
		t.Fatal(err)
	}
	b.e = e
	t.Cleanup(e.Close)
	return &testEnv{t: t, e: e, broker: b, keys: keys, clock: clock}
}

func (env *testEnv) open() *fakeConn {
	c := &fakeConn{e: env.e}
	c.s = env.e.Open(c)
	return c
}

func (env *testEnv) send(c *fakeConn, frame string) { env.e.Message(c.s, []byte(frame)) }

// handshake opens a session and completes its handshake.
func (env *testEnv) handshake(token string) *fakeConn {
	env.t.Helper()
	c := env.open()
	tok := "null"
	if token != "" {
		tok = `"` + token + `"`
	}
	env.send(c, `{"event":"#handshake","data":{"authToken":`+tok+`},"cid":1}`)
	got := c.take()
	if len(got) == 0 || !strings.HasPrefix(got[0], `{"rid":1,"data":{"id":"`+c.s.ID()+`","pingTimeout":`) {
		env.t.Fatalf("handshake response %q", got)
	}
	return c
}

func (env *testEnv) token(claims jwt.MapClaims) string {
	env.t.Helper()
	s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(testKey))
	if err != nil {
		env.t.Fatal(err)
	}
	return s
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func wantFrames(t *testing.T, got []string, want ...string) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got frames %q\nwant %q", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("frame %d:\n got %s\nwant %s", i, got[i], want[i])
		}
	}
}

func waitClosed(t *testing.T, c *fakeConn, code ws.StatusCode) {
	t.Helper()
	waitFor(t, 2*time.Second, "close", func() bool { _, ok := c.closeCode(); return ok })
	if got, _ := c.closeCode(); got != code {
		t.Fatalf("closed with %d, want %d", got, code)
	}
}

func TestHandshake(t *testing.T) {
	env := newEnv(t, nil)
	c := env.open()
	env.send(c, `{"event":"#handshake","data":{"authToken":null},"cid":16}`)
	wantFrames(t, c.take(), `{"rid":16,"data":{"id":"`+c.s.ID()+`","pingTimeout":30000,"isAuthenticated":false}}`)
	if len(c.s.ID()) != 20 {
		t.Fatalf("id %q", c.s.ID())
	}
}

func TestStrictHandshake(t *testing.T) {
	env := newEnv(t, nil)
	for _, frame := range []string{`{"event":"chat","data":1}`, `not json`, `{"event":"#subscribe","data":{"channel":"a"},"cid":1}`} {
		c := env.open()
		env.send(c, frame)
		waitClosed(t, c, CodeNotHandshaken)
	}
	// A pong before the handshake is tolerated.
	c := env.open()
	env.send(c, ``)
	if _, closed := c.closeCode(); closed {
		t.Fatal("early pong closed the socket")
	}
	c = env.open()
	env.send(c, `{"event":"#handshake","data":{}}`)
	waitClosed(t, c, CodeBadHandshake)
	c = env.open()
	env.send(c, `{"event":"#handshake","data":{},"cid":"1"}`)
	waitClosed(t, c, CodeBadHandshake)
	waitFor(t, time.Second, "sessions gone", func() bool { return env.e.Len() == 1 })
}

func TestHandshakeTimeout(t *testing.T) {
	env := newEnv(t, func(p *configs.Protocol) { p.HandshakeTimeout = configs.Duration(50 * time.Millisecond) })
	start := time.Now()
	c := env.open()
	waitClosed(t, c, CodeHandshakeTimeout)
	if el := time.Since(start); el < 50*time.Millisecond {
		t.Fatalf("closed after %v", el)
	}
	ok := env.handshake("")
	waitFor(t, time.Second, "a sweep", func() bool { return env.e.Stats().Counters["handshake_timeouts"] == 1 })
	if _, closed := ok.closeCode(); closed {
		t.Fatal("handshaken socket closed")
	}
}

func TestPingPong(t *testing.T) {
	for _, v := range []int{1, 2} {
		t.Run("v"+string(rune('0'+v)), func(t *testing.T) {
			env := newEnv(t, func(p *configs.Protocol) {
				p.Version = v
				p.PingInterval = configs.Duration(20 * time.Millisecond)
				p.PingTimeout = configs.Duration(150 * time.Millisecond)
			})
			ping, pong := "", ""
			if v == 1 {
				ping, pong = "#1", "#2"
			}
			c := env.handshake("")
			// Answer pings for a while: the socket stays up past pingTimeout.
			deadline := time.Now().Add(300 * time.Millisecond)
			pings := 0
			for time.Now().Before(deadline) {
				for _, f := range c.take() {
					if f != ping {
						t.Fatalf("unexpected frame %q", f)
					}
					pings++
					env.send(c, pong)
				}
				if _, closed := c.closeCode(); closed {
					t.Fatal("closed although pongs were sent")
				}
				time.Sleep(5 * time.Millisecond)
			}
			if pings < 5 {
				t.Fatalf("only %d pings in 300ms at a 20ms interval", pings)
			}
			// Stop answering: 4001 after pingTimeout.
			waitClosed(t, c, CodePongTimeout)
		})
	}
}

func TestInvokeAndTransmit(t *testing.T) {
	env := newEnv(t, nil)
	c := env.handshake("")
	env.send(c, `{"event":"getUser","data":5,"cid":7}`)
	env.send(c, `{"event":"chat","data":{"a":1}}`)
	env.send(c, `{"rid":3,"data":1}`)
	wantFrames(t, c.take(), `{"rid":7,"error":{"message":"No handler for procedure getUser","name":"UnknownProcedureError"}}`)
	st := env.e.Stats().Counters
	if st["transmits_dropped"] != 1 || st["unknown_procedures"] != 1 {
		t.Fatalf("counters %v", st)
	}
}

func TestPubSub(t *testing.T) {
	env := newEnv(t, nil)
	a, b := env.handshake(""), env.handshake("")
	env.send(a, `{"event":"#subscribe","data":{"channel":"foo"},"cid":2}`)
	env.send(b, `{"event":"#subscribe","data":{"channel":"foo","waitForAuth":true,"data":{"z":1},"extra":1},"cid":15}`)
	wantFrames(t, a.take(), `{"rid":2}`)
	wantFrames(t, b.take(), `{"rid":15}`)
	if n := env.broker.interestIn("foo"); n != 1 || env.broker.subs != 1 {
		t.Fatalf("broker interest %d after %d subscribes", n, env.broker.subs)
	}
	// Publisher gets its own message; invoke ack after the broker took it.
	env.send(a, `{"event":"#publish","data":{"channel":"foo","data":{"hello":"world"}},"cid":3}`)
	pub := `{"event":"#publish","data":{"channel":"foo","data":{"hello":"world"}}}`
	wantFrames(t, a.take(), pub, `{"rid":3}`)
	wantFrames(t, b.take(), pub)
	// Transmit form, batch with unsubscribe in order.
	env.send(b, `[{"event":"#publish","data":{"channel":"foo","data":1}},{"event":"#unsubscribe","data":"foo"},{"event":"#publish","data":{"channel":"foo","data":2}}]`)
	wantFrames(t, b.take(), `{"event":"#publish","data":{"channel":"foo","data":1}}`)
	wantFrames(t, a.take(), `{"event":"#publish","data":{"channel":"foo","data":1}}`, `{"event":"#publish","data":{"channel":"foo","data":2}}`)
	// Invoke unsubscribe of a channel b is not in.
	env.send(b, `{"event":"#unsubscribe","data":"foo","cid":9}`)
	if f := b.take(); len(f) != 1 || !strings.Contains(f[0], `"name":"BrokerError"`) {
		t.Fatalf("unsubscribe not-subscribed: %q", f)
	}
	// Closing the last subscriber drops the broker interest.
	a.Close(1000, "")
	waitFor(t, time.Second, "interest dropped", func() bool { return env.broker.interestIn("foo") == 0 })
	if env.e.Hub().Channels() != 0 || env.e.Stats().Counters["subscriptions"] != 0 {
		t.Fatalf("hub still holds %d channels", env.e.Hub().Channels())
	}
}

func TestSubscribeErrors(t *testing.T) {
	env := newEnv(t, func(p *configs.Protocol) { p.SocketChannelLimit = 2 })
	c := env.handshake("")
	env.send(c, `[{"event":"#subscribe","data":{"channel":5},"cid":1},{"event":"#subscribe","data":"x","cid":2},`+
		`{"event":"#subscribe","data":{"channel":"a"},"cid":3},{"event":"#subscribe","data":{"channel":"a"},"cid":4},`+
		`{"event":"#subscribe","data":{"channel":"b"},"cid":5},{"event":"#subscribe","data":{"channel":"c"},"cid":6}]`)
	malformed := `{"message":"Subscribe channel name was malformatted","name":"InvalidActionError"}`
	got := c.take()
	wantFrames(t, got[:5], `{"rid":1,"error":`+malformed+`}`, `{"rid":2,"error":`+malformed+`}`, `{"rid":3}`, `{"rid":4}`, `{"rid":5}`)
	if !strings.Contains(got[5], `"name":"BrokerError"`) || !strings.Contains(got[5], "subscription limit of 2") {
		t.Fatalf("limit error %s", got[5])
	}
}

func TestClientPublishDisabled(t *testing.T) {
	no := false
	env := newEnv(t, func(p *configs.Protocol) { p.AllowClientPublish = &no })
	c := env.handshake("")
	env.send(c, `{"event":"#subscribe","data":{"channel":"a"},"cid":1}`)
	env.send(c, `{"event":"#publish","data":{"channel":"a","data":1},"cid":2}`)
	env.send(c, `{"event":"#publish","data":{"channel":"a","data":1}}`)
	wantFrames(t, c.take(), `{"rid":1}`, `{"rid":2,"error":{"message":"Client publish feature is disabled","name":"InvalidActionError"}}`)
}

func TestPublishBrokerError(t *testing.T) {
	env := newEnv(t, nil)
	env.broker.fail = errors.New("owner unreachable")
	c := env.handshake("")
	env.send(c, `{"event":"#publish","data":{"channel":5},"cid":1}`)
	env.send(c, `{"event":"#publish","data":{"channel":"a"},"cid":2}`)
	got := c.take()
	wantFrames(t, got[:1], `{"rid":1,"error":{"message":"Publish channel name was malformatted","name":"InvalidActionError"}}`)
	if len(got) != 2 || !strings.HasPrefix(got[1], `{"rid":2,"error":{"message":"Failed to publish: owner unreachable","name":"BrokerError"`) {
		t.Fatalf("broker failure %q", got)
	}
}

func TestKickOut(t *testing.T) {
	env := newEnv(t, nil)
	c := env.handshake("")
	env.send(c, `{"event":"#subscribe","data":{"channel":"room"},"cid":2}`)
	c.take()
	if !env.e.Session(c.s.ID()).KickOut("room", "bye") {
		t.Fatal("kickOut found no subscription")
	}
	wantFrames(t, c.take(), `{"event":"#kickOut","data":{"channel":"room","message":"bye"}}`)
	if env.broker.interestIn("room") != 0 {
		t.Fatal("interest kept after kickOut")
	}
}

func TestSlowConsumer(t *testing.T) {
	env := newEnv(t, nil)
	a, b := env.handshake(""), env.handshake("")
	for _, c := range []*fakeConn{a, b} {
		env.send(c, `{"event":"#subscribe","data":{"channel":"t"},"cid":2}`)
		c.take()
	}
	b.full.Store(true)
	env.e.Deliver("t", []byte("1"), 1)
	waitClosed(t, b, CodeSlowConsumer)
	wantFrames(t, a.take(), `{"event":"#publish","data":{"channel":"t","data":1}}`)
	if _, closed := a.closeCode(); closed {
		t.Fatal("the fast consumer was closed")
	}
}

func TestAuthHandshake(t *testing.T) {
	env := newEnv(t, nil)
	now := time.Now()
	valid := env.token(jwt.MapClaims{"sub": "alice", "exp": now.Add(time.Hour).Unix()})
	c := env.open()
	env.send(c, `{"event":"#handshake","data":{"authToken":"`+valid+`"},"cid":1}`)
	wantFrames(t, c.take(), `{"rid":1,"data":{"id":"`+c.s.ID()+`","pingTimeout":30000,"isAuthenticated":true}}`)
	if c.s.AuthToken().Subject() != "alice" {
		t.Fatal("token not kept")
	}

	expired := env.token(jwt.MapClaims{"exp": now.Add(-time.Hour).Unix()})
	c = env.open()
	env.send(c, `{"event":"#handshake","data":{"authToken":"`+expired+`"},"cid":1}`)
	got := c.take()
	if len(got) != 2 || !strings.Contains(got[0], `"isAuthenticated":false,"authError":{"message":"jwt expired","name":"AuthTokenExpiredError","expiry":"`) ||
		!strings.Contains(got[0], `"isBadToken":true}`) || got[1] != sc.RemoveAuthToken {
		t.Fatalf("expired: %q", got)
	}

	bad, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{}).SignedString([]byte("other"))
	c = env.open()
	env.send(c, `{"event":"#handshake","data":{"authToken":"`+bad+`"},"cid":1}`)
	wantFrames(t, c.take(),
		`{"rid":1,"data":{"id":"`+c.s.ID()+`","pingTimeout":30000,"isAuthenticated":false,"authError":{"message":"invalid signature","name":"AuthTokenInvalidError","isBadToken":true}}}`,
		sc.RemoveAuthToken)

	nbf := env.token(jwt.MapClaims{"nbf": now.Add(time.Hour).Unix()})
	c = env.open()
	env.send(c, `{"event":"#handshake","data":{"authToken":"`+nbf+`"},"cid":1}`)
	got = c.take()
	if len(got) != 1 || !strings.Contains(got[0], `"name":"AuthTokenNotBeforeError","date":"`) || !strings.Contains(got[0], `"isBadToken":false`) {
		t.Fatalf("nbf: %q", got)
	}
}

func TestAuthenticate(t *testing.T) {
	env := newEnv(t, nil)
	c := env.handshake("")
	valid := env.token(jwt.MapClaims{"sub": "bob", "exp": time.Now().Add(time.Minute).Unix()})
	env.send(c, `{"event":"#authenticate","data":"`+valid+`","cid":9}`)
	wantFrames(t, c.take(), `{"rid":9,"data":{"isAuthenticated":true,"authError":null}}`)
	env.send(c, `{"event":"#removeAuthToken"}`)
	if c.s.AuthToken() != nil {
		t.Fatal("#removeAuthToken kept the token")
	}
	env.send(c, `{"event":"#authenticate","data":null,"cid":18}`)
	wantFrames(t, c.take(),
		`{"rid":18,"error":{"message":"Invalid token format - Token must be a string","name":"AuthTokenInvalidError","isBadToken":true}}`,
		sc.RemoveAuthToken)
	env.send(c, `{"event":"#authenticate","data":"abc"}`)
	waitClosed(t, c, CodeBadHandshake)
}

func TestAuthExpiresWhileConnected(t *testing.T) {
	env := newEnv(t, nil)
	tok := env.token(jwt.MapClaims{"sub": "carol", "exp": time.Now().Add(time.Minute).Unix()})
	c := env.handshake(tok)
	if c.s.AuthToken() == nil {
		t.Fatal("not authenticated")
	}
	env.send(c, ``) // pong: still valid
	if len(c.take()) != 0 {
		t.Fatal("early deauthentication")
	}
	env.clock.advance(2 * time.Minute)
	env.send(c, ``)
	wantFrames(t, c.take(), sc.RemoveAuthToken)
	if c.s.AuthToken() != nil {
		t.Fatal("still authenticated")
	}
}

func TestSetAuthToken(t *testing.T) {
	env := newEnv(t, nil)
	c := env.handshake("")
	if err := c.s.SetAuthToken(map[string]any{"sub": "dave"}); err != nil {
		t.Fatal(err)
	}
	got := c.take()
	if len(got) != 1 || !strings.HasPrefix(got[0], `{"event":"#setAuthToken","data":{"token":"`) {
		t.Fatalf("%q", got)
	}
	if c.s.AuthToken().Subject() != "dave" {
		t.Fatal("session not authenticated")
	}
}

func TestGarbageFrames(t *testing.T) {
	env := newEnv(t, nil)
	c := env.handshake("")
	for _, f := range []string{
		`not json`, `{"event":`, `{"data":1}`, `[1,2,3]`, "\x00\x01\xff", `{"event":"#publish","data":5,"cid":1}`,
		`{"event":"#subscribe","cid":2}`, `{"event":"#unsubscribe","data":{"channel":"a"},"cid":3}`,
		strings.Repeat("[", 100000), `{"event":"x","data":` + strings.Repeat(`{"a":`, 5000) + "1" + strings.Repeat("}", 5000) + `,"cid":4}`,
		`[` + strings.Repeat(`{"event":"#subscribe","data":{"channel":"z"},"cid":5},`, 10) + `{"event":"e"}]`,
	} {
		env.send(c, f)
	}
	if _, closed := c.closeCode(); closed {
		t.Fatal("garbage closed the socket")
	}
	got := c.take()
	// Answers only for the invokes of valid frames.
	if len(got) != 13 {
		t.Fatalf("got %d answers: %q", len(got), got)
	}
}

func TestBinaryFrameIsJSON(t *testing.T) {
	env := newEnv(t, nil)
	c := env.open()
	// The transport hands binary messages over like text ones.
	env.e.Message(c.s, []byte(`{"event":"#handshake","data":{},"cid":1}`))
	if got := c.take(); len(got) != 1 {
		t.Fatalf("%q", got)
	}
}

func TestServerPublish(t *testing.T) {
	env := newEnv(t, nil)
	c := env.handshake("")
	env.send(c, `{"event":"#subscribe","data":{"channel":"news"},"cid":2}`)
	c.take()
	var got []error
	env.e.Publish("news", []byte(`{"headline":"x"}`), func(err error) { got = append(got, err) })
	env.e.Publish("news", []byte(`{bad`), func(err error) { got = append(got, err) })
	if len(got) != 2 || got[0] != nil || got[1] == nil {
		t.Fatalf("results %v", got)
	}
	wantFrames(t, c.take(), `{"event":"#publish","data":{"channel":"news","data":{"headline":"x"}}}`)
}
