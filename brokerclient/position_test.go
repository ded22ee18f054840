package brokerclient_test

import (
	"context"
	"testing"
	"time"

	"github.com/shoalhq/shoal/brokerclient"
)

// publishPos is PublishPos made synchronous.
func publishPos(t *testing.T, c *brokerclient.Client, ch, data string) (off, epoch uint64) {
	t.Helper()
	type res struct {
		off, epoch uint64
		err        error
	}
	out := make(chan res, 1)
	c.PublishPos(ch, []byte(data), func(off, epoch uint64, err error) { out <- res{off, epoch, err} })
	select {
	case r := <-out:
		if r.err != nil {
			t.Fatalf("PublishPos %s: %v", ch, r.err)
		}
		return r.off, r.epoch
	case <-time.After(10 * time.Second):
		t.Fatalf("PublishPos %s: done never called", ch)
	}
	return 0, 0
}

// TestPublishPosCarriesEpoch: the acknowledgement of a publish gives the
// channel's epoch with its offset (after the replica step on a history
// channel, straight from the ack on others), so the server API needs no
// history read to report it.
func TestPublishPosCarriesEpoch(t *testing.T) {
	dir := runDir(t)
	b1 := startHistoryBroker(t, dir, "broker-1")
	b2 := startHistoryBroker(t, dir, "broker-2")
	c, _ := newClient(t, "w", withRules)
	c.SetBrokers([]brokerclient.Endpoint{b1.ep, b2.ep})
	waitConnected(t, c, 2)

	for i, want := range []uint64{1, 2, 3} {
		off, ep := publishPos(t, c, "hist/pos", `"x"`)
		if off != want || ep == 0 {
			t.Fatalf("publish %d: offset %d epoch %d", i, off, ep)
		}
		p, err := c.History(context.Background(), "hist/pos", 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		if brokerclient.FormatEpoch(ep) != p.Epoch {
			t.Fatalf("publish %d: epoch %s, history says %s", i, brokerclient.FormatEpoch(ep), p.Epoch)
		}
	}
	if st := c.Stats(); st.Replicated != 3 {
		t.Fatalf("history publishes were not replicated before done: %+v", st)
	}
	off, ep := publishPos(t, c, "plain/pos", `1`)
	if off != 1 || ep == 0 {
		t.Fatalf("plain channel: offset %d epoch %d", off, ep)
	}
	// Failures still reach done.
	c.Close()
	got := make(chan error, 1)
	c.PublishPos("hist/pos", []byte("1"), func(_, _ uint64, err error) { got <- err })
	if err := <-got; err == nil {
		t.Fatal("publish on a closed client succeeded")
	}
}
