package balancer

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"syscall"
	"time"

	"github.com/shoalhq/shoal/handoff"
	"github.com/shoalhq/shoal/proto/control"
)

// How a worker's load is estimated (least connections):
//
//	load = base + delta
//
// base is Peer.Connections from the latest topology. The supervisor polls
// every worker's Stats every 2 s and pushes a new topology when a count
// changed, so base is at most a few seconds old. delta is what this balancer
// knows happened since: +1 for every connection it handed or proxied to the
// worker, -1 for every proxied (TLS) connection that closed. Plain
// connections are handed over and forgotten, so their closes are only seen
// through the next base. Each topology resets delta to 0. Ties are broken at
// random (see pool.rng); since a pick counts at once, a burst still spreads.
//
// A worker whose socket fails (send or dial error) is marked dead at once and
// skipped; it is tried again after deadRetry (a dial to a vanished socket
// fails in microseconds, so this costs nothing), or as soon as a topology
// names a new process (pid) or new socket for it.
const deadRetry = time.Second

// handoffTimeout bounds one fd handoff. The accept loop does the handoff
// itself (no goroutine per plain connection), so a stuck worker may stall
// new connections this long, once, before it is marked dead.
const handoffTimeout = 250 * time.Millisecond

// worker is one live worker as this balancer routes to it.
type worker struct {
	name        string
	pid         int
	handoffPath string
	proxyPath   string

	// Guarded by pool.mu.
	base    int64
	delta   int64
	dead    bool
	retryAt time.Time
	gone    bool // no longer in the topology; its sender is closed

	smu    sync.Mutex // guards sender; held across a Send (Sends are serial per worker anyway)
	sender *handoff.Sender
}

// kind selects which of a worker's sockets a connection needs.
type kind int

const (
	kindPlain kind = iota // fd handoff
	kindTLS               // PROXY v2 stream to the proxy socket
)

func (w *worker) addr(k kind) string {
	if k == kindPlain {
		return w.handoffPath
	}
	return w.proxyPath
}

// pool is the set of workers and the least-connections choice among them.
type pool struct {
	mu      sync.Mutex
	workers []*worker // topology order
	// rng breaks ties. Random, not round robin: a round-robin index shared
	// by the plain and TLS paths phase-locks with a periodic mix (plain and
	// TLS connections alternating sent every TLS one to the same worker).
	// Seeded with a constant, so tests are repeatable.
	rng     *rand.Rand
	version int64
	stats   *stats
}

// setTopology replaces the worker set with the ready workers of t. It keeps
// the connection (and dead mark) of a worker whose process and socket did
// not change, and returns the senders of workers that left so the caller
// closes them outside the lock.
func (p *pool) setTopology(t control.Topology) []*worker {
	p.mu.Lock()
	defer p.mu.Unlock()
	if t.Version != 0 && t.Version < p.version {
		return nil // a late, older push must not undo a newer one
	}
	p.version = t.Version
	old := make(map[string]*worker, len(p.workers))
	for _, w := range p.workers {
		old[w.name] = w
	}
	var next []*worker
	for _, peer := range t.Peers {
		if peer.Role != control.RoleWorker || peer.State != control.StateReady {
			continue
		}
		hp, pp := peer.Addrs[control.AddrHandoff], peer.Addrs[control.AddrProxy]
		if hp == "" && pp == "" {
			continue
		}
		w := old[peer.Name]
		if w != nil && w.pid == peer.Pid && w.handoffPath == hp && w.proxyPath == pp {
			delete(old, peer.Name)
		} else {
			w = &worker{name: peer.Name, pid: peer.Pid, handoffPath: hp, proxyPath: pp}
		}
		w.base = peer.Connections
		w.delta = 0
		next = append(next, w)
	}
	p.workers = next
	var gone []*worker
	for _, w := range old {
		w.gone = true
		gone = append(gone, w)
	}
	return gone
}

// pick reserves the least-loaded usable worker for a connection of kind k,
// skipping those in tried. It counts the connection (delta+1) at once so
// concurrent picks spread; release undoes that if the connection fails.
func (p *pool) pick(k kind, tried []*worker) *worker {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if p.rng == nil {
		p.rng = rand.New(rand.NewPCG(0x5eed, 0xba1a))
	}
	var best *worker
	var bestLoad int64
	ties := 0
	for _, w := range p.workers {
		if w.addr(k) == "" || (w.dead && now.Before(w.retryAt)) || contains(tried, w) {
			continue
		}
		load := max(w.base+w.delta, 0)
		switch {
		case best == nil || load < bestLoad:
			best, bestLoad, ties = w, load, 1
		case load == bestLoad:
			// Reservoir sampling: each of the tied workers ends up
			// chosen with equal probability.
			ties++
			if p.rng.IntN(ties) == 0 {
				best = w
			}
		}
	}
	if best == nil {
		return nil
	}
	best.delta++
	return best
}

func contains(ws []*worker, w *worker) bool {
	for _, x := range ws {
		if x == w {
			return true
		}
	}
	return false
}

// release undoes one pick's count (the connection failed or closed).
func (p *pool) release(w *worker) {
	p.mu.Lock()
	w.delta--
	p.mu.Unlock()
}

// markDead takes w out of rotation until deadRetry passes or a topology
// brings a new process for it.
func (p *pool) markDead(w *worker) {
	p.mu.Lock()
	w.dead = true
	w.retryAt = time.Now().Add(deadRetry)
	p.mu.Unlock()
}

// markAlive clears a dead mark after a worker answered again.
func (p *pool) markAlive(w *worker) {
	p.mu.Lock()
	w.dead = false
	p.mu.Unlock()
}

// live counts workers not marked dead (for Health).
func (p *pool) live() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, w := range p.workers {
		if !w.dead {
			n++
		}
	}
	return n
}

func (p *pool) all() []*worker {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]*worker(nil), p.workers...)
}

// send hands fd to w's handoff socket, dialling it first if needed. On any
// error the sender is dropped, so the next attempt re-dials. A cached
// connection that turns out dead (the worker was replaced at the same
// socket path before the topology said so: its old end is closed) is
// redialled once and the send retried, so the new process gets the
// connection instead of being marked dead for it.
func (w *worker) send(fd int, m handoff.Meta, prebuf []byte) error {
	w.smu.Lock()
	defer w.smu.Unlock()
	cached := w.sender != nil
	err := w.sendLocked(fd, m, prebuf)
	if err != nil && cached && staleConn(err) {
		err = w.sendLocked(fd, m, prebuf)
	}
	return err
}

func (w *worker) sendLocked(fd int, m handoff.Meta, prebuf []byte) error {
	if w.sender == nil {
		s, err := handoff.Dial(w.handoffPath)
		if err != nil {
			return fmt.Errorf("dial %s's handoff socket: %w", w.name, err)
		}
		s.SetTimeout(handoffTimeout)
		w.sender = s
	}
	if err := w.sender.SendFDMeta(fd, m, prebuf); err != nil {
		_ = w.sender.Close()
		w.sender = nil
		return fmt.Errorf("hand a connection to %s: %w", w.name, err)
	}
	return nil
}

// staleConn reports a send error that means the peer end is gone (nothing
// was delivered), as opposed to a stuck worker (a timeout), which a retry
// would only make the accept loop wait for twice.
func staleConn(err error) bool {
	return errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.ENOTCONN) || errors.Is(err, syscall.ECONNREFUSED)
}

// closeSender drops w's handoff connection (worker left or balancer stops).
func (w *worker) closeSender() {
	w.smu.Lock()
	defer w.smu.Unlock()
	if w.sender != nil {
		_ = w.sender.Close()
		w.sender = nil
	}
}
