package netpoll

import (
	"sync"
	"sync/atomic"
)

// queue is a connection's list of frames waiting to be written. Queues are
// pooled by capacity class: an idle connection holds none, and a busy one
// reuses them instead of allocating on the write path.
type queue struct {
	frames [][]byte // frames[:head] are written; frames[head] may be partly written
	head   int
}

const (
	minQueueCap  = 8
	queueClasses = 20 // up to minQueueCap<<19 frames; bigger queues are not pooled
)

var queuePools [queueClasses]sync.Pool

// queueReserve backs each sync.Pool with a small free list that the garbage
// collector does not empty: sync.Pool drops what sat unused through two
// cycles, and a fan-out burst right after would allocate its queues again.
// It holds at most reserveBytes of frame slots per small class (1.5 MiB in
// all).
var queueReserve [queueClasses]struct {
	mu   sync.Mutex
	n    atomic.Int32 // len(free), readable without mu
	free []*queue
}

const reserveBytes = 256 << 10

// queueClass is the smallest class whose capacity holds n frames.
func queueClass(n int) int {
	k := 0
	for minQueueCap<<k < n {
		k++
	}
	return k
}

func getQueue(n int) *queue {
	k := queueClass(n)
	if k < queueClasses {
		if q, ok := queuePools[k].Get().(*queue); ok {
			return q
		}
		if r := &queueReserve[k]; r.n.Load() > 0 {
			r.mu.Lock()
			if l := len(r.free); l > 0 {
				q := r.free[l-1]
				r.free[l-1] = nil
				r.free = r.free[:l-1]
				r.n.Store(int32(l - 1))
				r.mu.Unlock()
				return q
			}
			r.mu.Unlock()
		}
	}
	return &queue{frames: make([][]byte, 0, minQueueCap<<k)}
}

// reserveCap is how many queues of class k the reserve keeps: up to
// reserveBytes for the small classes (up to 256 frames), none for the big
// ones, which only deep bursts need.
func reserveCap(k int) int32 {
	if k > 5 {
		return 0
	}
	return int32(reserveBytes / (24 * (minQueueCap << k)))
}

// putQueue returns q to its pool. The caller has no other reference to it.
func putQueue(q *queue) {
	clear(q.frames) // frames are shared with other conns: do not keep them alive
	q.frames, q.head = q.frames[:0], 0
	k := queueClass(cap(q.frames))
	if k >= queueClasses || minQueueCap<<k != cap(q.frames) {
		return
	}
	if r := &queueReserve[k]; r.n.Load() < reserveCap(k) {
		r.mu.Lock()
		if int32(len(r.free)) < reserveCap(k) {
			r.free = append(r.free, q)
			r.n.Store(int32(len(r.free)))
			r.mu.Unlock()
			return
		}
		r.mu.Unlock()
	}
	queuePools[k].Put(q)
}

func (q *queue) len() int { return len(q.frames) - q.head }

// push appends b and returns the queue to use from now on (q, compacted, or
// a bigger one that replaced it).
func (q *queue) push(b []byte) *queue {
	if len(q.frames) == cap(q.frames) {
		if q.head > 0 && q.head >= len(q.frames)/2 {
			n := copy(q.frames, q.frames[q.head:])
			clear(q.frames[n:])
			q.frames, q.head = q.frames[:n], 0
		} else {
			bigger := getQueue(2 * cap(q.frames))
			bigger.frames = append(bigger.frames, q.frames[q.head:]...)
			putQueue(q)
			q = bigger
		}
	}
	q.frames = append(q.frames, b)
	return q
}

// consume drops w written bytes from the head and reports whether the queue
// is now empty.
func (q *queue) consume(w int) bool {
	for w > 0 {
		b := q.frames[q.head]
		if w < len(b) {
			q.frames[q.head] = b[w:]
			return false
		}
		w -= len(b)
		q.frames[q.head] = nil
		q.head++
	}
	return q.head == len(q.frames)
}
