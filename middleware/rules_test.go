package middleware

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestPattern(t *testing.T) {
	tests := []struct {
		pat, ch string
		claims  map[string]any // nil: shape only
		want    bool
	}{
		{"chat/*", "chat/a", nil, true},
		{"chat/*", "chat/a/b", nil, false},
		{"chat/*", "chat/", nil, false},
		{"chat/*", "chat", nil, false},
		{"private/**", "private/a", nil, true},
		{"private/**", "private/a/b/c", nil, true},
		{"private/**", "private", nil, false},
		{"private/**", "private/", nil, false},
		{"private/**", "privateer/a", nil, false},
		{"**", "anything/at/all", nil, true},
		{"a/*/c", "a/b/c", nil, true},
		{"a/*/c", "a/b/d", nil, false},
		{"exact", "exact", nil, true},
		{"exact", "exactly", nil, false},
		{"chat.*", "chat.general", nil, true},
		{"chat.*", "chat.", nil, false},
		{"chat.*", "chat.a/b", nil, false},
		{"chat.*/**", "chat.a/b", nil, true},
		{"room-*/x", "room-1/x", nil, true},
		{"room-*/x", "rooms/x", nil, false},
		{"user/{sub}/**", "user/alice/inbox", nil, true},
		{"user/{sub}/**", "user/alice/inbox", map[string]any{"sub": "alice"}, true},
		{"user/{sub}/**", "user/bob/inbox", map[string]any{"sub": "alice"}, false},
		{"user/{sub}/**", "user/alice/inbox", map[string]any{}, false},
		{"user/{sub}/**", "user/42/inbox", map[string]any{"sub": float64(42)}, true},
		{"org/{org}/user/{sub}", "org/x/user/alice", map[string]any{"sub": "alice", "org": "x"}, true},
		{"org/{org}/user/{sub}", "org/y/user/alice", map[string]any{"sub": "alice", "org": "x"}, false},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%s~%s", tc.pat, tc.ch), func(t *testing.T) {
			p, err := compilePattern(tc.pat)
			if err != nil {
				t.Fatal(err)
			}
			if got := p.match(tc.ch, tc.claims, tc.claims != nil); got != tc.want {
				t.Fatalf("match = %v, want %v", got, tc.want)
			}
		})
	}
}

const channelsYAML = `
middleware:
  inbound:
    - channels:
        - match: "private/**"
          subscribe: {require: authenticated}
          error: {name: AuthError, message: "Cannot subscribe to {channel} without authentication"}
        - match: "user/{sub}/**"
          subscribe: {require: claim}
          publish: {require: claim}
        - match: "readonly/**"
          publish: deny
          error: {name: InvalidActionError, message: "Clients cannot publish to {channel}"}
        - match: "admin/*"
          subscribe: {claims: {role: [admin, ops]}}
          publish: {claims: {role: admin}}
        - match: "open/*"
          subscribe: allow
        - match: "quiet/*"
          publish: deny
          error: silent
        - match: "void/*"
          subscribe: deny
          publish: deny
          error: drop
    - max_payload: 16
`

func TestChannels(t *testing.T) {
	c := load(t, channelsYAML, Options{})
	alice := user("s1", "10.0.0.1", "alice", map[string]any{"role": []any{"ops"}})
	root := user("s2", "10.0.0.2", "root", map[string]any{"role": "admin"})
	guest := anon("s3", "10.0.0.3")
	tests := []struct {
		name    string
		act     Action
		sock    *Socket
		channel string
		data    string
		verdict Verdict
		errName string
		errMsg  string
		rule    string
	}{
		{"private anon", Subscribe, guest, "private/x", "", Deny, "AuthError", "Cannot subscribe to private/x without authentication", "inbound[0].channels"},
		{"private user", Subscribe, alice, "private/x", "", Allow, "", "", ""},
		{"private publish has no rule", PublishIn, guest, "private/x", "", Allow, "", "", ""},
		{"own user channel", Subscribe, alice, "user/alice/inbox", "", Allow, "", "", ""},
		{"other user channel", Subscribe, alice, "user/root/inbox", "", Deny, "ForbiddenError", "Cannot subscribe to user/root/inbox", "inbound[0].channels"},
		{"other user publish", PublishIn, alice, "user/root/inbox", "1", Deny, "ForbiddenError", "Cannot publish to user/root/inbox", "inbound[0].channels"},
		{"anon user channel", Subscribe, guest, "user/alice/inbox", "", Deny, "ForbiddenError", "", ""},
		{"readonly publish", PublishIn, alice, "readonly/news", "1", Deny, "InvalidActionError", "Clients cannot publish to readonly/news", ""},
		{"readonly subscribe", Subscribe, guest, "readonly/news", "", Allow, "", "", ""},
		{"claim list any-of", Subscribe, alice, "admin/x", "", Allow, "", "", ""},
		{"claim list publish", PublishIn, alice, "admin/x", "1", Deny, "ForbiddenError", "", ""},
		{"claim scalar", PublishIn, root, "admin/x", "1", Allow, "", "", ""},
		{"claims need auth", Subscribe, guest, "admin/x", "", Deny, "ForbiddenError", "", ""},
		{"explicit allow stops chain", Subscribe, guest, "open/x", strings.Repeat("x", 40), Allow, "", "", "inbound[0].channels"},
		{"no explicit allow: next rule runs", PublishIn, guest, "free/x", `"` + strings.Repeat("x", 40) + `"`, Deny, "PayloadTooLargeError", "The publishIn data is larger than 16 bytes", "inbound[1].max_payload"},
		{"silent", PublishIn, guest, "quiet/x", "1", Deny, "SilentMiddlewareBlockedError", "The publishIn AGAction was blocked by inbound middleware", ""},
		{"drop publish", PublishIn, guest, "void/x", "1", Drop, "ForbiddenError", "", ""},
		{"drop subscribe still answers", Subscribe, guest, "void/x", "", Deny, "ForbiddenError", "", ""},
		{"unmatched", Subscribe, guest, "elsewhere", "", Allow, "", "", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var data []byte
			if tc.data != "" {
				data = []byte(tc.data)
			}
			d := decide(c, Input{Action: tc.act, Socket: tc.sock, Channel: tc.channel, Data: data})
			if d.Verdict != tc.verdict {
				t.Fatalf("verdict %v, want %v (%+v)", d.Verdict, tc.verdict, d)
			}
			if tc.errName != "" && (d.Error == nil || d.Error.Name != tc.errName) {
				t.Fatalf("error %+v, want name %s", d.Error, tc.errName)
			}
			if tc.errMsg != "" && d.Error.Message != tc.errMsg {
				t.Fatalf("message %q, want %q", d.Error.Message, tc.errMsg)
			}
			if tc.rule != "" && d.Rule != tc.rule {
				t.Fatalf("rule %q, want %q", d.Rule, tc.rule)
			}
		})
	}
	// The silent error carries its type, as socketcluster-server's does.
	d := decide(c, Input{Action: PublishIn, Socket: guest, Channel: "quiet/x"})
	if got := string(d.Error.AppendJSON(nil)); got != `{"message":"The publishIn AGAction was blocked by inbound middleware","name":"SilentMiddlewareBlockedError","type":"inbound"}` {
		t.Fatalf("silent error JSON %s", got)
	}
}

func TestCIDR(t *testing.T) {
	c := load(t, `
middleware:
  handshake:
    - cidr: {deny: ["203.0.113.0/24", "2001:db8::/32"], allow: ["10.0.0.0/8", "203.0.113.0/24", "2001:db8::/16", "127.0.0.1"]}
  inbound:
    - cidr: {deny: ["10.9.0.0/16"], error: {name: BannedError, message: "banned {ip}"}}
`, Options{})
	tests := []struct {
		act  Action
		addr string
		want Verdict
	}{
		{HandshakeWS, "10.1.2.3", Allow},
		{HandshakeWS, "::ffff:10.1.2.3", Allow}, // v4-mapped
		{HandshakeWS, "203.0.113.9", Deny},      // deny wins over allow
		{HandshakeWS, "2001:db8::1", Deny},
		{HandshakeWS, "2001:db9::1", Allow},
		{HandshakeWS, "192.0.2.1", Deny}, // not in allow
		{HandshakeWS, "127.0.0.1", Allow},
		{HandshakeWS, "127.0.0.2", Deny},
		{PublishIn, "10.9.1.1", Deny},
		{Invoke, "10.8.1.1", Allow},
	}
	for _, tc := range tests {
		t.Run(tc.act.String()+" "+tc.addr, func(t *testing.T) {
			in := Input{Action: tc.act, RemoteIP: ip(tc.addr)}
			if tc.act != HandshakeWS {
				in.Socket = anon("s", tc.addr)
			}
			d := decide(c, in)
			if d.Verdict != tc.want {
				t.Fatalf("got %v want %v", d.Verdict, tc.want)
			}
			if d.Verdict == Deny && tc.act == HandshakeWS && d.HTTPStatus != 403 {
				t.Fatalf("status %d", d.HTTPStatus)
			}
			if d.Verdict == Deny && tc.act == PublishIn && d.Error.Message != "banned "+tc.addr {
				t.Fatalf("message %q", d.Error.Message)
			}
		})
	}
	// An unknown address cannot pass an allow list.
	if d := decide(c, Input{Action: HandshakeWS}); d.Verdict != Deny {
		t.Fatal("unknown address allowed")
	}
}

func TestOrigins(t *testing.T) {
	c := load(t, `
middleware:
  handshake:
    - origins: ["https://app.example.com", "*.example.org", "localhost:*", "*:8080"]
`, Options{})
	strict := load(t, `
middleware:
  handshake:
    - origins: {allow: ["https://app.example.com"], allow_missing: false, error: {status: 401}}
`, Options{})
	tests := []struct {
		chain  *Chain
		origin string
		want   Verdict
	}{
		{c, "https://app.example.com", Allow},
		{c, "https://APP.example.com", Allow},
		{c, "http://app.example.com", Deny}, // scheme
		{c, "https://evil.com", Deny},
		{c, "https://a.example.org", Allow},
		{c, "https://example.org.evil.com", Deny},
		{c, "http://localhost:3000", Allow},
		{c, "http://other:8080", Allow},
		{c, "http://other:8081", Deny},
		{c, "", Allow},
		{c, "null", Allow},
		{strict, "", Deny},
		{strict, "https://app.example.com", Allow},
		{strict, "https://app.example.com:8443", Allow}, // port omitted in the pattern: any
	}
	for i, tc := range tests {
		t.Run(fmt.Sprintf("%d %s", i, tc.origin), func(t *testing.T) {
			d := decide(tc.chain, Input{Action: HandshakeWS, RemoteIP: ip("1.2.3.4"), Origin: tc.origin})
			if d.Verdict != tc.want {
				t.Fatalf("got %v want %v", d.Verdict, tc.want)
			}
			if d.Verdict == Deny {
				want := 403
				if tc.chain == strict {
					want = 401
				}
				if d.HTTPStatus != want {
					t.Fatalf("status %d want %d", d.HTTPStatus, want)
				}
			}
		})
	}
}

func TestMaxPayload(t *testing.T) {
	c := load(t, `
middleware:
  inbound:
    - max_payload: {bytes: 8, actions: [publishIn, invoke], error: {name: TooBig, message: "{procedure}{channel} too big"}}
  outbound:
    - max_payload: 4
`, Options{})
	tests := []struct {
		name string
		in   Input
		want Verdict
		msg  string
	}{
		{"publish small", Input{Action: PublishIn, Channel: "c", Data: []byte(`"123456"`)}, Allow, ""},
		{"publish at limit", Input{Action: PublishIn, Channel: "c", Data: []byte(`"1234567"`)[:8]}, Allow, ""},
		{"publish big", Input{Action: PublishIn, Channel: "c", Data: []byte(`"1234567890"`)}, Deny, "c too big"},
		{"invoke big", Input{Action: Invoke, Event: "proc", Data: []byte(`"1234567890"`)}, Deny, "proc too big"},
		{"transmit not covered", Input{Action: Transmit, Event: "e", Data: []byte(`"1234567890"`)}, Allow, ""},
		{"outbound big", Input{Action: PublishOut, Channel: "c", Data: []byte(`"1234"`)}, Deny, "The publishOut data is larger than 4 bytes"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.in.Socket = anon("s", "10.0.0.1")
			d := decide(c, tc.in)
			if d.Verdict != tc.want {
				t.Fatalf("got %v want %v", d.Verdict, tc.want)
			}
			if tc.msg != "" && d.Error.Message != tc.msg {
				t.Fatalf("message %q want %q", d.Error.Message, tc.msg)
			}
		})
	}
}

func TestRate(t *testing.T) {
	tests := []struct {
		name  string
		yml   string
		socks []*Socket // sent in turn, one action each, `n` rounds
		act   Action
		n     int
		want  []int // allowed per socket
	}{
		{"per socket burst", "middleware:\n  inbound:\n    - rate: {per_socket: 5/s}\n",
			[]*Socket{anon("a", "10.0.0.1"), anon("b", "10.0.0.1")}, PublishIn, 10, []int{5, 5}},
		{"per socket explicit burst", "middleware:\n  inbound:\n    - rate: {per_socket: 5/s, burst: 2}\n",
			[]*Socket{anon("a", "10.0.0.1")}, Invoke, 10, []int{2}},
		{"per ip shared by sockets", "middleware:\n  inbound:\n    - rate: {per_ip: 6/s}\n",
			[]*Socket{anon("a", "10.0.0.1"), anon("b", "10.0.0.1"), anon("c", "10.0.0.2")}, PublishIn, 10, []int{3, 3, 6}},
		{"per user across ips", "middleware:\n  inbound:\n    - rate: {per_user: 4/m}\n",
			[]*Socket{user("a", "10.0.0.1", "u", nil), user("b", "10.0.0.2", "u", nil), anon("c", "10.0.0.3")}, Subscribe, 10, []int{2, 2, 10}},
		{"actions filter", "middleware:\n  inbound:\n    - rate: {per_socket: 1/s, actions: [subscribe]}\n",
			[]*Socket{anon("a", "10.0.0.1")}, PublishIn, 10, []int{10}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clk := newFakeClock()
			c := load(t, tc.yml, Options{Now: clk.Now})
			got := make([]int, len(tc.socks))
			for range tc.n {
				for i, s := range tc.socks {
					if d := decide(c, Input{Action: tc.act, Socket: s, Channel: "c"}); d.Verdict == Allow {
						got[i]++
					} else if d.Error.Name != "RateLimitError" || d.Error.Message != "Too many "+tc.act.String()+" requests" {
						t.Fatalf("error %+v", d.Error)
					}
				}
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Fatalf("allowed %v, want %v", got, tc.want)
			}
		})
	}
}

func TestRateRefillAndHandshakes(t *testing.T) {
	clk := newFakeClock()
	c := load(t, `
middleware:
  handshake:
    - rate: {handshakes_per_ip: 2/s}
`, Options{Now: clk.Now})
	hs := func(addr string) Verdict {
		return decide(c, Input{Action: HandshakeWS, RemoteIP: ip(addr)}).Verdict
	}
	if first, second := hs("1.1.1.1"), hs("1.1.1.1"); first != Allow || second != Allow {
		t.Fatal("burst refused")
	}
	d := decide(c, Input{Action: HandshakeWS, RemoteIP: ip("1.1.1.1")})
	if d.Verdict != Deny || d.HTTPStatus != 429 {
		t.Fatalf("third handshake: %+v", d)
	}
	if hs("1.1.1.2") != Allow {
		t.Fatal("other ip refused")
	}
	clk.Advance(500 * time.Millisecond)
	if hs("1.1.1.1") != Allow || hs("1.1.1.1") != Deny {
		t.Fatal("half a second should give one token")
	}
}

func TestRateMemoryBounded(t *testing.T) {
	clk := newFakeClock()
	c := load(t, "middleware:\n  inbound:\n    - rate: {per_ip: 1/s, max_keys: 100}\n", Options{Now: clk.Now})
	r := c.lists[PublishIn][0].r.(*rateRule)
	in := Input{Action: PublishIn, Socket: &Socket{ID: "s"}}
	for i := range 1000 {
		in.Socket.RemoteIP = ip(fmt.Sprintf("10.0.%d.%d", i/256, i%256))
		decide(c, in)
	}
	if n := r.ip.len(); n > 100 {
		t.Fatalf("%d keys kept, max 100", n)
	}
	// Past the cap new keys share the overflow bucket: one token, then no.
	if r.ip.overflow.tokens >= 1 {
		t.Fatal("overflow bucket not used")
	}
	// Idle buckets are full again after 1s and swept.
	clk.Advance(2 * time.Second)
	in.Socket.RemoteIP = ip("192.168.0.1")
	if d := decide(c, in); d.Verdict != Allow {
		t.Fatal("new key refused after the sweep")
	}
	if n := r.ip.len(); n != 1 {
		t.Fatalf("%d keys after the sweep, want 1", n)
	}
}

// TestFloodingSocketIsThrottled: one socket floods, another on the same
// worker (same IP even) sends at its normal pace; only the flooder is held
// back, and the rate of the well-behaved one is untouched.
func TestFloodingSocketIsThrottled(t *testing.T) {
	clk := newFakeClock()
	c := load(t, "middleware:\n  inbound:\n    - rate: {per_socket: 100/s, burst: 200}\n", Options{Now: clk.Now})
	flood := anon("flood", "10.0.0.1")
	calm := anon("calm", "10.0.0.1")
	floodIn := Input{Action: PublishIn, Socket: flood, Channel: "chat/a", Data: []byte(`"x"`)}
	calmIn := Input{Action: PublishIn, Socket: calm, Channel: "chat/a", Data: []byte(`"x"`)}
	var floodOK, calmOK, calmSent int
	// 10 seconds in 10 ms steps: the flooder sends 100 per step (10000/s),
	// the calm socket one per step (100/s, its limit).
	for range 1000 {
		for range 100 {
			if d, _ := c.Run(&floodIn, nil); d.Verdict == Allow {
				floodOK++
			}
		}
		calmSent++
		if d, _ := c.Run(&calmIn, nil); d.Verdict == Allow {
			calmOK++
		}
		clk.Advance(10 * time.Millisecond)
	}
	if calmOK != calmSent {
		t.Fatalf("well-behaved socket lost %d of %d", calmSent-calmOK, calmSent)
	}
	// burst + 10 s × 100/s, give or take the last step.
	if floodOK < 1100 || floodOK > 1201 {
		t.Fatalf("flooder got %d through, want about 1200", floodOK)
	}
	st := c.Stats()[0]
	if st.Denied != uint64(100000-floodOK) || st.Allowed != uint64(floodOK+calmOK) {
		t.Fatalf("stats %+v", st)
	}
}

func TestConnLimit(t *testing.T) {
	c := load(t, `
middleware:
  handshake:
    - conn_limit: {per_ip: 2, per_user: 1, error: {code: 4429}}
  inbound:
    - conn_limit: {per_user: 1}
`, Options{})
	hsWS := func(addr string) Decision { return decide(c, Input{Action: HandshakeWS, RemoteIP: ip(addr)}) }
	a := user("a", "10.0.0.1", "alice", nil)
	b := anon("b", "10.0.0.1")
	if hsWS("10.0.0.1").Verdict != Allow {
		t.Fatal("first refused")
	}
	c.Open(a)
	if hsWS("10.0.0.1").Verdict != Allow {
		t.Fatal("second refused")
	}
	c.Open(b)
	if d := hsWS("10.0.0.1"); d.Verdict != Deny || d.HTTPStatus != 429 || d.Error.Name != "ConnectionLimitError" {
		t.Fatalf("third: %+v", d)
	}
	if hsWS("10.0.0.2").Verdict != Allow {
		t.Fatal("other ip refused")
	}
	// Per user at the SC handshake: alice already has a socket.
	a2 := user("a2", "10.0.0.2", "alice", nil)
	d := decide(c, Input{Action: HandshakeSC, Socket: a2})
	if d.Verdict != Deny || d.CloseCode != 4429 {
		t.Fatalf("second alice: %+v", d)
	}
	if got := string(d.Error.AppendJSON(nil)); got != `{"message":"Too many connections","name":"ConnectionLimitError","statusCode":4429}` {
		t.Fatalf("error JSON %s", got)
	}
	// Re-authenticating as herself does not count twice.
	if d := decide(c, Input{Action: Authenticate, Socket: a}); d.Verdict != Allow {
		t.Fatalf("re-auth: %+v", d)
	}
	// b authenticates as alice: refused by the inbound rule.
	b2 := *b
	b2.UserID, b2.Authenticated = "alice", true
	if d := decide(c, Input{Action: Authenticate, Socket: &b2}); d.Verdict != Deny {
		t.Fatalf("b as alice: %+v", d)
	}
	c.Close(a)
	c.Close(a) // twice is harmless
	if d := decide(c, Input{Action: HandshakeSC, Socket: a2}); d.Verdict != Allow {
		t.Fatalf("after close: %+v", d)
	}
	// UserChanged moves the count.
	b.UserID = "bob"
	c.UserChanged(b)
	if n := c.shared.conns.user["bob"]; n != 1 {
		t.Fatalf("bob has %d", n)
	}
	c.Close(b)
	if len(c.shared.conns.ip) != 0 || len(c.shared.conns.user) != 0 {
		t.Fatalf("counts left: %v %v", c.shared.conns.ip, c.shared.conns.user)
	}
}

func TestHandshakeSCDenyDefaults(t *testing.T) {
	c := load(t, "middleware:\n  handshake:\n    - cidr: {deny: [10.0.0.0/8]}\n    - conn_limit: {per_user: 1}\n", Options{})
	s := user("s", "10.0.0.1", "u", nil)
	c.Open(s)
	d := decide(c, Input{Action: HandshakeSC, Socket: user("t", "11.0.0.1", "u", nil)})
	if d.Verdict != Deny || d.CloseCode != DefaultCloseCode {
		t.Fatalf("%+v", d)
	}
	if got := string(d.Error.AppendJSON(nil)); !strings.Contains(got, `"statusCode":4008`) {
		t.Fatalf("error JSON %s", got)
	}
	c.Close(s)
}

// TestConnLimitHoldsCountHandshakesUnderWay: sockets whose handshake is
// under way keep their place (Hold) from the check until Open, so a burst
// of simultaneous connects from one address or user cannot pass the limit
// because none of them had opened yet.
func TestConnLimitHoldsCountHandshakesUnderWay(t *testing.T) {
	c := load(t, `
middleware:
  handshake:
    - conn_limit: {per_ip: 3, scope: worker}
    - conn_limit: {per_ip: 5, per_user: 2, scope: worker}
`, Options{})
	upgrade := func(h *Hold) Verdict {
		return decide(c, Input{Action: HandshakeWS, RemoteIP: ip("10.0.0.9"), Hold: h}).Verdict
	}
	// Ten concurrent upgrades, none opened yet: exactly three pass.
	holds := make([]*Hold, 10)
	var mu sync.Mutex
	var wg sync.WaitGroup
	passed := 0
	for i := range holds {
		holds[i] = &Hold{}
		wg.Add(1)
		go func(h *Hold) {
			defer wg.Done()
			if upgrade(h) == Allow {
				mu.Lock()
				passed++
				mu.Unlock()
			} else {
				h.Release()
			}
		}(holds[i])
	}
	wg.Wait()
	if passed != 3 {
		t.Fatalf("%d of 10 concurrent upgrades passed per_ip: 3", passed)
	}
	// Both rules checked each socket; each keeps one place, not two.
	if n := c.shared.conns.pendIP[ip("10.0.0.9")]; n != 3 {
		t.Fatalf("%d places held, want 3", n)
	}
	var kept []*Hold
	for _, h := range holds {
		if h.Kept() {
			kept = append(kept, h)
		}
	}
	// One opens (counted, its place given back), one goes away before
	// opening: one new upgrade fits.
	s := anon("s0", "10.0.0.9")
	c.Open(s)
	kept[0].Release()
	kept[1].Release()
	kept[1].Release() // twice is harmless
	if upgrade(&Hold{}) != Allow {
		t.Fatal("refused with 2 of 3 places taken")
	}
	if upgrade(&Hold{}) != Deny {
		t.Fatal("a fourth socket passed")
	}
	// A released Hold keeps nothing, even if a late check runs with it.
	late := &Hold{}
	late.Release()
	c.Close(s)
	if upgrade(late) != Allow || late.Kept() {
		t.Fatal("a released Hold took a place")
	}

	// Per user at handshakeSC, the same way.
	h1, h2 := &Hold{}, &Hold{}
	for i, h := range []*Hold{h1, h2, {}} {
		want := Allow
		if i == 2 {
			want = Deny
		}
		in := Input{Action: HandshakeSC, Socket: user(fmt.Sprint("u", i), "10.0.1.1", "carol", nil), Hold: h}
		if d := decide(c, in); d.Verdict != want {
			t.Fatalf("carol's socket %d: %+v", i, d)
		}
	}
	h1.Release()
	h2.Release()
	if len(c.shared.conns.pendUser) != 0 {
		t.Fatalf("places left: %v", c.shared.conns.pendUser)
	}
}

// WantsHold: only actions a conn_limit rule checks get a Hold, so other
// chains allocate none per connection.
func TestWantsHold(t *testing.T) {
	none := load(t, "middleware:\n  handshake:\n    - cidr: {deny: [\"203.0.113.0/24\"]}\n", Options{})
	hs := load(t, "middleware:\n  handshake:\n    - conn_limit: {per_ip: 5}\n", Options{})
	in := load(t, "middleware:\n  inbound:\n    - conn_limit: {per_user: 5}\n", Options{})
	for _, tc := range []struct {
		c    *Chain
		want [3]bool // HandshakeWS, HandshakeSC, Authenticate
	}{{none, [3]bool{}}, {hs, [3]bool{true, true, false}}, {in, [3]bool{false, false, true}}} {
		for i, a := range []Action{HandshakeWS, HandshakeSC, Authenticate} {
			if got := tc.c.WantsHold(a); got != tc.want[i] {
				t.Errorf("WantsHold(%v) = %v, want %v", a, got, tc.want[i])
			}
		}
	}
}
