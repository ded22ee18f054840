package balancer

import (
	"runtime/debug"
	"time"
)

// Returning the handshakes' garbage to the OS once a burst of them is over.
//
// A TLS handshake allocates tens of KB that are garbage as soon as it ends,
// while what a proxied connection keeps is ~3.4 KB (tlsmem.go). After a
// burst of handshakes the heap therefore holds free spans well above the
// live state: with 8,000 idle wss:// connections the balancer's RSS was
// ~1.8 KB per connection above its live heap. Go's background scavenger
// returns only what lies above the GC goal (plus 10%), slowly; a forced
// collection and release once the burst is over brings RSS down to about
// the live heap. It costs one full GC per burst (100 ms of wall time with
// 8,000 connections held, on a loaded machine), so it waits for a burst
// worth amortising it.
const (
	// releaseEvery is how often the balancer checks whether a burst ended.
	releaseEvery = 5 * time.Second
	// releaseAfter is how many TLS connections must have been accepted
	// since the last release.
	releaseAfter = 256
	// releaseQuiet: at most this many accepted in the last interval means
	// the burst is over.
	releaseQuiet = 16
)

// releaseAfterBursts runs on its own goroutine (one per balancer process,
// joined by Stop) while the balancer terminates TLS.
func (c *Child) releaseAfterBursts() {
	defer c.wg.Done()
	t := time.NewTicker(releaseEvery)
	defer t.Stop()
	var last, releasedAt int64
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
		n := c.stats.tlsAccepted.Load()
		if releaseDue(n, last, releasedAt) {
			start := time.Now()
			debug.FreeOSMemory()
			releasedAt = n
			c.log.Debug("returned the handshakes' free heap to the OS", "took", time.Since(start))
		}
		last = n
	}
}

// releaseDue reports whether to release now: n TLS connections accepted so
// far, last at the previous check, releasedAt at the last release.
func releaseDue(n, last, releasedAt int64) bool {
	return n-releasedAt >= releaseAfter && n-last <= releaseQuiet
}
