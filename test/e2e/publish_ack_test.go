package e2e

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/gobwas/ws/wsutil"
)

// TestPublishAckOrderThroughCluster: a socket pipelines #publish invokes to
// a channel without history (acked once queued on the broker link,
// protocol.publish_ack: local) and to a history channel (acked after the
// broker stored it), both routed through the brokers to a subscriber on the
// other worker. Every invoke gets a success ack, and the subscriber sees
// each channel's messages exactly once in the publisher's order.
func TestPublishAckOrderThroughCluster(t *testing.T) {
	c := startRealtimeCluster(t, "")
	tok := userToken(t, "pat")
	const plain, hist = "plain/order", "chat/order"

	sub := dialRaw(t, c.public, tok)
	sub.invoke("#subscribe", map[string]any{"channel": plain})
	sub.invoke("#subscribe", map[string]any{"channel": hist})
	pub := dialRaw(t, c.public, tok)

	// The subscriber's interest reaches the owning brokers asynchronously:
	// probe both channels until a probe arrives.
	for _, ch := range []string{plain, hist} {
		deadline := time.Now().Add(10 * time.Second)
		for got := false; !got; {
			if time.Now().After(deadline) {
				t.Fatalf("no probe on %s reached the subscriber", ch)
			}
			ack := pub.invoke("#publish", map[string]any{"channel": ch, "data": "probe"})
			if strings.Contains(string(ack), `"error"`) {
				t.Fatalf("probe on %s: %s", ch, ack)
			}
			select {
			case m := <-sub.in:
				got = strings.Contains(string(m), `"probe"`)
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	// Drain the probes still in flight.
	for quiet := false; !quiet; {
		select {
		case <-sub.in:
		case <-time.After(300 * time.Millisecond):
			quiet = true
		}
	}

	const n = 300
	first := pub.cid + 1
	for i := 0; i < n; i++ {
		ch := plain
		if i%3 == 2 {
			ch = hist
		}
		pub.cid++
		b, _ := json.Marshal(map[string]any{"event": "#publish", "data": map[string]any{"channel": ch, "data": map[string]int{"n": i}}, "cid": pub.cid})
		if err := wsutil.WriteClientText(pub.conn, b); err != nil {
			t.Fatal(err)
		}
	}
	acked := map[int]bool{}
	for len(acked) < n {
		m := pub.next("publish acks")
		var r struct {
			RID   int             `json:"rid"`
			Error json.RawMessage `json:"error"`
		}
		if err := json.Unmarshal(m, &r); err != nil || r.RID < first || r.RID >= first+n || acked[r.RID] || r.Error != nil {
			t.Fatalf("unexpected answer %s (err %v)", m, err)
		}
		acked[r.RID] = true
	}

	next := map[string]int{plain: 0, hist: 2} // the n each channel must deliver next
	for got := 0; got < n; got++ {
		p := sub.nextPacket("delivery")
		var d struct{ N int }
		if p.Event != "#publish" || json.Unmarshal(p.Data.Data, &d) != nil {
			t.Fatalf("delivery %d: %+v", got, p)
		}
		want, ok := next[p.Data.Channel]
		if !ok || d.N != want {
			t.Fatalf("delivery %d on %s: n=%d, want %d (reordered or duplicated)", got, p.Data.Channel, d.N, want)
		}
		if p.Data.Channel == hist {
			next[hist] += 3
		} else if want%3 == 0 {
			next[plain] += 1
		} else {
			next[plain] += 2
		}
	}
	if next[plain] < n || next[hist] < n {
		t.Fatalf("deliveries stopped early: %v", next)
	}
	select {
	case m := <-sub.in:
		t.Fatalf("extra delivery %s", m)
	case <-time.After(200 * time.Millisecond):
	}
}
