package supervisor

import (
	"time"

	"github.com/shoalhq/shoal/configs"
)

// Policy is the restart policy as pure arithmetic, so that it can be tested
// without processes: what to do after a child's crash.
type Policy struct {
	BackoffMin  time.Duration // delay before the first restart of a streak
	BackoffMax  time.Duration // the doubling stops here
	Crashes     int           // this many crashes ...
	Window      time.Duration // ... within this window is a crash loop
	StableAfter time.Duration // a child that ran this long before crashing starts a new streak
}

// Defaults for knobs the config leaves at zero. A zero BackoffMin would let a
// child that dies at once spin the CPU, so it is never below minBackoff.
const (
	minBackoff         = 50 * time.Millisecond
	defaultBackoffMin  = 200 * time.Millisecond
	defaultBackoffMax  = 30 * time.Second
	defaultCrashWindow = 60 * time.Second
	defaultStableAfter = 10 * time.Second
)

// PolicyFromConfig resolves cluster.restart into a Policy.
func PolicyFromConfig(r configs.Restart) Policy {
	p := Policy{
		BackoffMin:  r.BackoffMin.D(),
		BackoffMax:  r.BackoffMax.D(),
		Crashes:     r.CrashLoop.Crashes,
		Window:      r.CrashLoop.Window.D(),
		StableAfter: defaultStableAfter,
	}
	if p.BackoffMin <= 0 {
		p.BackoffMin = defaultBackoffMin
	}
	p.BackoffMin = max(p.BackoffMin, minBackoff)
	if p.BackoffMax <= 0 {
		p.BackoffMax = defaultBackoffMax
	}
	p.BackoffMax = max(p.BackoffMax, p.BackoffMin)
	if p.Crashes < 1 {
		p.Crashes = 5
	}
	if p.Window <= 0 {
		p.Window = defaultCrashWindow
	}
	return p
}

// CrashHistory is what the policy remembers about one child. The zero value
// is a child that never crashed.
type CrashHistory struct {
	recent []time.Time // crash times inside the window, oldest first
	streak int         // crashes since the child last ran stably
}

// Decision is the policy's answer to one crash.
type Decision struct {
	Delay  time.Duration // wait this long, then restart
	GiveUp bool          // crash loop: do not restart again
	Recent int           // crashes within the window, this one included
}

// OnCrash records a crash at now of a child that had run for ranFor and
// decides what happens next. Delays double per crash in a streak, from
// BackoffMin up to BackoffMax; a child that ran StableAfter or longer starts a
// new streak. Crashes within Window reaching Crashes is a crash loop.
func (p Policy) OnCrash(h *CrashHistory, now time.Time, ranFor time.Duration) Decision {
	if ranFor >= p.StableAfter {
		h.streak = 0
	}
	cut := now.Add(-p.Window)
	kept := h.recent[:0]
	for _, t := range h.recent {
		if t.After(cut) {
			kept = append(kept, t)
		}
	}
	h.recent = append(kept, now)
	d := Decision{Recent: len(h.recent)}
	if len(h.recent) >= p.Crashes {
		d.GiveUp = true
		return d
	}
	d.Delay = p.backoff(h.streak)
	h.streak++
	return d
}

// backoff is BackoffMin·2^n, capped at BackoffMax.
func (p Policy) backoff(n int) time.Duration {
	d := p.BackoffMin
	for i := 0; i < n && d < p.BackoffMax; i++ { // bounded: stops at the cap
		d *= 2
	}
	return min(d, p.BackoffMax)
}
