package middleware

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/shoalhq/shoal/configs"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakeClock is a settable clock for rate limits.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (f *fakeClock) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.t
}

func (f *fakeClock) Advance(d time.Duration) {
	f.mu.Lock()
	f.t = f.t.Add(d)
	f.mu.Unlock()
}

// load parses a config as the product does (so the registered validator
// runs too) and compiles its middleware.
func load(t testing.TB, yml string, o Options) *Chain {
	t.Helper()
	cfg, err := configs.Load([]byte(yml), "test.yaml")
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	c, err := CompileWith(cfg, o)
	if err != nil {
		t.Fatalf("compile: %v", err)
	}
	t.Cleanup(c.CloseIdleConnections)
	return c
}

func ip(s string) netip.Addr { return netip.MustParseAddr(s) }

func anon(id, addr string) *Socket {
	return &Socket{ID: id, RemoteIP: ip(addr)}
}

func user(id, addr, sub string, claims map[string]any) *Socket {
	if claims == nil {
		claims = map[string]any{}
	}
	claims["sub"] = sub
	return &Socket{ID: id, RemoteIP: ip(addr), Authenticated: true, Claims: claims, UserID: sub}
}

// decide runs the chain synchronously.
func decide(c *Chain, in Input) Decision {
	d, _ := c.Run(&in, nil)
	return d
}
