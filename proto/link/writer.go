package link

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// ErrQueueFull means a frame did not fit in the writer's bounded queue. The
// frame was not queued; the caller decides (fail the publish, drop the slow
// link, or wait with WaitSpace).
var ErrQueueFull = errors.New("link: write queue full")

// ErrClosed means the writer was closed or its connection failed.
var ErrClosed = errors.New("link: writer closed")

// WriterConfig bounds a Writer.
type WriterConfig struct {
	// MaxPending is the most bytes queued and not yet written (default 4 MiB).
	// A single frame larger than this is still accepted when the queue is
	// empty, so one max-size publish always fits.
	MaxPending int
	// WriteTimeout fails the link when the peer accepts no bytes for this
	// long (default 10 s): a stalled write fails after between WriteTimeout
	// and 1.5 × WriteTimeout (the deadline is renewed lazily, see write).
	WriteTimeout time.Duration
}

// Writer is the one writer of a link connection. Frames are encoded straight
// into a pending buffer under a mutex; one goroutine (Run) swaps that buffer
// out and writes it in a single syscall. While a write is in flight new
// frames accumulate, so frames coalesce under load and go out at once when
// the link is idle — no timer, no added latency. Two buffers alternate, so
// the steady state allocates nothing.
type Writer struct {
	conn    net.Conn
	max     int
	timeout time.Duration
	// deadline is the write deadline set on conn (Run's goroutine only).
	deadline time.Time

	mu      sync.Mutex
	buf     []byte
	spare   []byte
	closed  bool
	err     error
	space   chan struct{} // closed and replaced after a write when waiting: wakes WaitSpace
	waiting bool          // someone waits on space (so an idle link allocates no channel per write)
	kick    chan struct{} // cap 1: "there is something to write"
	stopped chan struct{} // closed when Run returns
}

// NewWriter returns a writer for conn; start Run in a goroutine the caller owns.
func NewWriter(conn net.Conn, cfg WriterConfig) *Writer {
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = 4 << 20
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = 10 * time.Second
	}
	// Both batch buffers start at a size that holds a burst, so the first
	// bursts of a link do not grow them append by append.
	size := min(cfg.MaxPending, initialBuf)
	return &Writer{
		conn:    conn,
		max:     cfg.MaxPending,
		timeout: cfg.WriteTimeout,
		buf:     make([]byte, 0, size),
		spare:   make([]byte, 0, size),
		space:   make(chan struct{}),
		kick:    make(chan struct{}, 1),
		stopped: make(chan struct{}),
	}
}

// reserve takes the lock and checks that n more bytes fit. On success the
// lock is held and the caller appends to w.buf, then calls commit. n < 0
// skips the limit.
func (w *Writer) reserve(n int) error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return ErrClosed
	}
	if n >= 0 && len(w.buf) > 0 && len(w.buf)+n > w.max {
		w.mu.Unlock()
		return ErrQueueFull
	}
	return nil
}

func (w *Writer) commit() {
	w.mu.Unlock()
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// WriteRaw queues an already encoded frame (or several): the broker encodes a
// msg once and queues the same bytes on every interested link.
func (w *Writer) WriteRaw(frame []byte) error {
	if err := w.reserve(len(frame)); err != nil {
		return err
	}
	w.buf = append(w.buf, frame...)
	w.commit()
	return nil
}

// WriteRawAlways queues encoded frames ignoring the queue limit: for a
// reply whose size the broker bounds itself (a recovery is at most the
// channel's history size) and which must not fail halfway.
func (w *Writer) WriteRawAlways(frame []byte) error {
	if err := w.reserve(-1); err != nil {
		return err
	}
	w.buf = append(w.buf, frame...)
	w.commit()
	return nil
}

// WriteHello queues a hello frame.
func (w *Writer) WriteHello(epoch uint64, name string) error {
	if err := w.reserve(HelloSize(name)); err != nil {
		return err
	}
	w.buf = AppendHello(w.buf, Version, epoch, name)
	w.commit()
	return nil
}

// WriteChannel queues a sub or unsub frame. Interest frames ignore the
// queue limit: they are bounded by the sender's own interest table, and a
// re-registration after a reconnect must never fail halfway (a lost sub
// would silently stop deliveries).
func (w *Writer) WriteChannel(t Type, channel string) error {
	if err := w.reserve(-1); err != nil {
		return err
	}
	w.buf = AppendChannel(w.buf, t, channel)
	w.commit()
	return nil
}

// WritePub queues a pub frame.
func (w *Writer) WritePub(reqID uint64, channel string, data []byte) error {
	if err := w.reserve(PubSize(channel, data)); err != nil {
		return err
	}
	w.buf = AppendPub(w.buf, reqID, channel, data)
	w.commit()
	return nil
}

// WritePubAck queues a puback frame.
func (w *Writer) WritePubAck(reqID, offset, epoch uint64, errText string) error {
	if err := w.reserve(PubAckSize(errText)); err != nil {
		return err
	}
	w.buf = AppendPubAck(w.buf, reqID, offset, epoch, errText)
	w.commit()
	return nil
}

// WriteEmpty queues a ping, pong or ready. These 5-byte control frames
// ignore the queue limit: a ready lost to a full queue would stall a
// starting broker, and pings are rate-limited by their senders.
func (w *Writer) WriteEmpty(t Type) error {
	if err := w.reserve(-1); err != nil {
		return err
	}
	w.buf = AppendEmpty(w.buf, t)
	w.commit()
	return nil
}

// WaitSpace blocks until at least n bytes fit in the queue, the writer
// closes, or ctx ends: backpressure for callers that may wait (a link's own
// reader), never for a fan-out.
func (w *Writer) WaitSpace(ctx context.Context, n int) error {
	for {
		w.mu.Lock()
		if w.closed {
			w.mu.Unlock()
			return ErrClosed
		}
		if len(w.buf) == 0 || len(w.buf)+n <= w.max {
			w.mu.Unlock()
			return nil
		}
		space := w.space
		w.waiting = true
		w.mu.Unlock()
		select {
		case <-space:
		case <-w.stopped:
			return ErrClosed
		case <-ctx.Done():
			return fmt.Errorf("link: waiting for write queue space: %w", ctx.Err())
		}
	}
}

// Pending returns the bytes queued and not yet handed to the socket.
func (w *Writer) Pending() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.buf)
}

// Err returns why the writer stopped (nil while running or after a clean Close).
func (w *Writer) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// Close stops accepting frames; Run writes what is already queued (within
// the write timeout) and returns. Close does not close the connection.
func (w *Writer) Close() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// Done is closed when Run has returned.
func (w *Writer) Done() <-chan struct{} { return w.stopped }

// Run writes queued frames until Close or a write error, which it returns
// (nil after Close). The caller closes the connection afterwards.
func (w *Writer) Run() error {
	defer close(w.stopped)
	for range w.kick {
		for {
			w.mu.Lock()
			out := w.buf
			closed := w.closed
			w.buf, w.spare = w.spare[:0], nil
			w.mu.Unlock()
			if len(out) == 0 {
				if closed {
					return nil
				}
				w.putSpare(out)
				break
			}
			if err := w.write(out); err != nil {
				w.mu.Lock()
				w.closed = true
				w.err = err
				w.buf = nil
				close(w.space)
				w.mu.Unlock()
				return err
			}
			w.putSpare(out)
		}
	}
	return nil
}

// putSpare returns a written buffer for reuse and wakes WaitSpace callers.
// A buffer grown far past the limit by one huge frame is dropped.
func (w *Writer) putSpare(b []byte) {
	w.mu.Lock()
	if cap(b) <= 2*w.max {
		w.spare = b[:0]
	}
	if w.waiting {
		w.waiting = false
		close(w.space)
		w.space = make(chan struct{})
	}
	w.mu.Unlock()
}

// initialBuf is the starting capacity of each of a Writer's two buffers.
const initialBuf = 16 << 10

// write writes b within the write timeout. Setting a deadline re-arms a
// runtime timer (in the rtt profile SetWriteDeadline was 11% of a broker's
// CPU, once per write), so it is renewed only when less than the timeout is
// left: the deadline is 1.5 × timeout ahead when set, and every write
// starts with at least the full timeout before it.
func (w *Writer) write(b []byte) error {
	if now := time.Now(); w.deadline.Sub(now) < w.timeout {
		w.deadline = now.Add(w.timeout + w.timeout/2)
		if err := w.conn.SetWriteDeadline(w.deadline); err != nil {
			return fmt.Errorf("link: setting write deadline: %w", err)
		}
	}
	if _, err := w.conn.Write(b); err != nil {
		return fmt.Errorf("link: writing %d bytes: %w", len(b), err)
	}
	return nil
}
