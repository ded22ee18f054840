package worker

import (
	"errors"
	"fmt"
	"time"

	"github.com/shoalhq/shoal/broker/chanopts"
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/middleware"
	"github.com/shoalhq/shoal/proto/sc"
)

// Slow consumers. netpoll bounds each socket's send queue (bytes and
// messages) and refuses a frame that does not fit (ErrQueueFull); what
// happens to a refused publish is the channel's slow_consumer policy
// (channels[].slow_consumer, first matching entry wins):
//
//   - disconnect (default): the socket is closed with CodeSlowConsumer (4100).
//   - drop_oldest: the worker holds the refused publish in a per-socket
//     backlog of at most maxBacklog publishes and hands them to netpoll, in
//     order, as soon as its queue takes frames again. When the backlog is
//     full its oldest publish is dropped (counted in slow_consumer_drops).
//     What netpoll already queued is never dropped: "oldest" is the oldest
//     publish not yet handed to the socket's send queue.
//   - latest: as drop_oldest, but the backlog keeps only the newest publish
//     per channel: a newer one replaces the held one in place (counted in
//     slow_consumer_conflated).
//
// While a socket has a backlog every new publish for it joins the backlog
// (so order is kept); the backlog is retried on each new publish for the
// socket, by a goroutine that lives only while the socket is backed up
// (pumpBacklog), and on every heartbeat tick. Responses and other private frames
// never wait in the backlog: a full queue for those closes the socket (4100).

// maxBacklog bounds the publishes held per socket. Frames are shared with the
// other subscribers (framed once), so a held publish costs a slice header.
const maxBacklog = 256

type slowPolicy uint8

const (
	slowDisconnect slowPolicy = iota
	slowDropOldest
	slowLatest
)

type slowPolicies struct {
	rules []slowRule
}

type slowRule struct {
	pat middleware.ChannelPattern
	pol slowPolicy
}

// SetChannels applies the per-channel settings (slow_consumer policies); on
// reload the new policies apply to the next publish.
func (e *Engine) SetChannels(rules []configs.ChannelRule) error {
	ps := &slowPolicies{}
	for i, r := range rules {
		var pol slowPolicy
		switch r.SlowConsumer {
		case "", "disconnect":
			continue // the default: no entry needed
		case "drop_oldest":
			pol = slowDropOldest
		case "latest":
			pol = slowLatest
		default:
			return fmt.Errorf("channels[%d].slow_consumer: %q is not disconnect, drop_oldest or latest", i, r.SlowConsumer)
		}
		pat, err := middleware.CompileChannelPattern(r.Match)
		if err != nil {
			return fmt.Errorf("channels[%d].match: %w", i, err)
		}
		ps.rules = append(ps.rules, slowRule{pat: pat, pol: pol})
	}
	e.slow.Store(ps)
	e.rules.Store(chanopts.Compile(rules))
	return nil
}

// policyFor returns channel's slow-consumer policy (no allocation).
func (e *Engine) policyFor(channel string) slowPolicy {
	ps := e.slow.Load()
	for i := range ps.rules {
		if ps.rules[i].pat.Match(channel) {
			return ps.rules[i].pol
		}
	}
	return slowDisconnect
}

type heldPublish struct {
	channel string
	frame   []byte
}

// writePublish queues a publish frame for s, applying pol when it does not
// fit. It reports whether the frame was queued or held.
func (e *Engine) writePublish(s *Session, channel string, frame []byte, pol slowPolicy) bool {
	if !s.backlogged.Load() {
		switch err := s.c.WriteFrame(frame); {
		case err == nil:
			return true
		case !errors.Is(err, e.cfg.ErrQueueFull):
			return false // closing
		}
	}
	return e.overflow(s, channel, frame, pol)
}

// overflow applies pol to a publish that s's send queue refused (or that
// must wait behind s's backlog).
func (e *Engine) overflow(s *Session, channel string, frame []byte, pol slowPolicy) bool {
	if pol == slowDisconnect {
		e.slowConsumer(s)
		return false
	}
	s.blMu.Lock()
	defer s.blMu.Unlock()
	if s.flushBacklogLocked() {
		switch err := s.c.WriteFrame(frame); {
		case err == nil:
			return true
		case !errors.Is(err, e.cfg.ErrQueueFull):
			return false
		}
	}
	if pol == slowLatest {
		for i := range s.backlog {
			if s.backlog[i].channel == channel {
				s.backlog[i].frame = frame
				e.stats.slowConflated.Add(1)
				return true
			}
		}
	}
	if len(s.backlog) >= maxBacklog {
		s.backlog[0] = heldPublish{}
		s.backlog = s.backlog[1:]
		e.stats.slowDropped.Add(1)
	}
	s.backlog = append(s.backlog, heldPublish{channel: channel, frame: frame})
	if !s.backlogged.Swap(true) {
		go s.pumpBacklog()
	}
	return true
}

// pumpBacklog retries a socket's backlog until it is empty, the session
// closes or the engine stops. netpoll has no "queue drained" callback, so
// this polls: 1 ms after progress, backing off to 50 ms while the client
// reads nothing. It exists only while the socket is backed up, so idle and
// healthy sockets still cost no goroutine.
func (s *Session) pumpBacklog() {
	const minWait, maxWait = time.Millisecond, 50 * time.Millisecond
	wait := minWait
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-s.e.stop:
			return
		case <-t.C:
		}
		s.blMu.Lock()
		before := len(s.backlog)
		empty := s.flushBacklogLocked()
		progress := len(s.backlog) < before
		s.blMu.Unlock()
		if empty || s.isClosed() {
			return
		}
		if progress {
			wait = minWait
		} else {
			wait = min(wait*2, maxWait)
		}
		t.Reset(wait)
	}
}

// flushBacklogLocked hands held publishes to netpoll until its queue is full
// again; it reports whether the backlog is now empty. Caller holds blMu.
func (s *Session) flushBacklogLocked() bool {
	for len(s.backlog) > 0 {
		if err := s.c.WriteFrame(s.backlog[0].frame); err != nil {
			return false
		}
		s.e.stats.msgsOut.Add(1)
		s.backlog[0] = heldPublish{}
		s.backlog = s.backlog[1:]
	}
	s.backlog = nil
	s.backlogged.Store(false)
	return true
}

// flushBacklog retries the held publishes (heartbeat tick).
func (s *Session) flushBacklog() {
	s.blMu.Lock()
	s.flushBacklogLocked()
	s.blMu.Unlock()
}

// fanoutFiltered is Deliver when outbound (publishOut) rules exist: each
// receiving socket's publish is decided by the chain. An allowed publish
// without rewritten data still gets the shared frame; a rewrite is framed
// for that socket alone. A publishOut hook decides later, on its own
// goroutine: that socket's publish may then arrive after later ones.
func (e *Engine) fanoutFiltered(channel string, data, frame []byte, pol slowPolicy) int {
	chain := e.chain.Load()
	var arr [64]*Session
	subs := e.hub.subscribers(arr[:0], channel)
	n := 0
	for _, s := range subs {
		in := middleware.Input{Action: middleware.PublishOut, Socket: s.ident.Load(), Channel: channel, Data: data}
		d, pending := chain.Run(&in, func(d middleware.Decision) { e.applyPublishOut(s, channel, frame, pol, d) })
		if pending {
			e.stats.mwPending.Add(1)
			continue
		}
		if e.applyPublishOut(s, channel, frame, pol, d) {
			n++
		}
	}
	return n
}

func (e *Engine) applyPublishOut(s *Session, channel string, frame []byte, pol slowPolicy, d middleware.Decision) bool {
	switch d.Verdict {
	case middleware.Deny:
		e.stats.mwDenied.Add(1)
		return false
	case middleware.Drop:
		e.stats.mwDropped.Add(1)
		return false
	}
	if d.Data != nil {
		payload := sc.AppendPublish(nil, channel, d.Data)
		frame = e.cfg.Frame(make([]byte, 0, len(payload)+14), payload)
	}
	return e.writePublish(s, channel, frame, pol)
}
