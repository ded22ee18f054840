package broker

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shoalhq/shoal/broker/chanopts"
	"github.com/shoalhq/shoal/broker/store"
	"github.com/shoalhq/shoal/proto/link"
)

// History, epochs and recovery (docs/history.md is the user-facing story).
//
// Every channel state has an epoch and offsets that only grow within it. A
// broker that starts serving as owner a history it did not write itself in
// this run — reloaded from its bbolt file after a restart, or received as a
// replica from the previous owner — starts a new epoch on its first own
// publish and remembers the old one with its last offset (prevEpoch,
// prevTop). Offsets continue, so a client holding (old epoch, n ≤ prevTop)
// still recovers; a client holding an offset beyond prevTop saw a message
// this broker never got (not fsynced, or not replicated because it was never
// acknowledged) and is told recovered=false instead of being handed a
// different message under the same number.

// histEntry is one stored message. data's capacity is reused when the ring
// wraps, so a full ring appends without allocating.
type histEntry struct {
	off  uint64
	t    int64
	data []byte
}

// histRing is a bounded circular buffer of ascending offsets.
type histRing struct {
	buf   []histEntry
	start int
	n     int
}

func (h *histRing) at(i int) *histEntry { return &h.buf[(h.start+i)%len(h.buf)] }

// add stores a message. In-order appends (the owner's case) are O(1);
// a replica may receive appends out of order (several publishers' workers
// forward them), which are placed by a bounded backwards walk; duplicates
// are ignored.
func (h *histRing) add(size int, off uint64, t int64, data []byte) {
	if size <= 0 {
		return
	}
	// The buffer grows by doubling up to size, so a channel with a large
	// history size and few messages does not hold size slots.
	if len(h.buf) > size {
		h.resize(size)
	} else if h.n == len(h.buf) && len(h.buf) < size {
		h.resize(min(size, max(8, 2*len(h.buf))))
	}
	if h.n > 0 {
		last := h.at(h.n - 1).off
		if off == last {
			return
		}
		if off < last {
			if off < h.at(0).off && h.n == size {
				return // older than everything kept
			}
			for i := h.n - 1; i >= 0 && h.at(i).off >= off; i-- {
				if h.at(i).off == off {
					return
				}
			}
		}
	}
	var e *histEntry
	if h.n < len(h.buf) {
		e = h.at(h.n)
		h.n++
	} else {
		e = h.at(0)
		h.start = (h.start + 1) % len(h.buf)
	}
	e.off, e.t, e.data = off, t, append(e.data[:0], data...)
	// Bubble an out-of-order append back into place.
	for i := h.n - 1; i > 0 && h.at(i-1).off > h.at(i).off; i-- {
		*h.at(i - 1), *h.at(i) = *h.at(i), *h.at(i - 1)
	}
}

// resize moves the newest min(n, size) entries into a buffer of size slots.
func (h *histRing) resize(size int) {
	nb := make([]histEntry, size)
	keep := min(h.n, size)
	for i := 0; i < keep; i++ {
		nb[i] = *h.at(h.n - keep + i)
	}
	h.buf, h.start, h.n = nb, 0, keep
}

// expire drops messages older than ttl.
func (h *histRing) expire(ttl time.Duration, now int64) {
	if ttl <= 0 {
		return
	}
	cut := now - int64(ttl)
	for h.n > 0 && h.at(0).t < cut {
		h.start = (h.start + 1) % len(h.buf)
		h.n--
	}
}

// first returns the oldest kept offset (0 when empty).
func (h *histRing) first() uint64 {
	if h.n == 0 {
		return 0
	}
	return h.at(0).off
}

// from returns the index of the first entry with offset ≥ off (n if none).
func (h *histRing) from(off uint64) int {
	lo, hi := 0, h.n
	for lo < hi {
		m := (lo + hi) / 2
		if h.at(m).off < off {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo
}

// takeOver starts this broker's own epoch on a history it did not write.
// Called with the shard lock held.
func (s *Server) takeOver(st *chanState) {
	st.prevEpoch, st.prevTop = st.epoch, st.offset
	st.epoch = s.nextEpoch()
	st.foreign = false
}

// recoverable decides whether a subscriber holding (since, epoch) can be
// given exactly what it missed; it returns the first offset to send. Called
// with the shard lock held.
func (s *Server) recoverable(st *chanState, since, epoch uint64, now int64) (from uint64, ok bool) {
	if !st.opts.History() || epoch == 0 {
		return 0, false
	}
	switch {
	case epoch == st.epoch:
	case epoch == st.prevEpoch && since <= st.prevTop:
	default:
		return 0, false
	}
	from = since + 1
	if from > st.offset+1 {
		return 0, false
	}
	if from == st.offset+1 {
		return from, true
	}
	st.hist.expire(st.opts.HistoryTTL, now)
	i := st.hist.from(from)
	if i == st.hist.n || st.hist.at(i).off != from {
		return 0, false // pushed out, expired, or a hole
	}
	if now-st.hist.at(i).t > int64(st.opts.Recover) {
		return 0, false // outside the recovery window
	}
	for j, want := i, from; j < st.hist.n; j, want = j+1, want+1 {
		if st.hist.at(j).off != want {
			return 0, false // a hole (a replica missed an unacknowledged append)
		}
	}
	if st.hist.at(st.hist.n-1).off != st.offset {
		return 0, false
	}
	return from, true
}

// committer is the durable channels' group commit: ops queue under mu (in
// publish order, since they are queued under the shard lock) and one
// goroutine writes everything queued while the previous fsync ran in one
// transaction, then sends the publishes' deferred acks. Two op buffers and
// two data arenas alternate, so the steady state allocates nothing here.
type committer struct {
	st    store.Store
	delay time.Duration

	mu      sync.Mutex
	ops     []store.Op
	arena   []byte
	acks    []deferredAck
	kick    chan struct{}
	stop    chan struct{}
	done    chan struct{}
	commits atomic.Int64 // transactions (fsyncs)
	writes  atomic.Int64 // messages written
}

type deferredAck struct {
	l      *blink
	reqID  uint64
	offset uint64
	epoch  uint64
}

func newCommitter(st store.Store, delay time.Duration) *committer {
	return &committer{st: st, delay: delay, kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
}

// add queues one message (and its ack, when l != nil). Called with the
// channel's shard lock held.
func (c *committer) add(channel string, meta store.Meta, off uint64, t int64, data []byte, trimBelow uint64, l *blink, reqID uint64) {
	c.mu.Lock()
	start := len(c.arena)
	c.arena = append(c.arena, data...)
	c.ops = append(c.ops, store.Op{
		Channel: channel, SetMeta: true, Meta: meta,
		Msg:       store.Message{Offset: off, Time: t, Data: c.arena[start:len(c.arena):len(c.arena)]},
		TrimBelow: trimBelow,
	})
	if l != nil {
		c.acks = append(c.acks, deferredAck{l: l, reqID: reqID, offset: off, epoch: meta.Epoch})
	}
	c.mu.Unlock()
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

func (c *committer) run(s *Server) {
	defer close(c.done)
	var ops []store.Op
	var arena []byte
	var acks []deferredAck
	var frame []byte
	for {
		select {
		case <-c.kick:
		case <-c.stop:
			c.mu.Lock()
			pending := len(c.ops)
			c.mu.Unlock()
			if pending == 0 {
				return
			}
		}
		if c.delay > 0 {
			t := time.NewTimer(c.delay)
			select {
			case <-t.C:
			case <-c.stop:
				t.Stop()
			}
		}
		c.mu.Lock()
		ops, c.ops = c.ops, ops[:0]
		arena, c.arena = c.arena, arena[:0]
		acks, c.acks = c.acks, acks[:0]
		c.mu.Unlock()
		if len(ops) == 0 {
			continue
		}
		err := c.st.Apply(ops)
		errText := ""
		if err != nil {
			// The messages were fanned out already; their publishers are
			// told the durable write failed (they may retry: a duplicate
			// is better than a silent loss).
			s.log.Error("durable history write failed", "ops", len(ops), "error", err)
			errText = fmt.Sprintf("durable write failed: %v", err)
		}
		c.commits.Add(1)
		c.writes.Add(int64(len(ops)))
		for _, a := range acks {
			frame = link.AppendPubAck(frame[:0], a.reqID, a.offset, a.epoch, errText)
			// Acks ignore the queue bound: they are bounded by the
			// publisher's in-flight limit, and a lost ack is a failed
			// publish.
			if err := a.l.w.WriteRawAlways(frame); err != nil && !errors.Is(err, link.ErrClosed) {
				s.log.Debug("queueing deferred puback", "error", err)
			}
		}
		clear(ops)
		clear(acks)
		if cap(arena) > 4<<20 {
			arena = nil
		}
	}
}

// close flushes what is queued and stops the goroutine.
func (c *committer) close() {
	close(c.stop)
	<-c.done
}

// Restore loads the durable channels from the store. Each becomes a foreign
// state: served as it was (same epoch) until this broker's first publish to
// it starts a new, linked epoch. Call it before Serve; a no-op without a
// Store.
func (s *Server) Restore() error {
	if s.cfg.Store == nil {
		return nil
	}
	chans, err := s.cfg.Store.Load()
	if err != nil {
		return fmt.Errorf("broker: restoring durable history: %w", err)
	}
	now := time.Now().UnixNano()
	for _, c := range chans {
		opts := s.cfg.Rules.Lookup(c.Name)
		if !opts.Durable || c.Meta.Epoch == 0 {
			continue
		}
		st := &chanState{name: c.Name, opts: opts, epoch: c.Meta.Epoch, prevEpoch: c.Meta.PrevEpoch, prevTop: c.Meta.PrevTop, foreign: true, idleSince: now}
		for _, m := range c.Messages {
			st.hist.add(opts.HistorySize, m.Offset, m.Time, m.Data)
			st.offset = max(st.offset, m.Offset)
		}
		st.offset = max(st.offset, c.Meta.PrevTop)
		st.hist.expire(opts.HistoryTTL, now)
		sh := s.shard([]byte(c.Name))
		sh.mu.Lock()
		sh.chans[c.Name] = st
		sh.mu.Unlock()
	}
	s.log.Info("durable history restored", "channels", len(chans))
	return nil
}

// HistoryInfo is a channel's sequence as this broker holds it; for tests and
// diagnostics.
type HistoryInfo struct {
	Epoch, Offset, PrevEpoch, PrevTop uint64
	Stored                            int
	Options                           chanopts.Options
}

// History returns what this broker holds for channel (zero if nothing).
func (s *Server) History(channel string) HistoryInfo {
	sh := s.shard([]byte(channel))
	sh.mu.Lock()
	defer sh.mu.Unlock()
	st := sh.chans[channel]
	if st == nil {
		return HistoryInfo{}
	}
	return HistoryInfo{Epoch: st.epoch, Offset: st.offset, PrevEpoch: st.prevEpoch, PrevTop: st.prevTop, Stored: st.hist.n, Options: st.opts}
}
