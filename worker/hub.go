package worker

import (
	"errors"
	"hash/maphash"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shoalhq/shoal/worker/netpoll"
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
	// flushq writes the sockets a fan-out queued frames on (flushQueue).
	flushq   flushQueue
	owedBufs sync.Pool // *[]*netpoll.Conn, one fan-out's owed flushes
	flow     flowState
}

type hubShard struct {
	// imu serialises interest changes of this shard's channels, including
	// the broker call, so a subscribe/unsubscribe pair reaches the broker
	// in the order the local map changed. Fan-out never takes it, so a
	// broker that delivers while holding its own locks cannot deadlock
	// against us.
	imu  sync.Mutex
	mu   sync.RWMutex
	subs map[string]*subSet
}

// subSet is a channel's local subscribers: a slice, because fan-out walks it
// for every message (a map iteration cost ~10% of a worker's CPU in the
// fan-out profile), and an index for O(1) swap-removal.
type subSet struct {
	list []*Session
	idx  map[*Session]int
}

func (set *subSet) add(s *Session) bool {
	if _, ok := set.idx[s]; ok {
		return false
	}
	set.idx[s] = len(set.list)
	set.list = append(set.list, s)
	return true
}

func (set *subSet) remove(s *Session) bool {
	i, ok := set.idx[s]
	if !ok {
		return false
	}
	last := len(set.list) - 1
	moved := set.list[last]
	set.list[i] = moved
	set.idx[moved] = i
	set.list[last] = nil
	set.list = set.list[:last]
	delete(set.idx, s)
	return true
}

// len is nil-safe, like len of a nil map was.
func (set *subSet) len() int {
	if set == nil {
		return 0
	}
	return len(set.list)
}

func newHub(b Broker, full error) *Hub {
	h := &Hub{seed: maphash.MakeSeed(), broker: b, full: full}
	for i := range h.shards {
		h.shards[i].subs = make(map[string]*subSet)
	}
	h.flushq.init()
	h.flushq.async = runtime.GOMAXPROCS(0) > 1
	h.owedBufs.New = func() any { b := make([]*netpoll.Conn, 0, 64); return &b }
	if fb, ok := b.(interface{ SetBehind(bool) }); ok {
		h.flow.set = fb.SetBehind
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
	first := set == nil
	if first {
		set = &subSet{idx: make(map[*Session]int, 1)}
		sh.subs[channel] = set
	}
	if !set.add(s) {
		sh.mu.Unlock()
		return false
	}
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
	if set == nil || !set.remove(s) {
		sh.mu.Unlock()
		return false
	}
	last := set.len() == 0
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
	n := sh.subs[channel].len()
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
	return sh.subs[channel].len()
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
	var list []*Session
	if set := sh.subs[channel]; set != nil {
		list = set.list
	}
	// Taken from the pool at the first netpoll socket only, so a fan-out
	// to other Conns (tests, benchmarks) costs no pool round trip.
	var bp *[]*netpoll.Conn
	var owed []*netpoll.Conn
	for _, s := range list {
		if s.backlogged.Load() {
			full = append(full, s)
			continue
		}
		var err error
		if nc, ok := s.c.(*netpoll.Conn); ok {
			// Queue only: the sockets are written together afterwards
			// (flushQueue), so frames that arrive close together leave in
			// one writev per socket instead of one per frame.
			var flush bool
			if flush, err = nc.QueueFrame(frame); flush {
				if bp == nil {
					bp = h.owedBufs.Get().(*[]*netpoll.Conn)
					owed = (*bp)[:0]
				}
				owed = append(owed, nc)
			}
		} else {
			err = s.c.WriteFrame(frame)
		}
		switch {
		case err == nil:
			n++
		case errors.Is(err, h.full):
			full = append(full, s)
		}
	}
	sh.mu.RUnlock()
	if bp != nil {
		h.flushq.add(owed)
		clear(owed)
		*bp = owed[:0]
		h.owedBufs.Put(bp)
	}
	for _, s := range full {
		if over(s, channel, frame, pol) {
			n++
		}
	}
	if h.flow.set != nil {
		h.flow.check()
	}
	return n
}

// subscribers appends channel's local subscribers to dst.
func (h *Hub) subscribers(dst []*Session, channel string) []*Session {
	sh := h.shard(channel)
	sh.mu.RLock()
	if set := sh.subs[channel]; set != nil {
		dst = append(dst, set.list...)
	}
	sh.mu.RUnlock()
	return dst
}

// flushQueue is the fan-out's writer: one goroutine that writes, on its
// own, every socket a fan-out queued frames on (netpoll's QueueFrame), in
// rounds. A round writes each pending socket once, with everything queued
// on it so far; what fan-outs queue during a round waits for the next one.
// So the cost of a delivery falls as the load rises: at low rates every
// message goes out alone at once (no delay is ever added), and when a round
// takes longer than the gap between messages, the messages that arrived
// meanwhile leave in one writev per socket instead of one each (the paced
// profile showed one system call per subscriber per message, 5–12 µs of
// server CPU per delivery, against ~1 µs when batched). With the worker's
// GOMAXPROCS=1 the round runs when the link reader has fanned out all it
// read, which is exactly the end of a read batch. With more cores (async)
// the flushes go to netpoll's flush pool, as WriteFrame's do.
type flushQueue struct {
	mu      sync.Mutex
	pending []*netpoll.Conn // each owes exactly one Flush (QueueFrame's contract)
	stopped bool
	kick    chan struct{} // cap 1: pending became non-empty, or stop
	done    chan struct{} // closed when run returns
	started bool
	// async hands the flushes to netpoll's flush pool (several goroutines)
	// instead: with GOMAXPROCS > 1 one writer goroutine would keep the
	// fan-out's writes on one core. Set before the first add.
	async bool
}

func (q *flushQueue) init() {
	q.kick = make(chan struct{}, 1)
	q.done = make(chan struct{})
}

// start runs the writer goroutine (the engine owns it: stop joins it).
func (q *flushQueue) start() {
	q.mu.Lock()
	q.started = true
	q.mu.Unlock()
	go q.run()
}

// add takes over the flushes owed for cs (the caller clears its slice).
// Without a running writer (stopped, or a Hub without an engine) it
// flushes them at once on the caller's goroutine, so none is ever left
// owed: a connection whose flush is owed and never done would keep its
// frames, and its fd, forever.
func (q *flushQueue) add(cs []*netpoll.Conn) {
	if q.async {
		for _, c := range cs {
			c.FlushAsync()
		}
		return
	}
	q.mu.Lock()
	if q.stopped || !q.started {
		q.mu.Unlock()
		f := netpoll.NewFlusher()
		for _, c := range cs {
			f.Flush(c)
		}
		return
	}
	kick := len(q.pending) == 0
	q.pending = append(q.pending, cs...)
	q.mu.Unlock()
	if kick {
		select {
		case q.kick <- struct{}{}:
		default:
		}
	}
}

func (q *flushQueue) run() {
	defer close(q.done)
	f := netpoll.NewFlusher()
	var round []*netpoll.Conn
	for range q.kick {
		for {
			q.mu.Lock()
			round, q.pending = q.pending, round[:0]
			stopped := q.stopped
			q.mu.Unlock()
			if len(round) == 0 {
				if stopped {
					return
				}
				break
			}
			for i, c := range round {
				f.Flush(c)
				round[i] = nil
			}
		}
	}
}

// stop writes what is pending and ends the writer; later adds flush inline.
func (q *flushQueue) stop() {
	q.mu.Lock()
	if q.stopped {
		q.mu.Unlock()
		return
	}
	q.stopped = true
	started := q.started
	q.mu.Unlock()
	if !started {
		return
	}
	select {
	case q.kick <- struct{}{}:
	default:
	}
	<-q.done
}

// Publisher flow control (docs/brokers.md, "Flow control"). A publish is
// acknowledged when its broker has it, so a publisher that keeps a window
// of invokes in flight can outrun delivery; the send queues then grow
// until the slow-consumer policy cuts off subscribers that are merely
// behind because the whole machine is busy. So the worker tells its
// brokers when its delivery is behind (brokerclient SetBehind: a behind /
// caughtup link frame on each transition), and they hold the acks of
// publishes to channels it is interested in, for a bounded time, which
// slows publishers that wait for acks.
//
// "Behind" is about the worker, not one socket: at least flowMinDeep
// connections, and at least a sixteenth of the open ones, have a deep send
// queue (netpoll: over a quarter of its bounds). One stuck subscriber never
// makes it, so it still meets the slow-consumer policy and slows nobody.
// It stays behind until fewer than a thirty-second are deep (hysteresis)
// or fewer than flowMinDeep. A quarter (the first try) came too late at
// the maximum rate: the sockets of the slower bench agent were near their
// bound before a quarter of all were deep. The
// state is checked after every fan-out (two atomic loads) and, while
// behind, every flowTick, since the queues drain without fan-outs once
// publishers wait.
type flowState struct {
	set    func(behind bool) // the broker client's SetBehind; nil: off
	srv    atomic.Pointer[netpoll.Server]
	behind atomic.Bool // the last state sent; changed under mu

	mu      sync.Mutex
	timer   *time.Timer
	stopped bool
}

const (
	flowMinDeep = 4
	flowTick    = 5 * time.Millisecond
)

// flowBehind decides the state from netpoll's counters, with hysteresis.
func flowBehind(deep, open int64, was bool) bool {
	if deep < flowMinDeep {
		return false
	}
	if was {
		return 32*deep >= open
	}
	return 16*deep >= open
}

// check is the fan-out's test (nothing before the worker gave the server).
func (f *flowState) check() {
	srv := f.srv.Load()
	if srv == nil {
		return
	}
	was := f.behind.Load()
	deep, open := srv.Pressure()
	if flowBehind(deep, open, was) == was {
		return
	}
	f.update()
}

// update re-evaluates the state under mu and sends a transition.
func (f *flowState) update() {
	f.mu.Lock()
	defer f.mu.Unlock()
	srv := f.srv.Load()
	if f.stopped || srv == nil {
		return
	}
	was := f.behind.Load()
	deep, open := srv.Pressure()
	now := flowBehind(deep, open, was)
	if now != was {
		f.behind.Store(now)
		f.set(now)
	}
	if now {
		if f.timer == nil {
			f.timer = time.AfterFunc(flowTick, f.update)
		} else {
			f.timer.Reset(flowTick)
		}
	}
}

// stop ends the timer (engine close); the state is left as it is (the
// links close with the worker).
func (f *flowState) stop() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stopped = true
	if f.timer != nil {
		f.timer.Stop()
	}
}
