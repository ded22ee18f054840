package brokerclient_test

import (
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/shoalhq/shoal/brokerclient"
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
	w2.Close()
	var r4 vacRec
	newWorker("w4", &r4)
	want = []string{"#user/bob", "#user/carol"}
	waitFor(t, 5*time.Second, "the waiting notices at the next worker", func() bool { return slices.Equal(r4.list(), want) })
}
