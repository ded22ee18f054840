package worker

import (
	"context"
	"fmt"
	"time"

	"github.com/gobwas/ws"

	"github.com/shoalhq/shoal/proto/control"
)

// handoverStep is the interval between two batches of a handover: short
// enough that the reconnects arrive at the other workers as a steady trickle,
// long enough that a batch is more than one socket at realistic counts.
const handoverStep = 50 * time.Millisecond

var _ control.Handoverer = (*Child)(nil)

// Handover drains the worker for a rolling restart. Like Drain it stops
// accepting (the supervisor has already taken the worker out of the
// balancer's rotation), but instead of closing every socket at once with 1001
// — which the official client answers with a 10–20 s back-off — it closes them
// with code (4000: the client reconnects at once) in batches, one every 50 ms,
// spread evenly over window, so the workers that take the clients over see a
// trickle rather than a storm. It returns once every socket is gone, or when
// timeout has passed since the call: then the sockets still open are closed
// at once (the ones that do not finish their close handshake are cut).
// Sockets that arrive during the window (handed over just before the
// listeners closed) are included in the later batches.
func (c *Child) Handover(ctx context.Context, code int, reason string, window, timeout time.Duration) error {
	if code < 1000 || code > 4999 {
		return fmt.Errorf("worker %s: handover: close code %d is not a WebSocket close code", c.name, code)
	}
	c.mu.Lock()
	if !c.started || c.stopped {
		c.mu.Unlock()
		return nil
	}
	c.state = control.StateDraining
	c.closeListenersLocked()
	eng, srv, hooks, name := c.eng, c.srv, c.hooks, c.name
	// Health and Stats keep answering while the sockets close.
	c.mu.Unlock()

	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	if dl, ok := ctx.Deadline(); ok {
		// The batches must be done before the deadline, or the last ones
		// would be closed by Shutdown all at once anyway.
		window = min(window, time.Until(dl)*3/4)
	}
	start := time.Now()
	asked := eng.closeSpread(ctx, ws.StatusCode(code), reason, window, handoverStep)
	c.log.Info("handover: every socket told to reconnect", "sockets", asked, "code", code,
		"window", window, "took", time.Since(start).Round(time.Millisecond))

	// Shutdown waits for the close handshakes of the sockets asked above and
	// closes anything left (HTTP keep-alives, an upgrade still under way)
	// with the same code; at the deadline it cuts what remains.
	if err := srv.Shutdown(ctx, ws.StatusCode(code), reason); err != nil {
		return fmt.Errorf("worker %s: handover: %w", name, err)
	}
	// The sockets are gone: flush their vacated/offline events.
	eng.FlushEvents(ctx)
	if err := hooks.Close(ctx); err != nil {
		return fmt.Errorf("worker %s: handover: flushing webhooks: %w", name, err)
	}
	return nil
}

// closeSpread closes every session with code, in n = ceil(window/step)
// batches one step apart: batch k closes ceil(left/(n-k)) of the sessions not
// closed yet, so the batches stay even when sessions arrive or leave on their
// own meanwhile. It returns how many sessions it closed; it stops early when
// ctx ends (the caller's Shutdown then closes the rest at once).
func (e *Engine) closeSpread(ctx context.Context, code ws.StatusCode, reason string, window, step time.Duration) int {
	n := 1
	if window > step {
		n = int((window + step - 1) / step)
	}
	asked := make(map[*Session]struct{})
	var batch []*Session
	t := time.NewTicker(step)
	defer t.Stop()
	for k := range n { // bounded: n batches
		if k > 0 {
			select {
			case <-ctx.Done():
				return len(asked)
			case <-t.C:
			}
		}
		batch = e.appendOpen(batch[:0], asked)
		take := (len(batch) + (n - k) - 1) / (n - k)
		for _, s := range batch[:take] {
			asked[s] = struct{}{}
			s.close(code, reason)
		}
		clear(batch)
	}
	return len(asked)
}

// appendOpen appends the sessions not in skip (sessions are removed from the
// table when their socket has closed).
func (e *Engine) appendOpen(dst []*Session, skip map[*Session]struct{}) []*Session {
	for i := range e.sessions {
		sh := &e.sessions[i]
		sh.mu.RLock()
		for _, s := range sh.m {
			if _, ok := skip[s]; !ok {
				dst = append(dst, s)
			}
		}
		sh.mu.RUnlock()
	}
	return dst
}
