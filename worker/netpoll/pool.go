package netpoll

import (
	"sync"

	"golang.org/x/sys/unix"
)

// taskKind says what a pool goroutine does with a connection.
type taskKind uint8

const (
	taskRead  taskKind = iota // read input, run Handler calls (at most one per conn)
	taskFlush                 // write the send queue (at most one per conn)
)

type task struct {
	c    *Conn
	kind taskKind
}

// Read buffer and iovec batch per pool goroutine. Reads land in the pool
// goroutine's buffer, so an idle connection owns none.
const (
	readBufSize = 32 << 10
	maxIovecs   = 1024 // IOV_MAX on Linux
)

// pool runs tasks on a fixed set of goroutines. The queue is a ring that grows
// as needed; it never holds more than two entries per connection (one read,
// one flush, guarded by Conn.reading and Conn.flushing), so it is bounded by
// the connection count and pushing never blocks the poller or a writer.
type pool struct {
	mu      sync.Mutex
	cond    sync.Cond
	ring    []task
	head    int
	n       int
	stopped bool
	wg      sync.WaitGroup
}

// scratch is one pool goroutine's private memory.
type scratch struct {
	buf  []byte
	iovs []unix.Iovec
}

// start runs size goroutines, each with a read buffer of bufSize bytes (0
// for goroutines that only flush) and its own iovec batch.
func (p *pool) start(size, bufSize int, run func(*scratch, task)) {
	p.cond.L = &p.mu
	p.ring = make([]task, 64)
	for range size {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			s := &scratch{buf: make([]byte, bufSize), iovs: make([]unix.Iovec, maxIovecs)}
			for {
				t, ok := p.pop()
				if !ok {
					return
				}
				run(s, t)
			}
		}()
	}
}

func (p *pool) push(c *Conn, kind taskKind) {
	p.mu.Lock()
	if p.n == len(p.ring) {
		grown := make([]task, 2*len(p.ring))
		for i := range p.n {
			grown[i] = p.ring[(p.head+i)%len(p.ring)]
		}
		p.ring, p.head = grown, 0
	}
	p.ring[(p.head+p.n)%len(p.ring)] = task{c, kind}
	p.n++
	p.mu.Unlock()
	p.cond.Signal()
}

// pop waits for a task. After stop it still drains the queue, so every
// scheduled read (which may owe an OnClose) and flush runs before the
// goroutines exit.
func (p *pool) pop() (task, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.n == 0 {
		if p.stopped {
			return task{}, false
		}
		p.cond.Wait()
	}
	t := p.ring[p.head]
	p.ring[p.head] = task{}
	p.head = (p.head + 1) % len(p.ring)
	p.n--
	return t, true
}

// stop makes the goroutines exit once the queue is empty and waits for them.
func (p *pool) stop() {
	p.mu.Lock()
	p.stopped = true
	p.mu.Unlock()
	p.cond.Broadcast()
	p.wg.Wait()
}

// take pops a task without waiting.
func (p *pool) take() (task, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.n == 0 {
		return task{}, false
	}
	t := p.ring[p.head]
	p.ring[p.head] = task{}
	p.head = (p.head + 1) % len(p.ring)
	p.n--
	return t, true
}
