package middleware

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shoalhq/shoal/configs"
)

// fakeCounter is a ConnCounter: entries per key, with "other workers'"
// sockets added directly, and an error to fail Count.
type fakeCounter struct {
	mu     sync.Mutex
	m      map[string]map[string]bool
	err    error
	counts int
}

func newFakeCounter() *fakeCounter { return &fakeCounter{m: map[string]map[string]bool{}} }

func (f *fakeCounter) Join(key, conn string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.m[key] == nil {
		f.m[key] = map[string]bool{}
	}
	f.m[key][conn] = true
}

func (f *fakeCounter) Leave(key, conn string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.m[key], conn)
	if len(f.m[key]) == 0 {
		delete(f.m, key)
	}
}

func (f *fakeCounter) Count(_ context.Context, key string) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.counts++
	if f.err != nil {
		return 0, f.err
	}
	return len(f.m[key]), nil
}

func (f *fakeCounter) keys() map[string]int {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]int{}
	for k, v := range f.m {
		out[k] = len(v)
	}
	return out
}

func (f *fakeCounter) setErr(err error) {
	f.mu.Lock()
	f.err = err
	f.mu.Unlock()
}

func (f *fakeCounter) queries() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.counts
}

func TestConnLimitClusterTable(t *testing.T) {
	const yml = `
middleware:
  handshake:
    - conn_limit: {per_ip: 2, per_user: 2%s}
`
	type remote struct{ key, conn string }
	cases := []struct {
		name    string
		scope   string
		remote  []remote // sockets on other workers
		local   []*Socket
		in      Input
		wantOK  bool
		status  int
		closeCd int
	}{
		{name: "user under the limit", remote: []remote{{"user/alice", "w2-1"}},
			in: Input{Action: HandshakeSC, Socket: user("n", "10.0.0.9", "alice", nil)}, wantOK: true},
		{name: "user at the limit across workers", remote: []remote{{"user/alice", "w2-1"}, {"user/alice", "w3-1"}},
			in: Input{Action: HandshakeSC, Socket: user("n", "10.0.0.9", "alice", nil)}, closeCd: DefaultCloseCode},
		{name: "user at the limit, one local one remote", remote: []remote{{"user/alice", "w2-1"}},
			local: []*Socket{user("l1", "10.0.0.8", "alice", nil)},
			in:    Input{Action: HandshakeSC, Socket: user("n", "10.0.0.9", "alice", nil)}, closeCd: DefaultCloseCode},
		{name: "other user", remote: []remote{{"user/alice", "w2-1"}, {"user/alice", "w3-1"}},
			in: Input{Action: HandshakeSC, Socket: user("n", "10.0.0.9", "bob", nil)}, wantOK: true},
		{name: "anonymous is not counted per user", remote: []remote{{"user/", "x"}, {"user/", "y"}},
			in: Input{Action: HandshakeSC, Socket: anon("n", "10.0.0.9")}, wantOK: true},
		{name: "ip at the limit across workers", remote: []remote{{"ip/10.0.0.1", "w2-1"}, {"ip/10.0.0.1", "w3-1"}},
			in: Input{Action: HandshakeWS, RemoteIP: ip("10.0.0.1")}, status: 429},
		{name: "ip under the limit", remote: []remote{{"ip/10.0.0.1", "w2-1"}},
			in: Input{Action: HandshakeWS, RemoteIP: ip("10.0.0.1")}, wantOK: true},
		{name: "ipv4-mapped address is the same key", remote: []remote{{"ip/10.0.0.1", "w2-1"}, {"ip/10.0.0.1", "w3-1"}},
			in: Input{Action: HandshakeWS, RemoteIP: ip("::ffff:10.0.0.1")}, status: 429},
		{name: "scope worker ignores other workers", scope: "worker",
			remote: []remote{{"user/alice", "w2-1"}, {"user/alice", "w3-1"}},
			in:     Input{Action: HandshakeSC, Socket: user("n", "10.0.0.9", "alice", nil)}, wantOK: true},
		{name: "scope worker still counts its own", scope: "worker",
			local: []*Socket{user("l1", "10.0.0.8", "alice", nil), user("l2", "10.0.0.8", "alice", nil)},
			in:    Input{Action: HandshakeSC, Socket: user("n", "10.0.0.9", "alice", nil)}, closeCd: DefaultCloseCode},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			extra := ""
			if tc.scope != "" {
				extra = ", scope: " + tc.scope
			}
			c := load(t, strings.Replace(yml, "%s", extra, 1), Options{})
			fc := newFakeCounter()
			c.SetConnCounter(fc)
			for _, r := range tc.remote {
				fc.Join(r.key, r.conn)
			}
			for _, s := range tc.local {
				c.Open(s)
			}
			d := decide(c, tc.in)
			if tc.wantOK {
				if d.Verdict != Allow {
					t.Fatalf("denied: %+v", d)
				}
			} else {
				if d.Verdict != Deny || d.Error == nil || d.Error.Name != "ConnectionLimitError" {
					t.Fatalf("not denied: %+v", d)
				}
				if d.HTTPStatus != tc.status && tc.status != 0 || d.CloseCode != tc.closeCd && tc.closeCd != 0 {
					t.Fatalf("decision %+v, want status %d close %d", d, tc.status, tc.closeCd)
				}
			}
			if tc.scope == "worker" && fc.queries() != 0 {
				t.Fatalf("scope worker asked the counter %d times", fc.queries())
			}
			for _, s := range tc.local {
				c.Close(s)
			}
		})
	}
}

// TestConnLimitClusterLifecycle: Open joins the keys, UserChanged moves the
// user key, Close leaves; a socket re-authenticating as itself does not
// count twice; a reloaded chain keeps the counter, and one without the
// rule still leaves what was joined.
func TestConnLimitClusterLifecycle(t *testing.T) {
	c := load(t, `
middleware:
  handshake:
    - conn_limit: {per_ip: 5, per_user: 1}
  inbound:
    - conn_limit: {per_user: 1}
`, Options{})
	if !c.WantsConnCounter() {
		t.Fatal("chain with a cluster rule does not want a counter")
	}
	fc := newFakeCounter()
	c.SetConnCounter(fc)
	c.SetConnCounter(newFakeCounter()) // ignored: the first stays
	if c.WantsConnCounter() {
		t.Fatal("still wants a counter")
	}
	a := user("a", "10.0.0.1", "alice", nil)
	c.Open(a)
	c.Open(a) // twice is harmless
	want := map[string]int{"ip/10.0.0.1": 1, "user/alice": 1}
	if got := fc.keys(); !equalCounts(got, want) {
		t.Fatalf("after open %v, want %v", got, want)
	}
	if d := decide(c, Input{Action: Authenticate, Socket: a}); d.Verdict != Allow {
		t.Fatalf("re-auth as herself: %+v", d)
	}
	b := anon("b", "10.0.0.2")
	c.Open(b)
	b2 := *b
	b2.UserID, b2.Authenticated = "alice", true
	if d := decide(c, Input{Action: Authenticate, Socket: &b2}); d.Verdict != Deny {
		t.Fatalf("b as alice: %+v", d)
	}
	b.UserID, b.Authenticated = "bob", true
	c.UserChanged(b)
	want = map[string]int{"ip/10.0.0.1": 1, "ip/10.0.0.2": 1, "user/alice": 1, "user/bob": 1}
	if got := fc.keys(); !equalCounts(got, want) {
		t.Fatalf("after bob %v, want %v", got, want)
	}
	b.UserID, b.Authenticated = "", false
	c.UserChanged(b)
	delete(want, "user/bob")
	if got := fc.keys(); !equalCounts(got, want) {
		t.Fatalf("after deauth %v, want %v", got, want)
	}

	// Reload to a chain without conn_limit: the counter is kept, a's
	// entries are left on Close.
	cfg, err := configs.Load([]byte("middleware:\n  handshake:\n    - cidr: {deny: [192.0.2.0/24]}\n"), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c2, err := CompileWith(cfg, Options{Previous: c})
	if err != nil {
		t.Fatal(err)
	}
	if c2.WantsConnCounter() {
		t.Fatal("chain without the rule wants a counter")
	}
	c2.Close(a)
	c2.Close(b)
	if got := fc.keys(); len(got) != 0 {
		t.Fatalf("entries left: %v", got)
	}
}

func equalCounts(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// TestConnLimitClusterUnavailable: a failing count falls back to the
// worker's own count (fail open to the per-worker limit) and is counted.
func TestConnLimitClusterUnavailable(t *testing.T) {
	c := load(t, "middleware:\n  handshake:\n    - conn_limit: {per_user: 1, timeout: 50ms}\n", Options{})
	fc := newFakeCounter()
	c.SetConnCounter(fc)
	fc.Join("user/alice", "elsewhere")
	fc.setErr(errors.New("no brokers"))
	hs := func(s *Socket) Decision { return decide(c, Input{Action: HandshakeSC, Socket: s}) }
	if d := hs(user("n1", "10.0.0.1", "alice", nil)); d.Verdict != Allow {
		t.Fatalf("broker down, no local socket: %+v", d)
	}
	if n := c.ConnLimitUnavailable(); n != 1 {
		t.Fatalf("unavailable %d, want 1", n)
	}
	l := user("l", "10.0.0.1", "alice", nil)
	c.Open(l)
	if d := hs(user("n2", "10.0.0.1", "alice", nil)); d.Verdict != Deny {
		t.Fatalf("broker down, local socket at the limit: %+v", d)
	}
	fc.setErr(nil)
	c.Close(l)
	if d := hs(user("n3", "10.0.0.1", "alice", nil)); d.Verdict != Deny {
		t.Fatalf("broker back, remote socket at the limit: %+v", d)
	}
	if n := c.ConnLimitUnavailable(); n != 2 {
		t.Fatalf("unavailable %d, want 2", n)
	}
}

// blockingCounter's Count waits for its context: the rule's timeout.
type blockingCounter struct{ fakeCounter }

func (b *blockingCounter) Count(ctx context.Context, _ string) (int, error) {
	<-ctx.Done()
	return 0, ctx.Err()
}

// TestConnLimitClusterAsync: with a callback, Run does not block on the
// count; a slow counter times out and the rule falls back.
func TestConnLimitClusterAsync(t *testing.T) {
	c := load(t, "middleware:\n  handshake:\n    - conn_limit: {per_user: 1, timeout: 20ms}\n", Options{})
	fc := newFakeCounter()
	c.SetConnCounter(fc)
	fc.Join("user/alice", "elsewhere")
	got := make(chan Decision, 1)
	in := Input{Action: HandshakeSC, Socket: user("n", "10.0.0.1", "alice", nil)}
	if _, pending := c.Run(&in, func(d Decision) { got <- d }); !pending {
		t.Fatal("cluster count did not go asynchronous")
	}
	select {
	case d := <-got:
		if d.Verdict != Deny {
			t.Fatalf("%+v", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no decision")
	}
	// An anonymous socket needs no count: decided synchronously.
	in = Input{Action: HandshakeSC, Socket: anon("m", "10.0.0.1")}
	if d, pending := c.Run(&in, func(Decision) { t.Error("callback for a synchronous decision") }); pending || d.Verdict != Allow {
		t.Fatalf("anonymous: %+v pending=%v", d, pending)
	}

	c2 := load(t, "middleware:\n  handshake:\n    - conn_limit: {per_user: 1, timeout: 20ms}\n", Options{})
	c2.SetConnCounter(&blockingCounter{})
	start := time.Now()
	if d := decide(c2, Input{Action: HandshakeSC, Socket: user("n", "10.0.0.1", "alice", nil)}); d.Verdict != Allow {
		t.Fatalf("timed-out count: %+v", d)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("count took %v, want about the 20ms timeout", el)
	}
	if c2.ConnLimitUnavailable() != 1 {
		t.Fatal("timeout not counted")
	}
	c.Wait()
}

func TestConnLimitScopeConfig(t *testing.T) {
	bad := []struct{ yml, key, msg string }{
		{"- conn_limit: {per_user: 1, scope: node}", "middleware.handshake[0].conn_limit.scope", "cluster or worker"},
		{"- conn_limit: {per_user: 1, scope: worker, timeout: 1s}", "middleware.handshake[0].conn_limit.timeout", "only with scope: cluster"},
		{"- conn_limit: {per_user: 1, timeout: 0s}", "middleware.handshake[0].conn_limit.timeout", "positive"},
	}
	for _, tc := range bad {
		cfg, err := configs.Load([]byte("middleware:\n  handshake:\n    "+tc.yml+"\n"), "t.yaml")
		if err == nil {
			_, err = CompileWith(cfg, Options{})
		}
		if err == nil || !strings.Contains(err.Error(), tc.key) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: error %v, want %s: %s", tc.yml, err, tc.key, tc.msg)
		}
	}
	c := load(t, "middleware:\n  handshake:\n    - conn_limit: {per_user: 1, scope: worker}\n", Options{})
	if c.WantsConnCounter() {
		t.Fatal("scope worker wants a counter")
	}
}

// reservingCounter is a fakeCounter that also joins and counts in one step
// (ConnReserver), as the brokers' owner does.
type reservingCounter struct{ *fakeCounter }

func (r reservingCounter) Reserve(key, conn string) (func(context.Context) (int, error), error) {
	r.mu.Lock() // count and join in one step, as the owning broker does
	defer r.mu.Unlock()
	others := len(r.m[key])
	if r.m[key] == nil {
		r.m[key] = map[string]bool{}
	}
	r.m[key][conn] = true
	return func(context.Context) (int, error) { return others, nil }, nil
}

// TestConnLimitClusterReservations: two workers' chains share the cluster
// registry. Handshakes under way keep a place in it (under their Hold's
// reservation id), so over both workers exactly per_ip and per_user
// sockets pass, though none has opened; releasing a Hold leaves its
// places, and an opened socket holds one place, not two.
func TestConnLimitClusterReservations(t *testing.T) {
	const yml = `
middleware:
  handshake:
    - conn_limit: {per_ip: 3, per_user: 2}
`
	reg := reservingCounter{newFakeCounter()}
	w1, w2 := load(t, yml, Options{}), load(t, yml, Options{})
	w1.SetConnCounter(reg)
	w2.SetConnCounter(reg)
	var mu sync.Mutex
	var wg sync.WaitGroup
	var kept []*Hold
	for i := range 10 {
		c := w1
		if i%2 == 1 {
			c = w2
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := &Hold{}
			if decide(c, Input{Action: HandshakeWS, RemoteIP: ip("10.0.0.7"), Hold: h}).Verdict == Allow {
				mu.Lock()
				kept = append(kept, h)
				mu.Unlock()
			} else {
				h.Release()
			}
		}()
	}
	wg.Wait()
	if len(kept) != 3 {
		t.Fatalf("%d of 10 handshakes over two workers passed per_ip: 3", len(kept))
	}
	if n := reg.keys()["ip/10.0.0.7"]; n != 3 {
		t.Fatalf("registry holds %d places, want 3", n)
	}
	// One opens on w1 (joined under its id) and gives its reservation back.
	s := anon("s1", "10.0.0.7")
	w1.Open(s)
	kept[0].Release()
	if n := reg.keys()["ip/10.0.0.7"]; n != 3 {
		t.Fatalf("after an open: %d places, want 3", n)
	}
	fourth := &Hold{}
	if d := decide(w2, Input{Action: HandshakeWS, RemoteIP: ip("10.0.0.7"), Hold: fourth}); d.Verdict != Deny {
		t.Fatalf("a fourth socket passed: %+v", d)
	}
	fourth.Release() // the caller releases a refused handshake's Hold
	kept[1].Release()
	kept[2].Release()
	w1.Close(s)
	if n := reg.keys()["ip/10.0.0.7"]; n != 0 {
		t.Fatalf("after every release and close: %d places", n)
	}

	// per_user at handshakeSC, the same way.
	var users []*Hold
	for i := range 3 {
		h := &Hold{}
		d := decide([]*Chain{w1, w2}[i%2], Input{Action: HandshakeSC, Socket: user(fmt.Sprint("u", i), "10.0.1.1", "erin", nil), Hold: h})
		if want := i < 2; (d.Verdict == Allow) != want {
			t.Fatalf("erin's socket %d: %+v", i, d)
		}
		users = append(users, h)
	}
	for _, h := range users {
		h.Release()
	}
	if len(reg.keys()) != 0 {
		t.Fatalf("places left: %v", reg.keys())
	}
}
