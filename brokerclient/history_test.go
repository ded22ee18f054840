package brokerclient_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/shoalhq/shoal/broker"
	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/proto/link"
)

var historyRules = []configs.ChannelRule{
	{Match: "hist/**", History: configs.History{Size: 1000}, Presence: true, JoinLeave: true},
	{Match: "short/**", History: configs.History{Size: 5}},
	{Match: "dur/**", History: configs.History{Size: 1000}, Durable: true},
}

// startHistoryBroker starts an in-process broker with historyRules.
func startHistoryBroker(t testing.TB, dir, name string) *testBroker {
	t.Helper()
	cfg := configs.Default()
	cfg.Cluster.Gossip = ""
	cfg.Channels = historyRules
	cfg.Storage.Dir = t.TempDir()
	b, _ := json.Marshal(cfg)
	c := broker.New(nil)
	res, err := c.Start(context.Background(), control.StartParams{Role: control.RoleBroker, Name: name, RunDir: dir, Config: b})
	if err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	t.Cleanup(func() { _ = c.Stop(context.Background()) })
	return &testBroker{child: c, ep: brokerclient.Endpoint{Name: name, Addr: res.Addrs[control.AddrLink]}}
}

// pubRec records OnPublication.
type pubRec struct {
	mu   sync.Mutex
	msgs []brokerclient.Message
	ep   uint64
}

func (r *pubRec) on(_ string, data []byte, off, epoch uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, brokerclient.Message{Offset: off, Data: []byte(string(data))})
	r.ep = epoch
}

func (r *pubRec) snapshot() []brokerclient.Message {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]brokerclient.Message(nil), r.msgs...)
}

func recoverSync(t *testing.T, c *brokerclient.Client, ch string, since uint64, epoch string) brokerclient.RecoverResult {
	t.Helper()
	type res struct {
		r   brokerclient.RecoverResult
		err error
	}
	out := make(chan res, 1)
	c.SubscribeRecover(ch, since, epoch, func(r brokerclient.RecoverResult, err error) { out <- res{r, err} })
	select {
	case r := <-out:
		if r.err != nil {
			t.Fatalf("SubscribeRecover %s: %v", ch, r.err)
		}
		return r.r
	case <-time.After(10 * time.Second):
		t.Fatalf("SubscribeRecover %s: done never called", ch)
	}
	return brokerclient.RecoverResult{}
}

func mustPublish(t *testing.T, c *brokerclient.Client, ch, data string) uint64 {
	t.Helper()
	off, err := publishSync(t, c, ch, data)
	if err != nil {
		t.Fatalf("publish %s to %s: %v", data, ch, err)
	}
	return off
}

func withRules(o *brokerclient.Options) { o.Channels = historyRules }

// TestRecoveryReturnsExactlyTheGap: a subscriber that went away comes back
// with its last (offset, epoch) and gets exactly what it missed, then live.
func TestRecoveryReturnsExactlyTheGap(t *testing.T) {
	dir := runDir(t)
	b := startHistoryBroker(t, dir, "broker-1")
	pub, _ := newClient(t, "pub", withRules)
	pub.SetBrokers([]brokerclient.Endpoint{b.ep})
	waitConnected(t, pub, 1)

	const ch = "hist/room"
	sub1, _ := newClient(t, "sub1", withRules)
	sub1.SetBrokers([]brokerclient.Endpoint{b.ep})
	waitConnected(t, sub1, 1)
	first := recoverSync(t, sub1, ch, 0, "")
	if first.Recovered || first.Epoch == "" {
		t.Fatalf("a fresh subscribe: %+v", first)
	}
	for i := 1; i <= 5; i++ {
		mustPublish(t, pub, ch, "m"+strconv.Itoa(i))
	}
	sub1.Close() // the subscriber's worker goes away

	for i := 6; i <= 12; i++ {
		mustPublish(t, pub, ch, "m"+strconv.Itoa(i))
	}
	rec := &pubRec{}
	sub2, _ := newClient(t, "sub2", withRules, func(o *brokerclient.Options) { o.OnPublication = rec.on })
	sub2.SetBrokers([]brokerclient.Endpoint{b.ep})
	waitConnected(t, sub2, 1)
	r := recoverSync(t, sub2, ch, 5, first.Epoch)
	if !r.Recovered || r.Epoch != first.Epoch || r.Offset != 12 || len(r.Messages) != 7 {
		t.Fatalf("recovery: %+v", r)
	}
	for i, m := range r.Messages {
		if m.Offset != uint64(6+i) || string(m.Data) != "m"+strconv.Itoa(6+i) {
			t.Fatalf("recovered message %d: %d %q", i, m.Offset, m.Data)
		}
	}
	mustPublish(t, pub, ch, "m13")
	waitFor(t, 5*time.Second, "live message after the recovery", func() bool { return len(rec.snapshot()) == 1 })
	if got := rec.snapshot()[0]; got.Offset != 13 || brokerclient.FormatEpoch(rec.ep) != first.Epoch {
		t.Fatalf("live message %+v epoch %s", got, brokerclient.FormatEpoch(rec.ep))
	}

	// Not recoverable: unknown epoch, offset ahead, history pushed out.
	if r := recoverSync(t, sub2, ch, 5, "zzz"); r.Recovered {
		t.Fatalf("unknown epoch recovered: %+v", r)
	}
	if r := recoverSync(t, sub2, ch, 99, first.Epoch); r.Recovered {
		t.Fatalf("offset ahead recovered: %+v", r)
	}
	sr := recoverSync(t, sub2, "short/x", 0, "")
	for i := range 10 {
		mustPublish(t, pub, "short/x", strconv.Itoa(i))
	}
	if r := recoverSync(t, sub2, "short/x", 2, sr.Epoch); r.Recovered {
		t.Fatalf("pushed-out history recovered: %+v", r)
	}
	if r := recoverSync(t, sub2, "short/x", 6, sr.Epoch); !r.Recovered || len(r.Messages) != 4 {
		t.Fatalf("recent gap of a short history: %+v", r)
	}
	if r := recoverSync(t, sub2, "nohistory", 0, sr.Epoch); r.Recovered {
		t.Fatalf("a channel without history recovered: %+v", r)
	}

	// Paged history read.
	p, err := pub.History(context.Background(), ch, 0, 5)
	if err != nil || len(p.Messages) != 5 || !p.More || p.Messages[0].Offset != 1 || p.Offset != 13 {
		t.Fatalf("history page 1: %+v %v", p, err)
	}
	p, err = pub.History(context.Background(), ch, 10, 5)
	if err != nil || len(p.Messages) != 3 || p.More || p.Messages[2].Offset != 13 {
		t.Fatalf("history page 3: %+v %v", p, err)
	}
}

// TestRecoverySeamUnderLoad: while a publisher runs, a second subscriber
// recovers; recovered + live messages are contiguous, with no duplicate.
func TestRecoverySeamUnderLoad(t *testing.T) {
	dir := runDir(t)
	b := startHistoryBroker(t, dir, "broker-1")
	pub, _ := newClient(t, "pub", withRules)
	pub.SetBrokers([]brokerclient.Endpoint{b.ep})
	waitConnected(t, pub, 1)
	const ch = "hist/seam"
	// Another worker keeps live interest so messages also flow on the
	// recovering worker's link before its reply (the worker-already-
	// interested case).
	rec := &pubRec{}
	sub, _ := newClient(t, "sub", withRules, func(o *brokerclient.Options) { o.OnPublication = rec.on })
	sub.SetBrokers([]brokerclient.Endpoint{b.ep})
	waitConnected(t, sub, 1)
	base := recoverSync(t, sub, ch, 0, "")

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 3000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			done := make(chan struct{})
			pub.Publish(ch, []byte(strconv.Itoa(i)), func(uint64, error) { close(done) })
			<-done
		}
	}()
	waitFor(t, 5*time.Second, "some messages", func() bool { return len(rec.snapshot()) > 50 })
	// Recover from offset 10 while publishing continues; at done time,
	// note how many live messages had arrived.
	type res struct {
		r    brokerclient.RecoverResult
		seen int
	}
	out := make(chan res, 1)
	sub.SubscribeRecover(ch, 10, base.Epoch, func(r brokerclient.RecoverResult, err error) {
		if err != nil {
			t.Error(err)
		}
		out <- res{r, len(rec.snapshot())}
	})
	got := <-out
	waitFor(t, 5*time.Second, "more live messages", func() bool { return len(rec.snapshot()) > got.seen+50 })
	close(stop)
	wg.Wait()
	if !got.r.Recovered {
		t.Fatalf("not recovered: %+v", got.r)
	}
	// What a socket subscribing at done sees: the recovered messages, then
	// the live messages delivered after done.
	var seq []uint64
	for _, m := range got.r.Messages {
		seq = append(seq, m.Offset)
	}
	for _, m := range rec.snapshot()[got.seen:] {
		seq = append(seq, m.Offset)
	}
	for i, off := range seq {
		if off != uint64(11+i) {
			t.Fatalf("position %d: offset %d, want %d (recovered %d, top %d)", i, off, 11+i, len(got.r.Messages), got.r.Offset)
		}
	}
}

// TestReplicaServesAfterOwnerLoss: the owner of a non-durable history
// channel goes away; its next broker serves the history, and recovery of
// the old epoch continues.
func TestReplicaServesAfterOwnerLoss(t *testing.T) {
	dir := runDir(t)
	b1 := startHistoryBroker(t, dir, "broker-1")
	b2 := startHistoryBroker(t, dir, "broker-2")
	b3 := startHistoryBroker(t, dir, "broker-3")
	all := []brokerclient.Endpoint{b1.ep, b2.ep, b3.ep}
	pub, _ := newClient(t, "pub", withRules)
	pub.SetBrokers(all)
	waitConnected(t, pub, 3)
	var ch string
	for i := 0; ch == ""; i++ {
		if c := "hist/r" + strconv.Itoa(i); pub.Owner(c) == "broker-1" {
			ch = c
		}
	}
	sub, _ := newClient(t, "sub", withRules)
	sub.SetBrokers(all)
	waitConnected(t, sub, 3)
	first := recoverSync(t, sub, ch, 0, "")
	for i := 1; i <= 20; i++ {
		mustPublish(t, pub, ch, fmt.Sprint(i))
	}
	if st := pub.Stats(); st.Replicated != 20 || st.ReplicaMissed != 0 {
		t.Fatalf("replication counters %+v", st)
	}
	// The owner dies; every worker drops it.
	_ = b1.child.Stop(context.Background())
	rest := []brokerclient.Endpoint{b2.ep, b3.ep}
	pub.SetBrokers(rest)
	sub.SetBrokers(rest)
	newOwner := pub.Owner(ch)
	p, err := pub.History(context.Background(), ch, 0, 0)
	if err != nil || len(p.Messages) != 20 || p.Offset != 20 || p.Epoch != first.Epoch {
		t.Fatalf("history at the new owner %s: %+v %v", newOwner, p, err)
	}
	r := recoverSync(t, sub, ch, 10, first.Epoch)
	if !r.Recovered || len(r.Messages) != 10 || r.Messages[0].Offset != 11 {
		t.Fatalf("recovery from the replica: %+v", r)
	}
	// The new owner continues the offsets under its own, linked epoch.
	if off := mustPublish(t, pub, ch, "21"); off != 21 {
		t.Fatalf("first publish at the new owner got offset %d", off)
	}
	r = recoverSync(t, sub, ch, 15, first.Epoch)
	if !r.Recovered || len(r.Messages) != 6 || r.Epoch == first.Epoch || r.Messages[5].Offset != 21 {
		t.Fatalf("recovery across the epoch link: %+v", r)
	}
}

// TestPresenceNoGhosts: a worker's entries vanish when its link dies; join
// and leave events reach subscribed workers.
func TestPresenceNoGhosts(t *testing.T) {
	dir := runDir(t)
	b1 := startHistoryBroker(t, dir, "broker-1")
	b2 := startHistoryBroker(t, dir, "broker-2")
	all := []brokerclient.Endpoint{b1.ep, b2.ep}
	var evMu sync.Mutex
	var events []string
	watcher, _ := newClient(t, "watcher", withRules, func(o *brokerclient.Options) {
		o.OnJoinLeave = func(ch string, join bool, entry []byte) {
			var e brokerclient.PresenceEntry
			_ = json.Unmarshal(entry, &e)
			evMu.Lock()
			events = append(events, fmt.Sprintf("%v:%s:%s", join, e.Conn, e.Worker))
			evMu.Unlock()
		}
	})
	watcher.SetBrokers(all)
	waitConnected(t, watcher, 2)
	const ch = "hist/lobby"
	watcher.Subscribe(ch)
	waitFor(t, 5*time.Second, "interest", func() bool {
		return b1.child.Server().Interest(ch)+b2.child.Server().Interest(ch) == 1
	})

	w1, _ := newClient(t, "worker-1", withRules)
	w1.SetBrokers(all)
	waitConnected(t, w1, 2)
	for i := range 3 {
		if err := w1.PresenceJoin(ch, brokerclient.PresenceEntry{Conn: "c" + strconv.Itoa(i), User: "u" + strconv.Itoa(i%2), Info: json.RawMessage(`{"n":1}`)}); err != nil {
			t.Fatal(err)
		}
	}
	_ = w1.PresenceJoin("hist/other", brokerclient.PresenceEntry{Conn: "c0", User: "u0"})
	ctx := context.Background()
	waitFor(t, 5*time.Second, "3 entries", func() bool { n, _ := watcher.PresenceCount(ctx, ch); return n == 3 })
	list, err := watcher.Presence(ctx, ch)
	if err != nil || len(list) != 3 || list[0].Conn != "c0" || list[0].Worker != "worker-1" || string(list[0].Info) != `{"n":1}` {
		t.Fatalf("presence list %+v %v", list, err)
	}
	uc, err := watcher.UserChannels(ctx, "u0")
	if err != nil || len(uc) != 2 {
		t.Fatalf("user channels %v %v", uc, err)
	}
	chans, err := watcher.Channels(ctx)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, ci := range chans {
		if ci.Channel == ch {
			found = ci.Workers == 1 && ci.Presence == 3
		}
	}
	if !found {
		t.Fatalf("channel list %+v", chans)
	}
	w1.PresenceLeave(ch, "c2")
	waitFor(t, 5*time.Second, "2 entries after a leave", func() bool { n, _ := watcher.PresenceCount(ctx, ch); return n == 2 })

	// The worker dies: its link goes, and so do its entries.
	w1.Close()
	waitFor(t, 5*time.Second, "no ghosts", func() bool {
		n, _ := watcher.PresenceCount(ctx, ch)
		m, _ := watcher.PresenceCount(ctx, "hist/other")
		return n == 0 && m == 0
	})
	evMu.Lock()
	defer evMu.Unlock()
	joins, leaves := 0, 0
	for _, e := range events {
		if e[:4] == "true" {
			joins++
		} else {
			leaves++
		}
	}
	if joins != 3 || leaves != 3 {
		t.Fatalf("events %v", events)
	}
}

// TestPresenceRebuiltOnNewOwner: when a channel's owner goes away, the
// workers re-announce their entries to the new owner.
func TestPresenceRebuiltOnNewOwner(t *testing.T) {
	dir := runDir(t)
	b1 := startHistoryBroker(t, dir, "broker-1")
	b2 := startHistoryBroker(t, dir, "broker-2")
	all := []brokerclient.Endpoint{b1.ep, b2.ep}
	w, _ := newClient(t, "worker-1", withRules)
	w.SetBrokers(all)
	waitConnected(t, w, 2)
	var ch string
	for i := 0; ch == ""; i++ {
		if c := "hist/p" + strconv.Itoa(i); w.Owner(c) == "broker-1" {
			ch = c
		}
	}
	if err := w.PresenceJoin(ch, brokerclient.PresenceEntry{Conn: "c1", User: "u"}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	waitFor(t, 5*time.Second, "entry", func() bool { n, _ := w.PresenceCount(ctx, ch); return n == 1 })
	_ = b1.child.Stop(context.Background())
	w.SetBrokers([]brokerclient.Endpoint{b2.ep})
	waitFor(t, 5*time.Second, "entry at the new owner", func() bool { return b2.child.Server().Presence(ch) == 1 })
}

// BenchmarkPublishHistory: publish round trips on a history channel with
// a replica (2 brokers), pipelined (256 in flight); dur/ is also durable
// (bbolt group commit with a real fsync); allocs/op covers the worker side (the
// replica job is pooled) and both brokers run in process, so their
// allocations count too.
func BenchmarkPublishHistory(b *testing.B) {
	for _, name := range []string{"hist/bench", "dur/bench", "plain/bench"} {
		b.Run(name, func(b *testing.B) {
			dir := runDir(b)
			b1 := startHistoryBroker(b, dir, "broker-1").ep
			b2 := startHistoryBroker(b, dir, "broker-2").ep
			c := brokerclient.New(brokerclient.Options{Name: "bench", Channels: historyRules})
			defer c.Close()
			c.SetBrokers([]brokerclient.Endpoint{b1, b2})
			deadline := time.Now().Add(5 * time.Second)
			for c.Stats().Connected != 2 && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			data := make([]byte, 128)
			sem := make(chan struct{}, 256)
			done := func(uint64, error) { <-sem }
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				sem <- struct{}{}
				c.Publish(name, data, done)
			}
			for range cap(sem) {
				sem <- struct{}{}
			}
		})
	}
}

// TestWorkerResyncAfterBrokerRestart: a durable channel's broker restarts
// while a publisher keeps going; the subscribing worker re-registers with
// its last position and delivers every offset exactly once, in order.
func TestWorkerResyncAfterBrokerRestart(t *testing.T) {
	dir, storage := runDir(t), t.TempDir()
	rules := []configs.ChannelRule{{Match: "d/**", History: configs.History{Size: 10000}, Durable: true}}
	start := func() *testBroker {
		cfg := configs.Default()
		cfg.Cluster.Gossip = ""
		cfg.Channels = rules
		cfg.Storage.Dir = storage
		b, _ := json.Marshal(cfg)
		c := broker.New(nil)
		res, err := c.Start(context.Background(), control.StartParams{Role: control.RoleBroker, Name: "broker-1", RunDir: dir, Config: b})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Stop(context.Background()) })
		return &testBroker{child: c, ep: brokerclient.Endpoint{Name: "broker-1", Addr: res.Addrs[control.AddrLink]}}
	}
	b := start()
	rec := &pubRec{}
	var rsMu sync.Mutex
	var resyncs []brokerclient.RecoverResult
	sub, _ := newClient(t, "sub", func(o *brokerclient.Options) {
		o.Channels = rules
		o.OnPublication = rec.on
		o.OnResync = func(_ string, r brokerclient.RecoverResult, err error) {
			rsMu.Lock()
			resyncs = append(resyncs, r)
			rsMu.Unlock()
		}
	})
	pub, _ := newClient(t, "pub", func(o *brokerclient.Options) { o.Channels = rules })
	sub.SetBrokers([]brokerclient.Endpoint{b.ep})
	pub.SetBrokers([]brokerclient.Endpoint{b.ep})
	waitConnected(t, sub, 1)
	waitConnected(t, pub, 1)
	const ch = "d/feed"
	recoverSync(t, sub, ch, 0, "")
	acked := 0
	publishUntil := func(n int) {
		deadline := time.Now().Add(10 * time.Second)
		for acked < n {
			if time.Now().After(deadline) {
				t.Fatalf("publishing stalled at %d", acked)
			}
			if _, err := publishSync(t, pub, ch, strconv.Itoa(acked+1)); err == nil {
				acked++
			} else {
				time.Sleep(time.Millisecond) // retry pacing while the broker restarts
			}
		}
	}
	publishUntil(100)
	_ = b.child.Stop(context.Background())
	start()
	publishUntil(200)
	waitFor(t, 5*time.Second, "200 deliveries", func() bool { return len(rec.snapshot()) >= 200 })
	msgs := rec.snapshot()
	for i, m := range msgs {
		if m.Offset != uint64(i+1) || string(m.Data) != strconv.Itoa(i+1) {
			t.Fatalf("delivery %d: offset %d data %q", i, m.Offset, m.Data)
		}
	}
	if len(msgs) != 200 {
		t.Fatalf("%d deliveries, want 200", len(msgs))
	}
	rsMu.Lock()
	defer rsMu.Unlock()
	if len(resyncs) != 1 || !resyncs[0].Recovered {
		t.Fatalf("resyncs %+v", resyncs)
	}
	t.Logf("the worker's re-registration recovered %d messages published before it was back", len(resyncs[0].Messages))
}

// TestHandBackAfterOwnerRestart: a non-durable history channel's owner
// restarts empty (as the supervisor restarts a SIGKILLed broker within a
// second); it takes the history back from the channel's next broker, which
// held the replica, so subscribers still recover.
func TestHandBackAfterOwnerRestart(t *testing.T) {
	dir := runDir(t)
	b1 := startHistoryBroker(t, dir, "broker-1")
	b2 := startHistoryBroker(t, dir, "broker-2")
	b3 := startHistoryBroker(t, dir, "broker-3")
	pub, _ := newClient(t, "pub", withRules)
	pub.SetBrokers([]brokerclient.Endpoint{b1.ep, b2.ep, b3.ep})
	waitConnected(t, pub, 3)
	var ch string
	for i := 0; ch == ""; i++ {
		if c := "hist/h" + strconv.Itoa(i); pub.Owner(c) == "broker-1" {
			ch = c
		}
	}
	first := recoverSync(t, pub, ch, 0, "")
	for i := 1; i <= 30; i++ {
		mustPublish(t, pub, ch, strconv.Itoa(i))
	}
	// The owner dies and comes back at once, empty; the workers' broker
	// set never changed.
	_ = b1.child.Stop(context.Background())
	b1 = startHistoryBroker(t, dir, "broker-1")
	members := []link.Member{{Name: "broker-1", Addr: b1.ep.Addr}, {Name: "broker-2", Addr: b2.ep.Addr}, {Name: "broker-3", Addr: b3.ep.Addr}}
	// Peers are asked as they appear in the restarted broker's ring view
	// (HandBackFrom): asking only the one without the replica copies
	// nothing, asking the replica's holder later takes the history back.
	holder := brokerclient.Owner([]string{"broker-2", "broker-3"}, ch)
	other := map[string]string{"broker-2": "broker-3", "broker-3": "broker-2"}[holder]
	if n, err := b1.child.Server().HandBackFrom(context.Background(), "broker-1", members, []string{other}); err != nil || n != 0 {
		t.Fatalf("hand-back from %s (no replica): %d channels, %v", other, n, err)
	}
	n, err := b1.child.Server().HandBackFrom(context.Background(), "broker-1", members, []string{holder})
	if err != nil || n < 1 {
		t.Fatalf("hand-back from %s: %d channels, %v", holder, n, err)
	}
	waitConnected(t, pub, 3)
	p, err := pub.History(context.Background(), ch, 0, 0)
	if err != nil || len(p.Messages) != 30 || p.Epoch != first.Epoch || p.Offset != 30 {
		t.Fatalf("history after the restart: %d messages, epoch %s (was %s), top %d, %v", len(p.Messages), p.Epoch, first.Epoch, p.Offset, err)
	}
	r := recoverSync(t, pub, ch, 25, first.Epoch)
	if !r.Recovered || len(r.Messages) != 5 {
		t.Fatalf("recovery after the restart: %+v", r)
	}
	if off := mustPublish(t, pub, ch, "31"); off != 31 {
		t.Fatalf("first publish after the hand-back got offset %d", off)
	}
	// A second hand-back changes nothing: the channel has history now.
	if n, err := b1.child.Server().HandBack(context.Background(), "broker-1", members); err != nil || n != 0 {
		t.Fatalf("second hand-back: %d, %v", n, err)
	}
}

// TestWorkerResyncOnOwnerMove: the owner of a history channel dies; the
// publisher's worker moves first and publishes at the new owner while the
// subscriber's worker still points at the dead one. When the subscriber's
// worker moves, it recovers those messages from the new owner.
func TestWorkerResyncOnOwnerMove(t *testing.T) {
	dir := runDir(t)
	b1 := startHistoryBroker(t, dir, "broker-1")
	b2 := startHistoryBroker(t, dir, "broker-2")
	b3 := startHistoryBroker(t, dir, "broker-3")
	all := []brokerclient.Endpoint{b1.ep, b2.ep, b3.ep}
	rec := &pubRec{}
	var rsMu sync.Mutex
	var resyncs []brokerclient.RecoverResult
	sub, _ := newClient(t, "sub", withRules, func(o *brokerclient.Options) {
		o.OnPublication = rec.on
		o.OnResync = func(_ string, r brokerclient.RecoverResult, err error) {
			rsMu.Lock()
			defer rsMu.Unlock()
			if err == nil {
				resyncs = append(resyncs, r)
			}
		}
	})
	pub, _ := newClient(t, "pub", withRules)
	sub.SetBrokers(all)
	pub.SetBrokers(all)
	waitConnected(t, sub, 3)
	waitConnected(t, pub, 3)
	var ch string
	for i := 0; ch == ""; i++ {
		if c := "hist/m" + strconv.Itoa(i); pub.Owner(c) == "broker-1" {
			ch = c
		}
	}
	sub.Subscribe(ch)
	waitInterest(t, b1, ch, 1)
	for i := 1; i <= 10; i++ {
		mustPublish(t, pub, ch, strconv.Itoa(i))
	}
	waitFor(t, 5*time.Second, "10 deliveries", func() bool { return len(rec.snapshot()) == 10 })
	_ = b1.child.Stop(context.Background())
	rest := []brokerclient.Endpoint{b2.ep, b3.ep}
	pub.SetBrokers(rest)
	for i := 11; i <= 15; i++ {
		mustPublish(t, pub, ch, strconv.Itoa(i))
	}
	sub.SetBrokers(rest)
	waitFor(t, 5*time.Second, "15 deliveries", func() bool { return len(rec.snapshot()) == 15 })
	for i, m := range rec.snapshot() {
		if m.Offset != uint64(i+1) || string(m.Data) != strconv.Itoa(i+1) {
			t.Fatalf("delivery %d: %d %q", i, m.Offset, m.Data)
		}
	}
	rsMu.Lock()
	defer rsMu.Unlock()
	if len(resyncs) != 1 || !resyncs[0].Recovered || len(resyncs[0].Messages) != 5 {
		t.Fatalf("resyncs %+v", resyncs)
	}
	mustPublish(t, pub, ch, "16")
	waitFor(t, 5*time.Second, "live after the move", func() bool { return len(rec.snapshot()) == 16 })
}

// TestPresenceCountedInTheSameStep: the owner answers a join or leave with
// the other entries counted in the same step, so of workers joining (or
// leaving) an internal channel at once exactly one sees nobody else — what
// the worker's cluster-wide webhooks rely on (worker/clusterevents.go).
func TestPresenceCountedInTheSameStep(t *testing.T) {
	dir := runDir(t)
	b1 := startHistoryBroker(t, dir, "broker-1")
	b2 := startHistoryBroker(t, dir, "broker-2")
	all := []brokerclient.Endpoint{b1.ep, b2.ep}
	const workers = 4
	var ws []*brokerclient.Client
	for i := range workers {
		w, _ := newClient(t, "worker-"+strconv.Itoa(i), withRules)
		w.SetBrokers(all)
		waitConnected(t, w, 2)
		ws = append(ws, w)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	// Sequential: the answers count the others, not the caller.
	w0 := ws[0]
	me := brokerclient.PresenceEntry{Conn: "worker-0"}
	if n, err := w0.PresenceJoinCount(ctx, "#user/solo", me); err != nil || n != 0 {
		t.Fatalf("first join: %d others, %v; want 0", n, err)
	}
	if n, err := w0.PresenceJoinCount(ctx, "#user/solo", me); err != nil || n != 0 {
		t.Fatalf("join again (same conn): %d others, %v; want 0", n, err)
	}
	if n, err := ws[1].PresenceJoinCount(ctx, "#user/solo", brokerclient.PresenceEntry{Conn: "worker-1"}); err != nil || n != 1 {
		t.Fatalf("second worker's join: %d others, %v; want 1", n, err)
	}
	if n, err := w0.PresenceLeaveCount(ctx, "#user/solo", "worker-0"); err != nil || n != 1 {
		t.Fatalf("leave: %d left, %v; want 1", n, err)
	}
	if n, err := ws[1].PresenceLeaveCount(ctx, "#user/solo", "worker-1"); err != nil || n != 0 {
		t.Fatalf("last leave: %d left, %v; want 0", n, err)
	}

	// Concurrent, on many channels: exactly one joiner sees 0 others, and
	// exactly one leaver sees 0 left.
	const rounds = 40
	for r := range rounds {
		ch := "#chan/race" + strconv.Itoa(r)
		for _, op := range []string{"join", "leave"} {
			zeros := make(chan int, workers)
			var wg sync.WaitGroup
			for i, w := range ws {
				wg.Go(func() {
					var n int
					var err error
					conn := "worker-" + strconv.Itoa(i)
					if op == "join" {
						n, err = w.PresenceJoinCount(ctx, ch, brokerclient.PresenceEntry{Conn: conn})
					} else {
						n, err = w.PresenceLeaveCount(ctx, ch, conn)
					}
					if err != nil {
						t.Errorf("%s %s %s: %v", conn, op, ch, err)
					}
					if n == 0 {
						zeros <- i
					}
				})
			}
			wg.Wait()
			if len(zeros) != 1 {
				t.Fatalf("%s on %s: %d workers saw no other entry; want exactly 1", op, ch, len(zeros))
			}
		}
	}
}
