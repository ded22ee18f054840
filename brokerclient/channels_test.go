package brokerclient_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/shoalhq/shoal/brokerclient"
)

// TestChannelAndPresenceListsPaged: a broker with more channels than one
// reply frame can carry answers the channel list in pages, and a channel's
// presence list larger than a frame comes in pages too (it was an error
// answer before); the link stays up throughout.
func TestChannelAndPresenceListsPaged(t *testing.T) {
	dir := runDir(t)
	b := startHistoryBroker(t, dir, "broker-1")
	c, _ := newClient(t, "w", withRules)
	c.SetBrokers([]brokerclient.Endpoint{b.ep})
	waitConnected(t, c, 1)

	// ~5000 × 250 B of list: several 256 KiB pages.
	const n = 5000
	pad := strings.Repeat("x", 150)
	for i := range n {
		c.Subscribe(fmt.Sprintf("plain/%s/%05d", pad, i))
	}
	waitFor(t, 10*time.Second, "every interest registered", func() bool {
		return b.child.Server().Interest(fmt.Sprintf("plain/%s/%05d", pad, n-1)) == 1
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	list, err := c.Channels(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != n {
		t.Fatalf("%d channels listed, want %d", len(list), n)
	}
	for i, ci := range list {
		if want := fmt.Sprintf("plain/%s/%05d", pad, i); ci.Channel != want || ci.Workers != 1 || len(ci.WorkerNames) != 1 || ci.WorkerNames[0] != "w" {
			t.Fatalf("entry %d: %+v", i, ci)
		}
	}

	// ~1.5 MiB of presence entries in one channel: more than a link frame
	// holds, so the list comes in pages, whole and in conn id order.
	info := []byte(`"` + strings.Repeat("i", 500) + `"`)
	for i := range 3000 {
		if err := c.PresenceJoin("hist/big", brokerclient.PresenceEntry{Conn: fmt.Sprintf("c%05d", i), Info: info}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, "3000 entries", func() bool { return b.child.Server().Presence("hist/big") == 3000 })
	entries, err := c.Presence(ctx, "hist/big")
	if err != nil {
		t.Fatalf("presence list larger than a frame: %v", err)
	}
	if len(entries) != 3000 {
		t.Fatalf("%d presence entries listed, want 3000", len(entries))
	}
	for i, e := range entries {
		if want := fmt.Sprintf("c%05d", i); e.Conn != want || string(e.Info) != string(info) {
			t.Fatalf("entry %d: conn %q (want %q), %d bytes of info", i, e.Conn, want, len(e.Info))
		}
	}
	if n, err := c.PresenceCount(ctx, "hist/big"); err != nil || n != 3000 {
		t.Fatalf("count after the list: %d %v (the link must have stayed up)", n, err)
	}
}
