package brokerclient_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/shoalhq/shoal/broker"
	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/proto/link"
)

func TestMain(m *testing.M) {
	if os.Getenv(workerHelperEnv) != "" {
		os.Exit(runHelperWorker())
	}
	goleak.VerifyTestMain(m)
}

// runDir is a short private directory: unix socket paths must stay under
// 108 bytes, which t.TempDir's long names can exceed.
func runDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "shoal-bc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

type testBroker struct {
	child *broker.Child
	ep    brokerclient.Endpoint
}

func startBroker(t *testing.T, dir, name string) *testBroker {
	t.Helper()
	c := broker.New(nil)
	// No gossip: these tests drive the broker set by hand (ring tests are in
	// package broker).
	res, err := c.Start(context.Background(), control.StartParams{Role: control.RoleBroker, Name: name, RunDir: dir, Config: []byte(`{"cluster":{"gossip":""}}`)})
	if err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	t.Cleanup(func() { _ = c.Stop(context.Background()) })
	return &testBroker{child: c, ep: brokerclient.Endpoint{Name: name, Addr: res.Addrs[control.AddrLink]}}
}

// recorder keeps what a client's OnMessage saw.
type recorder struct {
	mu   sync.Mutex
	msgs map[string][]msg
}

type msg struct {
	data   string
	offset uint64
}

func (r *recorder) on(channel string, data []byte, offset uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.msgs == nil {
		r.msgs = map[string][]msg{}
	}
	r.msgs[channel] = append(r.msgs[channel], msg{string(data), offset})
}

func (r *recorder) get(channel string) []msg {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]msg(nil), r.msgs[channel]...)
}

func (r *recorder) total() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range r.msgs {
		n += len(m)
	}
	return n
}

func newClient(t *testing.T, name string, opts ...func(*brokerclient.Options)) (*brokerclient.Client, *recorder) {
	t.Helper()
	r := &recorder{}
	o := brokerclient.Options{Name: name, OnMessage: r.on}
	for _, f := range opts {
		f(&o)
	}
	c := brokerclient.New(o)
	t.Cleanup(c.Close)
	return c, r
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func waitConnected(t *testing.T, c *brokerclient.Client, n int) {
	t.Helper()
	waitFor(t, 5*time.Second, fmt.Sprintf("%d broker links up", n), func() bool { return c.Stats().Connected == n })
}

func waitInterest(t *testing.T, b *testBroker, channel string, n int) {
	t.Helper()
	waitFor(t, 5*time.Second, fmt.Sprintf("%d links interested in %s at %s", n, channel, b.ep.Name), func() bool {
		return b.child.Server().Interest(channel) == n
	})
}

// publishSync publishes and waits for done.
func publishSync(t *testing.T, c *brokerclient.Client, channel, data string) (uint64, error) {
	t.Helper()
	type res struct {
		off uint64
		err error
	}
	ch := make(chan res, 1)
	c.Publish(channel, []byte(data), func(off uint64, err error) { ch <- res{off, err} })
	select {
	case r := <-ch:
		return r.off, r.err
	case <-time.After(10 * time.Second):
		t.Fatalf("publish to %s: done never called", channel)
		return 0, nil
	}
}

// acks counts done calls of many asynchronous publishes.
type acks struct {
	mu     sync.Mutex
	ok     int
	errs   []error
	called map[int]int
}

func (a *acks) done(i int) func(uint64, error) {
	return func(_ uint64, err error) {
		a.mu.Lock()
		defer a.mu.Unlock()
		if a.called == nil {
			a.called = map[int]int{}
		}
		a.called[i]++
		if err != nil {
			a.errs = append(a.errs, err)
		} else {
			a.ok++
		}
	}
}

func (a *acks) count() (ok, failed int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.ok, len(a.errs)
}

// publishNumbered publishes the numbers 0..n-1 on channel and waits until
// every one is acknowledged without error.
func publishNumbered(t *testing.T, c *brokerclient.Client, channel string, n int) *acks {
	t.Helper()
	a := &acks{}
	for i := range n {
		c.Publish(channel, []byte(strconv.Itoa(i)), a.done(i))
	}
	waitFor(t, 5*time.Second, "all acks", func() bool { ok, f := a.count(); return ok+f == n })
	if ok, _ := a.count(); ok != n {
		t.Fatalf("acks: %d ok, errors %v", ok, a.errs)
	}
	return a
}

func checkInOrder(t *testing.T, who, channel string, got []msg, n int) {
	t.Helper()
	if len(got) != n {
		t.Fatalf("%s got %d messages on %s, want %d", who, len(got), channel, n)
	}
	for i, m := range got {
		if m.data != strconv.Itoa(i) || (i > 0 && m.offset != got[i-1].offset+1) {
			t.Fatalf("%s: message %d on %s is %+v (previous %+v): out of order or duplicated", who, i, channel, m, got[max(i-1, 0)])
		}
	}
}

func TestPublishReachesEachInterestedWorkerOnceInOrder(t *testing.T) {
	dir := runDir(t)
	b := startBroker(t, dir, "broker-1")
	pub, pubRec := newClient(t, "worker-1")
	sub, subRec := newClient(t, "worker-2")
	other, otherRec := newClient(t, "worker-3")
	for _, c := range []*brokerclient.Client{pub, sub, other} {
		c.SetBrokers([]brokerclient.Endpoint{b.ep})
		waitConnected(t, c, 1)
	}
	pub.Subscribe("chat") // the publisher's own worker is interested too
	sub.Subscribe("chat")
	sub.Subscribe("chat") // idempotent: still one interest
	other.Subscribe("news")
	waitInterest(t, b, "chat", 2)

	const n = 500
	a := publishNumbered(t, pub, "chat", n)
	waitFor(t, 5*time.Second, "deliveries", func() bool { return len(subRec.get("chat")) == n && len(pubRec.get("chat")) == n })
	checkInOrder(t, "subscriber", "chat", subRec.get("chat"), n)
	checkInOrder(t, "publisher", "chat", pubRec.get("chat"), n)
	if otherRec.total() != 0 {
		t.Fatalf("uninterested worker got %d messages", otherRec.total())
	}
	for i, cnt := range a.called {
		if cnt != 1 {
			t.Fatalf("done of publish %d called %d times", i, cnt)
		}
	}
	st := b.child.Server().Stats()
	if st.Publishes != n || st.Deliveries != 2*n || st.Links != 3 {
		t.Fatalf("broker stats %+v", st)
	}
}

func TestUnsubscribeStopsDelivery(t *testing.T) {
	dir := runDir(t)
	b := startBroker(t, dir, "broker-1")
	pub, _ := newClient(t, "worker-1")
	sub, rec := newClient(t, "worker-2")
	for _, c := range []*brokerclient.Client{pub, sub} {
		c.SetBrokers([]brokerclient.Endpoint{b.ep})
		waitConnected(t, c, 1)
	}
	sub.Subscribe("c")
	waitInterest(t, b, "c", 1)
	if _, err := publishSync(t, pub, "c", "0"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "first message", func() bool { return len(rec.get("c")) == 1 })
	sub.Unsubscribe("c")
	waitInterest(t, b, "c", 0)
	off, err := publishSync(t, pub, "c", "1")
	if err != nil || off != 2 {
		t.Fatalf("second publish: offset %d, %v", off, err)
	}
	// The subscriber's link carries frames in order: once a later message on
	// another channel arrives, "1" would have arrived before it.
	sub.Subscribe("marker")
	waitInterest(t, b, "marker", 1)
	if _, err := publishSync(t, pub, "marker", "m"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "marker", func() bool { return len(rec.get("marker")) == 1 })
	if got := rec.get("c"); len(got) != 1 {
		t.Fatalf("after unsubscribe got %+v", got)
	}
}

func TestTwoBrokersSpreadChannels(t *testing.T) {
	dir := runDir(t)
	b1 := startBroker(t, dir, "broker-1")
	b2 := startBroker(t, dir, "broker-2")
	eps := []brokerclient.Endpoint{b1.ep, b2.ep}
	pub, _ := newClient(t, "worker-1")
	sub, rec := newClient(t, "worker-2")
	for _, c := range []*brokerclient.Client{pub, sub} {
		c.SetBrokers(eps)
		waitConnected(t, c, 2)
	}
	const channels, per = 40, 20
	owned := map[string]int64{}
	byName := map[string]*testBroker{"broker-1": b1, "broker-2": b2}
	for i := range channels {
		ch := "room/" + strconv.Itoa(i)
		o := sub.Owner(ch)
		if o != pub.Owner(ch) || o != brokerclient.Owner([]string{"broker-2", "broker-1"}, ch) {
			t.Fatalf("workers disagree on the owner of %s", ch)
		}
		owned[o] += per
		sub.Subscribe(ch)
		waitInterest(t, byName[o], ch, 1)
	}
	if owned["broker-1"] == 0 || owned["broker-2"] == 0 {
		t.Fatalf("channels not spread: %v", owned)
	}
	var a acks
	for j := range per {
		for i := range channels {
			pub.Publish("room/"+strconv.Itoa(i), []byte(strconv.Itoa(j)), a.done(j*channels+i))
		}
	}
	waitFor(t, 5*time.Second, "acks", func() bool { ok, f := a.count(); return ok+f == channels*per })
	if _, f := a.count(); f != 0 {
		t.Fatalf("publish errors: %v", a.errs)
	}
	waitFor(t, 5*time.Second, "deliveries", func() bool { return rec.total() == channels*per })
	for i := range channels {
		ch := "room/" + strconv.Itoa(i)
		checkInOrder(t, "subscriber", ch, rec.get(ch), per)
	}
	// Each channel's messages went through its owner only.
	for name, b := range byName {
		if got := b.child.Server().Stats().Publishes; got != owned[name] {
			t.Fatalf("%s handled %d publishes, owns %d", name, got, owned[name])
		}
	}
}

func TestBrokerLossMovesInterest(t *testing.T) {
	dir := runDir(t)
	b1 := startBroker(t, dir, "broker-1")
	b2 := startBroker(t, dir, "broker-2")
	pub, _ := newClient(t, "worker-1")
	sub, rec := newClient(t, "worker-2")
	for _, c := range []*brokerclient.Client{pub, sub} {
		c.SetBrokers([]brokerclient.Endpoint{b1.ep, b2.ep})
		waitConnected(t, c, 2)
	}
	// Channels on both brokers.
	var lost, kept string
	for i := 0; lost == "" || kept == ""; i++ {
		ch := "c" + strconv.Itoa(i)
		if sub.Owner(ch) == "broker-1" {
			lost = ch
		} else {
			kept = ch
		}
	}
	sub.Subscribe(lost)
	sub.Subscribe(kept)
	waitInterest(t, b1, lost, 1)
	waitInterest(t, b2, kept, 1)

	if err := b1.child.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	waitConnected(t, pub, 1)
	start := time.Now()
	if _, err := publishSync(t, pub, lost, "x"); !errors.Is(err, brokerclient.ErrBrokerDown) {
		t.Fatalf("publish to the dead owner: %v, want ErrBrokerDown", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("failing a publish to a dead broker took %v", d)
	}
	if _, err := publishSync(t, pub, kept, "0"); err != nil {
		t.Fatalf("publish to the live broker: %v", err)
	}

	for _, c := range []*brokerclient.Client{pub, sub} {
		c.SetBrokers([]brokerclient.Endpoint{b2.ep})
	}
	waitInterest(t, b2, lost, 1)
	waitInterest(t, b2, kept, 1) // an unaffected channel keeps its interest
	if _, err := publishSync(t, pub, lost, "0"); err != nil {
		t.Fatalf("publish after the move: %v", err)
	}
	waitFor(t, 5*time.Second, "delivery after the move", func() bool { return len(rec.get(lost)) == 1 })
	if got := rec.get(kept); len(got) != 1 {
		t.Fatalf("kept channel got %+v", got)
	}
}

func TestReconnectReregistersInterest(t *testing.T) {
	dir := runDir(t)
	b := startBroker(t, dir, "broker-1")
	pub, _ := newClient(t, "worker-1")
	sub, rec := newClient(t, "worker-2")
	for _, c := range []*brokerclient.Client{pub, sub} {
		c.SetBrokers([]brokerclient.Endpoint{b.ep})
		waitConnected(t, c, 1)
	}
	sub.Subscribe("c")
	waitInterest(t, b, "c", 1)
	_ = b.child.Stop(context.Background())
	waitConnected(t, sub, 0)

	// A restarted broker at the same address: no SetBrokers needed.
	b2 := startBroker(t, dir, "broker-1")
	waitConnected(t, sub, 1)
	waitConnected(t, pub, 1)
	waitInterest(t, b2, "c", 1)
	if _, err := publishSync(t, pub, "c", "0"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "delivery after reconnect", func() bool { return len(rec.get("c")) == 1 })
}

func TestConcurrentPublishersShareOneOrder(t *testing.T) {
	dir := runDir(t)
	b := startBroker(t, dir, "broker-1")
	const workers, per = 3, 300
	var clients []*brokerclient.Client
	var recs []*recorder
	for i := range workers {
		c, r := newClient(t, "worker-"+strconv.Itoa(i))
		c.SetBrokers([]brokerclient.Endpoint{b.ep})
		waitConnected(t, c, 1)
		c.Subscribe("c")
		clients, recs = append(clients, c), append(recs, r)
	}
	waitInterest(t, b, "c", workers)
	var a acks
	var wg sync.WaitGroup
	for w, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range per {
				c.Publish("c", []byte(fmt.Sprintf("%d/%d", w, i)), a.done(w*per+i))
			}
		}()
	}
	wg.Wait()
	waitFor(t, 5*time.Second, "acks", func() bool { ok, f := a.count(); return ok+f == workers*per })
	waitFor(t, 5*time.Second, "deliveries", func() bool {
		for _, r := range recs {
			if len(r.get("c")) != workers*per {
				return false
			}
		}
		return true
	})
	first := recs[0].get("c")
	for w, r := range recs {
		got := r.get("c")
		next := map[string]int{}
		for i, m := range got {
			if m != first[i] || m.offset != uint64(i+1) {
				t.Fatalf("worker %d message %d = %+v, worker 0 saw %+v", w, i, m, first[i])
			}
			var pw, pi int
			fmt.Sscanf(m.data, "%d/%d", &pw, &pi)
			if key := strconv.Itoa(pw); next[key] != pi {
				t.Fatalf("worker %d: publisher %d's message %d arrived out of order", w, pw, pi)
			}
			next[strconv.Itoa(pw)]++
		}
	}
}

func TestPublishFailures(t *testing.T) {
	t.Run("no brokers", func(t *testing.T) {
		c, _ := newClient(t, "w")
		if _, err := publishSync(t, c, "c", "x"); !errors.Is(err, brokerclient.ErrNoBrokers) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("too large", func(t *testing.T) {
		c, _ := newClient(t, "w", func(o *brokerclient.Options) { o.MaxFrame = 100 + link.Overhead })
		c.SetBrokers([]brokerclient.Endpoint{{Name: "b", Addr: "unix:/nonexistent"}})
		if _, err := publishSync(t, c, "c", string(make([]byte, 100+link.Overhead))); !errors.Is(err, brokerclient.ErrTooLarge) {
			t.Fatalf("got %v", err)
		}
		c.Publish("c", nil, nil) // a nil done is allowed
	})
	t.Run("after close", func(t *testing.T) {
		c, _ := newClient(t, "w")
		c.Close()
		if _, err := publishSync(t, c, "c", "x"); !errors.Is(err, brokerclient.ErrClosed) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("unreachable broker", func(t *testing.T) {
		c, _ := newClient(t, "w")
		c.SetBrokers([]brokerclient.Endpoint{{Name: "b", Addr: "unix:" + filepath.Join(runDir(t), "none.sock")}})
		start := time.Now()
		if _, err := publishSync(t, c, "c", "x"); !errors.Is(err, brokerclient.ErrBrokerDown) {
			t.Fatalf("got %v", err)
		}
		if time.Since(start) > 100*time.Millisecond {
			t.Fatal("publish to an unreachable broker did not fail at once")
		}
	})
	t.Run("timeout", func(t *testing.T) {
		addr := fakeBroker(t, func(f *link.Frame, w *link.Writer, conn net.Conn) {})
		c, _ := newClient(t, "w", func(o *brokerclient.Options) { o.PublishTimeout = 150 * time.Millisecond })
		c.SetBrokers([]brokerclient.Endpoint{{Name: "b", Addr: addr}})
		waitConnected(t, c, 1)
		start := time.Now()
		if _, err := publishSync(t, c, "c", "x"); !errors.Is(err, brokerclient.ErrTimeout) {
			t.Fatalf("got %v", err)
		}
		if d := time.Since(start); d < 150*time.Millisecond || d > 2*time.Second {
			t.Fatalf("timed out after %v", d)
		}
	})
	t.Run("link dies before ack", func(t *testing.T) {
		addr := fakeBroker(t, func(f *link.Frame, w *link.Writer, conn net.Conn) {
			if f.Type == link.TypePub {
				conn.Close()
			}
		})
		c, _ := newClient(t, "w")
		c.SetBrokers([]brokerclient.Endpoint{{Name: "b", Addr: addr}})
		waitConnected(t, c, 1)
		if _, err := publishSync(t, c, "c", "x"); !errors.Is(err, brokerclient.ErrLinkLost) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("queue full", func(t *testing.T) {
		addr := fakeBroker(t, func(f *link.Frame, w *link.Writer, conn net.Conn) {})
		c, _ := newClient(t, "w", func(o *brokerclient.Options) { o.MaxInflight = 10 })
		c.SetBrokers([]brokerclient.Endpoint{{Name: "b", Addr: addr}})
		waitConnected(t, c, 1)
		var a acks
		for i := range 11 {
			c.Publish("c", []byte("x"), a.done(i))
		}
		// The eleventh fails at once; the ten in flight fail on Close.
		if _, f := a.count(); f != 1 || !errors.Is(a.errs[0], brokerclient.ErrQueueFull) {
			t.Fatalf("errors %v", a.errs)
		}
		c.Close()
		if ok, f := a.count(); ok != 0 || f != 11 {
			t.Fatalf("after close: %d ok, %d failed", ok, f)
		}
	})
}

// fakeBroker answers hello and hands every later frame to fn.
func fakeBroker(t *testing.T, fn func(*link.Frame, *link.Writer, net.Conn)) string {
	t.Helper()
	ln, err := link.Listen("unix:" + filepath.Join(runDir(t), "fake.sock"))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
			w := link.NewWriter(conn, link.WriterConfig{})
			wg.Add(2)
			go func() { defer wg.Done(); _ = w.Run() }()
			go func() {
				defer wg.Done()
				defer w.Close()
				var d link.Decoder
				_ = link.ReadFrames(conn, &d, make([]byte, 4096), 0, func(f *link.Frame) error {
					if f.Type == link.TypeHello {
						return w.WriteHello(1, "fake")
					}
					fn(f, w, conn)
					return nil
				})
			}()
		}
	}()
	return link.ListenerAddr(ln)
}
