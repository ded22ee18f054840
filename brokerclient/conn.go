package brokerclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	"github.com/shoalhq/shoal/internal/loglimit"
	"github.com/shoalhq/shoal/proto/link"
)

// bconn is the link to one broker: a reconnect loop that owns the current
// connection, its writer, and the FIFO of publishes awaiting their ack.
type bconn struct {
	c  *Client
	ep Endpoint

	ctx    context.Context // cancelled by shutdown: stops dialling and backoff
	cancel context.CancelFunc
	// secureLog bounds the warnings of failed TLS handshakes and proofs
	// (Options.Secure) while the link redials every 20–250 ms.
	secureLog loglimit.Limiter

	mu     sync.Mutex
	conn   net.Conn
	w      *link.Writer // nil while down
	up     bool         // hello answered: interests are registered
	nextID uint64
	// Acks come back in the order the publishes were written (the broker
	// handles one link's frames in order), so the in-flight publishes are a
	// FIFO: the ack matches the head, and the head is the oldest deadline.
	queue []pending
	head  int
	dead  bool // shut down for good
	// Requests (recover, history, replication, presence) wait here by id;
	// their replies may come in any order.
	reqs    map[uint64]*request
	repls   map[uint64]replWait // history appends awaiting this replica
	scratch []byte              // frame encoding under mu

	// names interns channel names for the reader; its values are the
	// client's shared positions (Client.pos). Reader goroutine only.
	names map[string]*chanPos
}

// chanPos is a channel's last position delivered to OnPublication (history
// channels), shared by every link: a re-registration after a reconnect or an
// owner change asks for what the worker missed since then.
type chanPos struct {
	name string
	hist bool

	mu         sync.Mutex
	off, epoch uint64
}

// advance records a delivered position. Within one epoch it never goes
// back (an old owner's in-flight messages may arrive after the new
// owner's); a different epoch replaces it.
func (p *chanPos) advance(off, epoch uint64) {
	p.mu.Lock()
	if epoch != p.epoch || off > p.off {
		p.off, p.epoch = off, epoch
	}
	p.mu.Unlock()
}

func (p *chanPos) get() (off, epoch uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.off, p.epoch
}

type pending struct {
	id       uint64
	deadline int64 // unix ns
	done     func(uint64, error)
	repl     *replJob // history channel: replicate before done
	acked    bool     // answered out of order (a durable publish's ack comes after its group commit)
}

func newBconn(c *Client, ep Endpoint) *bconn {
	ctx, cancel := context.WithCancel(context.Background())
	return &bconn{c: c, ep: ep, ctx: ctx, cancel: cancel, secureLog: loglimit.Limiter{Every: 10 * time.Second, Burst: 1}}
}

func (b *bconn) isUp() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.up
}

// run dials, serves the link until it fails, and redials with jittered
// exponential backoff until shutdown.
func (b *bconn) run() {
	defer b.c.wg.Done()
	o := &b.c.opts
	backoff := o.BackoffMin
	for b.ctx.Err() == nil {
		dctx, cancel := context.WithTimeout(b.ctx, o.DialTimeout)
		conn, err := link.Dial(dctx, b.ep.Addr)
		if _, tcp := conn.(*net.TCPConn); tcp && o.Secure != nil {
			if conn, err = o.Secure.Client(dctx, conn); err != nil && !errors.Is(err, context.Canceled) {
				// A configuration problem (the secrets differ) as often as
				// a network one: say so at warn level, but not on every
				// redial. A cancelled attempt (the ring replaced this
				// link, or shutdown) is neither.
				if ok, held := b.secureLog.Allow(time.Now()); ok {
					b.c.log.Warn("securing the broker link failed", "broker", b.ep.Name, "addr", b.ep.Addr, "error", err, "more_not_logged", held)
				}
			}
		}
		cancel()
		if err == nil {
			if b.serve(conn) {
				backoff = o.BackoffMin
			}
		} else if b.ctx.Err() == nil {
			b.c.log.Debug("dialling broker", "broker", b.ep.Name, "error", err)
		}
		// Jitter spreads the reconnects of many workers after a broker restart.
		d := backoff/2 + rand.N(backoff/2+1)
		select {
		case <-b.ctx.Done():
		case <-time.After(d):
		}
		backoff = min(2*backoff, o.BackoffMax)
	}
}

// serve runs one connection; it reports whether the link came up.
func (b *bconn) serve(conn net.Conn) (wasUp bool) {
	o := &b.c.opts
	w := link.NewWriter(conn, link.WriterConfig{MaxPending: o.MaxPending, WriteTimeout: o.WriteTimeout})
	b.mu.Lock()
	if b.dead {
		b.mu.Unlock()
		conn.Close()
		return false
	}
	b.conn, b.w = conn, w
	b.mu.Unlock()

	b.c.wg.Add(1)
	go func() {
		defer b.c.wg.Done()
		if err := w.Run(); errors.Is(err, net.ErrClosed) {
			// Closed on purpose (shutdown, e.g. the ring swapped this
			// link's address) or by the reader, which logged why.
			b.c.log.Debug("broker link writer stopped", "broker", b.ep.Name, "error", err)
		} else if err != nil {
			b.c.log.Warn("writing to broker", "broker", b.ep.Name, "error", err)
		}
		// A dead writer means a dead link: wake the reader.
		conn.Close()
	}()
	err := w.WriteHello(0, o.Name)
	if err == nil {
		err = b.read(conn)
	}
	wasUp = b.down(err)
	<-w.Done()
	return wasUp
}

func (b *bconn) read(conn net.Conn) error {
	o := &b.c.opts
	dec := link.Decoder{MaxFrame: o.MaxFrame}
	buf := make([]byte, 64<<10)
	// Channel names are interned per broker so the steady state allocates
	// no string per message.
	if b.names == nil {
		b.names = map[string]*chanPos{}
	}
	return link.ReadFrames(conn, &dec, buf, o.LinkTimeout, func(f *link.Frame) error {
		switch f.Type {
		case link.TypeMsg:
			p, ok := b.names[string(f.Channel)]
			if !ok {
				if len(b.names) >= 4096 {
					b.c.pruneNames(b)
				}
				p = b.c.position(string(f.Channel))
				b.names[p.name] = p
			}
			if p.hist {
				p.advance(f.Offset, f.Epoch)
			}
			b.c.received.Add(1)
			o.OnPublication(p.name, f.Data, f.Offset, f.Epoch)
		case link.TypeHist, link.TypeReply:
			b.reply(f)
		case link.TypeEvent:
			if f.Op == link.EventVacated {
				o.OnVacated(string(f.Channel))
				break
			}
			o.OnJoinLeave(string(f.Channel), f.Op == link.EventJoin, f.Data)
		case link.TypePubAck:
			b.ack(f)
		case link.TypeHello:
			if f.Version != link.Version {
				return fmt.Errorf("brokerclient: broker %s speaks link version %d, this worker %d", b.ep.Name, f.Version, link.Version)
			}
			b.c.linkUp(b)
		case link.TypePing:
			b.mu.Lock()
			if b.w != nil {
				_ = b.w.WriteEmpty(link.TypePong)
			}
			b.mu.Unlock()
		case link.TypePong:
		case link.TypeMembers:
			if o.OnMembers != nil {
				ms, err := link.ParseMembers(f.Data)
				if err != nil {
					return err
				}
				eps := make([]Endpoint, len(ms))
				for i, m := range ms {
					eps[i] = Endpoint(m)
				}
				b.c.noteView(b, eps)
			}
		default:
			return fmt.Errorf("brokerclient: unexpected %s frame from broker %s", f.Type, b.ep.Name)
		}
		return nil
	})
}

// linkUp registers every interest this broker owns, under the client lock
// so no Subscribe or Unsubscribe can interleave.
func (c *Client) linkUp(b *bconn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.w == nil || b.dead {
		return
	}
	b.up = true
	n := 0
	members := *c.members.Load()
	for ch := range c.subs {
		if owner(members, ch) == b {
			b.register(ch, c.pos[ch])
			n++
		}
	}
	// Presence entries of this worker for channels this broker owns (a
	// restarted broker, or a new owner, rebuilds presence from these), and
	// shadows of the internal ones it does not own (history.go, shadowed).
	for ch, conns := range c.pres {
		op := link.PresJoin
		if owner(members, ch) != b {
			if !shadowed(ch) {
				continue
			}
			op = link.PresShadowJoin // history.go
		}
		for _, raw := range conns {
			_ = b.w.WriteRawAlways(link.AppendPres(nil, 0, op, ch, raw))
		}
	}
	// Tells a starting broker that this worker's interest is complete (it
	// refuses publishes until every worker has said so; see broker).
	_ = b.w.WriteEmpty(link.TypeReady)
	if c.behind {
		_ = b.w.WriteRawAlways(link.AppendEmpty(nil, link.TypeBehind)) // flow control (SetBehind)
	}
	c.log.Debug("broker link up", "broker", b.ep.Name, "channels", n)
}

// register queues the interest in ch: a subrec from the worker's last
// position when it has one (history channels), else a sub. b.mu held, link
// up.
func (b *bconn) register(ch string, p *chanPos) {
	if p != nil && p.hist {
		if _, epoch := p.get(); epoch != 0 {
			b.resync(p)
			return
		}
	}
	_ = b.w.WriteChannel(link.TypeSub, ch)
}

// moveInterest registers ch at this broker after an owner change (see
// register); a link that is down registers it when it comes up.
func (b *bconn) moveInterest(ch string, p *chanPos) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.up {
		b.register(ch, p)
	}
}

// sendInterest queues a sub or unsub if the link is up; otherwise linkUp
// will register the interest set as it is then.
func (b *bconn) sendInterest(t link.Type, ch string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.up {
		_ = b.w.WriteChannel(t, ch)
	}
}

func (b *bconn) publish(ch string, data []byte, done func(uint64, error), job *replJob) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.up {
		return ErrBrokerDown
	}
	if len(b.queue)-b.head >= b.c.opts.MaxInflight {
		return ErrQueueFull
	}
	b.nextID++
	if err := b.w.WritePub(b.nextID, ch, data); err != nil {
		if errors.Is(err, link.ErrQueueFull) {
			return ErrQueueFull
		}
		return ErrBrokerDown
	}
	if b.head > 0 && b.head >= len(b.queue)/2 {
		n := copy(b.queue, b.queue[b.head:])
		clear(b.queue[n:])
		b.queue, b.head = b.queue[:n], 0
	}
	b.queue = append(b.queue, pending{
		id:       b.nextID,
		deadline: time.Now().Add(b.c.opts.PublishTimeout).UnixNano(),
		done:     done,
		repl:     job,
	})
	return nil
}

func (b *bconn) ack(f *link.Frame) {
	var p pending
	found := false
	b.mu.Lock()
	// Acks usually match the head; a durable publish's ack comes after its
	// group commit, so a later publish's ack may overtake it: the match is
	// found by a bounded scan and marked, and the head skips marked slots.
	for i := b.head; i < len(b.queue); i++ {
		if b.queue[i].id == f.ReqID && !b.queue[i].acked {
			p = b.queue[i]
			b.queue[i] = pending{id: p.id, acked: true}
			found = true
			break
		}
		if b.queue[i].id > f.ReqID {
			break
		}
	}
	for b.head < len(b.queue) && b.queue[b.head].acked {
		b.queue[b.head] = pending{}
		b.head++
	}
	b.mu.Unlock()
	if !found {
		return // timed out already
	}
	if len(f.Err) > 0 {
		b.c.putReplJob(p.repl)
		b.c.fail(p.done, fmt.Errorf("%w: broker %s: %s", ErrRefused, b.ep.Name, f.Err))
		return
	}
	if p.repl != nil {
		b.c.replicate(b, p.repl, f.Offset, f.Epoch, p.done)
		return
	}
	b.c.published.Add(1)
	p.done(f.Offset, nil)
}

// expire fails publishes whose ack is overdue.
func (b *bconn) expire(now time.Time) {
	ns := now.UnixNano()
	for range 1 << 20 { // bounded: at most the whole queue
		b.mu.Lock()
		if b.head >= len(b.queue) || b.queue[b.head].deadline > ns {
			b.mu.Unlock()
			return
		}
		p := b.queue[b.head]
		b.queue[b.head] = pending{}
		b.head++
		b.mu.Unlock()
		if p.acked {
			continue
		}
		b.c.putReplJob(p.repl)
		b.c.fail(p.done, ErrTimeout)
	}
}

func (b *bconn) ping() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.up {
		_ = b.w.WriteEmpty(link.TypePing)
	}
}

// down marks the link down and fails what was in flight. It reports whether
// the link had come up.
func (b *bconn) down(err error) bool {
	b.mu.Lock()
	wasUp := b.up
	w, conn := b.w, b.conn
	b.up, b.w, b.conn = false, nil, nil
	q := b.queue[b.head:]
	b.queue, b.head = nil, 0
	reqs, repls := b.reqs, b.repls
	b.reqs, b.repls = nil, nil
	dead := b.dead
	b.mu.Unlock()
	w.Close()
	conn.Close()
	// A down link's view is stale from now on.
	b.c.dropView(b)
	if !dead && !errors.Is(err, io.EOF) {
		b.c.log.Warn("broker link lost", "broker", b.ep.Name, "error", err)
	} else if !dead {
		b.c.log.Info("broker closed the link", "broker", b.ep.Name)
	}
	failWith := ErrLinkLost
	if dead && b.c.isClosed.Load() {
		failWith = ErrClosed
	}
	for _, p := range q {
		if !p.acked {
			b.c.putReplJob(p.repl)
			b.c.fail(p.done, failWith)
		}
	}
	for _, r := range reqs {
		r.finish(nil, failWith)
	}
	// The owner acknowledged these; only the replica copy is in doubt.
	for _, w := range repls {
		b.c.finishRepl(w, false)
	}
	return wasUp
}

// shutdown stops the link for good (broker removed, or client closed).
func (b *bconn) shutdown() {
	b.cancel()
	b.mu.Lock()
	b.dead = true
	b.up = false
	conn := b.conn
	b.mu.Unlock()
	if conn != nil {
		conn.Close()
	}
}
