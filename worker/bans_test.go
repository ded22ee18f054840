package worker

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/shoalhq/shoal/api"
	"github.com/shoalhq/shoal/broker/chanopts"
	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/configs"
)

// logBroker is the brokers as the ban log sees them: "#bans" publishes get
// offsets, are kept as history (the last banLogSize, as a broker keeps
// chanopts.BansHistory) and are delivered to every engine attached.
type logBroker struct {
	mu      sync.Mutex
	engines []*Engine
	log     []brokerclient.Message
	next    uint64
	gate    chan struct{} // when set, History waits for it (after reading)
}

func (b *logBroker) Subscribe(string)   {}
func (b *logBroker) Unsubscribe(string) {}

func (b *logBroker) Publish(channel string, data []byte, done func(uint64, error)) {
	if channel != bansChannel {
		done(0, nil)
		return
	}
	b.mu.Lock()
	b.next++
	off := b.next
	b.log = append(b.log, brokerclient.Message{Offset: off, Data: append([]byte(nil), data...)})
	if len(b.log) > int(banLogSize) {
		b.log = b.log[len(b.log)-int(banLogSize):]
	}
	engines := append([]*Engine(nil), b.engines...)
	b.mu.Unlock()
	for _, e := range engines {
		e.DeliverPub(channel, data, off, 1)
	}
	done(off, nil)
}

func (b *logBroker) History(ctx context.Context, channel string, since uint64, limit int) (brokerclient.HistoryPage, error) {
	b.mu.Lock()
	var page brokerclient.HistoryPage
	page.Offset = b.next
	for _, m := range b.log {
		if m.Offset > since {
			if limit > 0 && len(page.Messages) == limit {
				page.More = true
				break
			}
			page.Messages = append(page.Messages, m)
		}
	}
	gate := b.gate
	b.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return page, ctx.Err()
		}
	}
	return page, nil
}

func (b *logBroker) ops(op string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, m := range b.log {
		var c ctrlMsg
		if json.Unmarshal(m.Data, &c) == nil && c.Op == op {
			n++
		}
	}
	return n
}

// banWorker starts an engine with a ban store on b, as Start would.
func banWorker(t *testing.T, b *logBroker, name string) *Engine {
	t.Helper()
	e, err := NewEngine(EngineConfig{
		Name:         name,
		Protocol:     configs.Default().Protocol,
		Broker:       b,
		Frame:        func(dst, p []byte) []byte { return append(dst, p...) },
		ErrQueueFull: errFakeFull,
		Bans:         NewClusterBans(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	b.mu.Lock()
	b.engines = append(b.engines, e)
	b.mu.Unlock()
	e.StartControl()
	return e
}

func banTargets(t *testing.T, e *Engine) []string {
	t.Helper()
	list, err := e.cfg.Bans.Bans(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := make([]string, 0, len(list))
	for _, b := range list {
		if b.User != "" {
			out = append(out, "user "+b.User)
		} else {
			out = append(out, "ip "+b.IP.String())
		}
	}
	sort.Strings(out)
	return out
}

func waitBans(t *testing.T, e *Engine, want []string) {
	t.Helper()
	sort.Strings(want)
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := banTargets(t, e)
		if fmt.Sprint(got) == fmt.Sprint(want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s holds bans %v, want %v", e.cfg.Name, got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestBanLogReplay(t *testing.T) {
	b := &logBroker{}
	a := banWorker(t, b, "worker-a")
	ctx := context.Background()
	now := time.Now()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(a.cfg.Bans.Ban(ctx, api.Ban{User: "mallory", Reason: "spam", Created: now}))
	must(a.cfg.Bans.Ban(ctx, api.Ban{IP: netip.MustParsePrefix("203.0.113.0/24"), Created: now}))
	must(a.cfg.Bans.Ban(ctx, api.Ban{User: "trudy", Created: now}))
	must(a.cfg.Bans.Ban(ctx, api.Ban{User: "brief", Created: now, Expires: now.Add(50 * time.Millisecond)}))
	if _, err := a.cfg.Bans.Unban(ctx, api.BanTarget{User: "trudy"}); err != nil {
		t.Fatal(err)
	}
	// Every worker restarted: a new one has only the log.
	c := banWorker(t, b, "worker-c")
	time.Sleep(60 * time.Millisecond) // let "brief" expire (its Expires is absolute)
	waitBans(t, c, []string{"user mallory", "ip 203.0.113.0/24"})
	if _, banned := c.banned("mallory", netip.Addr{}); !banned {
		t.Fatal("mallory not refused by the replayed worker")
	}
	if _, banned := c.banned("", netip.MustParseAddr("203.0.113.9")); !banned {
		t.Fatal("203.0.113.9 not refused by the replayed worker")
	}
	// The replay did not ask the others (no sync): the log answered.
	if n := b.ops("sync"); n != 0 {
		t.Fatalf("%d sync requests; the log should have answered", n)
	}
}

// TestBanLogHoldsLiveOps: an unban that arrives while a starting worker
// reads the (older) log is applied after the log, not overwritten by it.
func TestBanLogHoldsLiveOps(t *testing.T) {
	b := &logBroker{}
	a := banWorker(t, b, "worker-a")
	ctx := context.Background()
	if err := a.cfg.Bans.Ban(ctx, api.Ban{User: "x", Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	b.mu.Lock()
	b.gate = gate
	b.mu.Unlock()
	c := banWorker(t, b, "worker-c") // reads the log (ban x), then waits
	if _, err := a.cfg.Bans.Unban(ctx, api.BanTarget{User: "x"}); err != nil {
		t.Fatal(err)
	}
	b.mu.Lock()
	b.gate = nil
	b.mu.Unlock()
	close(gate)
	waitBans(t, c, []string{})
	// And it stays so once the replay is done.
	time.Sleep(20 * time.Millisecond)
	waitBans(t, c, []string{})
}

// TestBanLogCompaction: past half the log's size a worker writes a
// snapshot, so a worker that starts after the log overflowed still gets
// every ban.
func TestBanLogCompaction(t *testing.T) {
	// A small log, small snapshot parts and small history pages, so the
	// log overflows several times, snapshots come in several parts and
	// replays read several pages.
	oldSize, oldPart, oldPage := banLogSize, snapshotPart, banLogPage
	banLogSize, snapshotPart, banLogPage = 64, 10, 16
	t.Cleanup(func() { banLogSize, snapshotPart, banLogPage = oldSize, oldPart, oldPage })
	b := &logBroker{}
	a := banWorker(t, b, "worker-a")
	ctx := context.Background()
	var want []string
	n := 4 * int(banLogSize)
	for i := 0; i < n; i++ {
		u := fmt.Sprintf("u%05d", i)
		if err := a.cfg.Bans.Ban(ctx, api.Ban{User: u, Created: time.Now()}); err != nil {
			t.Fatal(err)
		}
		if i%3 == 0 {
			if _, err := a.cfg.Bans.Unban(ctx, api.BanTarget{User: u}); err != nil {
				t.Fatal(err)
			}
		} else {
			want = append(want, "user "+u)
		}
		// Compaction runs in the background: let one finish before the
		// log could overflow past it (a real log is far slower to fill).
		if i%8 == 0 {
			deadline := time.Now().Add(10 * time.Second)
			for a.cfg.Bans.compact.Load() && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for a.cfg.Bans.compact.Load() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if b.ops("snapshot") == 0 {
		t.Fatal("no snapshot in the log")
	}
	b.mu.Lock()
	first := b.log[0].Offset
	b.mu.Unlock()
	if first == 1 {
		t.Fatal("the log never overflowed; the test proves nothing")
	}
	c := banWorker(t, b, "worker-c")
	waitBans(t, c, want)
}

// TestBanLogClosesEarlySockets: a socket admitted before the replay ended
// (checked against a partial list) is closed once the log bans it.
func TestBanLogClosesEarlySockets(t *testing.T) {
	b := &logBroker{}
	a := banWorker(t, b, "worker-a")
	if err := a.cfg.Bans.Ban(context.Background(), api.Ban{IP: netip.MustParsePrefix("127.0.0.1/32"), Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	b.mu.Lock()
	b.gate = gate
	b.mu.Unlock()
	c := banWorker(t, b, "worker-c")
	conn := &fakeConn{e: c}
	conn.s = c.Open(conn)
	c.Message(conn.s, []byte(`{"event":"#handshake","data":{},"cid":1}`))
	if _, closed := conn.closeCode(); closed {
		t.Fatal("closed before the replay: the test proves nothing")
	}
	b.mu.Lock()
	b.gate = nil
	b.mu.Unlock()
	close(gate)
	deadline := time.Now().Add(5 * time.Second)
	for {
		code, closed := conn.closeCode()
		if closed {
			if code != CodeBanned {
				t.Fatalf("closed with %d, want %d", code, CodeBanned)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the early socket of a banned address is still open after the replay")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestBanLogChannelOptions: "#bans" keeps a durable history whatever the
// config's channel rules say, and those rules still decide for the rest.
func TestBanLogChannelOptions(t *testing.T) {
	r := chanopts.Compile([]configs.ChannelRule{{Match: "**"}})
	if o := r.Lookup(bansChannel); !o.Durable || o.HistorySize != chanopts.BansHistory {
		t.Fatalf("#bans options %+v", o)
	}
	if o := r.Lookup("chat/a"); o.Durable || o.History() || !o.Matched {
		t.Fatalf("chat/a options %+v", o)
	}
	if !chanopts.Compile(nil).Empty() {
		t.Fatal("the internal rule makes an empty config non-empty")
	}
}
