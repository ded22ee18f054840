package worker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"

	"github.com/shoalhq/shoal/broker"
	"github.com/shoalhq/shoal/configs"
)

// Publisher flow control through real sockets: an in-process broker and
// worker, subscribers with small receive buffers, and a publisher that
// keeps a window of #publish invokes in flight (as socketcluster-client's
// invokePublish and the bench do).

const flowPayload = 8 << 10

// flowCluster starts a broker and one worker whose sockets queue at most
// 128 publishes of flowPayload (1 MiB) before the slow-consumer policy.
func flowCluster(t *testing.T) (*broker.Child, string) {
	t.Helper()
	b, topo := startBrokerChild(t, nil)
	mod := func(c *configs.Config) {
		c.Worker.SendQueue = 128 * flowPayload
		// The stuck subscriber reads only after the others are done, which
		// under -race on a loaded 2-core machine took longer than the
		// default 10 s: its slow-consumer close frame must still be
		// waiting for it.
		c.Worker.WriteTimeout = configs.Duration(60 * time.Second)
		// The publisher waits for the broker's ack (the default, local,
		// acks up to 64 publishes per socket ahead of it: a window of 16
		// would never wait).
		c.Protocol.PublishAck = configs.PublishAckBroker
	}
	// Each accepted socket gets a fixed 32 KiB send buffer (no autotuning
	// to megabytes), so a backlog reaches the worker's send queues after a
	// few messages: what a busy machine with thousands of sockets sees
	// after its kernel buffers filled.
	_, _, addr := startTunedChild(t, "worker-1", topo, mod, func(tc *net.TCPConn) { _ = tc.SetWriteBuffer(32 << 10) })
	return b, addr
}

// dialSmall dials with a 16 KiB receive buffer, so that a subscriber that
// reads slowly fills its kernel buffers after a few messages instead of
// megabytes of them.
func dialSmall(t *testing.T, addr string) *wsClient {
	t.Helper()
	d := ws.Dialer{NetDial: func(ctx context.Context, network, a string) (net.Conn, error) {
		nd := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 16<<10)
			}); err != nil {
				return err
			}
			return serr
		}}
		return nd.DialContext(ctx, network, a)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, _, _, err := d.Dial(ctx, "ws://"+addr+"/socketcluster/")
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return &wsClient{t: t, c: c}
}

// subResult is what one subscriber saw.
type subResult struct {
	got       int
	outOfSeq  int
	closeCode ws.StatusCode // 0: not closed by the server
	err       error
}

// readSubscriber reads publishes of channel "flow" until it has n, the
// server closes it, or 60 s pass; pause is waited after each message.
// Runs on its own goroutine: reports through the result, never t.Fatal.
func readSubscriber(c net.Conn, n int, pause time.Duration) subResult {
	var r subResult
	deadline := time.Now().Add(60 * time.Second)
	for r.got < n {
		_ = c.SetReadDeadline(deadline)
		b, _, err := wsutil.ReadServerData(c)
		if err != nil {
			var ce wsutil.ClosedError
			if errors.As(err, &ce) {
				r.closeCode = ce.Code
			} else {
				r.err = err
			}
			return r
		}
		s := string(b)
		i := strings.Index(s, `"data":"`)
		if !strings.HasPrefix(s, `{"event":"#publish"`) || i < 0 {
			continue // pings
		}
		rest := s[i+len(`"data":"`):]
		j := strings.IndexByte(rest, ':')
		seq, err := strconv.Atoi(rest[:max(j, 0)])
		if err != nil || seq != r.got {
			r.outOfSeq++
		}
		r.got++
		if pause > 0 {
			time.Sleep(pause) // the slow reader's pace, not synchronisation
		}
	}
	return r
}

// publishWindowed sends n publishes of flowPayload to "flow" keeping at
// most window unacknowledged; it returns when all are acked.
func publishWindowed(t *testing.T, p *wsClient, n, window int) time.Duration {
	t.Helper()
	pad := strings.Repeat("x", flowPayload-16)
	start := time.Now()
	sent, acked := 0, 0
	seen := map[int]bool{}
	for acked < n {
		for sent < n && sent-acked < window {
			p.send(fmt.Sprintf(`{"event":"#publish","data":{"channel":"flow","data":"%d:%s"},"cid":%d}`, sent, pad, 100+sent))
			sent++
		}
		s, err := p.recvWithin(20 * time.Second)
		if err != nil {
			t.Fatalf("publisher: %v after %d acks", err, acked)
		}
		if s == "#1" || s == "" {
			continue
		}
		// Acks may come out of order (a held one is released after a
		// later one that was not held); clients match them by rid.
		var rid int
		if _, err := fmt.Sscanf(s, `{"rid":%d}`, &rid); err != nil || rid < 100 || rid >= 100+sent || seen[rid] {
			t.Fatalf("publisher got %.200s after %d acks", s, acked)
		}
		seen[rid] = true
		acked++
	}
	return time.Since(start)
}

// readSubscribers runs readSubscriber on every subscriber at once; the
// results are complete once wait returns.
func readSubscribers(subs []*wsClient, n int, pause time.Duration) (results []subResult, wait func()) {
	results = make([]subResult, len(subs))
	var wg sync.WaitGroup
	for i, s := range subs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = readSubscriber(s.c, n, pause)
		}()
	}
	return results, wg.Wait
}

func subscribeFlow(t *testing.T, addr string, n int, cl func(*testing.T, string) *wsClient) []*wsClient {
	t.Helper()
	subs := make([]*wsClient, n)
	for i := range subs {
		subs[i] = cl(t, addr)
		subs[i].handshake("")
		subs[i].send(`{"event":"#subscribe","data":{"channel":"flow"},"cid":2}`)
		if r := subs[i].recvData(); r != `{"rid":2}` {
			t.Fatal(r)
		}
	}
	return subs
}

func waitFlowInterest(t *testing.T, b *broker.Child) {
	t.Helper()
	waitFor(t, 5*time.Second, "the worker's interest at the broker", func() bool { return b.Server().Interest("flow") == 1 })
}

// TestFlowControlSlowsPublisher: every subscriber reads slower than the
// publisher could publish. Without flow control their send queues (128
// messages) overflow within a few hundred publishes and they are cut off
// (4100); with it the worker reports behind, the broker holds the
// publisher's acks, and every subscriber gets every message, in order.
func TestFlowControlSlowsPublisher(t *testing.T) {
	b, addr := flowCluster(t)
	const nsubs, n, window = 8, 300, 16
	subs := subscribeFlow(t, addr, nsubs, dialSmall)
	waitFlowInterest(t, b)
	pub := dialWS(t, addr)
	pub.handshake("")

	results, wait := readSubscribers(subs, n, 20*time.Millisecond)
	took := publishWindowed(t, pub, n, window)
	wait()
	st := b.Server().Stats()
	t.Logf("published %d in %v; acks held %d (by the maximum hold %d)", n, took, st.AcksHeld, st.AcksHeldExpired)
	for i, r := range results {
		if r.closeCode != 0 || r.err != nil || r.got != n || r.outOfSeq != 0 {
			t.Errorf("subscriber %d: got %d of %d, %d out of sequence, closed %d, error %v", i, r.got, n, r.outOfSeq, r.closeCode, r.err)
		}
	}
	if st.AcksHeld == 0 {
		t.Errorf("no ack was held: the flow control did not engage")
	}
}

// TestFlowControlIgnoresOneStuckSubscriber: one subscriber stops reading
// while the others keep up. The worker is not behind for it (one deep queue
// is not a quarter of its sockets), so the publisher is not held back: the
// stuck one meets the slow-consumer policy (4100) and the others get
// everything.
func TestFlowControlIgnoresOneStuckSubscriber(t *testing.T) {
	b, addr := flowCluster(t)
	const nsubs, n, window = 12, 600, 16
	subs := subscribeFlow(t, addr, nsubs, dialWS)
	stuck := subscribeFlow(t, addr, 1, dialSmall)[0]
	waitFlowInterest(t, b)
	pub := dialWS(t, addr)
	pub.handshake("")

	results, wait := readSubscribers(subs, n, 0)
	publishWindowed(t, pub, n, window)
	wait()
	for i, r := range results {
		if r.closeCode != 0 || r.err != nil || r.got != n || r.outOfSeq != 0 {
			t.Errorf("subscriber %d: got %d of %d, %d out of sequence, closed %d, error %v", i, r.got, n, r.outOfSeq, r.closeCode, r.err)
		}
	}
	// Now it reads: what it had queued, then the slow-consumer close.
	if r := readSubscriber(stuck.c, n, 0); r.closeCode != CodeSlowConsumer {
		t.Errorf("stuck subscriber: got %d, closed %d (error %v), want close %d", r.got, r.closeCode, r.err, CodeSlowConsumer)
	}
	// Fast readers may be briefly deep too (the race detector slows
	// them), so an ack may be held for a moment, but never until the
	// maximum hold: the stuck socket alone does not keep the worker behind.
	st := b.Server().Stats()
	t.Logf("acks held %d (by the maximum hold %d)", st.AcksHeld, st.AcksHeldExpired)
	if st.AcksHeldExpired != 0 {
		t.Errorf("%d acks held for the maximum hold: one stuck subscriber kept the worker behind", st.AcksHeldExpired)
	}
}
