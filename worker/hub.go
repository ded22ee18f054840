package worker

import (
	"errors"
	"hash/maphash"
	"sync"
)

// hubShards spreads channels over independently locked maps so subscribes
// and fan-outs of unrelated channels do not contend.
const hubShards = 64

// Hub maps channels to the local sessions subscribed to them and keeps the
// worker's interest at the brokers in step: the first local subscriber of a
// channel registers interest, the last one to leave drops it.
//
// Lock order: Session.mu → hubShard.imu → hubShard.mu → (Broker's locks).
// Fan-out holds only hubShard.mu (read) and writes to connections, which
// never call back; slow consumers are closed after the lock is released.
type Hub struct {
	seed   maphash.Seed
	shards [hubShards]hubShard
	broker Broker
	full   error // the Conn error that means "send queue full"
	// occupied (may be nil) is told when a channel gets its first local
	// subscriber (true) or loses its last (false), under the shard's imu,
	// so the calls for one channel come in order. Internal ("#") channels
	// never have hub subscribers.
	occupied func(channel string, occupied bool)
}

type hubShard struct {
	// imu serialises interest changes of this shard's channels, including
	// the broker call, so a subscribe/unsubscribe pair reaches the broker
	// in the order the local map changed. Fan-out never takes it, so a
	// broker that delivers while holding its own locks cannot deadlock
	// against us.
	imu  sync.Mutex
	mu   sync.RWMutex
	subs map[string]map[*Session]struct{}
}

func newHub(b Broker, full error) *Hub {
	h := &Hub{seed: maphash.MakeSeed(), broker: b, full: full}
	for i := range h.shards {
		h.shards[i].subs = make(map[string]map[*Session]struct{})
	}
	return h
}

func (h *Hub) shard(channel string) *hubShard {
	return &h.shards[maphash.String(h.seed, channel)%hubShards]
}

// add subscribes s to channel; it reports whether s was newly added.
func (h *Hub) add(channel string, s *Session) bool {
	sh := h.shard(channel)
	sh.imu.Lock()
	defer sh.imu.Unlock()
	sh.mu.Lock()
	set := sh.subs[channel]
	if _, ok := set[s]; ok {
		sh.mu.Unlock()
		return false
	}
	first := set == nil
	if first {
		set = make(map[*Session]struct{}, 1)
		sh.subs[channel] = set
	}
	set[s] = struct{}{}
	sh.mu.Unlock()
	if first && h.broker != nil {
		h.broker.Subscribe(channel)
	}
	if first && h.occupied != nil {
		h.occupied(channel, true)
	}
	return true
}

// remove unsubscribes s from channel; it reports whether s was subscribed.
func (h *Hub) remove(channel string, s *Session) bool {
	sh := h.shard(channel)
	sh.imu.Lock()
	defer sh.imu.Unlock()
	sh.mu.Lock()
	set := sh.subs[channel]
	if _, ok := set[s]; !ok {
		sh.mu.Unlock()
		return false
	}
	delete(set, s)
	last := len(set) == 0
	if last {
		delete(sh.subs, channel)
	}
	sh.mu.Unlock()
	if last && h.broker != nil {
		h.broker.Unsubscribe(channel)
	}
	if last && h.occupied != nil {
		h.occupied(channel, false)
	}
	return true
}

// release drops the worker's broker interest in channel if no local
// session holds it: for a recovery subscribe whose socket went away before
// the broker answered (SubscribeRecover registers interest itself).
func (h *Hub) release(channel string) {
	sh := h.shard(channel)
	sh.imu.Lock()
	defer sh.imu.Unlock()
	sh.mu.RLock()
	n := len(sh.subs[channel])
	sh.mu.RUnlock()
	if n == 0 && h.broker != nil {
		h.broker.Unsubscribe(channel)
	}
}

// Channels is the number of channels with at least one local subscriber.
func (h *Hub) Channels() int {
	n := 0
	for i := range h.shards {
		sh := &h.shards[i]
		sh.mu.RLock()
		n += len(sh.subs)
		sh.mu.RUnlock()
	}
	return n
}

// Subscribers is the number of local subscribers of channel.
func (h *Hub) Subscribers(channel string) int {
	sh := h.shard(channel)
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	return len(sh.subs[channel])
}

// fanout writes one pre-built frame to every local subscriber of channel and
// returns how many took it. Sessions whose send queue is full, or that still
// hold publishes back under a drop_oldest/latest policy (so this one must
// queue behind them), are handed to over after the shard lock is released.
func (h *Hub) fanout(channel string, frame []byte, pol slowPolicy, over func(*Session, string, []byte, slowPolicy) bool) int {
	sh := h.shard(channel)
	var full []*Session
	n := 0
	sh.mu.RLock()
	for s := range sh.subs[channel] {
		if s.backlogged.Load() {
			full = append(full, s)
			continue
		}
		switch err := s.c.WriteFrame(frame); {
		case err == nil:
			n++
		case errors.Is(err, h.full):
			full = append(full, s)
		}
	}
	sh.mu.RUnlock()
	for _, s := range full {
		if over(s, channel, frame, pol) {
			n++
		}
	}
	return n
}

// subscribers appends channel's local subscribers to dst.
func (h *Hub) subscribers(dst []*Session, channel string) []*Session {
	sh := h.shard(channel)
	sh.mu.RLock()
	for s := range sh.subs[channel] {
		dst = append(dst, s)
	}
	sh.mu.RUnlock()
	return dst
}
