package worker

import (
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/shoalhq/shoal/configs"
)

// heldBroker queues publishes and acknowledges them only when told to, like
// a broker link whose owner answers slowly. fail makes Publish refuse at
// once (no broker link), before anything is queued.
type heldBroker struct {
	mu   sync.Mutex
	held []heldPub
	fail error
}

type heldPub struct {
	ch, data string
	done     func(uint64, error)
}

func (b *heldBroker) Subscribe(string)   {}
func (b *heldBroker) Unsubscribe(string) {}

func (b *heldBroker) Publish(ch string, data []byte, done func(uint64, error)) {
	b.mu.Lock()
	if err := b.fail; err != nil {
		b.mu.Unlock()
		done(0, err)
		return
	}
	b.held = append(b.held, heldPub{ch, string(data), done})
	b.mu.Unlock()
}

// release acknowledges every held publish (err: fails them) from another
// goroutine, as the link's reader does, and returns what was held.
func (b *heldBroker) release(err error) []heldPub {
	b.mu.Lock()
	held := b.held
	b.held = nil
	b.mu.Unlock()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i, p := range held {
			p.done(uint64(i+1), err)
		}
	}()
	wg.Wait()
	return held
}

func newHeldEnv(t *testing.T, ack string) (*testEnv, *heldBroker) {
	t.Helper()
	env := newEnv(t, func(p *configs.Protocol) { p.PublishAck = ack })
	b := &heldBroker{}
	env.e.cfg.Broker = b
	if err := env.e.SetChannels([]configs.ChannelRule{{Match: "hist/*", History: configs.History{Size: 10}}}); err != nil {
		t.Fatal(err)
	}
	return env, b
}

func publishFrame(cid int, ch, data string) string {
	return `{"event":"#publish","data":{"channel":"` + ch + `","data":` + data + `},"cid":` + itoa(cid) + `}`
}

func TestPublishAckLocalForChannelWithoutHistory(t *testing.T) {
	env, b := newHeldEnv(t, configs.PublishAckLocal)
	c := env.handshake("")
	for i := 2; i <= 4; i++ {
		env.send(c, publishFrame(i, "plain", itoa(i)))
	}
	// Acked while the broker has acknowledged nothing yet.
	wantFrames(t, c.take(), `{"rid":2}`, `{"rid":3}`, `{"rid":4}`)
	held := b.release(nil)
	if len(held) != 3 {
		t.Fatalf("broker got %d publishes, want 3", len(held))
	}
	for i, p := range held { // in the publisher's order
		if p.ch != "plain" || p.data != itoa(i+2) {
			t.Fatalf("publish %d reached the broker as %q %s", i, p.ch, p.data)
		}
	}
	if got := c.take(); len(got) != 0 {
		t.Fatalf("the broker's acks produced frames %q", got)
	}
	// A broker that fails an already acknowledged publish is counted, not told.
	env.send(c, publishFrame(5, "plain", "5"))
	wantFrames(t, c.take(), `{"rid":5}`)
	b.release(errors.New("owner gone"))
	if got := c.take(); len(got) != 0 {
		t.Fatalf("late failure produced frames %q", got)
	}
	if n := env.e.stats.pubErrors.Load(); n != 1 {
		t.Fatalf("pubErrors = %d, want 1", n)
	}
}

func TestPublishAckHistoryChannelWaitsForBroker(t *testing.T) {
	env, b := newHeldEnv(t, configs.PublishAckLocal)
	c := env.handshake("")
	env.send(c, publishFrame(2, "hist/a", `"x"`))
	if got := c.take(); len(got) != 0 {
		t.Fatalf("history publish answered before the broker: %q", got)
	}
	b.release(nil)
	wantFrames(t, c.take(), `{"rid":2}`)
}

func TestPublishAckBrokerModeWaits(t *testing.T) {
	env, b := newHeldEnv(t, configs.PublishAckBroker)
	c := env.handshake("")
	env.send(c, publishFrame(2, "plain", `"x"`))
	if got := c.take(); len(got) != 0 {
		t.Fatalf("publish_ack: broker answered before the broker: %q", got)
	}
	b.release(nil)
	wantFrames(t, c.take(), `{"rid":2}`)
}

func TestPublishAckLocalRefusedSynchronously(t *testing.T) {
	env, b := newHeldEnv(t, configs.PublishAckLocal)
	b.fail = errors.New("no broker for channel")
	c := env.handshake("")
	env.send(c, publishFrame(2, "plain", `"x"`))
	got := c.take()
	if len(got) != 1 || !strings.HasPrefix(got[0], `{"rid":2,"error":`) || !strings.Contains(got[0], "BrokerError") || !strings.Contains(got[0], "no broker for channel") {
		t.Fatalf("frames %q, want one BrokerError for rid 2", got)
	}
	// A transmit (no cid) publish is not answered either way.
	env.send(c, `{"event":"#publish","data":{"channel":"plain","data":1}}`)
	if got := c.take(); len(got) != 0 {
		t.Fatalf("transmit publish answered: %q", got)
	}
}

// The loop broker acknowledges inside Publish (done runs before Publish
// returns): the session still answers once, with success.
func TestPublishAckLocalBrokerAnswersFirst(t *testing.T) {
	env := newEnv(t, nil)
	c := env.handshake("")
	env.send(c, `{"event":"#subscribe","data":{"channel":"plain"},"cid":2}`)
	wantFrames(t, c.take(), `{"rid":2}`)
	env.send(c, publishFrame(3, "plain", `"x"`))
	wantFrames(t, c.take(), `{"event":"#publish","data":{"channel":"plain","data":"x"}}`, `{"rid":3}`)
}

// A socket gets at most maxAheadOfBroker acks ahead of its broker: beyond
// that its publishes wait for the broker's ack, so brokers that hold acks
// (publisher flow control) still slow a publisher with a wide window.
func TestPublishAckLocalBoundedAheadOfBroker(t *testing.T) {
	env, b := newHeldEnv(t, configs.PublishAckLocal)
	c := env.handshake("")
	const extra = 3
	for i := 0; i < maxAheadOfBroker+extra; i++ {
		env.send(c, publishFrame(2+i, "plain", itoa(i)))
	}
	if got := c.take(); len(got) != maxAheadOfBroker {
		t.Fatalf("%d acks before the broker answered, want %d", len(got), maxAheadOfBroker)
	}
	if held := b.release(nil); len(held) != maxAheadOfBroker+extra {
		t.Fatalf("broker got %d publishes, want %d", len(held), maxAheadOfBroker+extra)
	}
	var want []string
	for i := maxAheadOfBroker; i < maxAheadOfBroker+extra; i++ {
		want = append(want, `{"rid":`+itoa(2+i)+`}`)
	}
	wantFrames(t, c.take(), want...)
	if n := c.s.aheadOfBroker.Load(); n != 0 {
		t.Fatalf("aheadOfBroker = %d after every broker ack", n)
	}
	env.send(c, publishFrame(1000, "plain", "1"))
	wantFrames(t, c.take(), `{"rid":1000}`)
	b.release(nil)
}

// The bound also counts bytes: past maxAheadBytes of unconfirmed data a
// publish waits for its broker, but one publish may always go ahead alone.
func TestPublishAckLocalBoundedBytes(t *testing.T) {
	env, b := newHeldEnv(t, configs.PublishAckLocal)
	c := env.handshake("")
	big := `"` + strings.Repeat("x", maxAheadBytes/2) + `"`
	for i := 0; i < 3; i++ {
		env.send(c, publishFrame(2+i, "plain", big))
	}
	// The first fits, the second would pass the byte bound, the third too.
	wantFrames(t, c.take(), `{"rid":2}`)
	b.release(nil)
	wantFrames(t, c.take(), `{"rid":3}`, `{"rid":4}`)
	if n, by := c.s.aheadOfBroker.Load(), c.s.aheadBytes.Load(); n != 0 || by != 0 {
		t.Fatalf("ahead %d publishes, %d bytes after every broker ack", n, by)
	}
	huge := `"` + strings.Repeat("y", maxAheadBytes+10) + `"`
	env.send(c, publishFrame(5, "plain", huge))
	wantFrames(t, c.take(), `{"rid":5}`)
	b.release(nil)
}
