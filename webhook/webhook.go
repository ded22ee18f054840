// Package webhook POSTs cluster events (channel occupied/vacated, user
// online/offline) to the backend URL in the config's webhooks section.
//
// Delivery model:
//   - Emit never blocks: it files the event under its key (the channel or
//     the user) and returns.
//   - Debounce: an event waits Debounce before it is sent. Later events for
//     the same key replace it; when the window ends, the key's latest state
//     is sent, unless it is the state the key was in before the window (an
//     occupied→vacated or vacated→occupied flap), which sends nothing. The
//     window starts at the key's first pending event and is never extended,
//     so a key that flaps forever still reports at least once per window.
//   - Order: one sender goroutine posts batches in due order, one batch at a
//     time, so events of one key reach the backend in the order they
//     happened. A batch is retried (exponential back-off with jitter,
//     bounded attempts and total time) before the next one is sent.
//   - Memory: at most MaxQueue events wait (pending plus ready); beyond that
//     the oldest is dropped and counted in Stats.Dropped.
//   - Each request is signed: X-Shoal-Signature is
//     "v1=" + hex(HMAC-SHA256(secret, timestamp + "." + body)) with the
//     Unix-seconds timestamp in X-Shoal-Timestamp (see Verify).
package webhook

import (
	"container/list"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/configs"
)

// Event types (the names the config's webhooks.events lists).
const (
	ChannelOccupied = "channel.occupied"
	ChannelVacated  = "channel.vacated"
	UserOnline      = "user.online"
	UserOffline     = "user.offline"
)

// opposite pairs each event type with the state it leaves.
var opposite = map[string]string{
	ChannelOccupied: ChannelVacated,
	ChannelVacated:  ChannelOccupied,
	UserOnline:      UserOffline,
	UserOffline:     UserOnline,
}

// Event is one state change. Channel events carry Channel, user events
// User.
type Event struct {
	Type    string
	Channel string
	User    string
	// Time is when it happened; zero: when Emit is called.
	Time time.Time
	// Info is optional JSON passed to the backend as is (e.g. client info
	// of the connection that made a user online).
	Info json.RawMessage
}

// key groups the events whose order and debounce belong together; ok is
// false for an unknown type or a missing channel or user.
func (e Event) key() (k string, ok bool) {
	switch e.Type {
	case ChannelOccupied, ChannelVacated:
		return "c\x00" + e.Channel, e.Channel != ""
	case UserOnline, UserOffline:
		return "u\x00" + e.User, e.User != ""
	}
	return "", false
}

// Defaults for Options' zero fields.
const (
	// DefaultSecretEnv is read when webhooks.secret_env is empty.
	DefaultSecretEnv      = "SHOAL_WEBHOOK_SECRET"
	DefaultDebounce       = time.Second
	DefaultMaxQueue       = 10000
	DefaultMaxBatch       = 100
	DefaultMaxAttempts    = 8
	DefaultMaxRetryTime   = 2 * time.Minute
	DefaultBackoffMin     = 200 * time.Millisecond
	DefaultBackoffMax     = 30 * time.Second
	DefaultRequestTimeout = 10 * time.Second
)

// Options configures a Sender. Zero fields take the defaults above.
type Options struct {
	// Webhooks is the config's webhooks section: URL, SecretEnv (the
	// environment variable that holds the HMAC secret) and Events (the
	// types to send; empty: all four).
	Webhooks configs.Webhooks
	// Source names the sending process in every payload (e.g. "worker-1").
	Source string
	// Getenv reads the environment (tests); default os.Getenv.
	Getenv func(string) string
	// Client posts the requests; default a client with RequestTimeout.
	Client *http.Client
	// Debounce is the flap window; negative: send every event at once.
	Debounce       time.Duration
	MaxQueue       int
	MaxBatch       int
	MaxAttempts    int           // per batch, including the first
	MaxRetryTime   time.Duration // per batch, from its first attempt
	BackoffMin     time.Duration
	BackoffMax     time.Duration
	RequestTimeout time.Duration
	Logger         hclog.Logger
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
}

// Stats are the sender's counters since New.
type Stats struct {
	Emitted   int64 // accepted by Emit
	Ignored   int64 // refused by Emit: filtered out, invalid, or after Close
	Coalesced int64 // events that a later event of the same key replaced or cancelled
	Dropped   int64 // oldest events dropped because MaxQueue was reached
	Sent      int64 // events the backend acknowledged (2xx)
	Failed    int64 // events given up on after retries or a permanent error
	Retries   int64 // repeated attempts
	Queued    int64 // waiting now
}

// Sender delivers events. Create it with New; stop it with Close.
type Sender struct {
	url    string
	secret []byte
	source string
	allow  map[string]bool
	client *http.Client
	opts   Options
	log    hclog.Logger
	now    func() time.Time

	mu      sync.Mutex
	closed  bool
	slots   map[string]*slot
	pending list.List // of *slot, in due order
	ready   []wireEvent
	wake    chan struct{} // cap 1: something changed

	closing chan struct{} // closed by Close: flush and stop
	ctx     context.Context
	cancel  context.CancelFunc // aborts in-flight work when Close's ctx ends
	done    chan struct{}
	once    sync.Once

	emitted, ignored, coalesced, dropped, sent, failed, retries atomic.Int64
	abandoned                                                   atomic.Int64
}

// slot is a key's pending (debounced) state.
type slot struct {
	key    string
	ev     Event
	before string // the state the key was in before its first pending event
	due    time.Time
	el     *list.Element
}

// wireEvent is an event as the backend receives it.
type wireEvent struct {
	Type    string          `json:"type"`
	Channel string          `json:"channel,omitempty"`
	User    string          `json:"user,omitempty"`
	TimeMs  int64           `json:"time_ms"`
	Info    json.RawMessage `json:"info,omitempty"`
}

// payload is one request body.
type payload struct {
	ID     string      `json:"id"` // same on every retry of this batch
	TimeMs int64       `json:"time_ms"`
	Source string      `json:"source,omitempty"`
	Events []wireEvent `json:"events"`
}

// ErrUnknownEvent names an event type that webhooks.events may not list.
var ErrUnknownEvent = errors.New("unknown webhook event")

// New starts a sender. It returns a nil *Sender and no error when
// webhooks.url is empty; a nil Sender's methods do nothing, so callers need
// no checks.
func New(o Options) (*Sender, error) {
	if o.Webhooks.URL == "" {
		return nil, nil
	}
	if o.Getenv == nil {
		o.Getenv = os.Getenv
	}
	if o.Debounce == 0 {
		o.Debounce = DefaultDebounce
	}
	if o.Debounce < 0 {
		o.Debounce = 0
	}
	if o.MaxQueue <= 0 {
		o.MaxQueue = DefaultMaxQueue
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = DefaultMaxBatch
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = DefaultMaxAttempts
	}
	if o.MaxRetryTime <= 0 {
		o.MaxRetryTime = DefaultMaxRetryTime
	}
	if o.BackoffMin <= 0 {
		o.BackoffMin = DefaultBackoffMin
	}
	if o.BackoffMax < o.BackoffMin {
		o.BackoffMax = max(DefaultBackoffMax, o.BackoffMin)
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = DefaultRequestTimeout
	}
	if o.Client == nil {
		// An own transport, so Close can drop its idle connections without
		// touching other users of http.DefaultTransport.
		// Redirects are not followed: a 3xx would turn the POST into a GET
		// and could send signed events somewhere else; it counts as a
		// permanent failure instead.
		o.Client = &http.Client{
			Timeout:   o.RequestTimeout,
			Transport: http.DefaultTransport.(*http.Transport).Clone(),
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		}
	}
	if o.Logger == nil {
		o.Logger = hclog.NewNullLogger()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	req, err := http.NewRequest(http.MethodPost, o.Webhooks.URL, nil)
	if err != nil || (req.URL.Scheme != "http" && req.URL.Scheme != "https") || req.URL.Host == "" {
		return nil, fmt.Errorf("webhooks.url %q: must be an http:// or https:// URL", o.Webhooks.URL)
	}
	allow := make(map[string]bool)
	for i, name := range o.Webhooks.Events {
		if _, ok := opposite[name]; !ok {
			return nil, fmt.Errorf("webhooks.events[%d] %q: %w (known: %s, %s, %s, %s)",
				i, name, ErrUnknownEvent, ChannelOccupied, ChannelVacated, UserOnline, UserOffline)
		}
		allow[name] = true
	}
	if len(allow) == 0 {
		for name := range opposite {
			allow[name] = true
		}
	}
	s := &Sender{
		url:     o.Webhooks.URL,
		source:  o.Source,
		allow:   allow,
		client:  o.Client,
		opts:    o,
		log:     o.Logger,
		now:     o.Now,
		slots:   make(map[string]*slot),
		wake:    make(chan struct{}, 1),
		closing: make(chan struct{}),
		done:    make(chan struct{}),
	}
	if o.Webhooks.SecretEnv == "" {
		o.Webhooks.SecretEnv = DefaultSecretEnv
	}
	s.secret = []byte(o.Getenv(o.Webhooks.SecretEnv))
	if len(s.secret) == 0 {
		o.Logger.Warn("webhooks are sent unsigned: no secret", "secret_env", o.Webhooks.SecretEnv)
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	go s.run()
	return s, nil
}

// Emit files ev for delivery and reports whether it was accepted. It never
// blocks: a full queue drops its oldest event instead.
func (s *Sender) Emit(ev Event) bool {
	if s == nil {
		return false
	}
	k, ok := ev.key()
	if !ok || !s.allow[ev.Type] {
		s.ignored.Add(1)
		return false
	}
	now := s.now()
	if ev.Time.IsZero() {
		ev.Time = now
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.ignored.Add(1)
		return false
	}
	s.emitted.Add(1)
	if sl, ok := s.slots[k]; ok {
		// Same key still in its window: the newer state replaces the older.
		sl.ev = ev
		s.coalesced.Add(1)
		s.mu.Unlock()
		return true
	}
	s.makeRoomLocked()
	if s.opts.Debounce == 0 {
		s.ready = append(s.ready, toWire(ev))
	} else {
		sl := &slot{key: k, ev: ev, before: opposite[ev.Type], due: now.Add(s.opts.Debounce)}
		sl.el = s.pending.PushBack(sl)
		s.slots[k] = sl
	}
	s.mu.Unlock()
	s.signal()
	return true
}

// makeRoomLocked drops the oldest waiting event when the queue is full:
// a ready one first (it is older than any pending one), else the oldest
// pending slot.
func (s *Sender) makeRoomLocked() {
	if len(s.ready)+len(s.slots) < s.opts.MaxQueue {
		return
	}
	s.dropped.Add(1)
	if len(s.ready) > 0 {
		s.ready[0] = wireEvent{}
		s.ready = s.ready[1:]
		return
	}
	if front := s.pending.Front(); front != nil {
		sl := front.Value.(*slot)
		s.pending.Remove(front)
		delete(s.slots, sl.key)
	}
}

func (s *Sender) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func toWire(ev Event) wireEvent {
	return wireEvent{Type: ev.Type, Channel: ev.Channel, User: ev.User, TimeMs: ev.Time.UnixMilli(), Info: ev.Info}
}

// Stats returns the counters.
func (s *Sender) Stats() Stats {
	if s == nil {
		return Stats{}
	}
	s.mu.Lock()
	q := int64(len(s.ready) + len(s.slots))
	s.mu.Unlock()
	return Stats{
		Emitted: s.emitted.Load(), Ignored: s.ignored.Load(), Coalesced: s.coalesced.Load(),
		Dropped: s.dropped.Load(), Sent: s.sent.Load(), Failed: s.failed.Load(),
		Retries: s.retries.Load(), Queued: q,
	}
}

// Close stops accepting events and delivers what is queued, debounced
// events included, until ctx ends; then it abandons the rest (counted as
// Failed) and returns an error saying how many. It is idempotent.
func (s *Sender) Close(ctx context.Context) error {
	if s == nil {
		return nil
	}
	s.once.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		close(s.closing)
	})
	select {
	case <-s.done:
		s.cancel()
		s.client.CloseIdleConnections()
		return nil
	case <-ctx.Done():
	}
	// Out of time: abort the request or back-off in progress; run then
	// counts what is left as failed. Bounded: every wait in run and deliver
	// also watches s.ctx, and requests are made with it.
	s.cancel()
	<-s.done
	s.client.CloseIdleConnections()
	return fmt.Errorf("webhook: close: %d events abandoned: %w", s.abandoned.Load(), ctx.Err())
}

// newID returns a random delivery id.
func newID() string {
	var b [12]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b[:])
}
