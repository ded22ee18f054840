package worker

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
	"github.com/golang-jwt/jwt/v5"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/middleware"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/worker/netpoll"
)

// newMWEnv is newWSEnv with a config's middleware and channel policies
// (yaml, with %URL% replaced by url).
func newMWEnv(t *testing.T, yaml, url string, mod func(*configs.Protocol)) *wsEnv {
	t.Helper()
	cfg, err := configs.Load([]byte(strings.ReplaceAll(yaml, "%URL%", url)), "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	chain, err := middleware.Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	env := newEnvWith(t, mod, netpoll.AppendTextFrame, netpoll.ErrQueueFull)
	env.e.SetChain(chain)
	if err := env.e.SetChannels(cfg.Channels); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { chain.Wait(); chain.CloseIdleConnections(); chain.Shutdown() })
	return serveWS(t, env)
}

// serveWS puts env's engine behind a real netpoll server on 127.0.0.1.
func serveWS(t *testing.T, env *testEnv) *wsEnv {
	t.Helper()
	srv, err := netpoll.New(netpoll.Config{Handler: wsHandler{env.e}, MaxPayload: 1 << 20,
		SendQueueBytes: 256 << 10, SendQueueMsgs: 64, Upgrade: upgradeHook(env.e, 5*time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			fd, err := dupFD(conn.(*net.TCPConn))
			conn.Close()
			if err != nil {
				t.Errorf("dup: %v", err)
				return
			}
			if err := srv.Serve(fd, nil, nil); err != nil {
				t.Errorf("serve: %v", err)
			}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx, 1001, "test over"); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return &wsEnv{testEnv: env, srv: srv, addr: ln.Addr().String()}
}

// hookRequest is what a backend hook receives (docs/middleware.md).
type hookRequest struct {
	Action  string            `json:"action"`
	Client  string            `json:"client"`
	User    string            `json:"user"`
	Channel string            `json:"channel"`
	Method  string            `json:"method"`
	Origin  string            `json:"origin"`
	Headers map[string]string `json:"headers"`
	Data    json.RawMessage   `json:"data"`
}

// backend is an httptest server answering hook calls with reply.
func backend(t *testing.T, reply func(r hookRequest) string) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		var r hookRequest
		body, _ := io.ReadAll(req.Body)
		if err := json.Unmarshal(body, &r); err != nil {
			t.Errorf("hook body %s: %v", body, err)
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, reply(r))
	}))
	t.Cleanup(srv.Close)
	return srv
}

func (c *wsClient) expect(want string) {
	c.t.Helper()
	if r := c.recvData(); r != want {
		c.t.Fatalf("got %s\nwant %s", r, want)
	}
}

func TestMWSubscribeAndPublishDenied(t *testing.T) {
	env := newMWEnv(t, `
middleware:
  inbound:
    - channels:
        - match: "private/**"
          subscribe: {require: authenticated}
          error: {name: AuthError, message: "Cannot subscribe to {channel} without authentication"}
        - match: "readonly/**"
          publish: deny
          error: {name: InvalidActionError, message: "Clients cannot publish to {channel}"}
`, "", nil)
	c := dialWS(t, env.addr)
	c.handshake("")
	c.send(`{"event":"#subscribe","data":{"channel":"private/x"},"cid":2}`)
	c.expect(`{"rid":2,"error":{"message":"Cannot subscribe to private/x without authentication","name":"AuthError"}}`)
	c.send(`{"event":"#subscribe","data":{"channel":"readonly/news"},"cid":3}`)
	c.expect(`{"rid":3}`)
	c.send(`{"event":"#publish","data":{"channel":"readonly/news","data":1},"cid":4}`)
	c.expect(`{"rid":4,"error":{"message":"Clients cannot publish to readonly/news","name":"InvalidActionError"}}`)
	// A transmit publish that is denied gets nothing; the next invoke shows
	// nothing was delivered in between.
	c.send(`{"event":"#publish","data":{"channel":"readonly/news","data":2}}`)
	c.send(`{"event":"#publish","data":{"channel":"open","data":3},"cid":5}`)
	c.expect(`{"rid":5}`)

	// Authenticated, private/ is fine.
	a := dialWS(t, env.addr)
	a.handshake(env.token(jwt.MapClaims{"sub": "alice", "exp": time.Now().Add(time.Hour).Unix()}))
	a.send(`{"event":"#subscribe","data":{"channel":"private/x"},"cid":2}`)
	a.expect(`{"rid":2}`)
	if n := env.e.Stats().Counters["middleware.inbound[0].channels.denied"]; n != 3 {
		t.Fatalf("denied count %d, want 3 (%v)", n, env.e.Stats().Counters)
	}
}

func TestMWRPCBackend(t *testing.T) {
	release := make(chan struct{})
	be := backend(t, func(r hookRequest) string {
		if r.Action != "rpc" {
			t.Errorf("action %q", r.Action)
		}
		switch r.Method {
		case "user.get":
			return `{"result":{"data":{"user":` + string(r.Data) + `,"by":"` + r.User + `"}}}`
		case "user.slow":
			<-release
			return `{"result":{"data":"slow"}}`
		case "user.secret":
			return `{"error":{"name":"NotAllowedError","message":"no secrets"}}`
		}
		return `{}`
	})
	env := newMWEnv(t, `
middleware:
  inbound:
    - rpc: {url: "%URL%", timeout: 5s, procedures: ["user.*"]}
`, be.URL, nil)
	c := dialWS(t, env.addr)
	c.handshake(env.token(jwt.MapClaims{"sub": "alice", "exp": time.Now().Add(time.Hour).Unix()}))
	c.send(`{"event":"user.get","data":5,"cid":2}`)
	c.expect(`{"rid":2,"data":{"user":5,"by":"alice"}}`)
	c.send(`{"event":"user.secret","data":null,"cid":3}`)
	c.expect(`{"rid":3,"error":{"message":"no secrets","name":"NotAllowedError"}}`)
	// Not an rpc procedure: no handler, as without middleware.
	c.send(`{"event":"other","cid":4}`)
	c.expect(`{"rid":4,"error":{"message":"No handler for procedure other","name":"UnknownProcedureError"}}`)

	// Order: actions behind a pending decision wait for it.
	c.send(`[{"event":"user.slow","cid":5},{"event":"#subscribe","data":{"channel":"room"},"cid":6},{"event":"other","cid":7}]`)
	waitFor(t, 2*time.Second, "the slow call to be pending", func() bool { return env.e.Stats().Counters["middleware_pending"] >= 3 })
	close(release)
	c.expect(`{"rid":5,"data":"slow"}`)
	c.expect(`{"rid":6}`)
	c.expect(`{"rid":7,"error":{"message":"No handler for procedure other","name":"UnknownProcedureError"}}`)
}

func TestMWBacklogFloodCloses(t *testing.T) {
	release := make(chan struct{})
	be := backend(t, func(r hookRequest) string { <-release; return `{}` })
	env := newMWEnv(t, `
middleware:
  inbound:
    - hook: {url: "%URL%", timeout: 5s, actions: [subscribe]}
`, be.URL, nil)
	defer close(release)
	c := dialWS(t, env.addr)
	c.handshake("")
	c.send(`{"event":"#subscribe","data":{"channel":"a"},"cid":2}`)
	var b strings.Builder
	b.WriteByte('[')
	for i := range maxQueuedActions + 1 {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(`{"event":"x"}`)
	}
	b.WriteByte(']')
	c.send(b.String())
	c.expectClose(CodeMiddlewareBacklog)
}

func TestMWHandshakeSCDenied(t *testing.T) {
	be := backend(t, func(r hookRequest) string {
		if r.Action != "connect" {
			t.Errorf("action %q", r.Action)
		}
		if r.User == "mallory" {
			return `{"error":{"name":"BannedError","message":"go away","code":4500}}`
		}
		return `{}`
	})
	env := newMWEnv(t, `
middleware:
  handshake:
    - hook: {url: "%URL%", timeout: 2s}
`, be.URL, nil)
	exp := time.Now().Add(time.Hour).Unix()
	ok := dialWS(t, env.addr)
	ok.handshake(env.token(jwt.MapClaims{"sub": "alice", "exp": exp}))

	c := dialWS(t, env.addr)
	c.send(`{"event":"#handshake","data":{"authToken":"` + env.token(jwt.MapClaims{"sub": "mallory", "exp": exp}) + `"},"cid":1}`)
	c.expect(`{"rid":1,"error":{"message":"go away","name":"BannedError","statusCode":4500}}`)
	c.expectClose(4500)
}

func TestMWHandshakeWSCheck(t *testing.T) {
	be := backend(t, func(r hookRequest) string {
		if r.Action != "handshake_ws" {
			t.Errorf("action %q", r.Action)
		}
		return `{"error":{"message":"not today","status":401}}`
	})
	env := newMWEnv(t, `
middleware:
  handshake:
    - cidr: {deny: ["203.0.113.0/24"], error: {status: 401}}
    - origins: ["https://app.example.com"]
    - hook: {url: "%URL%", timeout: 2s, actions: [handshakeWS]}
`, be.URL, nil)
	bad := &net.TCPAddr{IP: net.ParseIP("203.0.113.9"), Port: 1}
	if _, st, reason := env.e.CheckUpgrade(bad, "", nil, "/socketcluster/", time.Second); st != 401 || !strings.Contains(reason, "203.0.113.9") {
		t.Fatalf("cidr: %d %q", st, reason)
	}
	good := &net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 1}
	if _, st, _ := env.e.CheckUpgrade(good, "https://evil.example", nil, "/socketcluster/", time.Second); st != 403 {
		t.Fatalf("origin: %d", st)
	}
	if _, st, reason := env.e.CheckUpgrade(good, "https://app.example.com", nil, "/socketcluster/?a=1", time.Second); st != 401 || reason != "not today" {
		t.Fatalf("hook: %d %q", st, reason)
	}
}

func TestMWPublishOutFilteredForOneSocket(t *testing.T) {
	be := backend(t, func(r hookRequest) string {
		if r.Action != "publish_out" {
			t.Errorf("action %q", r.Action)
		}
		if r.User == "bob" {
			return `{"error":{"message":"not for bob"}}`
		}
		return `{}`
	})
	env := newMWEnv(t, `
middleware:
  outbound:
    - hook: {url: "%URL%", timeout: 2s, channels: ["secret/*"]}
`, be.URL, nil)
	exp := time.Now().Add(time.Hour).Unix()
	alice, bob := dialWS(t, env.addr), dialWS(t, env.addr)
	alice.handshake(env.token(jwt.MapClaims{"sub": "alice", "exp": exp}))
	bob.handshake(env.token(jwt.MapClaims{"sub": "bob", "exp": exp}))
	for _, c := range []*wsClient{alice, bob} {
		c.send(`[{"event":"#subscribe","data":{"channel":"secret/1"},"cid":2},{"event":"#subscribe","data":{"channel":"open"},"cid":3}]`)
		c.expect(`{"rid":2}`)
		c.expect(`{"rid":3}`)
	}
	env.e.Deliver("secret/1", []byte(`"s"`), 1)
	alice.expect(`{"event":"#publish","data":{"channel":"secret/1","data":"s"}}`)
	waitFor(t, 2*time.Second, "bob's publishOut denied", func() bool { return env.e.Stats().Counters["middleware_denied"] == 1 })
	// Channels the hook does not cover take the frame-once path for both.
	env.e.Deliver("open", []byte(`"o"`), 2)
	alice.expect(`{"event":"#publish","data":{"channel":"open","data":"o"}}`)
	bob.expect(`{"event":"#publish","data":{"channel":"open","data":"o"}}`)
}

// TestMWRateFloodKeepsCalmSocketFast: a socket flooding publishes is
// throttled by a per-socket rate while a calm socket on the same worker keeps
// answering quickly.
func TestMWRateFloodKeepsCalmSocketFast(t *testing.T) {
	env := newMWEnv(t, `
middleware:
  inbound:
    - rate: {per_socket: 50/s, burst: 50, actions: [publishIn]}
`, "", nil)
	flood, calm := dialWS(t, env.addr), dialWS(t, env.addr)
	flood.handshake("")
	calm.handshake("")
	const n = 2000
	// Transmit publishes: a denied one gets no answer, so the flooder's
	// own receive queue is not what is being measured.
	flooded := make(chan error, 1)
	go func() {
		frame := []byte(`{"event":"#publish","data":{"channel":"flood","data":1}}`)
		for range n {
			if err := wsutil.WriteClientText(flood.c, frame); err != nil {
				flooded <- err
				return
			}
		}
		flooded <- nil
	}()
	var worst time.Duration
	for i := range 20 {
		start := time.Now()
		calm.send(`{"event":"#publish","data":{"channel":"calm","data":1},"cid":` + itoa(i+2) + `}`)
		calm.expect(`{"rid":` + itoa(i+2) + `}`)
		worst = max(worst, time.Since(start))
	}
	if err := <-flooded; err != nil {
		t.Fatalf("flooding socket: %v", err)
	}
	denied := func() int64 { return env.e.Stats().Counters["middleware.inbound[0].rate.denied"] }
	waitFor(t, 10*time.Second, "the flood to be processed", func() bool {
		return denied()+env.e.Stats().Counters["middleware.inbound[0].rate.allowed"] >= n+20
	})
	if d := denied(); d < n/2 {
		t.Fatalf("only %d of %d flood publishes were limited", d, n)
	}
	if worst > 500*time.Millisecond {
		t.Fatalf("calm socket's worst publish round trip %v", worst)
	}
	t.Logf("calm worst round trip %v; %d of %d flood publishes limited", worst, denied(), n)
}

func itoa(i int) string { return strconv.Itoa(i) }

// slowSetup subscribes a reading and a non-reading socket to channel.
func slowSetup(t *testing.T, env *wsEnv, channel string) (slow, fast *wsClient) {
	slow, fast = dialWS(t, env.addr), dialWS(t, env.addr)
	for _, c := range []*wsClient{slow, fast} {
		c.handshake("")
		c.send(`{"event":"#subscribe","data":{"channel":"` + channel + `"},"cid":2}`)
		c.expect(`{"rid":2}`)
	}
	return slow, fast
}

// floodUntil delivers numbered 64 KiB messages to channel, paced on fast,
// until cond holds; it returns how many were sent.
func floodUntil(t *testing.T, env *wsEnv, fast *wsClient, channel string, cond func() bool) int {
	t.Helper()
	pad := strings.Repeat("x", 64<<10)
	sent := 0
	for ; sent < 3000 && !cond(); sent++ {
		env.e.Deliver(channel, []byte(`{"n":`+itoa(sent)+`,"pad":"`+pad+`"}`), uint64(sent))
		if _, err := fast.recvWithin(10 * time.Second); err != nil {
			t.Fatalf("fast subscriber: %v", err)
		}
	}
	if !cond() {
		t.Fatalf("condition not reached after %d messages", sent)
	}
	return sent
}

// drainNumbers reads slow's publishes until it sees message last, and
// returns the message numbers it got.
func drainNumbers(t *testing.T, c *wsClient, last int) []int {
	t.Helper()
	var got []int
	for range 10000 {
		r := c.recvData()
		// Frames are {"event":"#publish","data":{"channel":..,"data":{"n":N,"pad":..}}}.
		i := strings.Index(r, `"n":`)
		j := strings.Index(r, `,"pad"`)
		if i < 0 || j < i {
			t.Fatalf("frame %.80s", r)
		}
		n, err := strconv.Atoi(r[i+4 : j])
		if err != nil {
			t.Fatalf("frame %.80s: %v", r, err)
		}
		got = append(got, n)
		if n == last {
			return got
		}
	}
	t.Fatal("last message never came")
	return nil
}

func TestMWSlowConsumerDropOldest(t *testing.T) {
	env := newMWEnv(t, `
channels:
  - match: "feed/**"
    slow_consumer: drop_oldest
`, "", func(p *configs.Protocol) {
		p.PingInterval = configs.Duration(time.Hour)
		p.PingTimeout = configs.Duration(2 * time.Hour)
	})
	slow, fast := slowSetup(t, env, "feed/a")
	sent := floodUntil(t, env, fast, "feed/a", func() bool { return env.e.Stats().Counters["slow_consumer_drops"] >= 10 })
	if n := env.e.Stats().Counters["slow_consumer_closes"]; n != 0 {
		t.Fatalf("slow consumer closed under drop_oldest (%d)", n)
	}
	got := drainNumbers(t, slow, sent-1)
	// In order, nothing duplicated, the newest kept, some dropped.
	for i := 1; i < len(got); i++ {
		if got[i] <= got[i-1] {
			t.Fatalf("out of order: %v", got)
		}
	}
	if len(got) >= sent {
		t.Fatalf("got %d of %d: nothing dropped", len(got), sent)
	}
}

func TestMWSlowConsumerLatest(t *testing.T) {
	env := newMWEnv(t, `
channels:
  - match: "ticker/*"
    slow_consumer: latest
`, "", func(p *configs.Protocol) {
		p.PingInterval = configs.Duration(time.Hour)
		p.PingTimeout = configs.Duration(2 * time.Hour)
	})
	slow, fast := slowSetup(t, env, "ticker/x")
	sent := floodUntil(t, env, fast, "ticker/x", func() bool { return env.e.Stats().Counters["slow_consumer_conflated"] >= 10 })
	if n := env.e.Stats().Counters["slow_consumer_closes"]; n != 0 {
		t.Fatalf("slow consumer closed under latest (%d)", n)
	}
	got := drainNumbers(t, slow, sent-1)
	if len(got) >= sent {
		t.Fatalf("got %d of %d: nothing conflated", len(got), sent)
	}
}

func TestMWReloadSwapsRulesKeepsConnection(t *testing.T) {
	child, _, addr := startChild(t, func(c *configs.Config) {
		c.Middleware.Inbound = []map[string]any{{"channels": []any{map[string]any{"match": "a/*", "subscribe": "deny"}}}}
	})
	c := dialWS(t, addr)
	c.handshake("")
	c.send(`{"event":"#subscribe","data":{"channel":"a/1"},"cid":2}`)
	c.expect(`{"rid":2,"error":{"message":"Cannot subscribe to a/1","name":"ForbiddenError"}}`)

	cfg := configs.Default()
	cfg.Worker.GoMaxProcs = 0
	cfg.Middleware.Inbound = []map[string]any{{"channels": []any{map[string]any{"match": "b/*", "subscribe": "deny"}}}}
	js, _ := json.Marshal(cfg)
	if err := child.Reload(context.Background(), js); err != nil {
		t.Fatal(err)
	}
	c.send(`{"event":"#subscribe","data":{"channel":"a/1"},"cid":3}`)
	c.expect(`{"rid":3}`)
	c.send(`{"event":"#subscribe","data":{"channel":"b/1"},"cid":4}`)
	c.expect(`{"rid":4,"error":{"message":"Cannot subscribe to b/1","name":"ForbiddenError"}}`)

	// A config the middleware cannot compile changes nothing.
	cfg.Middleware.Inbound = []map[string]any{{"nonsense": 1}}
	js, _ = json.Marshal(cfg)
	if err := child.Reload(context.Background(), js); err == nil {
		t.Fatal("a bad config reloaded")
	}
	c.send(`{"event":"#subscribe","data":{"channel":"b/2"},"cid":5}`)
	c.expect(`{"rid":5,"error":{"message":"Cannot subscribe to b/2","name":"ForbiddenError"}}`)
}

func TestMWStartFailsOnBadMiddleware(t *testing.T) {
	cfg := configs.Default()
	cfg.Middleware.Inbound = []map[string]any{{"rate": map[string]any{"per_socket": "lots"}}}
	js, _ := json.Marshal(cfg)
	c := New(nil)
	_, err := c.Start(context.Background(), control.StartParams{Role: control.RoleWorker, Name: "w", Index: 1, Config: js, RunDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "middleware.inbound[0].rate") {
		t.Fatalf("Start: %v", err)
	}
}

// TestMWPluginStage runs client publishes through the example go-plugin
// middleware (examples/audit-plugin), built by the test.
func TestMWPluginStage(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "audit")
	if out, err := exec.Command("go", "build", "-o", bin, "../examples/audit-plugin").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	env := newMWEnv(t, `
middleware:
  inbound:
    - plugin: {path: %URL%, stages: [publishIn], timeout: 5s}
`, bin, nil)
	c := dialWS(t, env.addr)
	c.handshake("")
	c.send(`[{"event":"#subscribe","data":{"channel":"chat/1"},"cid":2},{"event":"#publish","data":{"channel":"chat/1","data":{"text":"hello"}},"cid":3},{"event":"#publish","data":{"channel":"chat/1","data":{"text":"badword!"}},"cid":4},{"event":"#publish","data":{"channel":"chat/1","data":2},"cid":5}]`)
	c.expect(`{"rid":2}`)
	// In order, though each publish waits for the plugin.
	c.expect(`{"event":"#publish","data":{"channel":"chat/1","data":{"text":"hello"}}}`)
	c.expect(`{"rid":3}`)
	c.expect(`{"rid":4,"error":{"message":"Publishing to chat/1 was refused: the message contains a banned word","name":"BannedWordError"}}`)
	c.expect(`{"event":"#publish","data":{"channel":"chat/1","data":2}}`)
	c.expect(`{"rid":5}`)
}

func TestMWConnLimitPerUser(t *testing.T) {
	env := newMWEnv(t, `
middleware:
  handshake:
    - conn_limit: {per_user: 1}
`, "", nil)
	tok := env.token(jwt.MapClaims{"sub": "alice", "exp": time.Now().Add(time.Hour).Unix()})
	a := dialWS(t, env.addr)
	a.handshake(tok)
	b := dialWS(t, env.addr)
	b.send(`{"event":"#handshake","data":{"authToken":"` + tok + `"},"cid":1}`)
	b.expect(`{"rid":1,"error":{"message":"Too many connections","name":"ConnectionLimitError","statusCode":4008}}`)
	b.expectClose(4008)
	// Once alice's first socket is gone, she may connect again.
	a.c.Close()
	waitFor(t, 5*time.Second, "the first socket to close", func() bool { return env.e.Len() == 0 })
	c := dialWS(t, env.addr)
	c.handshake(tok)
}

// TestMWConnLimitPerUserConcurrent: a user's handshakes that are all
// checked before any of them is accepted (a slow connect hook after the
// rule keeps them undecided) count each other: per_user: 2 lets exactly two
// of five through.
func TestMWConnLimitPerUserConcurrent(t *testing.T) {
	be := backend(t, func(r hookRequest) string {
		time.Sleep(300 * time.Millisecond)
		return `{}`
	})
	env := newMWEnv(t, `
middleware:
  handshake:
    - conn_limit: {per_user: 2}
    - hook: {url: "%URL%", timeout: 2s, actions: [connect]}
`, be.URL, nil)
	tok := env.token(jwt.MapClaims{"sub": "dave", "exp": time.Now().Add(time.Hour).Unix()})
	clients := make([]*wsClient, 5)
	for i := range clients {
		clients[i] = dialWS(t, env.addr)
		clients[i].send(`{"event":"#handshake","data":{"authToken":"` + tok + `"},"cid":1}`)
	}
	accepted := 0
	for i, c := range clients {
		r := c.recv()
		switch {
		case strings.HasPrefix(r, `{"rid":1,"data":{"id":"`):
			accepted++
		case r == `{"rid":1,"error":{"message":"Too many connections","name":"ConnectionLimitError","statusCode":4008}}`:
		default:
			t.Fatalf("client %d: %s", i, r)
		}
	}
	if accepted != 2 {
		t.Fatalf("%d of 5 concurrent handshakes of one user accepted with per_user: 2", accepted)
	}
}

// TestMWConnectHookIdentity: a connect hook that returns a token makes the
// socket authenticated with it and pushes it with #setAuthToken.
func TestMWConnectHookIdentity(t *testing.T) {
	var tok string
	be := backend(t, func(r hookRequest) string {
		return `{"result":{"user":"carol","token":"` + tok + `"}}`
	})
	env := newMWEnv(t, `
middleware:
  handshake:
    - hook: {url: "%URL%", timeout: 2s}
  inbound:
    - channels:
        - match: "user/{sub}/**"
          subscribe: {require: claim}
`, be.URL, nil)
	tok = env.token(jwt.MapClaims{"sub": "carol", "exp": time.Now().Add(time.Hour).Unix()})
	c := dialWS(t, env.addr)
	if r := c.handshake(""); !strings.HasSuffix(r, `"isAuthenticated":true}}`) {
		t.Fatalf("handshake %s", r)
	}
	c.expect(`{"event":"#setAuthToken","data":{"token":"` + tok + `"}}`)
	c.send(`[{"event":"#subscribe","data":{"channel":"user/carol/inbox"},"cid":2},{"event":"#subscribe","data":{"channel":"user/dave/inbox"},"cid":3}]`)
	c.expect(`{"rid":2}`)
	c.expect(`{"rid":3,"error":{"message":"Cannot subscribe to user/dave/inbox","name":"ForbiddenError"}}`)
}

func TestMWReloadAuthKeys(t *testing.T) {
	dir := t.TempDir()
	k1, k2 := filepath.Join(dir, "k1"), filepath.Join(dir, "k2")
	for f, key := range map[string]string{k1: "first-secret-0123456789abcdef0123", k2: "second-secret-0123456789abcdef012"} {
		if err := os.WriteFile(f, []byte(key+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	child, _, addr := startChild(t, func(c *configs.Config) { c.Auth.JWT.KeyFile = k1 })
	claims := jwt.MapClaims{"sub": "alice", "exp": time.Now().Add(time.Hour).Unix()}
	tok2, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte("second-secret-0123456789abcdef012"))
	if err != nil {
		t.Fatal(err)
	}
	c := dialWS(t, addr)
	c.handshake("")
	c.send(`{"event":"#authenticate","data":"` + tok2 + `","cid":2}`)
	if r := c.recvData(); !strings.Contains(r, `"AuthTokenInvalidError"`) {
		t.Fatalf("old key accepted the new token: %s", r)
	}
	c.expect(`{"event":"#removeAuthToken"}`)
	cfg := configs.Default()
	cfg.Worker.GoMaxProcs = 0
	cfg.Auth.JWT.KeyFile = k2
	js, _ := json.Marshal(cfg)
	if err := child.Reload(context.Background(), js); err != nil {
		t.Fatal(err)
	}
	// Same connection, new key.
	c.send(`{"event":"#authenticate","data":"` + tok2 + `","cid":3}`)
	c.expect(`{"rid":3,"data":{"isAuthenticated":true,"authError":null}}`)
}

// TestMWOrderUnderVaryingHookDelays: subscribes go to a hook that answers
// after varying delays while invokes are decided at once; every response
// still comes back in the order the client sent the packets.
func TestMWOrderUnderVaryingHookDelays(t *testing.T) {
	var n atomic.Int64
	be := backend(t, func(r hookRequest) string {
		// A varying delay without randomness: 0–4 ms by call number.
		time.Sleep(time.Duration(n.Add(1)%5) * time.Millisecond)
		if strings.HasSuffix(r.Channel, "7") {
			return `{"error":{"name":"SevenError","message":"no sevens"}}`
		}
		return `{}`
	})
	env := newMWEnv(t, `
middleware:
  inbound:
    - rate: {per_socket: 100000/s, actions: [invoke]}
    - hook: {url: "%URL%", timeout: 5s, actions: [subscribe]}
`, be.URL, nil)
	c := dialWS(t, env.addr)
	c.handshake("")
	const total = 200
	var want []string
	for frame := 0; frame < total/10; frame++ {
		var b strings.Builder
		b.WriteByte('[')
		for k := range 10 {
			i := frame*10 + k
			cid := itoa(i + 2)
			if k > 0 {
				b.WriteByte(',')
			}
			if i%3 == 0 {
				b.WriteString(`{"event":"proc","cid":` + cid + `}`)
				want = append(want, `{"rid":`+cid+`,"error":{"message":"No handler for procedure proc","name":"UnknownProcedureError"}}`)
				continue
			}
			ch := "c" + itoa(i)
			b.WriteString(`{"event":"#subscribe","data":{"channel":"` + ch + `"},"cid":` + cid + `}`)
			if strings.HasSuffix(ch, "7") {
				want = append(want, `{"rid":`+cid+`,"error":{"message":"no sevens","name":"SevenError"}}`)
			} else {
				want = append(want, `{"rid":`+cid+`}`)
			}
		}
		b.WriteByte(']')
		c.send(b.String())
	}
	for _, w := range want {
		c.expect(w)
	}
}

// upgradeStatus sends a WebSocket upgrade request and returns the HTTP
// status line and body of the answer.
func upgradeStatus(t *testing.T, addr, origin string) (int, string) {
	t.Helper()
	st, body, conn := upgradeOpen(t, addr, origin)
	conn.Close()
	return st, body
}

// upgradeOpen sends a WebSocket upgrade request and reads the answer; the
// connection stays open (a 101 leaves a WebSocket that sent nothing yet).
func upgradeOpen(t *testing.T, addr, origin string) (int, string, net.Conn) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	req := "GET /socketcluster/ HTTP/1.1\r\nHost: " + addr + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
	if origin != "" {
		req += "Origin: " + origin + "\r\n"
	}
	if _, err := io.WriteString(conn, req+"\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("reading the upgrade answer: %v", err)
	}
	var body []byte
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ = io.ReadAll(io.LimitReader(resp.Body, 4096))
	}
	_ = conn.SetDeadline(time.Time{})
	return resp.StatusCode, string(body), conn
}

// TestMWHandshakeWSOverHTTP: handshakeWS rules refuse real upgrades with
// their HTTP status (a cidr deny with 401, a connect hook's 403) before any
// WebSocket exists; upgrades the rules allow still work.
func TestMWHandshakeWSOverHTTP(t *testing.T) {
	denyAll := newMWEnv(t, `
middleware:
  handshake:
    - cidr: {deny: ["127.0.0.0/8"], error: {status: 401}}
`, "", nil)
	if st, body := upgradeStatus(t, denyAll.addr, ""); st != 401 || !strings.Contains(body, "Connections from 127.0.0.1 are not allowed") {
		t.Fatalf("cidr deny: %d %q", st, body)
	}
	if denyAll.e.Len() != 0 {
		t.Fatal("a refused upgrade opened a session")
	}

	be := backend(t, func(r hookRequest) string {
		if r.Action != "handshake_ws" {
			t.Errorf("action %q", r.Action)
		}
		if r.Origin == "https://bad.example" {
			return `{"error":{"name":"NoEntry","message":"hook says no","status":403}}`
		}
		return `{}`
	})
	hooked := newMWEnv(t, `
middleware:
  handshake:
    - hook: {url: "%URL%", timeout: 2s, actions: [handshakeWS]}
`, be.URL, nil)
	if st, body := upgradeStatus(t, hooked.addr, "https://bad.example"); st != 403 || !strings.Contains(body, "hook says no") {
		t.Fatalf("hook deny: %d %q", st, body)
	}
	c := dialWS(t, hooked.addr)
	c.handshake("")
}

// TestMWConnectHookSeesUpgradeHeaders: a handshakeSC hook with
// forward_headers gets the upgrade request's headers (kept from the upgrade
// until the #handshake is decided).
func TestMWConnectHookSeesUpgradeHeaders(t *testing.T) {
	be := backend(t, func(r hookRequest) string {
		if r.Action == "connect" && r.Headers["X-Tenant"] != "acme" {
			return `{"error":{"name":"TenantError","message":"tenant missing"}}`
		}
		return `{}`
	})
	env := newMWEnv(t, `
middleware:
  handshake:
    - hook: {url: "%URL%", timeout: 2s, forward_headers: [X-Tenant]}
`, be.URL, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d := ws.Dialer{Header: ws.HandshakeHeaderHTTP(http.Header{"X-Tenant": []string{"acme"}})}
	conn, _, _, err := d.Dial(ctx, "ws://"+env.addr+"/socketcluster/")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	(&wsClient{t: t, c: conn}).handshake("")

	c := dialWS(t, env.addr) // no X-Tenant
	c.send(`{"event":"#handshake","data":{"authToken":null},"cid":1}`)
	c.expect(`{"rid":1,"error":{"message":"tenant missing","name":"TenantError","statusCode":4008}}`)
	c.expectClose(4008)
}

// TestMWHandshakeRateAndConnLimitPerIP: handshakes_per_ip and conn_limit
// per_ip refuse upgrades with 429.
func TestMWHandshakeRateAndConnLimitPerIP(t *testing.T) {
	rate := newMWEnv(t, `
middleware:
  handshake:
    - rate: {handshakes_per_ip: 2/m}
`, "", nil)
	dialWS(t, rate.addr).handshake("")
	dialWS(t, rate.addr).handshake("")
	if st, body := upgradeStatus(t, rate.addr, ""); st != 429 || !strings.Contains(body, "Too many") {
		t.Fatalf("third handshake in a minute: %d %q", st, body)
	}

	limit := newMWEnv(t, `
middleware:
  handshake:
    - conn_limit: {per_ip: 1}
`, "", nil)
	dialWS(t, limit.addr).handshake("")
	if st, body := upgradeStatus(t, limit.addr, ""); st != 429 || !strings.Contains(body, "Too many connections") {
		t.Fatalf("second connection: %d %q", st, body)
	}
}

// TestMWConnLimitCountsHandshakesUnderWay: conn_limit per_ip counts the
// sockets of an address from the upgrade on, not from their #handshake:
// WebSockets that upgraded and sent nothing yet fill the limit, so a burst
// of connects cannot pass it because none had finished its handshake. A
// place comes back when such a socket goes away.
func TestMWConnLimitCountsHandshakesUnderWay(t *testing.T) {
	env := newMWEnv(t, `
middleware:
  handshake:
    - conn_limit: {per_ip: 3}
`, "", nil)
	var open []net.Conn
	for i := range 3 {
		st, body, conn := upgradeOpen(t, env.addr, "")
		if st != http.StatusSwitchingProtocols {
			t.Fatalf("upgrade %d: %d %q", i, st, body)
		}
		open = append(open, conn)
	}
	if st, body := upgradeStatus(t, env.addr, ""); st != 429 || !strings.Contains(body, "Too many connections") {
		t.Fatalf("fourth upgrade while three handshakes are under way: %d %q", st, body)
	}
	open[0].Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, body, _ := upgradeOpen(t, env.addr, "")
		if st == http.StatusSwitchingProtocols {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the closed socket's place never came back: %d %q", st, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The new socket took the place that came back: the limit still holds.
	if st, _ := upgradeStatus(t, env.addr, ""); st != 429 {
		t.Fatalf("an upgrade passed with 3 sockets open: %d", st)
	}
}

// TestMWSlowUpgradeHookIsBounded: a handshakeWS hook whose backend does not
// answer holds the upgrade for at most the rule's timeout, then 503.
func TestMWSlowUpgradeHookIsBounded(t *testing.T) {
	release := make(chan struct{})
	be := backend(t, func(r hookRequest) string { <-release; return `{}` })
	defer close(release) // before the backend's Close (cleanups run later)
	env := newMWEnv(t, `
middleware:
  handshake:
    - hook: {url: "%URL%", timeout: 200ms, actions: [handshakeWS]}
`, be.URL, nil)
	start := time.Now()
	st, body := upgradeStatus(t, env.addr, "")
	if el := time.Since(start); st != 503 || !strings.Contains(body, "could not process") || el > 3*time.Second {
		t.Fatalf("slow hook: %d %q after %v", st, body, el)
	}
}

// TestMWPublishOutRewriteForOneSocket: a publishOut hook that rewrites the
// data for one receiver: that socket gets its own frame, the other the shared one.
func TestMWPublishOutRewriteForOneSocket(t *testing.T) {
	be := backend(t, func(r hookRequest) string {
		if r.User == "bob" {
			return `{"result":{"data":"***"}}`
		}
		return `{}`
	})
	env := newMWEnv(t, `
middleware:
  outbound:
    - hook: {url: "%URL%", timeout: 2s}
`, be.URL, nil)
	exp := time.Now().Add(time.Hour).Unix()
	alice, bob := dialWS(t, env.addr), dialWS(t, env.addr)
	alice.handshake(env.token(jwt.MapClaims{"sub": "alice", "exp": exp}))
	bob.handshake(env.token(jwt.MapClaims{"sub": "bob", "exp": exp}))
	for _, c := range []*wsClient{alice, bob} {
		c.send(`{"event":"#subscribe","data":{"channel":"room"},"cid":2}`)
		c.expect(`{"rid":2}`)
	}
	env.e.Deliver("room", []byte(`"secret"`), 1)
	alice.expect(`{"event":"#publish","data":{"channel":"room","data":"secret"}}`)
	bob.expect(`{"event":"#publish","data":{"channel":"room","data":"***"}}`)
}

// pluginPIDs lists the processes running the binary at path.
func pluginPIDs(t *testing.T, path string) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe")); err == nil && exe == path {
			pids = append(pids, pid)
		}
	}
	return pids
}

// TestMWPluginProcessLifecycle: a worker starts its plugin once at Start,
// uses it for client publishes, and kills it on Stop.
func TestMWPluginProcessLifecycle(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "audit")
	if out, err := exec.Command("go", "build", "-o", bin, "../examples/audit-plugin").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	child, _, addr := startChild(t, func(c *configs.Config) {
		c.Middleware.Inbound = []map[string]any{{"plugin": map[string]any{"path": bin, "stages": []any{"publishIn"}, "timeout": "5s"}}}
	})
	if n := len(pluginPIDs(t, bin)); n != 1 {
		t.Fatalf("%d plugin processes after Start, want 1", n)
	}
	c := dialWS(t, addr)
	c.handshake("")
	c.send(`{"event":"#publish","data":{"channel":"chat","data":"some badword"},"cid":2}`)
	c.expect(`{"rid":2,"error":{"message":"Publishing to chat was refused: the message contains a banned word","name":"BannedWordError"}}`)
	if n := len(pluginPIDs(t, bin)); n != 1 {
		t.Fatalf("%d plugin processes after use, want 1", n)
	}
	c.c.Close() // a client that does not answer the close would hold Stop
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := child.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the plugin process to end", func() bool { return len(pluginPIDs(t, bin)) == 0 })
}

// TestMWReloadRotatesJWKS: auth.jwt.jwks_file is read again on reload, so
// a key added to the set verifies tokens on a live connection, and a key
// removed from it no longer does.
func TestMWReloadRotatesJWKS(t *testing.T) {
	pubA, privA, _ := ed25519.GenerateKey(rand.Reader)
	pubB, privB, _ := ed25519.GenerateKey(rand.Reader)
	path := filepath.Join(t.TempDir(), "jwks.json")
	writeSet := func(keys map[string]ed25519.PublicKey) {
		var list []map[string]string
		for kid, k := range keys {
			list = append(list, map[string]string{"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": base64.RawURLEncoding.EncodeToString(k)})
		}
		b, _ := json.Marshal(map[string]any{"keys": list})
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	sign := func(kid string, key ed25519.PrivateKey) string {
		tk := jwt.NewWithClaims(jwt.SigningMethodEdDSA, jwt.MapClaims{"sub": "alice", "exp": time.Now().Add(time.Hour).Unix()})
		tk.Header["kid"] = kid
		s, err := tk.SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	writeSet(map[string]ed25519.PublicKey{"a": pubA})
	setKeys := func(c *configs.Config) {
		c.Auth.JWT.Algorithms = []string{"EdDSA"}
		c.Auth.JWT.JWKSFile = path
	}
	child, _, addr := startChild(t, setKeys)
	tokA, tokB := sign("a", privA), sign("b", privB)
	c := dialWS(t, addr)
	c.handshake("")
	c.send(`{"event":"#authenticate","data":"` + tokA + `","cid":2}`)
	c.expect(`{"rid":2,"data":{"isAuthenticated":true,"authError":null}}`)
	c.send(`{"event":"#authenticate","data":"` + tokB + `","cid":3}`)
	if r := c.recvData(); !strings.Contains(r, `unknown signing key`) {
		t.Fatalf("key b before it is in the set: %s", r)
	}
	c.expect(`{"event":"#removeAuthToken"}`)

	writeSet(map[string]ed25519.PublicKey{"b": pubB}) // a rotated out, b in
	cfg := configs.Default()
	cfg.Worker.GoMaxProcs = 0
	setKeys(&cfg)
	js, _ := json.Marshal(cfg)
	if err := child.Reload(context.Background(), js); err != nil {
		t.Fatal(err)
	}
	c.send(`{"event":"#authenticate","data":"` + tokB + `","cid":4}`)
	c.expect(`{"rid":4,"data":{"isAuthenticated":true,"authError":null}}`)
	c.send(`{"event":"#authenticate","data":"` + tokA + `","cid":5}`)
	if r := c.recvData(); !strings.Contains(r, `unknown signing key`) {
		t.Fatalf("key a after it left the set: %s", r)
	}
}
