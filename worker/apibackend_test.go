package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/shoalhq/shoal/api"
)

// TestAPIBackendHistory: the API backend over a real broker: publish
// answers offset and epoch, history pages forward and in reverse, a
// foreign epoch is ErrUnrecoverablePosition, channels without history or
// presence are ErrNotSupported, and # channels are refused.
func TestAPIBackendHistory(t *testing.T) {
	topo := startBroker(t)
	w, _, _ := startNamedChild(t, "worker-1", topo, withRules)
	b := NewAPIBackend(w.eng, w.bc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	const ch = "hist/api"

	var pos api.StreamPosition
	waitFor(t, 5*time.Second, "first publish accepted", func() bool {
		var err error
		pos, err = b.Publish(ctx, ch, json.RawMessage(`1`))
		return err == nil
	})
	if pos.Offset != 1 || pos.Epoch == "" {
		t.Fatalf("first publish at %+v", pos)
	}
	for i := 2; i <= 5; i++ {
		p, err := b.Publish(ctx, ch, json.RawMessage(fmt.Sprint(i)))
		if err != nil || p.Offset != uint64(i) || p.Epoch != pos.Epoch {
			t.Fatalf("publish %d: %+v %v", i, p, err)
		}
	}
	offsets := func(pg api.HistoryPage) []uint64 {
		var out []uint64
		for _, p := range pg.Publications {
			out = append(out, p.Offset)
		}
		return out
	}
	pg, err := b.History(ctx, ch, api.HistoryQuery{Limit: 2})
	if err != nil || fmt.Sprint(offsets(pg)) != "[1 2]" || pg.Top.Offset != 5 || pg.Top.Epoch != pos.Epoch {
		t.Fatalf("first page: %v %+v %v", offsets(pg), pg.Top, err)
	}
	pg, err = b.History(ctx, ch, api.HistoryQuery{Limit: 2, Since: &api.StreamPosition{Offset: 2, Epoch: pos.Epoch}})
	if err != nil || fmt.Sprint(offsets(pg)) != "[3 4]" {
		t.Fatalf("page after 2: %v %v", offsets(pg), err)
	}
	pg, err = b.History(ctx, ch, api.HistoryQuery{Limit: 2, Reverse: true})
	if err != nil || fmt.Sprint(offsets(pg)) != "[5 4]" {
		t.Fatalf("newest first: %v %v", offsets(pg), err)
	}
	pg, err = b.History(ctx, ch, api.HistoryQuery{Limit: 2, Reverse: true, Since: &api.StreamPosition{Offset: 4, Epoch: pos.Epoch}})
	if err != nil || fmt.Sprint(offsets(pg)) != "[3 2]" {
		t.Fatalf("before 4, newest first: %v %v", offsets(pg), err)
	}
	if _, err := b.History(ctx, ch, api.HistoryQuery{Limit: 2, Since: &api.StreamPosition{Offset: 2, Epoch: "other"}}); !errors.Is(err, api.ErrUnrecoverablePosition) {
		t.Fatalf("foreign epoch: %v", err)
	}
	if _, err := b.History(ctx, "room/x", api.HistoryQuery{Limit: 1}); !errors.Is(err, api.ErrNotSupported) {
		t.Fatalf("history of a channel without history: %v", err)
	}
	if _, err := b.Presence(ctx, ch); !errors.Is(err, api.ErrNotSupported) {
		t.Fatalf("presence of a channel without presence: %v", err)
	}
	if _, err := b.Publish(ctx, "#bans", json.RawMessage(`{}`)); !errors.Is(err, api.ErrInvalid) {
		t.Fatalf("publish to #bans: %v", err)
	}
	if n, err := b.Disconnect(ctx, "nobody", 4403, "x"); err != nil || n != 0 {
		t.Fatalf("disconnect of a user nowhere: %d %v", n, err)
	}
}
