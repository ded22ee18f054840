package middleware

import (
	"bytes"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/configs"
)

func TestReloadKeepsSharedState(t *testing.T) {
	clk := newFakeClock()
	v1 := `
middleware:
  handshake:
    - conn_limit: {per_ip: 1}
  inbound:
    - rate: {per_ip: 2/s}
    - rate: {per_socket: 3/s}
    - rate: {per_user: 2/s}
`
	c1 := load(t, v1, Options{Now: clk.Now})
	s := user("s", "10.0.0.1", "u", nil)
	c1.Open(s)
	pub := func(c *Chain) Verdict { return decide(c, Input{Action: PublishIn, Socket: s, Channel: "x"}).Verdict }
	// Three publishes in a row: the burst allows two, the third is over.
	if got := []Verdict{pub(c1), pub(c1), pub(c1)}; got[0] != Allow || got[1] != Allow || got[2] != Deny {
		t.Fatalf("per_ip limit not reached: %v", got)
	}

	// Same rules after a new one was inserted above and the user rule changed.
	v2 := `
middleware:
  handshake:
    - conn_limit: {per_ip: 1}
  inbound:
    - max_payload: 1MiB
    - rate: {per_ip: 2/s}
    - rate: {per_socket: 3/s}
    - rate: {per_user: 5/s}
`
	cfg, err := configs.Load([]byte(v2), "v2.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c2, err := CompileWith(cfg, Options{Now: clk.Now, Previous: c1})
	if err != nil {
		t.Fatal(err)
	}
	// The per-IP bucket is the same one: still empty.
	if d := decide(c2, Input{Action: PublishIn, Socket: s, Channel: "x"}); d.Verdict != Deny || d.Rule != "inbound[1].rate" {
		t.Fatalf("after reload: %+v", d)
	}
	// The connection count carried over: the IP is at its limit.
	if d := decide(c2, Input{Action: HandshakeWS, RemoteIP: ip("10.0.0.1")}); d.Verdict != Deny {
		t.Fatalf("conn count lost: %+v", d)
	}
	// Closing through the new chain undoes what the old one counted.
	c2.Close(s)
	if d := decide(c2, Input{Action: HandshakeWS, RemoteIP: ip("10.0.0.1")}); d.Verdict != Allow {
		t.Fatalf("after close: %+v", d)
	}
	// Per-socket buckets start full under the new chain; the changed
	// per-user rule has a fresh store.
	clk.Advance(time.Second)
	r := c2.lists[PublishIn][3].r.(*rateRule)
	if old := c1.lists[PublishIn][2].r.(*rateRule); old.user == r.user {
		t.Fatal("changed rule kept its old store")
	}
	if c1.lists[PublishIn][0].r.(*rateRule).ip != c2.lists[PublishIn][1].r.(*rateRule).ip {
		t.Fatal("unchanged rule lost its store")
	}
}

// syncBuffer is an io.Writer safe for the logger.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestDenyLogIsRateLimited(t *testing.T) {
	clk := newFakeClock()
	var buf syncBuffer
	log := hclog.New(&hclog.LoggerOptions{Output: &buf, JSONFormat: true, Level: hclog.Info})
	c := load(t, "middleware:\n  inbound:\n    - channels:\n        - {match: \"x/*\", publish: deny}\n", Options{Now: clk.Now, Logger: log})
	s := anon("s1", "192.0.2.5")
	for range 100 {
		decide(c, Input{Action: PublishIn, Socket: s, Channel: "x/y"})
	}
	lines := strings.Count(buf.String(), "\n")
	if lines != 20 {
		t.Fatalf("%d lines for 100 denies, want the burst of 20", lines)
	}
	if !strings.Contains(buf.String(), `"rule":"inbound[0].channels"`) || !strings.Contains(buf.String(), `"client":"192.0.2.5"`) {
		t.Fatalf("log lacks rule or client: %s", buf.String())
	}
	clk.Advance(time.Second)
	decide(c, Input{Action: PublishIn, Socket: s, Channel: "x/y"})
	if !strings.Contains(buf.String(), `"suppressed":80`) {
		t.Fatalf("suppressed count missing: %s", buf.String())
	}
	if st := c.Stats()[0]; st.Denied != 101 || st.Allowed != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestNoRules(t *testing.T) {
	c := load(t, "", Options{})
	for a := range numActions {
		if c.HasRules(a) {
			t.Fatalf("%v has rules", a)
		}
		if d := decide(c, Input{Action: a}); d.Verdict != Allow {
			t.Fatalf("%v: %+v", a, d)
		}
	}
}

func BenchmarkPublishInAllowed(b *testing.B) {
	c := load(b, `
middleware:
  inbound:
    - rate: {per_socket: 1000000000/s, per_ip: 1000000000/s, per_user: 1000000000/s}
    - max_payload: 64KiB
    - channels:
        - match: "private/**"
          subscribe: {require: authenticated}
        - match: "user/{sub}/**"
          subscribe: {require: claim}
          publish: {require: claim}
        - match: "readonly/**"
          publish: deny
`, Options{})
	s := user("s1", "10.0.0.1", "alice", nil)
	c.Open(s)
	in := Input{Action: PublishIn, Socket: s, Channel: "user/alice/inbox", Data: []byte(`{"text":"hello"}`)}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if d, _ := c.Run(&in, nil); d.Verdict != Allow {
			b.Fatal(d)
		}
	}
}

func TestDropOnHandshakes(t *testing.T) {
	c := load(t, `
middleware:
  handshake:
    - cidr: {deny: [10.0.0.0/8], error: drop}
`, Options{})
	tests := []struct {
		in   Input
		want Verdict
	}{
		{Input{Action: HandshakeWS, RemoteIP: ip("10.0.0.1")}, Drop},
		{Input{Action: HandshakeWS, RemoteIP: ip("11.0.0.1")}, Allow},
	}
	for _, tc := range tests {
		t.Run(tc.in.RemoteIP.String(), func(t *testing.T) {
			if d := decide(c, tc.in); d.Verdict != tc.want {
				t.Fatalf("%+v", d)
			}
		})
	}
}

// TestConcurrentUse runs many sockets on one chain from several goroutines
// (the race detector checks the shared stores and counts).
func TestConcurrentUse(t *testing.T) {
	c := load(t, `
middleware:
  handshake:
    - conn_limit: {per_ip: 1000, per_user: 1000}
  inbound:
    - rate: {per_socket: 1000/s, per_ip: 100000/s, per_user: 100000/s}
    - channels:
        - {match: "user/{sub}/**", publish: {require: claim}}
`, Options{})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 50 {
				s := user("s", "10.0.0."+string(rune('1'+g)), "u"+string(rune('a'+i%5)), nil)
				c.Open(s)
				in := Input{Action: PublishIn, Socket: s, Channel: "user/" + s.UserID + "/x"}
				for range 20 {
					if d, _ := c.Run(&in, nil); d.Verdict != Allow {
						t.Errorf("denied: %+v", d)
						return
					}
				}
				c.Close(s)
			}
		}()
	}
	wg.Wait()
	if len(c.shared.conns.ip) != 0 || len(c.shared.conns.user) != 0 {
		t.Fatal("counts left after every socket closed")
	}
}

// BenchmarkPublishInChannelsOnly is the common case without rate limits:
// the channel rules alone.
func BenchmarkPublishInChannelsOnly(b *testing.B) {
	c := load(b, `
middleware:
  inbound:
    - channels:
        - {match: "private/**", subscribe: {require: authenticated}}
        - {match: "user/{sub}/**", publish: {require: claim}}
        - {match: "readonly/**", publish: deny}
`, Options{})
	s := user("s1", "10.0.0.1", "alice", nil)
	in := Input{Action: PublishIn, Socket: s, Channel: "user/alice/inbox", Data: []byte(`{"text":"hello"}`)}
	b.ReportAllocs()
	for b.Loop() {
		if d, _ := c.Run(&in, nil); d.Verdict != Allow {
			b.Fatal(d)
		}
	}
}
