package netpoll

import (
	"bytes"
	"fmt"
	"runtime"
	"testing"
)

// TestQueue pushes and consumes in uneven steps (partial frames, growth,
// compaction) and checks the bytes come out in order.
func TestQueue(t *testing.T) {
	var want, got bytes.Buffer
	q := getQueue(1)
	pending := 0
	for i := range 3000 {
		f := []byte(fmt.Sprintf("<%d>", i))
		q = q.push(f)
		want.Write(f)
		pending += len(f)
		if i%7 == 0 {
			// Consume a part that ends inside a frame.
			n := pending / 3
			got.Write(collect(q, n))
			if q.consume(n) != (n == pending) {
				t.Fatalf("consume(%d) of %d: wrong empty report", n, pending)
			}
			pending -= n
		}
	}
	got.Write(collect(q, pending))
	if !q.consume(pending) {
		t.Fatal("queue not empty after consuming everything")
	}
	if !bytes.Equal(got.Bytes(), want.Bytes()) {
		t.Fatal("bytes out of order")
	}
	putQueue(q)
	if q.len() != 0 {
		t.Fatal("put queue not reset")
	}
	for _, f := range q.frames[:cap(q.frames)] {
		if f != nil {
			t.Fatal("put queue keeps a frame alive")
		}
	}
}

// collect returns the first n queued bytes, as writev would send them.
func collect(q *queue, n int) []byte {
	var b []byte
	for _, f := range q.frames[q.head:] {
		if len(b)+len(f) >= n {
			return append(b, f[:n-len(b)]...)
		}
		b = append(b, f...)
	}
	return b
}

// The reserve keeps put queues through garbage collections (a sync.Pool
// alone drops them after two), up to reserveCap of a class and no more.
func TestQueueReserve(t *testing.T) {
	const k = 1 // a small class, with a reserve
	r := &queueReserve[k]
	limit := reserveCap(k)
	if limit == 0 {
		t.Fatal("no reserve for a small class")
	}
	qs := make([]*queue, limit+4)
	for i := range qs {
		qs[i] = &queue{frames: make([][]byte, 0, minQueueCap<<k)}
	}
	for _, q := range qs {
		putQueue(q)
	}
	if n := r.n.Load(); n != limit {
		t.Fatalf("reserve holds %d queues, want its cap %d", n, limit)
	}
	runtime.GC()
	runtime.GC()
	if q := getQueue(minQueueCap << k); cap(q.frames) != minQueueCap<<k {
		t.Fatalf("got a queue of capacity %d, want %d", cap(q.frames), minQueueCap<<k)
	}
	if n := r.n.Load(); n != limit-1 {
		t.Fatalf("after two collections and a get the reserve holds %d queues, want %d", n, limit-1)
	}
	if reserveCap(6) != 0 {
		t.Fatal("big classes have a reserve")
	}
}
