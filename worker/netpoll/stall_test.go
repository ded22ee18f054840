package netpoll

import (
	"net"
	"testing"
	"time"
)

// While the send queues are over the pressure mark, a connection's input
// waits (its read is paused, counted in Stalls); it is read once the
// pressure is gone.
func TestStallPausesReadsUnderPressure(t *testing.T) {
	h := &recorder{}
	ts := startServer(t, Config{Handler: h, FlowControl: true})
	c := ts.dial(t)
	waitFor(t, 5*time.Second, "open", func() bool { return h.openCount() == 1 })
	// White box: pretend every connection has a full queue.
	const fake = int64(1) << 40
	ts.deep.Add(fake)
	c.send(t, "held")
	waitFor(t, 5*time.Second, "a stalled read", func() bool { return ts.Stats().Stalls > 0 })
	h.mu.Lock()
	n := len(h.messages)
	h.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d messages delivered while stalled", n)
	}
	ts.deep.Add(-fake)
	waitFor(t, 5*time.Second, "the held message", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		return len(h.messages) == 1 && string(h.messages[0]) == "held"
	})
}

// A stall never lasts: with the pressure staying, input is read after
// maxStall anyway, and the slow-consumer bounds apply as before.
func TestStallIsBounded(t *testing.T) {
	h := &recorder{}
	ts := startServer(t, Config{Handler: h, FlowControl: true})
	c := ts.dial(t)
	waitFor(t, 5*time.Second, "open", func() bool { return h.openCount() == 1 })
	const fake = int64(1) << 40
	// Before the pressure: any stall begins after start.
	start := time.Now()
	ts.deep.Add(fake)
	defer ts.deep.Add(-fake)
	c.send(t, "late")
	waitFor(t, 5*time.Second, "the message after maxStall", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		return len(h.messages) == 1
	})
	d := time.Since(start)
	// The read was paused (not simply never stalled) for maxStall, and not
	// much longer.
	if ts.Stats().Stalls == 0 {
		t.Error("the read was never paused")
	}
	if d < maxStall {
		t.Errorf("read after %v, before maxStall %v: the stall did not hold", d, maxStall)
	}
	if d > 5*maxStall {
		t.Errorf("held for %v", d)
	}
}

// The deep-queue count returns to zero once the queues drained and once
// connections are gone: a drift would pause reads for nothing. Small
// bounds make every connection deep while its client does not read.
func TestDeepCountReturnsToZero(t *testing.T) {
	h := &recorder{}
	ts := startServer(t, Config{Handler: h, SendQueueMsgs: 8, SendQueueBytes: 1 << 30})
	var cs []*client
	for range 4 {
		cs = append(cs, ts.dial(t))
	}
	waitFor(t, 5*time.Second, "open", func() bool { return h.openCount() == 4 })
	// Big frames fill the socket buffers, so frames stay queued. The
	// clients' receive buffers are fixed (no autotuning: after the first
	// round of reads they had grown to take 7 MiB at times), so what the
	// kernel holds is bounded by the server's send buffer (4 MiB at most),
	// well under 7 frames of 2 MiB. One frame is shared by every write.
	for _, c := range cs {
		if err := c.Conn.(*net.TCPConn).SetReadBuffer(64 << 10); err != nil {
			t.Fatal(err)
		}
	}
	const size = 2 << 20
	big := AppendTextFrame(nil, make([]byte, size))
	fill := func() {
		for i := range 4 {
			for range 7 {
				if err := h.conn(i).WriteFrame(big); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	fill()
	waitFor(t, 5*time.Second, "deep queues", func() bool { return ts.deep.Load() > 0 })
	for _, c := range cs {
		for range 7 {
			if got := c.read(t); len(got) != size {
				t.Fatalf("read %d bytes", len(got))
			}
		}
	}
	waitFor(t, 5*time.Second, "no deep queue", func() bool { return ts.deep.Load() == 0 })
	fill()
	waitFor(t, 5*time.Second, "deep queues again", func() bool { return ts.deep.Load() > 0 })
	for _, c := range cs {
		_ = c.Close()
	}
	waitFor(t, 5*time.Second, "conns gone", func() bool { return ts.Len() == 0 })
	waitFor(t, 5*time.Second, "no deep queue after close", func() bool { return ts.deep.Load() == 0 })
}
