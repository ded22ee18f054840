package brokerclient_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/proto/link"
)

// vacRec records OnVacated notices.
type vacRec struct {
	mu  sync.Mutex
	got []string
}

func (v *vacRec) on(ch string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.got = append(v.got, ch)
}

func (v *vacRec) list() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := slices.Clone(v.got)
	slices.Sort(out)
	return out
}

// TestVacatedNoticeAfterWorkerDeath: when a worker's link dies and that
// empties an internal channel's presence, exactly one other worker gets a
// vacated notice for it (it reports the webhook the dead worker cannot);
// channels someone else still holds, and non-internal channels, give none;
// with no other worker the notice waits for the next one that comes up.
func TestVacatedNoticeAfterWorkerDeath(t *testing.T) {
	dir := runDir(t)
	b := startHistoryBroker(t, dir, "broker-1")
	eps := []brokerclient.Endpoint{b.ep}
	join := func(c *brokerclient.Client, ch, conn string) {
		t.Helper()
		if err := c.PresenceJoin(ch, brokerclient.PresenceEntry{Conn: conn, Worker: conn}); err != nil {
			t.Fatal(err)
		}
	}
	newWorker := func(name string, rec *vacRec) *brokerclient.Client {
		c, _ := newClient(t, name, withRules, func(o *brokerclient.Options) { o.OnVacated = rec.on })
		c.SetBrokers(eps)
		waitConnected(t, c, 1)
		return c
	}
	var r1, r2, r3 vacRec
	w1 := newWorker("w1", &r1)
	w2 := newWorker("w2", &r2)
	w3 := newWorker("w3", &r3)
	join(w1, "#user/alice", "w1")
	join(w1, "#chan/lobby", "w1")
	join(w1, "#user/bob", "w1")
	join(w2, "#user/bob", "w2") // bob stays online on w2
	join(w1, "hist/x", "w1")    // not internal: no notice
	waitFor(t, 5*time.Second, "entries at the broker", func() bool { return b.child.Server().Presence("hist/x") == 1 })

	w1.Close() // the link dies as with a crash: no leaves were sent
	want := []string{"#chan/lobby", "#user/alice"}
	waitFor(t, 5*time.Second, "the vacated notices", func() bool { return len(r2.list())+len(r3.list()) >= len(want) })
	// Give a duplicate a chance to show up.
	time.Sleep(100 * time.Millisecond)
	got := append(r2.list(), r3.list()...)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Fatalf("vacated notices %v, want %v once each (w2 %v, w3 %v)", got, want, r2.list(), r3.list())
	}
	if b.child.Server().Presence("#user/bob") != 1 {
		t.Fatal("bob's entry on w2 went with w1")
	}

	// The last workers die; the notice waits for the next worker.
	join(w2, "#user/carol", "w2")
	waitFor(t, 5*time.Second, "carol's entry", func() bool { return b.child.Server().Presence("#user/carol") == 1 })
	w3.Close()
	// Only once the broker has dropped w3: a link closed a moment ago but
	// not yet noticed would still look alive and could be handed the
	// notices (a double failure, lost by design).
	waitFor(t, 5*time.Second, "w3's link dropped", func() bool { return b.child.Server().Stats().Links == 1 })
	w2.Close()
	var r4 vacRec
	newWorker("w4", &r4)
	want = []string{"#user/bob", "#user/carol"}
	waitFor(t, 5*time.Second, "the waiting notices at the next worker", func() bool { return slices.Equal(r4.list(), want) })
}

// TestVacatedNoticeAfterNodeDeath: a whole node dies — a broker and a
// worker together. Keys whose owner survived are reported by their owner;
// a key whose owner died with the node is reported by the broker that owns
// it in the new ring view, from the shadow entries every non-owner keeps
// (exactly once); a key another worker still holds is not reported.
func TestVacatedNoticeAfterNodeDeath(t *testing.T) {
	dir := runDir(t)
	brokers := []*testBroker{
		startHistoryBroker(t, dir, "broker-1"),
		startHistoryBroker(t, dir, "broker-2"),
		startHistoryBroker(t, dir, "broker-3"),
	}
	ring := func(bs ...*testBroker) {
		var ms []link.Member
		for _, b := range bs {
			ms = append(ms, link.Member{Name: b.ep.Name, Addr: b.ep.Addr})
		}
		for _, b := range bs {
			b.child.Server().SetRingName(b.ep.Name)
			b.child.Server().SetMembers(ms)
		}
	}
	ring(brokers...)
	all := []brokerclient.Endpoint{brokers[0].ep, brokers[1].ep, brokers[2].ep}
	var rDead, rAlive vacRec
	dead, _ := newClient(t, "dead-node-worker", withRules, func(o *brokerclient.Options) { o.OnVacated = rDead.on })
	alive, _ := newClient(t, "live-node-worker", withRules, func(o *brokerclient.Options) { o.OnVacated = rAlive.on })
	for _, c := range []*brokerclient.Client{dead, alive} {
		c.SetBrokers(all)
		waitConnected(t, c, 3)
	}
	// Keys by owner: lost (owned by broker-1, which dies), kept (owned by
	// a survivor), shared (owned by broker-1, also held by the live worker).
	names := []string{"broker-1", "broker-2", "broker-3"}
	pick := func(want string, not ...string) string {
		for i := 0; i < 1000; i++ {
			ch := fmt.Sprintf("#user/u%d", i)
			if brokerclient.Owner(names, ch) == want && !slices.Contains(not, ch) {
				return ch
			}
		}
		t.Fatalf("no channel owned by %s", want)
		return ""
	}
	lost := pick("broker-1")
	shared := pick("broker-1", lost)
	kept := pick("broker-2")
	for _, ch := range []string{lost, shared, kept} {
		if err := dead.PresenceJoin(ch, brokerclient.PresenceEntry{Conn: "dead-node-worker"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := alive.PresenceJoin(shared, brokerclient.PresenceEntry{Conn: "live-node-worker"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "entries and shadows in place", func() bool {
		return brokers[0].child.Server().Presence(shared) == 2 && brokers[1].child.Server().Presence(kept) == 1
	})

	// The node dies: its broker first (the ring notices within ~1 s), its
	// worker's links to the survivors later (their idle timeout).
	_ = brokers[0].child.Stop(context.Background())
	ring(brokers[1], brokers[2])
	alive.SetBrokers(all[1:])
	waitFor(t, 5*time.Second, "the shared key re-announced at its new owner", func() bool {
		for _, b := range brokers[1:] {
			if b.child.Server().Presence(shared) == 1 {
				return true
			}
		}
		return false
	})
	dead.Close()
	want := []string{kept, lost}
	slices.Sort(want)
	waitFor(t, 5*time.Second, "notices for the lost and kept keys", func() bool { return len(rAlive.list()) >= 2 })
	time.Sleep(100 * time.Millisecond) // a duplicate would show up by now
	if got := rAlive.list(); !slices.Equal(got, want) {
		t.Fatalf("notices %v, want %v once each (not the shared key %s)", got, want, shared)
	}
}

// TestNoVacatedNoticeForABlip: a worker whose link drops and comes back
// (it redials and re-announces its entries) within the broker's grace is
// not reported gone.
func TestNoVacatedNoticeForABlip(t *testing.T) {
	dir := runDir(t)
	b := startHistoryBroker(t, dir, "broker-1")
	hole := newBlackHole(t, b.ep.Addr)
	var rFlaky, rOther vacRec
	flaky, _ := newClient(t, "flaky", withRules, func(o *brokerclient.Options) { o.OnVacated = rFlaky.on })
	flaky.SetBrokers([]brokerclient.Endpoint{{Name: "broker-1", Addr: hole.addr()}})
	other, _ := newClient(t, "other", withRules, func(o *brokerclient.Options) { o.OnVacated = rOther.on })
	other.SetBrokers([]brokerclient.Endpoint{b.ep})
	waitConnected(t, flaky, 1)
	waitConnected(t, other, 1)
	if err := flaky.PresenceJoin("#user/blip", brokerclient.PresenceEntry{Conn: "flaky"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the entry", func() bool { return b.child.Server().Presence("#user/blip") == 1 })
	hole.cut()
	waitFor(t, 5*time.Second, "the entry dropped with the link", func() bool { return b.child.Server().Presence("#user/blip") == 0 })
	waitFor(t, 5*time.Second, "the entry re-announced", func() bool { return b.child.Server().Presence("#user/blip") == 1 })
	time.Sleep(2500 * time.Millisecond) // past the 2 s grace
	if got := append(rFlaky.list(), rOther.list()...); len(got) != 0 {
		t.Fatalf("a blip was reported as a vacancy: %v", got)
	}
}
