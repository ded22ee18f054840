package worker

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// TestClusterPublishAcrossWorkers runs a real broker and two workers in
// process: a publish on one worker reaches the subscribers of both, once
// each and in order, and the publisher gets its own messages.
func TestClusterPublishAcrossWorkers(t *testing.T) {
	_, topo := startBrokerChild(t, nil)
	w1, _, addr1 := startNamedChild(t, "worker-1", topo, nil)
	_, _, addr2 := startNamedChild(t, "worker-2", topo, nil)

	a, bc := dialWS(t, addr1), dialWS(t, addr2)
	a.handshake("")
	bc.handshake("")
	a.send(`{"event":"#subscribe","data":{"channel":"chat/1"},"cid":2}`)
	bc.send(`{"event":"#subscribe","data":{"channel":"chat/1"},"cid":2}`)
	if r := a.recvData(); r != `{"rid":2}` {
		t.Fatal(r)
	}
	if r := bc.recvData(); r != `{"rid":2}` {
		t.Fatal(r)
	}
	// Interest travels to the broker asynchronously; wait until a probe
	// published from worker-1 reaches worker-2's subscriber.
	waitFor(t, 5*time.Second, "interest registered", func() bool {
		a.send(`{"event":"#publish","data":{"channel":"chat/1","data":"probe"}}`)
		r, err := bc.recvWithin(100 * time.Millisecond)
		return err == nil && r == `{"event":"#publish","data":{"channel":"chat/1","data":"probe"}}`
	})
	// Drain the probes still in flight.
	for {
		if _, err := bc.recvWithin(300 * time.Millisecond); err != nil {
			break
		}
	}
	for {
		if _, err := a.recvWithin(300 * time.Millisecond); err != nil {
			break
		}
	}

	const n = 50
	for i := range n {
		a.send(fmt.Sprintf(`{"event":"#publish","data":{"channel":"chat/1","data":%d},"cid":%d}`, i, 100+i))
	}
	for i := range n {
		want := fmt.Sprintf(`{"event":"#publish","data":{"channel":"chat/1","data":%d}}`, i)
		if r := bc.recvData(); r != want {
			t.Fatalf("worker-2 subscriber got %s, want %s", r, want)
		}
	}
	acks, msgs := 0, 0
	for acks+msgs < 2*n {
		r := a.recvData()
		if r == fmt.Sprintf(`{"event":"#publish","data":{"channel":"chat/1","data":%d}}`, msgs) {
			msgs++
		} else if r == fmt.Sprintf(`{"rid":%d}`, 100+acks) {
			acks++
		} else {
			t.Fatalf("publisher got %s (after %d msgs, %d acks)", r, msgs, acks)
		}
	}
	if _, err := bc.recvWithin(200 * time.Millisecond); err == nil {
		t.Fatal("worker-2 subscriber got a duplicate")
	}
	st, _ := w1.Stats(context.Background())
	if st.Counters["publish_errors"] != 0 {
		t.Fatalf("publish errors %v", st.Counters)
	}
}
