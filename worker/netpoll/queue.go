package netpoll

import "sync"

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
	}
	return &queue{frames: make([][]byte, 0, minQueueCap<<k)}
}

// putQueue returns q to its pool. The caller has no other reference to it.
func putQueue(q *queue) {
	clear(q.frames) // frames are shared with other conns: do not keep them alive
	q.frames, q.head = q.frames[:0], 0
	if k := queueClass(cap(q.frames)); k < queueClasses && minQueueCap<<k == cap(q.frames) {
		queuePools[k].Put(q)
	}
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
