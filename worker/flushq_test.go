package worker

import (
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gobwas/ws/wsutil"
)

// TestFanoutFlushQueueOrderAndLoss: deliveries on real sockets go through
// the hub's flushQueue (QueueFrame, then one writer in rounds). Two
// goroutines deliver interleaved on two channels, as two broker links
// would: every subscriber gets every message of its channels once, in
// order per channel.
func TestFanoutFlushQueueOrderAndLoss(t *testing.T) {
	// The worker's GOMAXPROCS=1 mode (one writer goroutine) and the
	// several-core one (netpoll's flush pool).
	for _, async := range []bool{false, true} {
		t.Run(map[bool]string{false: "writer", true: "pool"}[async], func(t *testing.T) {
			testFanoutFlushQueue(t, async)
		})
	}
}

func testFanoutFlushQueue(t *testing.T, async bool) {
	env := newWSEnv(t, nil)
	env.e.hub.flushq.async = async // before any fan-out
	const clients = 8
	cs := make([]*wsClient, clients)
	for i := range cs {
		c := dialWS(t, env.addr)
		c.handshake("")
		c.send(`{"event":"#subscribe","data":{"channel":"a"},"cid":2}`)
		if r := c.recvData(); r != `{"rid":2}` {
			t.Fatalf("subscribe: %s", r)
		}
		c.send(`{"event":"#subscribe","data":{"channel":"b"},"cid":3}`)
		if r := c.recvData(); r != `{"rid":3}` {
			t.Fatalf("subscribe: %s", r)
		}
		cs[i] = c
	}
	// Rounds of 2×10 messages stay well under the test server's queue bound
	// (the clients read only between rounds).
	const rounds, per = 30, 10
	next := make([]map[string]int, clients)
	for i := range next {
		next[i] = map[string]int{"a": 0, "b": 0}
	}
	for r := range rounds {
		var wg sync.WaitGroup
		for _, ch := range []string{"a", "b"} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for n := r * per; n < (r+1)*per; n++ {
					env.e.Deliver(ch, []byte(strconv.Itoa(n)), uint64(n))
				}
			}()
		}
		wg.Wait()
		for i, c := range cs {
			for got := 0; got < 2*per; {
				_ = c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
				b, _, err := wsutil.ReadServerData(c.c)
				if err != nil {
					t.Fatalf("client %d round %d after %d messages: %v", i, r, got, err)
				}
				s := string(b)
				if s == "#1" || s == "" {
					continue // ping
				}
				// {"event":"#publish","data":{"channel":"a","data":17}}
				ch := s[strings.Index(s, `"channel":"`)+11:][:1]
				n, err := strconv.Atoi(s[strings.LastIndex(s, `"data":`)+7 : len(s)-2])
				if err != nil {
					t.Fatalf("client %d: unexpected frame %s", i, s)
				}
				if n != next[i][ch] {
					t.Fatalf("client %d channel %s: got %d, want %d", i, ch, n, next[i][ch])
				}
				next[i][ch]++
				got++
			}
		}
	}
}

// After the engine closed, a fan-out flushes on the caller's goroutine:
// no socket is left owing a flush.
func TestFanoutAfterEngineClose(t *testing.T) {
	env := newWSEnv(t, nil)
	env.e.hub.flushq.async = false // the writer's path, stopped
	c := dialWS(t, env.addr)
	c.handshake("")
	c.send(`{"event":"#subscribe","data":{"channel":"a"},"cid":2}`)
	if r := c.recvData(); r != `{"rid":2}` {
		t.Fatalf("subscribe: %s", r)
	}
	env.e.Close()
	env.e.Deliver("a", []byte(`"late"`), 1)
	if r := c.recvData(); r != `{"event":"#publish","data":{"channel":"a","data":"late"}}` {
		t.Fatalf("got %s", r)
	}
}
