package broker

import (
	"context"
	"encoding/json"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shoalhq/shoal/broker/chanopts"
	"github.com/shoalhq/shoal/broker/store"
	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/proto/link"
)

// TestDurableHistorySurvivesSIGKILL publishes to a durable channel while the
// broker process is SIGKILLed, restarts it on the same storage dir, and
// checks that every acknowledged message is in its history with the same
// epoch and offsets, and that recovery across the crash works.
func TestDurableHistorySurvivesSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("starts broker processes")
	}
	dir, storage := shortDir(t), t.TempDir()
	rules := []configs.ChannelRule{{Match: "d/**", History: configs.History{Size: 100000}, Durable: true}}
	cfgJSON, _ := json.Marshal(map[string]any{"channels": rules, "storage": map[string]string{"dir": storage}})
	env := helperEnv + "_CFG=" + string(cfgJSON)
	p1 := startBrokerProc(t, dir, "broker-1", nil, env)
	ep := brokerclient.Endpoint{Name: "broker-1", Addr: p1.addrs[control.AddrLink]}
	c := brokerclient.New(brokerclient.Options{Name: "worker-1", Channels: rules, PublishTimeout: 2 * time.Second})
	t.Cleanup(c.Close)
	c.SetBrokers([]brokerclient.Endpoint{ep})
	waitFor(t, "link up", func() bool { return c.Stats().Connected == 1 })

	const ch = "d/orders"
	var mu sync.Mutex
	acked := map[uint64]string{}
	inflight := make(chan struct{}, 64)
	var wg sync.WaitGroup
	publish := func(i int) {
		data := strconv.Itoa(i)
		inflight <- struct{}{}
		wg.Add(1)
		c.Publish(ch, []byte(data), func(off uint64, err error) {
			defer wg.Done()
			<-inflight
			if err == nil {
				mu.Lock()
				acked[off] = data
				mu.Unlock()
			}
		})
	}
	i := 0
	for ; i < 300; i++ {
		publish(i)
	}
	waitFor(t, "300 acks", func() bool { mu.Lock(); defer mu.Unlock(); return len(acked) == 300 })
	before, err := c.History(context.Background(), ch, 0, 0)
	if err != nil || len(before.Messages) != 300 {
		t.Fatalf("history before the kill: %d messages, %v", len(before.Messages), err)
	}
	// Keep publishing while the process dies: some publishes in flight get
	// acked, some fail; only the acked ones count.
	killed := make(chan struct{})
	go func() {
		defer close(killed)
		// Kill mid-stream: once 600 are acked, with up to 64 in flight.
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			mu.Lock()
			n := len(acked)
			mu.Unlock()
			if n >= 600 {
				break
			}
			time.Sleep(100 * time.Microsecond)
		}
		_ = p1.cmd.Process.Signal(syscall.SIGKILL)
	}()
	for ; i < 2000; i++ {
		publish(i)
	}
	<-killed
	wg.Wait()
	mu.Lock()
	nAcked := len(acked)
	mu.Unlock()

	p2 := startBrokerProc(t, dir, "broker-1", nil, env)
	if p2.addrs[control.AddrLink] != ep.Addr {
		t.Fatalf("restarted broker moved its link: %s", p2.addrs[control.AddrLink])
	}
	var after brokerclient.HistoryPage
	waitFor(t, "history after the restart", func() bool {
		after, err = c.History(context.Background(), ch, 0, 0)
		return err == nil
	})
	if after.Epoch != before.Epoch {
		t.Fatalf("epoch %s after the restart, %s before", after.Epoch, before.Epoch)
	}
	got := map[uint64]string{}
	for _, m := range after.Messages {
		got[m.Offset] = string(m.Data)
	}
	mu.Lock()
	for off, data := range acked {
		if got[off] != data {
			t.Fatalf("acknowledged offset %d (%q) is %q after the restart", off, data, got[off])
		}
	}
	mu.Unlock()
	t.Logf("%d publishes acknowledged (of %d attempted); %d messages in history after SIGKILL and restart", nAcked, i, len(after.Messages))

	// A subscriber from before the crash recovers across it.
	res := make(chan brokerclient.RecoverResult, 1)
	c.SubscribeRecover(ch, 100, before.Epoch, func(r brokerclient.RecoverResult, err error) {
		if err != nil {
			t.Error(err)
		}
		res <- r
	})
	r := <-res
	if !r.Recovered || len(r.Messages) != int(after.Offset-100) || r.Messages[0].Offset != 101 {
		t.Fatalf("recovery across the restart: recovered=%v %d messages, top %d", r.Recovered, len(r.Messages), r.Offset)
	}
	// The restarted broker's first publish starts a new epoch, linked to
	// the old one: offsets continue and the old epoch still recovers.
	done := make(chan uint64, 1)
	c.Publish(ch, []byte("after"), func(off uint64, err error) {
		if err != nil {
			t.Error(err)
		}
		done <- off
	})
	if off := <-done; off != after.Offset+1 {
		t.Fatalf("first publish after the restart got offset %d, want %d", off, after.Offset+1)
	}
}

// TestHistoryRingBounds covers the ring buffer directly: size bound,
// out-of-order replica appends, duplicates, TTL.
func TestHistoryRingBounds(t *testing.T) {
	var h histRing
	for _, off := range []uint64{1, 2, 4, 3, 3, 5, 7, 6} {
		h.add(5, off, int64(off), []byte(strconv.FormatUint(off, 10)))
	}
	var offs []uint64
	for i := 0; i < h.n; i++ {
		offs = append(offs, h.at(i).off)
		if string(h.at(i).data) != strconv.FormatUint(h.at(i).off, 10) {
			t.Fatalf("entry %d data %q", i, h.at(i).data)
		}
	}
	if len(offs) != 5 || offs[0] != 3 || offs[4] != 7 {
		t.Fatalf("ring holds %v", offs)
	}
	h.expire(2, 7) // keep t ≥ 5
	if h.n != 3 || h.first() != 5 {
		t.Fatalf("after ttl: n=%d first=%d", h.n, h.first())
	}
	if i := h.from(6); h.at(i).off != 6 {
		t.Fatalf("from(6) = %d", i)
	}
	// The buffer grows with the messages, not to the size at once.
	h = histRing{}
	for off := uint64(1); off <= 20; off++ {
		h.add(100000, off, 0, nil)
	}
	if len(h.buf) != 32 || h.n != 20 || h.first() != 1 || h.at(19).off != 20 {
		t.Fatalf("grown ring: %d slots, %d entries", len(h.buf), h.n)
	}
	// A full ring appends without allocating.
	h = histRing{}
	data := make([]byte, 64)
	for off := uint64(1); off <= 8; off++ {
		h.add(8, off, 0, data)
	}
	off := uint64(9)
	if n := testing.AllocsPerRun(100, func() { h.add(8, off, 0, data); off++ }); n != 0 {
		t.Fatalf("append to a full ring allocates %v", n)
	}
}

// TestDurableGroupCommitAcksAfterWrite: a durable publish's ack comes
// after the store has the message (in-memory store, raw link).
func TestDurableGroupCommitAcksAfterWrite(t *testing.T) {
	st := &slowStore{gate: make(chan struct{})}
	rules := []configs.ChannelRule{{Match: "d/*", Durable: true}}
	s := NewServer(ServerConfig{Name: "b", Store: st, Rules: chanopts.Compile(rules)})
	ln, err := link.Listen("unix:" + shortDir(t) + "/b.sock")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Serve(ln); err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	c := brokerclient.New(brokerclient.Options{Name: "w", Channels: rules})
	defer c.Close()
	c.SetBrokers([]brokerclient.Endpoint{{Name: "b", Addr: link.ListenerAddr(ln)}})
	waitFor(t, "link up", func() bool { return c.Stats().Connected == 1 })
	acked := make(chan error, 1)
	c.Publish("d/x", []byte("1"), func(_ uint64, err error) { acked <- err })
	c.Publish("plain", []byte("1"), func(_ uint64, err error) {
		if err != nil {
			t.Error(err)
		}
	})
	waitFor(t, "the plain publish overtakes the durable one", func() bool { return c.Stats().Published == 1 })
	select {
	case err := <-acked:
		t.Fatalf("durable publish acknowledged before its write: %v", err)
	default:
	}
	close(st.gate)
	if err := <-acked; err != nil {
		t.Fatal(err)
	}
	if st.applied() != 1 {
		t.Fatalf("store applied %d messages", st.applied())
	}
	if ss := s.Stats(); ss.DurableWrites != 1 || ss.DurableCommits != 1 || ss.HistoryChannels != 1 {
		t.Fatalf("stats %+v", ss)
	}
}

// slowStore holds every Apply until gate closes.
type slowStore struct {
	gate chan struct{}
	mu   sync.Mutex
	n    int
}

func (s *slowStore) Apply(ops []store.Op) error {
	<-s.gate
	s.mu.Lock()
	s.n += len(ops)
	s.mu.Unlock()
	return nil
}

func (s *slowStore) applied() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

func (s *slowStore) Load() ([]store.Channel, error) { return nil, nil }

func (s *slowStore) Close() error {
	select {
	case <-s.gate:
	default:
		close(s.gate)
	}
	return nil
}

// TestRingHandBackAfterSIGKILL: three broker processes on a ring; the
// owner of a non-durable history channel is SIGKILLed and restarted (as the
// supervisor does); on rejoining the ring it takes the history back from
// the channel's next broker before taking publishes, so nothing
// acknowledged is lost and subscribers recover across the restart.
func TestRingHandBackAfterSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("starts broker processes")
	}
	dir := shortDir(t)
	rules := []configs.ChannelRule{{Match: "hist/**", History: configs.History{Size: 1000}}}
	cfgJSON, _ := json.Marshal(map[string]any{"channels": rules})
	env := helperEnv + "_CFG=" + string(cfgJSON)
	p1 := startBrokerProc(t, dir, "broker-1", nil, env)
	join := []string{p1.addrs[control.AddrGossip]}
	p2 := startBrokerProc(t, dir, "broker-2", join, env)
	startBrokerProc(t, dir, "broker-3", join, env)

	var self *brokerclient.Client
	var selfMu sync.Mutex
	c := brokerclient.New(brokerclient.Options{Name: "worker-1", Channels: rules, OnMembers: func(eps []brokerclient.Endpoint) {
		selfMu.Lock()
		defer selfMu.Unlock()
		self.SetBrokers(eps)
	}})
	selfMu.Lock()
	self = c
	selfMu.Unlock()
	t.Cleanup(c.Close)
	c.SetBrokers([]brokerclient.Endpoint{{Name: "broker-1", Addr: p1.addrs[control.AddrLink]}})
	waitFor(t, "3 brokers via the ring", func() bool { return c.Stats().Connected == 3 })
	var ch string
	for i := 0; ch == ""; i++ {
		if x := "hist/k" + strconv.Itoa(i); c.Owner(x) == "broker-2" {
			ch = x
		}
	}
	acked := map[uint64]string{}
	publish := func(data string) error {
		res := make(chan error, 1)
		c.Publish(ch, []byte(data), func(off uint64, err error) {
			if err == nil {
				acked[off] = data
			}
			res <- err
		})
		return <-res
	}
	for i := 1; i <= 50; i++ {
		if err := publish(strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
	}
	if st := c.Stats(); st.Replicated != 50 {
		t.Fatalf("replicated %d of 50: %+v", st.Replicated, st)
	}
	before, err := c.History(context.Background(), ch, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := p2.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	startBrokerProc(t, dir, "broker-2", join, env)
	// Publishing resumes (on the replica while broker-2 is out of the ring,
	// then on broker-2 again once it is back and has taken the history).
	var after brokerclient.HistoryPage
	waitFor(t, "broker-2 owns the channel again and serves its history", func() bool {
		if c.Owner(ch) != "broker-2" || c.Stats().Connected != 3 {
			return false
		}
		after, err = c.History(context.Background(), ch, 0, 0)
		return err == nil && len(after.Messages) >= 50
	})
	for off, data := range acked {
		found := false
		for _, m := range after.Messages {
			if m.Offset == off && string(m.Data) == data {
				found = true
			}
		}
		if !found {
			t.Fatalf("acknowledged offset %d (%q) missing after the restart", off, data)
		}
	}
	res := make(chan brokerclient.RecoverResult, 1)
	c.SubscribeRecover(ch, 40, before.Epoch, func(r brokerclient.RecoverResult, err error) {
		if err != nil {
			t.Error(err)
		}
		res <- r
	})
	if r := <-res; !r.Recovered || len(r.Messages) != int(r.Offset-40) {
		t.Fatalf("recovery across the restart: recovered=%v, %d messages, top %d", r.Recovered, len(r.Messages), r.Offset)
	}
}
