package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shoalhq/shoal/configs"
)

const testKey = "s3cret-key"

type testServer struct {
	*httptest.Server
	fake *fakeBackend
	h    *Handler
	bans *MemoryBans
}

func newTestServer(t *testing.T, key string, mod func(*Config)) *testServer {
	t.Helper()
	fake := &fakeBackend{}
	bans := NewMemoryBans(nil)
	cfg := Config{
		API: configs.API{KeyEnv: "TEST_SHOAL_API_KEY"},
		Getenv: func(name string) string {
			if name == "TEST_SHOAL_API_KEY" {
				return key
			}
			return ""
		},
		Bans: bans,
	}
	if mod != nil {
		mod(&cfg)
	}
	h, err := New(cfg, fake)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle(Prefix, h) // as the worker mounts it
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return &testServer{Server: srv, fake: fake, h: h, bans: bans}
}

// call POSTs body to the method with the test key and decodes the answer.
func (s *testServer) call(t *testing.T, method, body string) (int, map[string]any) {
	t.Helper()
	return s.do(t, http.MethodPost, method, body, map[string]string{"X-API-Key": testKey})
}

func (s *testServer) do(t *testing.T, verb, method, body string, hdr map[string]string) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequest(verb, s.URL+Prefix+method, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := s.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("%s: Content-Type %q, body %s", method, ct, raw)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("%s: answer is not a JSON object: %v: %s", method, err, raw)
	}
	return resp.StatusCode, m
}

// errCode returns the answer's error code and field ("" when no error).
func errCode(m map[string]any) (code, field string) {
	e, _ := m["error"].(map[string]any)
	if e == nil {
		return "", ""
	}
	code, _ = e["code"].(string)
	field, _ = e["field"].(string)
	return code, field
}

func TestAuth(t *testing.T) {
	var compares atomic.Int64
	orig := constantTimeEqual
	constantTimeEqual = func(a, b []byte) bool { compares.Add(1); return orig(a, b) }
	t.Cleanup(func() { constantTimeEqual = orig })

	t.Run("no key configured", func(t *testing.T) {
		s := newTestServer(t, "", nil)
		st, m := s.do(t, "POST", "publish", `{"channel":"a","data":1}`, map[string]string{"X-API-Key": "x"})
		code, _ := errCode(m)
		msg := m["error"].(map[string]any)["message"].(string)
		if st != http.StatusServiceUnavailable || code != CodeKeyNotConfigured || !strings.Contains(msg, "TEST_SHOAL_API_KEY") {
			t.Fatalf("got %d %v", st, m)
		}
		if len(s.fake.pubs()) != 0 {
			t.Fatal("published without a key")
		}
	})
	s := newTestServer(t, testKey, nil)
	cases := []struct {
		name string
		hdr  map[string]string
		want int
	}{
		{"missing", nil, 401},
		{"wrong x-api-key", map[string]string{"X-API-Key": "nope"}, 401},
		{"prefix of key", map[string]string{"X-API-Key": testKey[:4]}, 401},
		{"wrong scheme", map[string]string{"Authorization": "Bearer " + testKey}, 401},
		{"wrong apikey", map[string]string{"Authorization": "apikey nope"}, 401},
		{"right x-api-key", map[string]string{"X-API-Key": testKey}, 200},
		{"right apikey", map[string]string{"Authorization": "apikey " + testKey}, 200},
		{"scheme case-insensitive", map[string]string{"Authorization": "ApiKey " + testKey}, 200},
		{"both right", map[string]string{"Authorization": "apikey " + testKey, "X-API-Key": testKey}, 200},
		{"one of two wrong", map[string]string{"Authorization": "apikey " + testKey, "X-API-Key": "nope"}, 401},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := compares.Load()
			st, m := s.do(t, "POST", "publish", `{"channel":"a","data":1}`, tc.hdr)
			if st != tc.want {
				t.Fatalf("status %d, want %d: %v", st, tc.want, m)
			}
			if st == 401 {
				if c, _ := errCode(m); c != CodeUnauthorized {
					t.Fatalf("code %q", c)
				}
			}
			if len(tc.hdr) > 0 && !strings.HasPrefix(tc.name, "wrong scheme") && compares.Load() == before {
				t.Fatal("the key was not compared with constantTimeEqual")
			}
		})
	}
	if n := len(s.fake.pubs()); n != 4 {
		t.Fatalf("%d publishes went through, want 4 (one per accepted key)", n)
	}
	// Without the key, method names are not revealed either.
	if st, _ := s.do(t, "POST", "nope", `{}`, nil); st != 401 {
		t.Fatalf("unknown method without key: %d", st)
	}
	// SetKey (reload) replaces the key.
	s.h.SetKey("new")
	if st, _ := s.do(t, "POST", "publish", `{"channel":"a","data":1}`, map[string]string{"X-API-Key": testKey}); st != 401 {
		t.Fatalf("old key after SetKey: %d", st)
	}
}

func TestConstantTimeEqual(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want bool
	}{{"abc", "abc", true}, {"abc", "abd", false}, {"abc", "abcd", false}, {"", "x", false}} {
		if got := constantTimeEqual([]byte(tc.a), []byte(tc.b)); got != tc.want {
			t.Errorf("%q vs %q: %v", tc.a, tc.b, got)
		}
	}
}

func TestRequestErrors(t *testing.T) {
	s := newTestServer(t, testKey, func(c *Config) { c.MaxBody = 256 })
	cases := []struct {
		name, method, body string
		status             int
		code, field        string
	}{
		{"unknown method", "nope", `{}`, 404, CodeNotFound, ""},
		{"empty body", "publish", ``, 400, CodeBadRequest, ""},
		{"malformed", "publish", `{"channel":`, 400, CodeBadRequest, ""},
		{"syntax", "publish", `{"channel" "a"}`, 400, CodeBadRequest, ""},
		{"not an object", "publish", `[1,2]`, 400, CodeBadRequest, ""},
		{"trailing", "publish", `{"channel":"a","data":1} {}`, 400, CodeBadRequest, ""},
		{"wrong type", "history", `{"channel":"a","limit":"ten"}`, 400, CodeBadRequest, "limit"},
		{"unknown field", "publish", `{"channel":"a","data":1,"chanel":"b"}`, 400, CodeBadRequest, "chanel"},
		{"missing channel", "publish", `{"data":1}`, 400, CodeBadRequest, "channel"},
		{"missing data", "publish", `{"channel":"a"}`, 400, CodeBadRequest, "data"},
		{"long channel", "publish", `{"channel":"` + strings.Repeat("x", 200) + `","data":1}`, 200, "", ""},
		{"body too large", "publish", `{"channel":"a","data":"` + strings.Repeat("x", 300) + `"}`, 413, CodeBodyTooLarge, ""},
		{"limit range", "history", `{"channel":"a","limit":0}`, 400, CodeBadRequest, "limit"},
		{"bad code", "disconnect", `{"user":"u","code":3000}`, 400, CodeBadRequest, "code"},
		{"broadcast none", "broadcast", `{"channels":[],"data":1}`, 400, CodeBadRequest, "channels"},
		{"broadcast empty name", "broadcast", `{"channels":["a",""],"data":1}`, 400, CodeBadRequest, "channels[1]"},
		{"push both", "push_token", `{"user":"u","token":"t","claims":{}}`, 400, CodeBadRequest, "token"},
		{"push other sub", "push_token", `{"user":"u","claims":{"sub":"v"}}`, 400, CodeBadRequest, "claims"},
		{"ban both", "ban", `{"user":"u","ip":"1.2.3.4"}`, 400, CodeBadRequest, "user"},
		{"ban bad ip", "ban", `{"ip":"1.2.3"}`, 400, CodeBadRequest, "ip"},
		{"ban bad duration", "ban", `{"user":"u","duration":"soon"}`, 400, CodeBadRequest, "duration"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			st, m := s.call(t, tc.method, tc.body)
			code, field := errCode(m)
			if st != tc.status || code != tc.code || field != tc.field {
				t.Fatalf("got %d %q field %q, want %d %q field %q: %v", st, code, field, tc.status, tc.code, tc.field, m)
			}
		})
	}
	t.Run("GET", func(t *testing.T) {
		st, m := s.do(t, "GET", "publish", "", map[string]string{"X-API-Key": testKey})
		if c, _ := errCode(m); st != 405 || c != CodeMethodNotAllowed {
			t.Fatalf("%d %v", st, m)
		}
	})
	t.Run("content type", func(t *testing.T) {
		st, m := s.do(t, "POST", "publish", `{"channel":"a","data":1}`, map[string]string{"X-API-Key": testKey, "Content-Type": "text/plain"})
		if c, _ := errCode(m); st != 415 || c != CodeUnsupportedMedia {
			t.Fatalf("%d %v", st, m)
		}
	})
}

func TestPublish(t *testing.T) {
	s := newTestServer(t, testKey, nil)
	st, m := s.call(t, "publish", `{"channel":"chat/1","data":{"text":"hi"}}`)
	if st != 200 || m["offset"] != 1.0 || m["epoch"] != "ep1" {
		t.Fatalf("%d %v", st, m)
	}
	if p := s.fake.pubs(); len(p) != 1 || p[0] != (fakePub{"chat/1", `{"text":"hi"}`}) {
		t.Fatalf("published %v", p)
	}
	s.fake.mu.Lock()
	s.fake.pubErr = map[string]error{"down": ErrUnavailable, "boom": errors.New("disk on fire")}
	s.fake.mu.Unlock()
	st, m = s.call(t, "publish", `{"channel":"down","data":1}`)
	if c, _ := errCode(m); st != 503 || c != CodeUnavailable {
		t.Fatalf("%d %v", st, m)
	}
	st, m = s.call(t, "publish", `{"channel":"boom","data":1}`)
	if c, _ := errCode(m); st != 500 || c != CodeInternal {
		t.Fatalf("%d %v", st, m)
	}
}

func TestPublishTimeout(t *testing.T) {
	s := newTestServer(t, testKey, func(c *Config) { c.Timeout = 50 * time.Millisecond })
	s.fake.pubGate = make(chan struct{}) // never opened: the backend hangs
	st, m := s.call(t, "publish", `{"channel":"a","data":1}`)
	if c, _ := errCode(m); st != 504 || c != CodeTimeout {
		t.Fatalf("%d %v", st, m)
	}
}

func TestIdempotency(t *testing.T) {
	now := time.Unix(1000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	s := newTestServer(t, testKey, func(c *Config) {
		c.Now = clock
		c.IdempotencyWindow = time.Minute
		c.IdempotencyEntries = 3
	})
	body := `{"channel":"c","data":1,"idempotency_key":"k1"}`
	_, first := s.call(t, "publish", body)
	_, again := s.call(t, "publish", body)
	if first["offset"] != again["offset"] || again["replayed"] != true || first["replayed"] != nil {
		t.Fatalf("first %v, again %v", first, again)
	}
	if n := len(s.fake.pubs()); n != 1 {
		t.Fatalf("published %d times", n)
	}
	// The key is per channel: the same key on another channel publishes.
	if _, m := s.call(t, "publish", `{"channel":"d","data":1,"idempotency_key":"k1"}`); m["replayed"] != nil {
		t.Fatalf("other channel replayed: %v", m)
	}
	// After the window the key publishes again.
	mu.Lock()
	now = now.Add(2 * time.Minute)
	mu.Unlock()
	if _, m := s.call(t, "publish", body); m["replayed"] != nil || m["offset"] == first["offset"] {
		t.Fatalf("after the window: %v", m)
	}
	// The cache stays bounded.
	for i := range 10 {
		s.call(t, "publish", `{"channel":"c","data":1,"idempotency_key":"n`+string(rune('a'+i))+`"}`)
	}
	if n := s.h.idem.len(); n > 3 {
		t.Fatalf("cache holds %d entries, bound 3", n)
	}
	// A failed publish is not remembered: the retry publishes.
	s.fake.mu.Lock()
	s.fake.pubErr = map[string]error{"f": ErrUnavailable}
	s.fake.mu.Unlock()
	if st, _ := s.call(t, "publish", `{"channel":"f","data":1,"idempotency_key":"x"}`); st != 503 {
		t.Fatal(st)
	}
	s.fake.mu.Lock()
	s.fake.pubErr = nil
	s.fake.mu.Unlock()
	if st, m := s.call(t, "publish", `{"channel":"f","data":1,"idempotency_key":"x"}`); st != 200 || m["replayed"] != nil {
		t.Fatalf("%d %v", st, m)
	}
}

// Concurrent requests with one key publish once: the others wait for the
// first result.
func TestIdempotencyConcurrent(t *testing.T) {
	s := newTestServer(t, testKey, nil)
	gate := make(chan struct{})
	s.fake.mu.Lock()
	s.fake.pubGate = gate
	s.fake.mu.Unlock()
	const n = 8
	var wg sync.WaitGroup
	offsets := make([]any, n)
	for i := range n {
		wg.Go(func() {
			_, m := s.call(t, "publish", `{"channel":"c","data":1,"idempotency_key":"same"}`)
			offsets[i] = m["offset"]
		})
	}
	// Wait until the first request holds the key, then let it publish.
	deadline := time.Now().Add(5 * time.Second)
	for s.h.idem.len() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no request reached the cache")
		}
		time.Sleep(time.Millisecond)
	}
	close(gate)
	wg.Wait()
	if p := len(s.fake.pubs()); p != 1 {
		t.Fatalf("published %d times", p)
	}
	for _, o := range offsets {
		if o != 1.0 {
			t.Fatalf("offsets %v", offsets)
		}
	}
}

func TestBroadcast(t *testing.T) {
	s := newTestServer(t, testKey, nil)
	s.fake.pubErr = map[string]error{"b": ErrUnavailable}
	st, m := s.call(t, "broadcast", `{"channels":["a","b","c"],"data":{"x":1}}`)
	if st != 200 {
		t.Fatalf("%d %v", st, m)
	}
	rs := m["responses"].([]any)
	if len(rs) != 3 {
		t.Fatal(rs)
	}
	a, b, c := rs[0].(map[string]any), rs[1].(map[string]any), rs[2].(map[string]any)
	if a["channel"] != "a" || a["offset"] != 1.0 || c["offset"] != 2.0 {
		t.Fatalf("%v", rs)
	}
	if code, _ := errCode(b); code != CodeUnavailable {
		t.Fatalf("b: %v", b)
	}
	if p := s.fake.pubs(); len(p) != 2 || p[0].Channel != "a" || p[1].Channel != "c" {
		t.Fatalf("%v", p)
	}
}

func TestHistory(t *testing.T) {
	s := newTestServer(t, testKey, nil)
	for i := 1; i <= 5; i++ {
		s.fake.history = append(s.fake.history, Publication{Offset: uint64(i), Data: json.RawMessage(`{"n":` + string(rune('0'+i)) + `}`)})
	}
	// Page through with next.
	var got []float64
	body := `{"channel":"h","limit":2}`
	for range 5 { // bounded: 5 publications in pages of 2
		st, m := s.call(t, "history", body)
		if st != 200 || m["offset"] != 5.0 || m["epoch"] != "ep1" {
			t.Fatalf("%d %v", st, m)
		}
		for _, p := range m["publications"].([]any) {
			got = append(got, p.(map[string]any)["offset"].(float64))
		}
		next, ok := m["next"].(map[string]any)
		if !ok {
			break
		}
		nb, _ := json.Marshal(map[string]any{"channel": "h", "limit": 2, "since": next})
		body = string(nb)
	}
	if want := []float64{1, 2, 3, 4, 5}; !equalF(got, want) {
		t.Fatalf("paged %v, want %v", got, want)
	}
	_, m := s.call(t, "history", `{"channel":"h","reverse":true,"limit":2,"since":{"offset":4,"epoch":"ep1"}}`)
	if ps := m["publications"].([]any); len(ps) != 2 || ps[0].(map[string]any)["offset"] != 3.0 {
		t.Fatalf("reverse %v", m)
	}
	st, m := s.call(t, "history", `{"channel":"h","since":{"offset":1,"epoch":"old"}}`)
	if c, _ := errCode(m); st != 409 || c != CodeUnrecoverablePosition {
		t.Fatalf("%d %v", st, m)
	}
	// An empty history is an empty list, never null.
	s.fake.history = nil
	if _, m := s.call(t, "history", `{"channel":"h"}`); m["publications"] == nil {
		t.Fatalf("%v", m)
	}
}

func equalF(a, b []float64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestPresence(t *testing.T) {
	s := newTestServer(t, testKey, nil)
	s.fake.presence = map[string][]ClientInfo{"room": {
		{Client: "c1", User: "alice"}, {Client: "c2", User: "alice"}, {Client: "c3", User: "bob", ConnInfo: json.RawMessage(`{"device":"ios"}`)},
	}}
	st, m := s.call(t, "presence", `{"channel":"room"}`)
	p := m["presence"].(map[string]any)
	if st != 200 || len(p) != 3 || p["c3"].(map[string]any)["conn_info"].(map[string]any)["device"] != "ios" {
		t.Fatalf("%d %v", st, m)
	}
	st, m = s.call(t, "presence_stats", `{"channel":"room"}`)
	if st != 200 || m["num_clients"] != 3.0 || m["num_users"] != 2.0 {
		t.Fatalf("%d %v", st, m)
	}
	st, m = s.call(t, "presence", `{"channel":"nopresence"}`)
	if c, _ := errCode(m); st != 501 || c != CodeNotSupported {
		t.Fatalf("%d %v", st, m)
	}
}

func TestChannels(t *testing.T) {
	s := newTestServer(t, testKey, nil)
	s.fake.channels = []ChannelInfo{{Channel: "chat/1", NumClients: 3}, {Channel: "chat/2", NumClients: 1}}
	st, m := s.call(t, "channels", `{"pattern":"chat/*"}`)
	ch := m["channels"].(map[string]any)
	if st != 200 || len(ch) != 2 || ch["chat/1"].(map[string]any)["num_clients"] != 3.0 {
		t.Fatalf("%d %v", st, m)
	}
	if s.fake.lastPat != "chat/*" {
		t.Fatal(s.fake.lastPat)
	}
	if st, _ := s.call(t, "channels", ``); st != 200 || s.fake.lastPat != "" {
		t.Fatalf("empty body: %d", st)
	}
}

func TestUserActions(t *testing.T) {
	s := newTestServer(t, testKey, nil)
	st, m := s.call(t, "disconnect", `{"user":"alice"}`)
	if st != 200 || m["disconnected"] != 2.0 || s.fake.disc[0] != "alice 4403 Disconnected by the server" {
		t.Fatalf("%d %v %v", st, m, s.fake.disc)
	}
	s.call(t, "disconnect", `{"user":"bob","code":4500,"reason":"bye"}`)
	if s.fake.disc[1] != "bob 4500 bye" {
		t.Fatal(s.fake.disc)
	}
	for _, name := range []string{"unsubscribe", "kick"} {
		st, m = s.call(t, name, `{"user":"alice","channel":"room","reason":"spam"}`)
		if st != 200 || m["unsubscribed"] != 1.0 {
			t.Fatalf("%s: %d %v", name, st, m)
		}
	}
	if len(s.fake.unsub) != 2 || s.fake.unsub[0] != "alice room spam" {
		t.Fatal(s.fake.unsub)
	}
	st, m = s.call(t, "push_token", `{"user":"alice","claims":{"role":"admin"}}`)
	if st != 200 || m["sessions"] != 1.0 {
		t.Fatalf("%d %v", st, m)
	}
	if c := s.fake.tokens[0].Claims; c["sub"] != "alice" || c["role"] != "admin" {
		t.Fatalf("claims %v", c)
	}
	if st, _ := s.call(t, "push_token", `{"user":"alice","token":"eyJ.x.y"}`); st != 200 || s.fake.tokens[1].Token != "eyJ.x.y" {
		t.Fatal(st)
	}
	st, m = s.call(t, "push_token", `{"user":"alice","token":"bad"}`)
	if c, _ := errCode(m); st != 400 || c != CodeBadRequest {
		t.Fatalf("%d %v", st, m)
	}
}

func TestBans(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	s := newTestServer(t, testKey, func(c *Config) { c.Now = clock; c.Bans = NewMemoryBans(clock) })
	bans := s.h.bans.(*MemoryBans)
	st, m := s.call(t, "ban", `{"user":"mallory","duration":"10m","reason":"spam"}`)
	b := m["ban"].(map[string]any)
	if st != 200 || b["user"] != "mallory" || b["expires"] != "2026-01-02T03:14:05Z" || m["disconnected"] != 2.0 {
		t.Fatalf("%d %v", st, m)
	}
	if s.fake.disc[0] != "mallory 4403 spam" {
		t.Fatalf("ban did not disconnect: %v", s.fake.disc)
	}
	st, m = s.call(t, "ban", `{"ip":"203.0.113.7/24"}`)
	if st != 200 || m["ban"].(map[string]any)["ip"] != "203.0.113.0/24" || m["ban"].(map[string]any)["expires"] != nil {
		t.Fatalf("%d %v", st, m)
	}
	if s.fake.discIP[0] != "203.0.113.0/24 4403 Banned" {
		t.Fatal(s.fake.discIP)
	}
	s.call(t, "ban", `{"ip":"::ffff:198.51.100.1"}`)
	if _, ok := bans.Banned("", mustAddr(t, "203.0.113.99")); !ok {
		t.Fatal("CIDR ban not in force")
	}
	if _, ok := bans.Banned("", mustAddr(t, "198.51.100.1")); !ok {
		t.Fatal("mapped IPv4 ban not in force")
	}
	if _, ok := bans.Banned("mallory", mustAddr(t, "192.0.2.1")); !ok {
		t.Fatal("user ban not in force")
	}
	_, m = s.call(t, "bans", ``)
	if l := m["bans"].([]any); len(l) != 3 || l[0].(map[string]any)["user"] != "mallory" {
		t.Fatalf("%v", m)
	}
	// The timed ban expires.
	mu.Lock()
	now = now.Add(11 * time.Minute)
	mu.Unlock()
	if _, ok := bans.Banned("mallory", netipZero); ok {
		t.Fatal("expired ban in force")
	}
	st, m = s.call(t, "unban", `{"ip":"203.0.113.0/24"}`)
	if st != 200 || m["removed"] != true {
		t.Fatalf("%d %v", st, m)
	}
	st, m = s.call(t, "unban", `{"user":"mallory"}`)
	if st != 200 || m["removed"] != false {
		t.Fatalf("expired ban still listed: %d %v", st, m)
	}
	_, m = s.call(t, "bans", `{}`)
	if l := m["bans"].([]any); len(l) != 1 {
		t.Fatalf("%v", m)
	}
}

func TestNoBanStore(t *testing.T) {
	s := newTestServer(t, testKey, func(c *Config) { c.Bans = nil })
	st, m := s.call(t, "ban", `{"user":"u"}`)
	if c, _ := errCode(m); st != 501 || c != CodeNotSupported {
		t.Fatalf("%d %v", st, m)
	}
}

// The handler also works when the worker strips the prefix.
func TestStripPrefix(t *testing.T) {
	s := newTestServer(t, testKey, nil)
	srv := httptest.NewServer(http.StripPrefix("/api/v1", s.h))
	defer srv.Close()
	req, _ := http.NewRequestWithContext(context.Background(), "POST", srv.URL+"/api/v1/publish", bytes.NewReader([]byte(`{"channel":"a","data":1}`)))
	req.Header.Set("X-API-Key", testKey)
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatal(resp.Status)
	}
}

func TestNewNeedsBackend(t *testing.T) {
	if _, err := New(Config{}, nil); err == nil {
		t.Fatal("nil backend accepted")
	}
}
