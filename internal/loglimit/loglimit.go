// Package loglimit keeps a log line that an outsider or a misconfiguration
// can trigger at will (a port scan, a peer with the wrong secret retrying
// every 250 ms) from flooding the central log: at most Burst lines at once
// and one per Every after that, with the number held back reported on the
// next line let through.
package loglimit

import (
	"sync"
	"time"
)

// Limiter is a token bucket for log lines. The zero value lets nothing
// through; set Every and Burst.
type Limiter struct {
	Every time.Duration // one more line per Every
	Burst int           // lines let through at once

	mu         sync.Mutex
	tokens     float64
	last       time.Time
	started    bool
	suppressed uint64
}

// Allow reports whether a line may be logged now, and how many were held
// back since the last one that was (log it with the line).
func (l *Limiter) Allow(now time.Time) (ok bool, suppressed uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.started {
		l.started, l.tokens, l.last = true, float64(l.Burst), now
	}
	if l.Every > 0 && now.After(l.last) {
		l.tokens = min(float64(l.Burst), l.tokens+float64(now.Sub(l.last))/float64(l.Every))
	}
	if now.After(l.last) {
		l.last = now
	}
	if l.tokens < 1 {
		l.suppressed++
		return false, 0
	}
	l.tokens--
	s := l.suppressed
	l.suppressed = 0
	return true, s
}
