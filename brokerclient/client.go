// Package brokerclient is the worker's side of the broker tier: one link to
// every broker, channel ownership by rendezvous hashing, worker-level
// interest registration, and publishes with acknowledgements.
//
// Ownership is computed over the broker set given to SetBrokers (the
// membership), not over the links that happen to be connected: every worker
// is given the same set, so every worker agrees on each channel's owner. A
// channel whose owner's link is down fails its publishes at once (and its
// interest is re-registered when the link returns) until SetBrokers drops
// that broker, which moves only that broker's channels.
//
// Concurrency: every method is safe for concurrent use. Publish never blocks
// on the network. done callbacks and OnMessage run on the client's goroutines
// (or, for immediate failures, on the caller's) and must not block.
//
// Lock order: Client.mu → bconn.mu → link.Writer's mutex.
package brokerclient

import (
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/broker/chanopts"
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/proto/link"
)

// Errors given to Publish's done.
var (
	// ErrNoBrokers: SetBrokers has not named any broker yet.
	ErrNoBrokers = errors.New("brokerclient: no brokers known")
	// ErrBrokerDown: the channel's owner has no live link right now.
	ErrBrokerDown = errors.New("brokerclient: channel owner unreachable")
	// ErrLinkLost: the link to the owner died before the ack arrived; the
	// message may or may not have been delivered.
	ErrLinkLost = errors.New("brokerclient: link to broker lost before the ack")
	// ErrTimeout: no ack within Options.PublishTimeout.
	ErrTimeout = errors.New("brokerclient: publish not acknowledged in time")
	// ErrQueueFull: too many publishes in flight or too many bytes queued
	// to the owner.
	ErrQueueFull = errors.New("brokerclient: publish queue full")
	// ErrRefused: the broker answered with an error (e.g. it is starting
	// and its workers have not all re-registered yet); the message was not
	// published.
	ErrRefused = errors.New("brokerclient: broker refused the publish")
	// ErrClosed: the client is closed.
	ErrClosed = errors.New("brokerclient: closed")
	// ErrTooLarge: the channel name or the payload does not fit a link frame.
	ErrTooLarge = errors.New("brokerclient: channel name or payload too large")
)

// Endpoint is one broker: its unique name and link address ("unix:/path" or
// "tcp:host:port").
type Endpoint struct {
	Name string
	Addr string
}

// Options configure a Client. Zero fields take the defaults.
type Options struct {
	Name string // this worker's name, sent in hello (for the broker's logs)
	// OnMessage receives every message for a channel this worker is
	// interested in, from the link's reader goroutine, in order per
	// channel. data points into the link's read buffer: it is valid only
	// during the call; copy what you keep.
	OnMessage func(channel string, data []byte, offset uint64)
	// OnPublication, if set, replaces OnMessage and also receives the
	// channel's epoch (format it with FormatEpoch; cache the string, it
	// changes rarely). Same rules as OnMessage.
	OnPublication func(channel string, data []byte, offset, epoch uint64)
	// OnJoinLeave receives presence join/leave events of channels this
	// worker is interested in whose rule has join_leave on. entry is the
	// entry's JSON (PresenceEntry's shape), valid only during the call.
	OnJoinLeave func(channel string, join bool, entry []byte)
	// OnVacated receives a broker's notice that an internal ("#")
	// channel's last presence entry went with a dead worker's link (reader
	// goroutine; one live worker gets each notice). The worker reports the
	// webhook event the dead worker could not (worker/clusterevents.go).
	OnVacated func(channel string)
	// OnResync reports the re-registration of a history channel after this
	// worker's link to its owner came back (reader goroutine): when
	// res.Recovered, the messages the worker missed were delivered to
	// OnPublication first (and are in res.Messages); otherwise (or with
	// err) the worker's subscribers of channel may have missed messages.
	OnResync func(channel string, res RecoverResult, err error)
	// Channels are the config's channel rules: publishes to channels with
	// history are replicated to the channel's next broker before their
	// done is called (see docs/history.md). The brokers must be given the
	// same rules.
	Channels []configs.ChannelRule
	// OnMembers, if set, receives the broker ring's live members whenever
	// they change: the members that more than half of the linked brokers
	// list in their latest report (views.go, docs/brokers.md). It is called
	// from a link's reader goroutine, one call at a time. The client does
	// not act on it: the owner of the worker decides, and calls SetBrokers.
	OnMembers func([]Endpoint)
	Logger    hclog.Logger

	PublishTimeout time.Duration // ack deadline; default 5 s
	MaxInflight    int           // unacknowledged publishes per broker; default 65536
	MaxPending     int           // bytes queued per broker link; default 4 MiB
	// MaxFrame is the largest frame either way: set it to the config's
	// protocol.max_payload + link.Overhead, as the brokers do (default
	// link.DefaultMaxFrame, which fits the default 1 MiB). A publish that
	// would exceed it fails with ErrTooLarge instead of making the broker
	// drop the link.
	MaxFrame    int
	DialTimeout time.Duration // default 2 s
	BackoffMin  time.Duration // first reconnect delay; default 20 ms
	BackoffMax  time.Duration // default 250 ms: a restarted local broker is back within ~0.3 s, and a redial is cheap
	// PingInterval is the keepalive period (default 3 s): the broker drops
	// a link it hears nothing from for its IdleTimeout (default 9 s, three
	// pings), which is what clears a dead node's presence entries.
	PingInterval time.Duration
	// LinkTimeout: a broker link that delivers nothing (not even the pong
	// of a ping) this long is declared dead and redialled; default
	// 3 × PingInterval (9 s).
	LinkTimeout  time.Duration
	WriteTimeout time.Duration // default 10 s
	// Secure, if set, secures links over TCP with the cluster
	// secret (TLS, and proofs both ways; proto/link/secure.go). Links over
	// unix sockets stay plain. A broker that fails the proof is logged and
	// redialled like a broker that is down.
	Secure *link.Secure
}

func (o *Options) defaults() {
	if o.Logger == nil {
		o.Logger = hclog.NewNullLogger()
	}
	if o.OnMessage == nil {
		o.OnMessage = func(string, []byte, uint64) {}
	}
	if o.OnPublication == nil {
		onMsg := o.OnMessage
		o.OnPublication = func(ch string, data []byte, off, _ uint64) { onMsg(ch, data, off) }
	}
	if o.OnResync == nil {
		o.OnResync = func(string, RecoverResult, error) {}
	}
	if o.OnJoinLeave == nil {
		o.OnJoinLeave = func(string, bool, []byte) {}
	}
	if o.OnVacated == nil {
		o.OnVacated = func(string) {}
	}
	if o.PublishTimeout <= 0 {
		o.PublishTimeout = 5 * time.Second
	}
	if o.MaxInflight <= 0 {
		o.MaxInflight = 1 << 16
	}
	if o.MaxPending <= 0 {
		o.MaxPending = 4 << 20
	}
	if o.MaxFrame <= 0 {
		o.MaxFrame = link.DefaultMaxFrame
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 2 * time.Second
	}
	if o.BackoffMin <= 0 {
		o.BackoffMin = 20 * time.Millisecond
	}
	if o.BackoffMax <= 0 {
		o.BackoffMax = 250 * time.Millisecond
	}
	if o.PingInterval <= 0 {
		o.PingInterval = 3 * time.Second
	}
	if o.LinkTimeout <= o.PingInterval {
		o.LinkTimeout = 3 * o.PingInterval
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 10 * time.Second
	}
}

// Stats are the client's counters.
type Stats struct {
	Brokers   int   // in the current set
	Connected int   // of which have a live link
	Channels  int   // worker-level interests
	Published int64 // publishes acknowledged
	Failed    int64 // publishes whose done got an error
	Received  int64 // messages delivered to OnMessage
	// Replicated: history publishes the replica confirmed before their
	// done; ReplicaMissed: history publishes acknowledged without a
	// replica copy (replica link down, or it answered an error) — the
	// degraded case docs/history.md describes.
	Replicated, ReplicaMissed int64
}

// Client is the worker's connection to the broker tier.
type Client struct {
	opts Options
	log  hclog.Logger

	mu      sync.Mutex
	closed  bool
	conns   map[string]*bconn // by broker name: the membership
	subs    map[string]struct{}
	pres    map[string]map[string][]byte // channel → conn → entry JSON announced by this worker
	pos     map[string]*chanPos          // last delivered positions (history channels)
	rules   *chanopts.Rules
	behind  bool                     // flow control: the last SetBehind
	members atomic.Pointer[[]*bconn] // snapshot of conns for the lock-free Publish path

	isClosed atomic.Bool
	stop     chan struct{}
	wg       sync.WaitGroup

	// Ring views by reporting link, and the combined one last given to
	// OnMembers (views.go).
	viewsMu  sync.Mutex
	views    map[*bconn][]Endpoint
	lastView []Endpoint

	published, failed, received atomic.Int64
	replicated, replicaMissed   atomic.Int64
}

// New returns a client with no brokers; call SetBrokers.
func New(opts Options) *Client {
	opts.defaults()
	c := &Client{
		opts:  opts,
		log:   opts.Logger,
		conns: map[string]*bconn{},
		subs:  map[string]struct{}{},
		pres:  map[string]map[string][]byte{},
		pos:   map[string]*chanPos{},
		rules: chanopts.Compile(opts.Channels),
		stop:  make(chan struct{}),
	}
	empty := []*bconn{}
	c.members.Store(&empty)
	c.wg.Add(1)
	go c.housekeeping()
	return c
}

// SetBrokers replaces the broker set. New brokers are dialled, missing ones
// closed (their in-flight publishes fail), and every channel whose owner
// changed moves its interest: unsub at the old owner if it is still a
// member, sub at the new one (at once if its link is up, else when it comes
// up). Entries with an empty name or address are ignored; the last of a
// duplicated name wins.
func (c *Client) SetBrokers(eps []Endpoint) {
	want := map[string]Endpoint{}
	for _, ep := range eps {
		if ep.Name != "" && ep.Addr != "" {
			want[ep.Name] = ep
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	old := *c.members.Load()
	var removed []*bconn
	for name, b := range c.conns {
		if ep, ok := want[name]; !ok || ep.Addr != b.ep.Addr {
			removed = append(removed, b)
			delete(c.conns, name)
		}
	}
	for name, ep := range want {
		if _, ok := c.conns[name]; !ok {
			b := newBconn(c, ep)
			c.conns[name] = b
			c.wg.Add(1)
			go b.run()
		}
	}
	next := make([]*bconn, 0, len(c.conns))
	for _, b := range c.conns {
		next = append(next, b)
	}
	// Sorted so ties in the hash (practically never) break the same way on
	// every worker.
	slices.SortFunc(next, func(a, b *bconn) int { return strings.Compare(a.ep.Name, b.ep.Name) })
	c.members.Store(&next)

	for ch := range c.subs {
		was, now := owner(old, ch), owner(next, ch)
		if was == now {
			continue
		}
		if was != nil && c.conns[was.ep.Name] == was {
			was.sendInterest(link.TypeUnsub, ch)
		}
		if now != nil {
			// From the worker's last position: what it missed while the
			// channel moved is recovered from the new owner (which holds
			// the replica).
			now.moveInterest(ch, c.pos[ch])
		}
	}
	// Presence follows the channel to its new owner (the old owner, if it
	// is still a member, drops this worker's entries).
	for ch, conns := range c.pres {
		was, now := owner(old, ch), owner(next, ch)
		if was == now {
			continue
		}
		for conn, raw := range conns {
			if was != nil && c.conns[was.ep.Name] == was {
				was.sendPres(link.PresLeave, ch, []byte(conn), nil)
				if shadowed(ch) { // the old owner keeps a shadow, as every non-owner
					was.sendPres(link.PresShadowJoin, ch, raw, nil)
				}
			}
			if now != nil {
				if shadowed(ch) {
					now.sendPres(link.PresShadowLeave, ch, []byte(conn), nil)
				}
				now.sendPres(link.PresJoin, ch, raw, nil)
			}
		}
	}
	for _, b := range removed {
		b.shutdown()
	}
}

// Subscribe registers this worker's interest in channel with its owner.
// Idempotent: call it when the first local socket subscribes.
func (c *Client) Subscribe(channel string) {
	if channel == "" || len(channel) > link.MaxChannel {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	if _, ok := c.subs[channel]; ok {
		return
	}
	c.subs[channel] = struct{}{}
	if o := owner(*c.members.Load(), channel); o != nil {
		o.sendInterest(link.TypeSub, channel)
	}
}

// Unsubscribe drops the interest. Idempotent: call it when the last local
// socket unsubscribes.
func (c *Client) Unsubscribe(channel string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	if _, ok := c.subs[channel]; !ok {
		return
	}
	delete(c.subs, channel)
	if p := c.pos[channel]; p != nil {
		// Forget the position (the pointer stays: readers cache it): a
		// later subscription starts fresh.
		p.mu.Lock()
		p.off, p.epoch = 0, 0
		p.mu.Unlock()
	}
	if o := owner(*c.members.Load(), channel); o != nil {
		o.sendInterest(link.TypeUnsub, channel)
	}
}

// Publish sends data to channel's owner. done is called exactly once: with
// the offset the broker assigned, or with an error (see the Err values). It
// never blocks: an immediate failure calls done before Publish returns, on
// the caller's goroutine. data is copied into the link's queue before
// Publish returns.
func (c *Client) Publish(channel string, data []byte, done func(offset uint64, err error)) {
	c.publish(channel, data, done, nil)
}

// PublishPos is Publish whose done also gets the channel's epoch (the one
// the broker's acknowledgement carries), so a caller that reports the
// position — the server API — needs no extra history read. It costs one
// closure per call: the hot path (client publishes) uses Publish.
func (c *Client) PublishPos(channel string, data []byte, done func(offset, epoch uint64, err error)) {
	c.publish(channel, data, func(off uint64, err error) { done(off, 0, err) }, done)
}

// publish is Publish; withEpoch, when set, is called instead of done on
// success (done still reports failures).
func (c *Client) publish(channel string, data []byte, done func(offset uint64, err error), withEpoch func(offset, epoch uint64, err error)) {
	if c.isClosed.Load() {
		c.fail(done, ErrClosed)
		return
	}
	if done == nil {
		done = ignoreDone
	}
	if channel == "" || len(channel) > link.MaxChannel || link.PubSize(channel, data)-link.HeaderSize+1 > c.opts.MaxFrame {
		c.fail(done, ErrTooLarge)
		return
	}
	o := owner(*c.members.Load(), channel)
	if o == nil {
		c.fail(done, ErrNoBrokers)
		return
	}
	var job *replJob
	if c.rules.Lookup(channel).History() {
		job = c.newReplJob(channel, data)
		job.withEpoch = withEpoch
	} else if withEpoch != nil {
		// No replication step: the ack's epoch reaches done only through
		// a job, so keep one without data (replicate is skipped for it).
		job = c.newReplJob(channel, nil)
		job.withEpoch, job.noRepl = withEpoch, true
	}
	if err := o.publish(channel, data, done, job); err != nil {
		c.putReplJob(job)
		c.fail(done, err)
	}
}

func ignoreDone(uint64, error) {}

func (c *Client) fail(done func(uint64, error), err error) {
	c.failed.Add(1)
	if done != nil {
		done(0, err)
	}
}

// Owner returns the name of the broker that owns channel ("" if none).
func (c *Client) Owner(channel string) string {
	if o := owner(*c.members.Load(), channel); o != nil {
		return o.ep.Name
	}
	return ""
}

// Stats returns the counters.
func (c *Client) Stats() Stats {
	c.mu.Lock()
	st := Stats{Brokers: len(c.conns), Channels: len(c.subs)}
	for _, b := range c.conns {
		if b.isUp() {
			st.Connected++
		}
	}
	c.mu.Unlock()
	st.Published = c.published.Load()
	st.Failed = c.failed.Load()
	st.Received = c.received.Load()
	st.Replicated = c.replicated.Load()
	st.ReplicaMissed = c.replicaMissed.Load()
	return st
}

// Close closes every link, fails every pending publish with ErrClosed and
// waits for every goroutine. Idempotent.
func (c *Client) Close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		c.wg.Wait()
		return
	}
	c.closed = true
	c.isClosed.Store(true)
	close(c.stop)
	conns := make([]*bconn, 0, len(c.conns))
	for _, b := range c.conns {
		conns = append(conns, b)
	}
	c.conns = map[string]*bconn{}
	empty := []*bconn{}
	c.members.Store(&empty)
	c.mu.Unlock()
	for _, b := range conns {
		b.shutdown()
	}
	c.wg.Wait()
}

// housekeeping times out unacknowledged publishes and sends keepalives.
func (c *Client) housekeeping() {
	defer c.wg.Done()
	tick := min(c.opts.PublishTimeout/4, c.opts.PingInterval, 250*time.Millisecond)
	t := time.NewTicker(tick)
	defer t.Stop()
	lastPing := time.Now()
	for {
		select {
		case <-c.stop:
			return
		case now := <-t.C:
			ping := now.Sub(lastPing) >= c.opts.PingInterval
			if ping {
				lastPing = now
			}
			for _, b := range *c.members.Load() {
				b.expire(now)
				b.expireRequests(now.UnixNano())
				if ping {
					b.ping()
				}
			}
		}
	}
}

// SetBehind tells every broker whether this worker's local delivery is
// behind (publisher flow control, docs/brokers.md): while it is, brokers
// hold the acks of publishes to channels this worker is interested in, for
// a bounded time. Call it on transitions only; a link that comes up later
// is told in linkUp. Never blocks on a link (the frame is tiny and bypasses
// the queue bound).
func (c *Client) SetBehind(behind bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.behind == behind {
		return
	}
	c.behind = behind
	t := link.TypeCaughtUp
	if behind {
		t = link.TypeBehind
	}
	frame := link.AppendEmpty(nil, t)
	for _, b := range c.conns {
		b.mu.Lock()
		if b.up && b.w != nil {
			_ = b.w.WriteRawAlways(frame)
		}
		b.mu.Unlock()
	}
}
