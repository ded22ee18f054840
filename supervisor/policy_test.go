package supervisor

import (
	"strings"
	"testing"
	"time"

	"github.com/shoalhq/shoal/configs"
)

func TestPolicyBackoffDoublesAndCaps(t *testing.T) {
	p := Policy{BackoffMin: 100 * time.Millisecond, BackoffMax: time.Second, Crashes: 100, Window: time.Minute, StableAfter: 10 * time.Second}
	var h CrashHistory
	now := time.Unix(1000, 0)
	want := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for i, w := range want {
		d := p.OnCrash(&h, now.Add(time.Duration(i)*time.Millisecond), time.Millisecond)
		if d.GiveUp || d.Delay != w*time.Millisecond {
			t.Fatalf("crash %d: %+v, want delay %dms", i+1, d, w)
		}
	}
}

func TestPolicyStableRunResetsStreak(t *testing.T) {
	p := Policy{BackoffMin: 100 * time.Millisecond, BackoffMax: time.Second, Crashes: 100, Window: time.Minute, StableAfter: 10 * time.Second}
	var h CrashHistory
	now := time.Unix(1000, 0)
	p.OnCrash(&h, now, 0)
	p.OnCrash(&h, now, 0)
	if d := p.OnCrash(&h, now, 0); d.Delay != 400*time.Millisecond {
		t.Fatalf("third quick crash: %v", d.Delay)
	}
	if d := p.OnCrash(&h, now, 11*time.Second); d.Delay != 100*time.Millisecond {
		t.Fatalf("a crash after a stable run starts over at BackoffMin, got %v", d.Delay)
	}
}

func TestPolicyCrashLoopWindow(t *testing.T) {
	p := Policy{BackoffMin: 10 * time.Millisecond, BackoffMax: time.Second, Crashes: 3, Window: time.Minute, StableAfter: time.Hour}
	var h CrashHistory
	t0 := time.Unix(1000, 0)
	if d := p.OnCrash(&h, t0, 0); d.GiveUp || d.Recent != 1 {
		t.Fatalf("1st: %+v", d)
	}
	if d := p.OnCrash(&h, t0.Add(30*time.Second), 0); d.GiveUp || d.Recent != 2 {
		t.Fatalf("2nd: %+v", d)
	}
	// The first crash has left the window: still two, no crash loop.
	if d := p.OnCrash(&h, t0.Add(61*time.Second), 0); d.GiveUp || d.Recent != 2 {
		t.Fatalf("3rd, first one out of the window: %+v", d)
	}
	if d := p.OnCrash(&h, t0.Add(62*time.Second), 0); !d.GiveUp || d.Recent != 3 {
		t.Fatalf("4th: three within a minute must give up: %+v", d)
	}
}

func TestPolicyFromConfig(t *testing.T) {
	p := PolicyFromConfig(configs.Default().Cluster.Restart)
	if p.BackoffMin != 200*time.Millisecond || p.BackoffMax != 30*time.Second || p.Crashes != 5 || p.Window != time.Minute {
		t.Fatalf("defaults: %+v", p)
	}
	// Zeros never mean "restart in a hot loop" or "never a crash loop".
	z := PolicyFromConfig(configs.Restart{})
	if z.BackoffMin < minBackoff || z.BackoffMax < z.BackoffMin || z.Crashes < 1 || z.Window <= 0 {
		t.Fatalf("zero config: %+v", z)
	}
}

func TestStderrRing(t *testing.T) {
	r := newStderrRing()
	for i := 0; i < 100; i++ {
		_, _ = r.Write([]byte(`{"@level":"info","@message":"line"}`))
		_, _ = r.Write([]byte("\n"))
	}
	if rep := r.Report(); strings.Count(rep, "\n") != ringLines-1 || !strings.HasPrefix(rep, "[info] line") {
		t.Fatalf("ring keeps the last %d lines, readable: %q", ringLines, rep)
	}
	_, _ = r.Write([]byte("panic: boom\n\ngoroutine 1 [running]:\n"))
	for i := 0; i < 50; i++ {
		_, _ = r.Write([]byte("main.f()\n"))
	}
	rep := r.Report()
	if !strings.HasPrefix(rep, "panic: boom\n\ngoroutine 1 [running]:") {
		t.Fatalf("a panic longer than the ring must be reported from its start: %q", rep[:80])
	}
}
