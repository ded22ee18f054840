package brokerclient

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/shoalhq/shoal/proto/link"
)

// Message is one stored publication of a channel.
type Message struct {
	Offset uint64
	Time   time.Time // when the owning broker stored it
	Data   []byte
}

// RecoverResult answers SubscribeRecover. Epoch and Offset are the
// channel's current epoch and last offset: when Recovered, Messages are
// exactly the publications after the requested offset up to Offset, in
// order, and every publication delivered to OnPublication afterwards has a
// higher offset. When not Recovered, Messages is empty and the subscriber
// should treat its state as stale (reload, or accept the gap).
type RecoverResult struct {
	Epoch     string
	Offset    uint64
	Recovered bool
	Messages  []Message
}

// HistoryPage is one page of a channel's history.
type HistoryPage struct {
	Epoch    string
	Offset   uint64    // the channel's last offset
	Messages []Message // ascending offsets
	More     bool      // the page was cut by the limit; ask again with since = last offset
}

// PresenceEntry is one connection's presence in a channel. Info is the
// client's info as JSON (from the token or set by the app).
type PresenceEntry struct {
	Conn   string          `json:"conn"`
	User   string          `json:"user,omitempty"`
	Worker string          `json:"worker,omitempty"`
	Info   json.RawMessage `json:"info,omitempty"`
}

// ChannelInfo is one channel in Channels' list.
type ChannelInfo struct {
	Channel     string   `json:"channel"`
	Workers     int      `json:"workers"`      // workers with at least one subscriber
	WorkerNames []string `json:"worker_names"` // their names (hello names), sorted
	Presence    int      `json:"presence"`     // presence entries
	Offset      uint64   `json:"offset"`
	Epoch       string   `json:"epoch"`
}

// ErrRequest wraps an error a broker answered to a request.
var ErrRequest = errors.New("brokerclient: broker answered an error")

// FormatEpoch is the string form of a link epoch (what clients see).
func FormatEpoch(e uint64) string {
	if e == 0 {
		return ""
	}
	return strconv.FormatUint(e, 36)
}

// ParseEpoch parses FormatEpoch's output; anything else is 0 (no epoch:
// never recoverable).
func ParseEpoch(s string) uint64 {
	e, err := strconv.ParseUint(s, 36, 64)
	if err != nil {
		return 0
	}
	return e
}

// request is one request awaiting its reply on a link.
type request struct {
	id       uint64
	deadline int64
	msgs     []Message
	done     func(r *request, f *link.Frame, err error)
	once     sync.Once
}

func (r *request) finish(f *link.Frame, err error) {
	r.once.Do(func() { r.done(r, f, err) })
}

// request queues a frame built by enc with a fresh id and registers done
// for its reply. done runs exactly once: on the link's reader goroutine with
// the reply, or with an error (link lost, timeout, not sent).
func (b *bconn) request(enc func(dst []byte, id uint64) []byte, done func(r *request, f *link.Frame, err error)) {
	r := &request{done: done, deadline: time.Now().Add(b.c.opts.PublishTimeout).UnixNano()}
	b.mu.Lock()
	if !b.up {
		b.mu.Unlock()
		r.finish(nil, ErrBrokerDown)
		return
	}
	b.nextID++
	r.id = b.nextID
	if err := b.w.WriteRaw(enc(nil, r.id)); err != nil {
		b.mu.Unlock()
		if errors.Is(err, link.ErrQueueFull) {
			r.finish(nil, ErrQueueFull)
		} else {
			r.finish(nil, ErrBrokerDown)
		}
		return
	}
	if b.reqs == nil {
		b.reqs = map[uint64]*request{}
	}
	b.reqs[r.id] = r
	b.mu.Unlock()
}

// reply handles hist and reply frames (reader goroutine).
func (b *bconn) reply(f *link.Frame) {
	b.mu.Lock()
	if w, ok := b.repls[f.ReqID]; ok && f.Type == link.TypeReply {
		delete(b.repls, f.ReqID)
		b.mu.Unlock()
		if f.Flags&link.FlagError != 0 {
			b.c.log.Debug("replica refused a history append", "broker", b.ep.Name, "error", string(f.Data))
		}
		b.c.finishRepl(w, f.Flags&link.FlagError == 0)
		return
	}
	r := b.reqs[f.ReqID]
	if r != nil && f.Type == link.TypeReply {
		delete(b.reqs, f.ReqID)
	}
	b.mu.Unlock()
	if r == nil {
		return // timed out
	}
	if f.Type == link.TypeHist {
		r.msgs = append(r.msgs, Message{Offset: f.Offset, Time: time.Unix(0, f.Time), Data: slices.Clone(f.Data)})
		return
	}
	if f.Flags&link.FlagError != 0 {
		r.finish(f, fmt.Errorf("%w: broker %s: %s", ErrRequest, b.ep.Name, f.Data))
		return
	}
	r.finish(f, nil)
}

// expireRequests fails requests whose reply is overdue.
func (b *bconn) expireRequests(ns int64) {
	var late []*request
	var lateRepl []replWait
	b.mu.Lock()
	for id, r := range b.reqs {
		if r.deadline <= ns {
			late = append(late, r)
			delete(b.reqs, id)
		}
	}
	for id, w := range b.repls {
		if w.deadline <= ns {
			lateRepl = append(lateRepl, w)
			delete(b.repls, id)
		}
	}
	b.mu.Unlock()
	for _, r := range late {
		r.finish(nil, ErrTimeout)
	}
	for _, w := range lateRepl {
		b.c.finishRepl(w, false)
	}
}

// resync re-registers a history channel after this link came back, or at
// its new owner, asking for what the worker missed since the last message
// it delivered; the missed messages go to OnPublication in order, before
// live ones from this link, and OnResync reports the outcome. Called with
// c.mu and b.mu held, link up.
func (b *bconn) resync(p *chanPos) {
	since, epoch := p.get()
	b.nextID++
	r := &request{id: b.nextID, deadline: time.Now().Add(b.c.opts.PublishTimeout).UnixNano()}
	r.done = func(r *request, f *link.Frame, err error) {
		if err != nil {
			b.c.opts.OnResync(p.name, RecoverResult{}, err)
			return
		}
		res := RecoverResult{Epoch: FormatEpoch(f.Epoch), Offset: f.Offset, Recovered: f.Flags&link.FlagRecovered != 0}
		if res.Recovered {
			res.Messages = r.msgs
			for _, m := range r.msgs {
				b.c.received.Add(1)
				b.c.opts.OnPublication(p.name, m.Data, m.Offset, f.Epoch)
			}
		}
		p.advance(f.Offset, f.Epoch)
		b.c.opts.OnResync(p.name, res, nil)
	}
	if b.reqs == nil {
		b.reqs = map[uint64]*request{}
	}
	b.reqs[r.id] = r
	// Like interest frames, a re-registration ignores the queue bound.
	_ = b.w.WriteRawAlways(link.AppendSubRec(nil, link.TypeSubRec, r.id, since, epoch, p.name))
}

// position returns the shared position of channel, creating it.
func (c *Client) position(channel string) *chanPos {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.pos[channel]
	if p == nil {
		p = &chanPos{name: channel, hist: c.rules.Lookup(channel).History()}
		c.pos[channel] = p
	}
	return p
}

// pruneNames drops positions of channels this worker no longer wants
// (reader goroutine of b).
func (c *Client) pruneNames(b *bconn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for name := range b.names {
		if _, ok := c.subs[name]; !ok {
			delete(b.names, name)
		}
	}
	if len(c.pos) > 2*len(c.subs)+4096 {
		for name := range c.pos {
			if _, ok := c.subs[name]; !ok {
				delete(c.pos, name)
			}
		}
	}
}

// replJob keeps a history publish's data until its replica has it.
type replJob struct {
	channel string
	data    []byte
	// withEpoch (PublishPos) replaces the publish's done on success, with
	// the epoch of the ack; noRepl: the channel has no history, the job
	// only carries withEpoch.
	withEpoch func(offset, epoch uint64, err error)
	noRepl    bool
}

var replPool = sync.Pool{New: func() any { return new(replJob) }}

func (c *Client) newReplJob(channel string, data []byte) *replJob {
	j := replPool.Get().(*replJob)
	j.channel, j.data = channel, append(j.data[:0], data...)
	return j
}

func (c *Client) putReplJob(j *replJob) {
	if j == nil {
		return
	}
	j.channel, j.withEpoch, j.noRepl = "", nil, false
	if cap(j.data) > 64<<10 {
		j.data = nil
	}
	replPool.Put(j)
}

// replica returns the channel's next broker in rendezvous order — the one
// that owns it if the owner dies — or nil.
func replica(members []*bconn, channel string, own *bconn) *bconn {
	var best *bconn
	var bestScore uint64
	for _, b := range members {
		if b == own {
			continue
		}
		if s := score(b.ep.Name, channel); best == nil || s > bestScore {
			best, bestScore = b, s
		}
	}
	return best
}

// replWait is a history append waiting for its replica. Replication has
// its own table (not request's) so the publish hot path allocates no
// request, closure or frame per message.
type replWait struct {
	job        *replJob
	off, epoch uint64
	deadline   int64
	done       func(uint64, error)
}

// replicate forwards an acknowledged history append to the replica and
// calls done once the replica confirmed it. Without a reachable replica the
// publish is acknowledged anyway and counted as ReplicaMissed: the message
// is at the owner (and on disk for durable channels) but a broker loss now
// would lose it.
func (c *Client) replicate(from *bconn, j *replJob, off, epoch uint64, done func(uint64, error)) {
	if j.noRepl {
		c.succeed(j, off, epoch, done)
		return
	}
	r := replica(*c.members.Load(), j.channel, from)
	if r == nil {
		c.succeed(j, off, epoch, done)
		return
	}
	if !r.sendRepl(j, off, epoch, done) {
		c.finishRepl(replWait{job: j, off: off, epoch: epoch, done: done}, false)
	}
}

// succeed releases j and reports an acknowledged publish to its caller.
func (c *Client) succeed(j *replJob, off, epoch uint64, done func(uint64, error)) {
	withEpoch := j.withEpoch
	c.putReplJob(j)
	c.published.Add(1)
	if withEpoch != nil {
		withEpoch(off, epoch, nil)
		return
	}
	done(off, nil)
}

// sendRepl queues a repl frame; false if the replica's link is down or full.
func (b *bconn) sendRepl(j *replJob, off, epoch uint64, done func(uint64, error)) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.up {
		return false
	}
	b.nextID++
	b.scratch = link.AppendRepl(b.scratch[:0], b.nextID, off, epoch, j.channel, j.data)
	if err := b.w.WriteRaw(b.scratch); err != nil {
		return false
	}
	if cap(b.scratch) > 64<<10 {
		b.scratch = nil
	}
	if b.repls == nil {
		b.repls = map[uint64]replWait{}
	}
	b.repls[b.nextID] = replWait{job: j, off: off, epoch: epoch, done: done, deadline: time.Now().Add(b.c.opts.PublishTimeout).UnixNano()}
	return true
}

func (c *Client) finishRepl(w replWait, ok bool) {
	if ok {
		c.replicated.Add(1)
	} else {
		c.replicaMissed.Add(1)
	}
	c.succeed(w.job, w.off, w.epoch, w.done)
}

// SubscribeRecover registers interest in channel like Subscribe and asks
// its owner for the publications after offset since of epoch (as the
// subscriber last saw them). done is called once, on the link's reader
// goroutine, before any publication of channel that follows the recovered
// ones reaches OnPublication; see RecoverResult. Publications with an
// offset ≤ result.Offset that reached OnPublication before done are part
// of the recovery: a worker adding a socket to its local fan-out at done
// time, after writing result.Messages to it, gives the socket no gap and no
// duplicate. An error (ErrBrokerDown, ErrLinkLost, ErrTimeout, ErrNoBrokers)
// means no recovery; the interest stays registered (it is re-sent when the
// owner's link comes up).
func (c *Client) SubscribeRecover(channel string, since uint64, epoch string, done func(RecoverResult, error)) {
	if channel == "" || len(channel) > link.MaxChannel {
		done(RecoverResult{}, ErrTooLarge)
		return
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		done(RecoverResult{}, ErrClosed)
		return
	}
	c.subs[channel] = struct{}{}
	o := owner(*c.members.Load(), channel)
	c.mu.Unlock()
	if o == nil {
		done(RecoverResult{}, ErrNoBrokers)
		return
	}
	// Not under c.mu (done may run at once, and may call the client). If
	// linkUp registers the channel meanwhile, the broker treats this
	// subrec's interest as already there.
	o.request(func(dst []byte, id uint64) []byte {
		return link.AppendSubRec(dst, link.TypeSubRec, id, since, ParseEpoch(epoch), channel)
	}, func(r *request, f *link.Frame, err error) {
		if err != nil {
			done(RecoverResult{}, err)
			return
		}
		res := RecoverResult{Epoch: FormatEpoch(f.Epoch), Offset: f.Offset, Recovered: f.Flags&link.FlagRecovered != 0}
		if res.Recovered {
			res.Messages = r.msgs
		}
		// The worker now holds the channel from here on: a later
		// re-registration recovers from this point even if no message
		// arrives meanwhile.
		if p := c.position(channel); p.hist {
			p.advance(f.Offset, f.Epoch)
		}
		done(res, nil)
	})
}

// History reads a page of channel's history from its owner: messages with
// an offset above since (since 0: from the oldest kept), at most limit
// (0: all kept).
func (c *Client) History(ctx context.Context, channel string, since uint64, limit int) (HistoryPage, error) {
	o, err := c.ownerOf(channel)
	if err != nil {
		return HistoryPage{}, err
	}
	type res struct {
		p   HistoryPage
		err error
	}
	ch := make(chan res, 1)
	o.request(func(dst []byte, id uint64) []byte {
		return link.AppendSubRec(dst, link.TypeHistReq, id, since, uint64(max(limit, 0)), channel)
	}, func(r *request, f *link.Frame, err error) {
		if err != nil {
			ch <- res{err: err}
			return
		}
		ch <- res{p: HistoryPage{Epoch: FormatEpoch(f.Epoch), Offset: f.Offset, Messages: r.msgs, More: f.Flags&link.FlagMore != 0}}
	})
	select {
	case r := <-ch:
		return r.p, r.err
	case <-ctx.Done():
		return HistoryPage{}, fmt.Errorf("brokerclient: history of %q: %w", channel, ctx.Err())
	}
}

func (c *Client) ownerOf(channel string) (*bconn, error) {
	if c.isClosed.Load() {
		return nil, ErrClosed
	}
	if channel == "" || len(channel) > link.MaxChannel {
		return nil, ErrTooLarge
	}
	o := owner(*c.members.Load(), channel)
	if o == nil {
		return nil, ErrNoBrokers
	}
	return o, nil
}

// sendPres queues a presence change without waiting for the answer (a
// failed one is logged; the entry is re-announced when the link returns).
// With out set, the answer goes there instead.
func (b *bconn) sendPres(op uint8, channel string, data []byte, out chan<- presAnswer) {
	b.request(func(dst []byte, id uint64) []byte {
		return link.AppendPres(dst, id, op, channel, data)
	}, func(_ *request, f *link.Frame, err error) {
		if out != nil {
			a := presAnswer{err: err}
			if err == nil {
				a.n, a.counted = int(f.Offset), f.Flags&link.FlagCounted != 0
				if f.Flags&link.FlagError != 0 {
					a.err = fmt.Errorf("brokerclient: presence change on %q: %s", channel, f.Data)
				}
			}
			out <- a
			return
		}
		if err != nil && !errors.Is(err, ErrBrokerDown) {
			b.c.log.Debug("presence change", "channel", channel, "broker", b.ep.Name, "error", err)
		}
	})
}

// presAnswer is the owner's answer to a join or leave: with counted, n is
// how many other entries the channel held right after the change.
type presAnswer struct {
	n       int
	counted bool
	err     error
}

// waitPres waits for the answer to a join or leave sent with sendPres.
func waitPres(ctx context.Context, out <-chan presAnswer) (presAnswer, error) {
	select {
	case a := <-out:
		return a, a.err
	case <-ctx.Done():
		return presAnswer{}, fmt.Errorf("brokerclient: presence change: %w", ctx.Err())
	}
}

// PresenceJoin announces a connection in channel. The client remembers it
// and (re-)announces it to the channel's owner whenever that link comes up
// and after an owner change, until PresenceLeave. The entry's Worker
// defaults to Options.Name. Errors: a missing conn id, a bad channel name,
// ErrClosed.
func (c *Client) PresenceJoin(channel string, e PresenceEntry) error {
	return c.presenceSet(channel, e, link.PresJoin, nil)
}

// PresenceJoinCount is PresenceJoin that waits for the owner's answer and
// returns how many other entries channel holds right after the join. The
// owner counts in the same step as the join, so of two connections joining
// an empty channel at once exactly one sees 0 (a join followed by a
// separate count could see both, or neither, depending on timing). A
// broker from before the counted answer is asked with PresenceCount after
// the join instead (not in the same step).
func (c *Client) PresenceJoinCount(ctx context.Context, channel string, e PresenceEntry) (others int, err error) {
	wait, err := c.PresenceJoinCounted(channel, e)
	if err != nil {
		return 0, err
	}
	return wait(ctx)
}

// PresenceJoinCounted is PresenceJoinCount in two steps: the join is
// queued on the link when it returns, so a PresenceLeave of the same entry
// made after it is sent after it, and wait returns the count. Callers that
// must not hold a lock across the round trip use it (conn_limit's
// reservations, worker/connlimit.go).
func (c *Client) PresenceJoinCounted(channel string, e PresenceEntry) (wait func(context.Context) (others int, err error), err error) {
	out := make(chan presAnswer, 1)
	if err := c.presenceSet(channel, e, link.PresJoin, out); err != nil {
		return nil, err
	}
	return func(ctx context.Context) (int, error) {
		a, err := waitPres(ctx, out)
		if err != nil || a.counted {
			return a.n, err
		}
		n, err := c.PresenceCount(ctx, channel)
		return max(n-1, 0), err
	}, nil
}

// PresenceUpdate replaces a connection's entry (e.g. new client info);
// subscribers get no join event for it.
func (c *Client) PresenceUpdate(channel string, e PresenceEntry) error {
	return c.presenceSet(channel, e, link.PresUpdate, nil)
}

// presenceSet remembers and announces an entry; with out set, the owner's
// answer goes there (ErrNoBrokers when no owner is reachable now).
func (c *Client) presenceSet(channel string, e PresenceEntry, op uint8, out chan<- presAnswer) error {
	if e.Conn == "" {
		return fmt.Errorf("brokerclient: presence entry without a conn id")
	}
	if e.Worker == "" {
		e.Worker = c.opts.Name
	}
	raw, err := json.Marshal(e)
	if err != nil {
		return fmt.Errorf("brokerclient: presence entry: %w", err)
	}
	if channel == "" || len(channel) > link.MaxChannel {
		return ErrTooLarge
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	// Remembered even when no owner is reachable now: it is announced when
	// the owner's link comes up.
	if c.pres[channel] == nil {
		c.pres[channel] = map[string][]byte{}
	}
	c.pres[channel][e.Conn] = raw
	members := *c.members.Load()
	o := owner(members, channel)
	if o != nil {
		o.sendPres(op, channel, raw, out)
	} else if out != nil {
		out <- presAnswer{err: ErrNoBrokers}
	}
	if shadowed(channel) {
		for _, b := range members {
			if b != o {
				b.sendPres(link.PresShadowJoin, channel, raw, nil)
			}
		}
	}
	return nil
}

// shadowed reports whether channel's presence entries are also kept, as
// shadows, by every broker other than the owner: the internal channels
// whose entries stand for workers (webhook occupancy), so that the broker
// owning the channel after its owner died can report the vacancy a dead
// worker leaves (broker/presence.go, "Vacated notices").
func shadowed(channel string) bool { return len(channel) > 0 && channel[0] == '#' }

// PresenceLeave removes a connection's entry from channel.
func (c *Client) PresenceLeave(channel, conn string) {
	c.presenceLeave(channel, conn, nil)
}

// PresenceLeaveCount is PresenceLeave that waits for the owner's answer
// and returns how many entries channel still holds, counted in the same
// step as the leave (see PresenceJoinCount).
func (c *Client) PresenceLeaveCount(ctx context.Context, channel, conn string) (left int, err error) {
	out := make(chan presAnswer, 1)
	c.presenceLeave(channel, conn, out)
	a, err := waitPres(ctx, out)
	if err != nil || a.counted {
		return a.n, err
	}
	return c.PresenceCount(ctx, channel)
}

func (c *Client) presenceLeave(channel, conn string, out chan<- presAnswer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cs := c.pres[channel]; cs != nil {
		delete(cs, conn)
		if len(cs) == 0 {
			delete(c.pres, channel)
		}
	}
	members := *c.members.Load()
	o := owner(members, channel)
	if o != nil {
		o.sendPres(link.PresLeave, channel, []byte(conn), out)
	} else if out != nil {
		out <- presAnswer{err: ErrNoBrokers}
	}
	if shadowed(channel) {
		for _, b := range members {
			if b != o {
				b.sendPres(link.PresShadowLeave, channel, []byte(conn), nil)
			}
		}
	}
}

// presQuery sends a query to one broker and waits.
func (c *Client) presQuery(ctx context.Context, b *bconn, op uint8, channel string) (uint64, []byte, error) {
	n, data, _, err := c.presPage(ctx, b, op, channel, nil)
	return n, data, err
}

// presPage is presQuery with an argument (a page cursor) and the reply's
// more flag.
func (c *Client) presPage(ctx context.Context, b *bconn, op uint8, channel string, arg []byte) (uint64, []byte, bool, error) {
	type res struct {
		n    uint64
		data []byte
		more bool
		err  error
	}
	ch := make(chan res, 1)
	b.request(func(dst []byte, id uint64) []byte {
		return link.AppendPres(dst, id, op, channel, arg)
	}, func(_ *request, f *link.Frame, err error) {
		if err != nil {
			ch <- res{err: err}
			return
		}
		ch <- res{n: f.Offset, data: slices.Clone(f.Data), more: f.Flags&link.FlagMore != 0}
	})
	select {
	case r := <-ch:
		return r.n, r.data, r.more, r.err
	case <-ctx.Done():
		return 0, nil, false, fmt.Errorf("brokerclient: presence query: %w", ctx.Err())
	}
}

// Presence lists channel's entries (from its owner), sorted by conn id.
func (c *Client) Presence(ctx context.Context, channel string) ([]PresenceEntry, error) {
	o, err := c.ownerOf(channel)
	if err != nil {
		return nil, err
	}
	// Read in pages (each a bounded reply frame), so a channel with more
	// entries than one frame holds is listed whole; the cursor is the last
	// conn id of the previous page. A broker from before pages answers the
	// whole list at once, without FlagMore.
	out := []PresenceEntry{}
	cursor := []byte{link.PresPageMark}
	for page := 0; ; page++ {
		_, data, more, err := c.presPage(ctx, o, link.PresList, channel, cursor)
		if err != nil {
			return nil, err
		}
		var list []PresenceEntry
		if err := json.Unmarshal(data, &list); err != nil {
			return nil, fmt.Errorf("brokerclient: presence of %q: %w", channel, err)
		}
		out = append(out, list...)
		if !more || len(list) == 0 {
			return out, nil
		}
		if page >= 1<<20 { // bounded: a broker that keeps saying "more"
			return nil, fmt.Errorf("brokerclient: presence of %q: too many pages", channel)
		}
		cursor = append(cursor[:1], list[len(list)-1].Conn...)
	}
}

// PresenceCount counts channel's entries.
func (c *Client) PresenceCount(ctx context.Context, channel string) (int, error) {
	o, err := c.ownerOf(channel)
	if err != nil {
		return 0, err
	}
	n, _, err := c.presQuery(ctx, o, link.PresCount, channel)
	return int(n), err
}

// everyBroker runs a query on every broker of the set and gathers the
// answers; a broker whose link is down fails the whole call (a partial
// list would look complete).
func (c *Client) everyBroker(ctx context.Context, op uint8, arg string, each func(b *bconn, data []byte) error) error {
	members := *c.members.Load()
	if len(members) == 0 {
		return ErrNoBrokers
	}
	for _, b := range members {
		_, data, err := c.presQuery(ctx, b, op, arg)
		if err != nil {
			return fmt.Errorf("broker %s: %w", b.ep.Name, err)
		}
		if err := each(b, data); err != nil {
			return fmt.Errorf("broker %s: %w", b.ep.Name, err)
		}
	}
	return nil
}

// UserChannels lists the channels where user has a presence entry, across
// every broker.
func (c *Client) UserChannels(ctx context.Context, user string) ([]string, error) {
	seen := map[string]bool{}
	err := c.everyBroker(ctx, link.PresUser, user, func(_ *bconn, data []byte) error {
		var chans []string
		if err := json.Unmarshal(data, &chans); err != nil {
			return err
		}
		for _, ch := range chans {
			seen[ch] = true
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("brokerclient: channels of user %q: %w", user, err)
	}
	out := make([]string, 0, len(seen))
	for ch := range seen {
		out = append(out, ch)
	}
	sort.Strings(out)
	return out, nil
}

// Channels lists the channels with interest or presence across every
// broker; a channel reported by several brokers (during an ownership move)
// is taken from its current owner.
func (c *Client) Channels(ctx context.Context) ([]ChannelInfo, error) {
	type wire struct {
		Channel  string   `json:"channel"`
		Workers  int      `json:"workers"`
		Names    []string `json:"names"`
		Presence int      `json:"presence"`
		Offset   uint64   `json:"offset"`
		Epoch    uint64   `json:"epoch"`
	}
	members := *c.members.Load()
	if len(members) == 0 {
		return nil, fmt.Errorf("brokerclient: channel list: %w", ErrNoBrokers)
	}
	byName := map[string]ChannelInfo{}
	for _, b := range members {
		// A broker answers in pages (each a bounded reply frame); the
		// cursor is the last channel of the previous page.
		cursor := ""
		for page := 0; ; page++ {
			_, data, more, err := c.presPage(ctx, b, link.PresChannels, "-", []byte(cursor))
			if err != nil {
				return nil, fmt.Errorf("brokerclient: channel list: broker %s: %w", b.ep.Name, err)
			}
			var list []wire
			if err := json.Unmarshal(data, &list); err != nil {
				return nil, fmt.Errorf("brokerclient: channel list: broker %s: %w", b.ep.Name, err)
			}
			for _, w := range list {
				if _, ok := byName[w.Channel]; ok && owner(members, w.Channel) != b {
					continue
				}
				byName[w.Channel] = ChannelInfo{Channel: w.Channel, Workers: w.Workers, WorkerNames: w.Names, Presence: w.Presence, Offset: w.Offset, Epoch: FormatEpoch(w.Epoch)}
			}
			if !more || len(list) == 0 {
				break
			}
			if page >= 1<<20 { // bounded: a broker that keeps saying "more"
				return nil, fmt.Errorf("brokerclient: channel list: broker %s: too many pages", b.ep.Name)
			}
			cursor = list[len(list)-1].Channel
		}
	}
	out := make([]ChannelInfo, 0, len(byName))
	for _, ci := range byName {
		out = append(out, ci)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Channel < out[j].Channel })
	return out, nil
}

// HistoryState is one channel's history as a broker holds it (for a
// broker's hand-back; see docs/history.md).
type HistoryState struct {
	Channel   string `json:"channel"`
	Epoch     uint64 `json:"epoch"`
	PrevEpoch uint64 `json:"prev_epoch"`
	PrevTop   uint64 `json:"prev_top"`
	Offset    uint64 `json:"offset"`
	Stored    int    `json:"stored"`
}

// HistoryStates lists the history states every broker of the set holds
// (owned or replica copies). Brokers use it to take history back from their
// peers after a restart.
func (c *Client) HistoryStates(ctx context.Context) ([]HistoryState, error) {
	var out []HistoryState
	err := c.everyBroker(ctx, link.PresHistory, "-", func(_ *bconn, data []byte) error {
		var list []HistoryState
		if err := json.Unmarshal(data, &list); err != nil {
			return err
		}
		out = append(out, list...)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("brokerclient: history states: %w", err)
	}
	return out, nil
}
