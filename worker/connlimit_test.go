package worker

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
	"github.com/golang-jwt/jwt/v5"

	"github.com/shoalhq/shoal/configs"
)

const connLimitKey = "connlimit-secret-0123456789abcdef"

// startConnLimitPair runs a real broker and two workers whose middleware is
// yml, with HS256 tokens signed by connLimitKey.
func startConnLimitPair(t *testing.T, yml string) (w1, w2 *Child, addr1, addr2 string) {
	t.Helper()
	cfgMW, err := configs.Load([]byte(yml), "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	kf := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(kf, []byte(connLimitKey+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mod := func(c *configs.Config) {
		c.Cluster.Gossip = ""
		c.Middleware = cfgMW.Middleware
		c.Auth.JWT.KeyFile = kf
	}
	topo := startBroker(t)
	w1, _, addr1 = startNamedChild(t, "worker-1", topo, mod)
	w2, _, addr2 = startNamedChild(t, "worker-2", topo, mod)
	// Until a worker's broker link is up its checks fall back to its own
	// count (and count the failure): start once both can ask the broker.
	waitFor(t, 5*time.Second, "the workers' broker links", func() bool {
		return brokerCount(t, w1, "user/nobody") == 0 && brokerCount(t, w2, "user/nobody") == 0
	})
	return w1, w2, addr1, addr2
}

func connLimitToken(t *testing.T, sub string) string {
	t.Helper()
	s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": sub, "exp": time.Now().Add(time.Hour).Unix()}).SignedString([]byte(connLimitKey))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// brokerCount is the count the workers' checks see for a conn_limit key.
func brokerCount(t *testing.T, w *Child, key string) int {
	t.Helper()
	w.mu.Lock()
	bc := w.bc
	w.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	n, err := bc.PresenceCount(ctx, connChannel(key))
	if err != nil {
		return -1
	}
	return n
}

// tryHandshake dials addr and hands a token over: the client when the
// socket was admitted (it stays open), else nil and the close code it got.
func tryHandshake(t *testing.T, addr, tok string) (*wsClient, ws.StatusCode) {
	t.Helper()
	c := dialWS(t, addr)
	c.send(`{"event":"#handshake","data":{"authToken":"` + tok + `"},"cid":1}`)
	r, err := c.recvWithin(5 * time.Second)
	if err != nil {
		var ce wsutil.ClosedError
		if errors.As(err, &ce) {
			return nil, ce.Code
		}
		t.Fatalf("handshake: %v", err)
	}
	if strings.HasPrefix(r, `{"rid":1,"data":{"id":"`) {
		return c, 0
	}
	if !strings.Contains(r, `"name":"ConnectionLimitError"`) {
		t.Fatalf("handshake answer %s", r)
	}
	_, err = c.recvWithin(5 * time.Second)
	var ce wsutil.ClosedError
	if !errors.As(err, &ce) {
		t.Fatalf("after the refusal: %v", err)
	}
	return nil, ce.Code
}

// TestConnLimitClusterPerUser: with per_user: 2, alice's third socket is
// refused whichever worker it reaches, and admitted again once one closes.
func TestConnLimitClusterPerUser(t *testing.T) {
	w1, w2, addr1, addr2 := startConnLimitPair(t, `
middleware:
  handshake:
    - conn_limit: {per_user: 2}
`)
	tok := connLimitToken(t, "alice")
	a1 := dialWS(t, addr1)
	a1.handshake(tok)
	a2 := dialWS(t, addr2)
	a2.handshake(tok)
	waitFor(t, 5*time.Second, "both sockets counted by the broker", func() bool { return brokerCount(t, w1, "user/alice") == 2 })

	// Third socket: refused on either worker (each holds only one).
	for _, addr := range []string{addr1, addr2} {
		if c, code := tryHandshake(t, addr, tok); c != nil || code != 4008 {
			t.Fatalf("third socket on %s: admitted=%v code=%d", addr, c != nil, code)
		}
	}
	// Another user and anonymous sockets are not affected.
	dialWS(t, addr1).handshake(connLimitToken(t, "bob"))
	dialWS(t, addr2).handshake("")

	// alice closes one: a new socket is admitted (after the leave reached
	// the broker), and then the limit holds again.
	a1.c.Close()
	waitFor(t, 5*time.Second, "the closed socket to leave", func() bool { return brokerCount(t, w2, "user/alice") == 1 })
	c, code := tryHandshake(t, addr1, tok)
	if c == nil {
		t.Fatalf("after a close: refused with %d", code)
	}
	waitFor(t, 5*time.Second, "the new socket counted", func() bool { return brokerCount(t, w2, "user/alice") == 2 })
	if c, code := tryHandshake(t, addr2, tok); c != nil || code != 4008 {
		t.Fatalf("at the limit again: admitted=%v code=%d", c != nil, code)
	}
	if n := w1.eng.Chain().ConnLimitUnavailable() + w2.eng.Chain().ConnLimitUnavailable(); n != 0 {
		t.Fatalf("%d count queries failed", n)
	}
}

// TestConnLimitClusterPerIP: per_ip: 2 refuses the third upgrade from the
// same address (HTTP 429) across workers, and admits one after a close.
func TestConnLimitClusterPerIP(t *testing.T) {
	w1, _, addr1, addr2 := startConnLimitPair(t, `
middleware:
  handshake:
    - conn_limit: {per_ip: 2}
`)
	a := dialWS(t, addr1)
	a.handshake("")
	b := dialWS(t, addr2)
	b.handshake("")
	waitFor(t, 5*time.Second, "both sockets counted by the broker", func() bool { return brokerCount(t, w1, "ip/127.0.0.1") == 2 })
	for _, addr := range []string{addr1, addr2} {
		if st, body := upgradeStatus(t, addr, ""); st != 429 || !strings.Contains(body, "Too many connections") {
			t.Fatalf("third connection on %s: %d %q", addr, st, body)
		}
	}
	a.c.Close()
	waitFor(t, 5*time.Second, "the closed socket to leave", func() bool { return brokerCount(t, w1, "ip/127.0.0.1") == 1 })
	dialWS(t, addr2).handshake("")
}

// TestConnLimitClusterCountsHandshakesUnderWay: with scope: cluster, an
// upgrade that has not finished its handshake holds its place in the
// brokers' count too (a reservation joined in the same step as the count),
// so sockets of one address spread over two workers cannot pass per_ip
// before any of them opened. Without reservations each worker would admit
// per_ip of its own (6 here).
func TestConnLimitClusterCountsHandshakesUnderWay(t *testing.T) {
	w1, w2, addr1, addr2 := startConnLimitPair(t, `
middleware:
  handshake:
    - conn_limit: {per_ip: 3}
`)
	var open []net.Conn
	admitted := 0
	for i := range 8 {
		addr := addr1
		if i%2 == 1 {
			addr = addr2
		}
		st, body, conn := upgradeOpen(t, addr, "")
		switch st {
		case http.StatusSwitchingProtocols:
			admitted++
			open = append(open, conn)
		case 429:
		default:
			t.Fatalf("upgrade %d: %d %q", i, st, body)
		}
	}
	if admitted != 3 {
		t.Fatalf("%d upgrades from one address admitted over two workers with per_ip: 3", admitted)
	}
	if n := brokerCount(t, w1, "ip/127.0.0.1"); n != 3 {
		t.Fatalf("the brokers count %d places, want the 3 reservations", n)
	}
	// A socket that goes away gives its place back, on every worker.
	open[0].Close()
	waitFor(t, 5*time.Second, "the closed socket's reservation to leave", func() bool { return brokerCount(t, w2, "ip/127.0.0.1") == 2 })
	c := dialWS(t, addr2)
	c.handshake("")
	waitFor(t, 5*time.Second, "the new socket to hold one place", func() bool { return brokerCount(t, w1, "ip/127.0.0.1") == 3 })
	for _, addr := range []string{addr1, addr2} {
		if st, _ := upgradeStatus(t, addr, ""); st != 429 {
			t.Fatalf("an upgrade on %s passed with 3 places taken: %d", addr, st)
		}
	}
	if n := w1.eng.Chain().ConnLimitUnavailable() + w2.eng.Chain().ConnLimitUnavailable(); n != 0 {
		t.Fatalf("%d count queries failed", n)
	}
}

// TestConnLimitClusterConcurrentAuthenticate: anonymous sockets on two
// workers authenticate as one user at once, each decision held open by a
// slow hook after the rule: per_user: 2 lets exactly two through, because
// each check reserves its place on the broker before the next one counts.
func TestConnLimitClusterConcurrentAuthenticate(t *testing.T) {
	be := backend(t, func(r hookRequest) string {
		time.Sleep(300 * time.Millisecond)
		return `{}`
	})
	_, _, addr1, addr2 := startConnLimitPair(t, `
middleware:
  inbound:
    - conn_limit: {per_user: 2}
    - hook: {url: "`+be.URL+`", timeout: 2s, actions: [authenticate]}
`)
	tok := connLimitToken(t, "frank")
	clients := make([]*wsClient, 5)
	for i := range clients {
		addr := addr1
		if i%2 == 1 {
			addr = addr2
		}
		clients[i] = dialWS(t, addr)
		clients[i].handshake("")
	}
	for _, c := range clients {
		c.send(`{"event":"#authenticate","data":"` + tok + `","cid":2}`)
	}
	accepted := 0
	for i, c := range clients {
		r := c.recv()
		switch {
		case strings.HasPrefix(r, `{"rid":2,"data":{"isAuthenticated":true`):
			accepted++
		case strings.Contains(r, `"isAuthenticated":false`) && strings.Contains(r, "ConnectionLimitError"):
		default:
			t.Fatalf("client %d: %s", i, r)
		}
	}
	if accepted != 2 {
		t.Fatalf("%d of 5 concurrent authentications of one user accepted with per_user: 2", accepted)
	}
}

// TestConnLimitWorkerScope: scope: worker keeps the per-worker count and
// registers nothing with the brokers: with per_user: 1 each worker admits
// one socket of alice.
func TestConnLimitWorkerScope(t *testing.T) {
	w1, _, addr1, addr2 := startConnLimitPair(t, `
middleware:
  handshake:
    - conn_limit: {per_user: 1, scope: worker}
`)
	tok := connLimitToken(t, "alice")
	dialWS(t, addr1).handshake(tok)
	dialWS(t, addr2).handshake(tok) // the other worker does not know
	if c, code := tryHandshake(t, addr1, tok); c != nil || code != 4008 {
		t.Fatalf("second on the same worker: admitted=%v code=%d", c != nil, code)
	}
	if n := brokerCount(t, w1, "user/alice"); n != 0 {
		t.Fatalf("scope worker registered %d entries with the broker", n)
	}
}

func TestConnChannel(t *testing.T) {
	if got := connChannel("user/alice"); got != "#conn/user/alice" {
		t.Fatal(got)
	}
	long := connChannel("user/" + strings.Repeat("x", 2000))
	if len(long) > maxConnChannel || !strings.HasPrefix(long, "#conn/h/") {
		t.Fatalf("long key: %q", long)
	}
}

// TestConnLimitClusterWorkerGone: a worker that stops takes its sockets'
// entries with it (its leaves, or the broker dropping its link's presence),
// so its users can connect to the other worker.
func TestConnLimitClusterWorkerGone(t *testing.T) {
	w1, w2, addr1, addr2 := startConnLimitPair(t, `
middleware:
  handshake:
    - conn_limit: {per_user: 2}
`)
	tok := connLimitToken(t, "alice")
	a1, a2 := dialWS(t, addr1), dialWS(t, addr1)
	a1.handshake(tok)
	a2.handshake(tok)
	waitFor(t, 5*time.Second, "both sockets counted by the broker", func() bool { return brokerCount(t, w2, "user/alice") == 2 })
	if c, code := tryHandshake(t, addr2, tok); c != nil || code != 4008 {
		t.Fatalf("third socket on the other worker: admitted=%v code=%d", c != nil, code)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stopped := make(chan error, 1)
	go func() { stopped <- w1.Stop(ctx) }()
	// The clients answer the worker's close (read until the connection
	// ends), so the graceful stop completes.
	for _, c := range []*wsClient{a1, a2} {
		for range 1000 {
			if _, err := c.recvWithin(5 * time.Second); err != nil {
				break
			}
		}
		c.c.Close()
	}
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the stopped worker's entries to go", func() bool { return brokerCount(t, w2, "user/alice") == 0 })
	dialWS(t, addr2).handshake(tok)
	dialWS(t, addr2).handshake(tok)
	if c, code := tryHandshake(t, addr2, tok); c != nil || code != 4008 {
		t.Fatalf("third socket after the move: admitted=%v code=%d", c != nil, code)
	}
}
