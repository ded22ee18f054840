package webhook

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shoalhq/shoal/configs"
)

var secret = []byte("hook-secret")

// received is one request the receiver got.
type received struct {
	header http.Header
	body   []byte
	p      payload
}

// receiver is a backend: it records every request on a channel and answers
// with status(n) for the n-th request (1-based); status may block.
type receiver struct {
	*httptest.Server
	got    chan received
	n      atomic.Int64
	status func(r *http.Request, n int64) int
}

func newReceiver(t *testing.T, status func(r *http.Request, n int64) int) *receiver {
	t.Helper()
	rc := &receiver{got: make(chan received, 1000), status: status}
	rc.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			w.WriteHeader(400)
			return
		}
		var p payload
		if err := json.Unmarshal(body, &p); err != nil {
			t.Errorf("receiver: bad JSON: %v: %s", err, body)
		}
		rc.got <- received{header: r.Header.Clone(), body: body, p: p}
		code := 200
		if rc.status != nil {
			code = rc.status(r, rc.n.Add(1))
		}
		w.WriteHeader(code)
	}))
	t.Cleanup(rc.Close)
	return rc
}

// next waits for the next request (bounded).
func (rc *receiver) next(t *testing.T) received {
	t.Helper()
	select {
	case r := <-rc.got:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("no webhook request within 10s")
		return received{}
	}
}

// events collects requests until want events arrived (bounded by next).
func (rc *receiver) events(t *testing.T, want int) []wireEvent {
	t.Helper()
	var out []wireEvent
	for len(out) < want {
		out = append(out, rc.next(t).p.Events...)
	}
	return out
}

func newSender(t *testing.T, rc *receiver, mod func(*Options)) *Sender {
	t.Helper()
	o := Options{
		Webhooks:   configs.Webhooks{URL: rc.URL + "/hook", SecretEnv: "TEST_HOOK_SECRET"},
		Getenv:     func(string) string { return string(secret) },
		Client:     rc.Client(),
		Source:     "worker-test",
		Debounce:   -1,
		BackoffMin: 5 * time.Millisecond,
		BackoffMax: 20 * time.Millisecond,
	}
	if mod != nil {
		mod(&o)
	}
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return s
}

func keyOf(e wireEvent) string {
	if e.Channel != "" {
		return "c:" + e.Channel
	}
	return "u:" + e.User
}

func TestSignedDelivery(t *testing.T) {
	rc := newReceiver(t, nil)
	s := newSender(t, rc, nil)
	at := time.UnixMilli(1_700_000_000_123)
	if !s.Emit(Event{Type: ChannelOccupied, Channel: "chat/1", Time: at, Info: json.RawMessage(`{"n":1}`)}) {
		t.Fatal("emit refused")
	}
	r := rc.next(t)
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Fatal(ct)
	}
	if err := Verify(secret, r.header.Get(HeaderTimestamp), r.header.Get(HeaderSignature), r.body, 5*time.Minute, time.Now()); err != nil {
		t.Fatalf("signature: %v", err)
	}
	if r.header.Get(HeaderDelivery) == "" || r.p.ID != r.header.Get(HeaderDelivery) || r.p.Source != "worker-test" {
		t.Fatalf("delivery id/source: %v %+v", r.header, r.p)
	}
	ev := r.p.Events
	if len(ev) != 1 || ev[0].Type != ChannelOccupied || ev[0].Channel != "chat/1" || ev[0].TimeMs != at.UnixMilli() || string(ev[0].Info) != `{"n":1}` {
		t.Fatalf("%+v", ev)
	}
}

func TestVerify(t *testing.T) {
	body := []byte(`{"events":[]}`)
	now := time.Unix(1_700_000_000, 0)
	ts := strconv.FormatInt(now.Unix(), 10)
	sig := Sign(secret, ts, body)
	if err := Verify(secret, ts, sig, body, time.Minute, now); err != nil {
		t.Fatal(err)
	}
	if err := Verify(secret, ts, sig, []byte(`{"events":[1]}`), time.Minute, now); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("tampered body: %v", err)
	}
	if err := Verify([]byte("other"), ts, sig, body, time.Minute, now); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("other secret: %v", err)
	}
	if err := Verify(secret, ts, sig, body, time.Minute, now.Add(2*time.Minute)); !errors.Is(err, ErrStale) {
		t.Fatalf("replayed later: %v", err)
	}
	if err := Verify(secret, "x", sig, body, time.Minute, now); !errors.Is(err, ErrStale) {
		t.Fatalf("bad timestamp: %v", err)
	}
}

// Events of one key arrive in emission order, even one event per request
// and with other keys interleaved.
func TestOrderPerKey(t *testing.T) {
	rc := newReceiver(t, nil)
	s := newSender(t, rc, func(o *Options) { o.MaxBatch = 3 })
	var want []wireEvent
	for i := range 20 {
		for _, u := range []string{"alice", "bob", "carol"} {
			typ := UserOnline
			if i%2 == 1 {
				typ = UserOffline
			}
			e := Event{Type: typ, User: u, Time: time.UnixMilli(int64(i))}
			if !s.Emit(e) {
				t.Fatal("refused")
			}
			want = append(want, toWire(e))
		}
	}
	got := rc.events(t, len(want))
	perKey := func(evs []wireEvent) map[string][]string {
		m := map[string][]string{}
		for _, e := range evs {
			m[keyOf(e)] = append(m[keyOf(e)], e.Type+"@"+strconv.FormatInt(e.TimeMs, 10))
		}
		return m
	}
	g, w := perKey(got), perKey(want)
	for k := range w {
		if len(g[k]) != len(w[k]) {
			t.Fatalf("%s: got %v want %v", k, g[k], w[k])
		}
		for i := range w[k] {
			if g[k][i] != w[k][i] {
				t.Fatalf("%s out of order: got %v want %v", k, g[k], w[k])
			}
		}
	}
}

func TestDebounce(t *testing.T) {
	rc := newReceiver(t, nil)
	s := newSender(t, rc, func(o *Options) { o.Debounce = 200 * time.Millisecond })
	// a: vacated→occupied→vacated→occupied within the window: one occupied.
	// b: occupied→vacated: nothing. c: online→offline→online: one online.
	// The emits take microseconds, far inside the window.
	for _, e := range []Event{
		{Type: ChannelOccupied, Channel: "a"},
		{Type: ChannelOccupied, Channel: "b"},
		{Type: ChannelVacated, Channel: "a"},
		{Type: ChannelVacated, Channel: "b"},
		{Type: UserOnline, User: "c"},
		{Type: ChannelOccupied, Channel: "a"},
		{Type: UserOffline, User: "c"},
		{Type: UserOnline, User: "c"},
	} {
		if !s.Emit(e) {
			t.Fatalf("refused %+v", e)
		}
	}
	// A marker emitted after the others is due after them, so once it
	// arrives every earlier key has been decided.
	s.Emit(Event{Type: ChannelOccupied, Channel: "marker"})
	var got []string
	for len(got) == 0 || got[len(got)-1] != "marker" {
		for _, e := range rc.next(t).p.Events {
			got = append(got, e.Channel+e.User)
			if e.Channel == "a" && e.Type != ChannelOccupied || e.User == "c" && e.Type != UserOnline {
				t.Fatalf("wrong final state %+v", e)
			}
		}
	}
	if len(got) != 3 || got[0] != "a" || got[1] != "c" {
		t.Fatalf("delivered %v, want [a c marker]", got)
	}
	waitFor(t, func() bool { return s.Stats().Sent == 3 })
	if st := s.Stats(); st.Coalesced != 6 {
		t.Fatalf("stats %+v", st)
	}
	// A flap back to the state before the window (b) sends nothing later either.
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-rc.got:
		t.Fatalf("unexpected request after close: %s", r.body)
	default:
	}
}

func TestRetryAfter500(t *testing.T) {
	rc := newReceiver(t, func(_ *http.Request, n int64) int {
		if n <= 2 {
			return 500
		}
		return 204
	})
	s := newSender(t, rc, nil)
	s.Emit(Event{Type: UserOnline, User: "u1"})
	a, b, c := rc.next(t), rc.next(t), rc.next(t)
	id := a.header.Get(HeaderDelivery)
	if b.header.Get(HeaderDelivery) != id || c.header.Get(HeaderDelivery) != id {
		t.Fatal("a retry must keep the delivery id")
	}
	if string(a.body) != string(c.body) {
		t.Fatal("a retry must resend the same body")
	}
	if err := Verify(secret, c.header.Get(HeaderTimestamp), c.header.Get(HeaderSignature), c.body, time.Minute, time.Now()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return s.Stats().Sent == 1 })
	if st := s.Stats(); st.Retries != 2 || st.Failed != 0 {
		t.Fatalf("%+v", st)
	}
}

func TestRetryBounded(t *testing.T) {
	rc := newReceiver(t, func(_ *http.Request, n int64) int { return 503 })
	s := newSender(t, rc, func(o *Options) { o.MaxAttempts = 3 })
	s.Emit(Event{Type: UserOnline, User: "u1"})
	waitFor(t, func() bool { return s.Stats().Failed == 1 })
	if n := rc.n.Load(); n != 3 {
		t.Fatalf("%d attempts, want 3", n)
	}
	// Total time bounds it too: a long first back-off exceeds MaxRetryTime.
	rc2 := newReceiver(t, func(_ *http.Request, n int64) int { return 500 })
	s2 := newSender(t, rc2, func(o *Options) {
		o.BackoffMin, o.BackoffMax, o.MaxRetryTime = time.Hour, time.Hour, time.Minute
	})
	s2.Emit(Event{Type: UserOnline, User: "u1"})
	waitFor(t, func() bool { return s2.Stats().Failed == 1 })
	if n := rc2.n.Load(); n != 1 {
		t.Fatalf("%d attempts, want 1", n)
	}
}

func TestPermanentFailureNotRetried(t *testing.T) {
	rc := newReceiver(t, func(_ *http.Request, n int64) int {
		if n == 1 {
			return 400
		}
		return 200
	})
	s := newSender(t, rc, nil)
	s.Emit(Event{Type: UserOnline, User: "u1"})
	s.Emit(Event{Type: UserOnline, User: "u2"})
	// u1 may share the first batch with u2; either way the 400 is not retried
	// and whatever is left goes in the next request.
	first := rc.next(t)
	waitFor(t, func() bool { st := s.Stats(); return st.Failed+st.Sent == 2 })
	if st := s.Stats(); st.Retries != 0 || st.Failed != int64(len(first.p.Events)) {
		t.Fatalf("%+v", st)
	}
}

// With the backend stuck, the queue stays bounded and drops the oldest.
func TestBoundedQueue(t *testing.T) {
	release := make(chan struct{})
	rc := newReceiver(t, func(r *http.Request, n int64) int {
		if n == 1 {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
		return 200
	})
	s := newSender(t, rc, func(o *Options) { o.MaxQueue = 5; o.MaxBatch = 100 })
	s.Emit(Event{Type: UserOnline, User: "first"})
	rc.next(t) // the sender is now blocked in the first request
	for i := range 50 {
		s.Emit(Event{Type: UserOnline, User: "u" + strconv.Itoa(i)})
	}
	if st := s.Stats(); st.Queued != 5 || st.Dropped != 45 {
		t.Fatalf("%+v", st)
	}
	close(release)
	got := rc.events(t, 5)
	for i, e := range got {
		if want := "u" + strconv.Itoa(45+i); e.User != want {
			t.Fatalf("event %d is %s, want %s (the newest kept)", i, e.User, want)
		}
	}
}

func TestFilterAndValidation(t *testing.T) {
	rc := newReceiver(t, nil)
	s := newSender(t, rc, func(o *Options) { o.Webhooks.Events = []string{ChannelOccupied} })
	for _, e := range []Event{
		{Type: UserOnline, User: "u"},
		{Type: ChannelVacated, Channel: "a"},
		{Type: "channel.exploded", Channel: "a"},
		{Type: ChannelOccupied}, // no channel
	} {
		if s.Emit(e) {
			t.Fatalf("accepted %+v", e)
		}
	}
	if !s.Emit(Event{Type: ChannelOccupied, Channel: "a"}) {
		t.Fatal("refused an allowed event")
	}
	if ev := rc.next(t).p.Events; len(ev) != 1 || ev[0].Channel != "a" {
		t.Fatalf("%+v", ev)
	}
	if st := s.Stats(); st.Ignored != 4 {
		t.Fatalf("%+v", st)
	}
}

func TestNew(t *testing.T) {
	s, err := New(Options{})
	if err != nil || s != nil {
		t.Fatalf("empty URL: %v %v", s, err)
	}
	// A nil Sender is inert.
	if s.Emit(Event{Type: UserOnline, User: "u"}) || s.Close(context.Background()) != nil || s.Stats() != (Stats{}) {
		t.Fatal("nil sender not inert")
	}
	if _, err := New(Options{Webhooks: configs.Webhooks{URL: "ftp://x"}}); err == nil {
		t.Fatal("ftp URL accepted")
	}
	_, err = New(Options{Webhooks: configs.Webhooks{URL: "http://127.0.0.1:1/", Events: []string{"user.online", "user.away"}}})
	if !errors.Is(err, ErrUnknownEvent) {
		t.Fatalf("unknown event: %v", err)
	}
}

// Close delivers debounced events at once and is idempotent.
func TestCloseFlushes(t *testing.T) {
	rc := newReceiver(t, nil)
	s := newSender(t, rc, func(o *Options) { o.Debounce = time.Hour })
	s.Emit(Event{Type: ChannelOccupied, Channel: "a"})
	s.Emit(Event{Type: UserOnline, User: "b"})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.Sent != 2 || st.Queued != 0 {
		t.Fatalf("%+v", st)
	}
	if s.Emit(Event{Type: UserOnline, User: "late"}) {
		t.Fatal("emit after close accepted")
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

// A backend that never answers cannot hold Close past its deadline.
func TestCloseDeadline(t *testing.T) {
	rc := newReceiver(t, func(r *http.Request, _ int64) int {
		<-r.Context().Done() // hangs until the sender gives up
		return 200
	})
	o := Options{
		Webhooks: configs.Webhooks{URL: rc.URL},
		Client:   rc.Client(),
		Debounce: -1,
	}
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	s.Emit(Event{Type: UserOnline, User: "a"})
	rc.next(t)
	s.Emit(Event{Type: UserOnline, User: "b"})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err = s.Close(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("close: %v", err)
	}
	if st := s.Stats(); st.Failed != 2 || st.Queued != 0 {
		t.Fatalf("%+v", st)
	}
}

// waitFor polls cond until it holds (bounded), instead of sleeping a guess.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// A redirect is not followed (it would turn the POST into a GET elsewhere):
// it is a permanent failure.
func TestRedirectNotFollowed(t *testing.T) {
	rc := newReceiver(t, nil)
	redir := httptest.NewServer(http.RedirectHandler(rc.URL, http.StatusFound))
	defer redir.Close()
	s, err := New(Options{Webhooks: configs.Webhooks{URL: redir.URL}, Debounce: -1})
	if err != nil {
		t.Fatal(err)
	}
	s.Emit(Event{Type: UserOnline, User: "u"})
	waitFor(t, func() bool { return s.Stats().Failed == 1 })
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := len(rc.got); n != 0 {
		t.Fatalf("the redirect target got %d requests", n)
	}
}

// Emit from many goroutines while Close runs: no race, no panic, and every
// accepted event is either sent or counted.
func TestEmitDuringClose(t *testing.T) {
	rc := newReceiver(t, nil)
	s, err := New(Options{Webhooks: configs.Webhooks{URL: rc.URL}, Client: rc.Client(), Debounce: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 200 {
				typ := ChannelOccupied
				if i%2 == 1 {
					typ = ChannelVacated
				}
				s.Emit(Event{Type: typ, Channel: "ch" + strconv.Itoa(g*1000+i/2)})
			}
		})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	st := s.Stats()
	if st.Emitted+st.Ignored != 800 || st.Queued != 0 || st.Failed != 0 {
		t.Fatalf("%+v", st)
	}
	// Each accepted event is sent, or was coalesced (a pair cancels out).
	if st.Sent+st.Coalesced != st.Emitted {
		t.Fatalf("accounting: %+v", st)
	}
}
