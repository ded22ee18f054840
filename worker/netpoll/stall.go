package netpoll

import "time"

// Inbound flow control. A publish is acknowledged as soon as the broker has
// it, before it is delivered, so a publisher that keeps a window of invokes
// in flight can outrun delivery: the send queues of every subscriber grow
// until they overflow and the slow-consumer policy cuts them off (the
// issue #8 maximum-rate runs lost hundreds of subscribers that way). While
// most open connections have a send queue over a quarter of its bounds
// (the worker as a whole is behind, not one client), read tasks pause
// instead of reading: the publishers' input waits in their sockets (TCP
// pushes back, their acks come later) and the writers catch up. A
// genuinely slow client alone does not make a majority, so it still meets
// the slow-consumer policy; and no connection
// is paused for longer than maxStall in a row (then reads go on for as
// long before the next pause), so a cluster that cannot catch up at all
// falls back to that policy instead of going deaf.

const (
	maxStall  = 250 * time.Millisecond
	stallTick = 5 * time.Millisecond // how often a lasting stall is re-checked
)

// pressured reports whether the send queues are over the pressure mark.
func (s *Server) pressured() bool {
	open := s.open.Load()
	if open <= 0 {
		return false
	}
	return 2*s.deep.Load() > open
}

// stall pauses c's reads if the server is under pressure; it reports
// whether it did (the read task then ends at once). Only open connections
// pause: a closing one must keep reading to see its peer's close frame.
func (s *Server) stall(c *Conn) bool {
	if !s.cfg.FlowControl || !s.pressured() {
		return false
	}
	now := time.Now().UnixNano()
	s.stallMu.Lock()
	defer s.stallMu.Unlock()
	if now < s.noStallUntil {
		return false
	}
	if len(s.stalled) == 0 {
		s.stallSince = now
	} else if now-s.stallSince > int64(maxStall) {
		return false
	}
	c.mu.Lock()
	if c.phase != phaseOpen || c.stalled {
		c.mu.Unlock()
		return false
	}
	c.stalled = true
	c.reading = false
	c.armLocked() // EPOLLOUT if a write waits; not EPOLLIN
	c.unlockAndRun()
	s.stalled = append(s.stalled, c)
	s.nstalled.Store(int32(len(s.stalled)))
	s.stats.stalls.Add(1)
	if !s.stallArmed {
		s.stallArmed = true
		if s.stallTimer == nil {
			s.stallTimer = time.AfterFunc(stallTick, s.checkStalls)
		} else {
			s.stallTimer.Reset(stallTick)
		}
	}
	return true
}

// checkStalls runs every stallTick while connections are paused: it
// releases them when the pressure is gone or the stall is too old. Flushes
// release them earlier, as soon as one finds the pressure gone.
func (s *Server) checkStalls() {
	s.stallMu.Lock()
	if len(s.stalled) == 0 {
		s.stallArmed = false
		s.stallMu.Unlock()
		return
	}
	// Without pressure the timer, rather than a flush, releases them.
	if s.pressured() {
		now := time.Now().UnixNano()
		if now-s.stallSince <= int64(maxStall) {
			s.stallTimer.Reset(stallTick)
			s.stallMu.Unlock()
			return
		}
		// The writers did not catch up within maxStall: read freely for
		// as long, so the cluster is never deaf for good and the
		// slow-consumer policy decides meanwhile.
		s.noStallUntil = now + int64(maxStall)
	}
	s.stallArmed = false
	s.stallMu.Unlock()
	s.releaseStalled()
}

// releaseStalled lets every paused connection read again. Called without
// any Conn.mu held.
func (s *Server) releaseStalled() {
	s.stallMu.Lock()
	list := s.stalled
	s.stalled = nil
	s.nstalled.Store(0)
	s.stallMu.Unlock()
	for _, c := range list {
		c.mu.Lock()
		c.stalled = false
		if c.phase < phaseDead {
			// Whatever arrived meanwhile is read now; with nothing there
			// the task re-arms EPOLLIN.
			c.pendRead = c.pendRead || c.scheduleReadLocked()
		}
		c.unlockAndRun()
	}
}

// stopStalls releases the paused connections and stops the timer (shutdown).
func (s *Server) stopStalls() {
	s.stallMu.Lock()
	if s.stallTimer != nil {
		s.stallTimer.Stop()
	}
	s.stallArmed = false
	s.stallMu.Unlock()
	s.releaseStalled()
}

// Pressure reports how many open connections have a deep send queue (over
// a quarter of its bounds, counted until it is down to an eighth) and how
// many are open. The worker's publisher flow control (worker/hub.go,
// flowState) reads it after each fan-out: two atomic loads.
func (s *Server) Pressure() (deep, open int64) { return s.deep.Load(), s.open.Load() }
