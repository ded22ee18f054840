package brokerclient_test

import (
	"testing"
	"time"

	"github.com/shoalhq/shoal/brokerclient"
)

// TestFlowControlHoldsAcks: while a worker interested in a channel reports
// behind, the broker delivers publishes to it at once but holds their acks;
// they go out when it catches up, or after the maximum hold (2 s by
// default); publishes to channels it is not interested in are not held.
func TestFlowControlHoldsAcks(t *testing.T) {
	dir := runDir(t)
	b := startBroker(t, dir, "broker-1")
	pub, _ := newClient(t, "worker-pub")
	sub, rec := newClient(t, "worker-sub")
	for _, c := range []*brokerclient.Client{pub, sub} {
		c.SetBrokers([]brokerclient.Endpoint{b.ep})
		waitConnected(t, c, 1)
	}
	sub.Subscribe("flow")
	waitInterest(t, b, "flow", 1)
	srv := b.child.Server()

	publish := func(ch, data string) chan error {
		done := make(chan error, 1)
		pub.Publish(ch, []byte(data), func(_ uint64, err error) { done <- err })
		return done
	}
	wait := func(done chan error, d time.Duration, what string) time.Duration {
		t.Helper()
		start := time.Now()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		case <-time.After(d):
			t.Fatalf("%s: no ack within %v", what, d)
		}
		return time.Since(start)
	}

	// Not behind: acked at once.
	wait(publish("flow", `1`), 5*time.Second, "publish before behind")

	sub.SetBehind(true)
	waitFor(t, 5*time.Second, "the broker sees the link behind", func() bool { return srv.Stats().LinksBehind == 1 })
	done := publish("flow", `2`)
	waitFor(t, 5*time.Second, "delivery while behind", func() bool { return len(rec.get("flow")) == 2 })
	// A channel the behind worker does not care about is not held.
	wait(publish("other", `x`), 5*time.Second, "publish to an uninterested channel")
	select {
	case err := <-done:
		t.Fatalf("ack came while the interested worker was behind (err %v)", err)
	case <-time.After(100 * time.Millisecond):
	}
	if st := srv.Stats(); st.AcksHeld != 1 {
		t.Fatalf("acks held %d, want 1", st.AcksHeld)
	}
	sub.SetBehind(false)
	wait(done, 5*time.Second, "held publish after caught up")
	if st := srv.Stats(); st.AcksHeldExpired != 0 || st.LinksBehind != 0 {
		t.Fatalf("expired %d behind %d, want 0 0", st.AcksHeldExpired, st.LinksBehind)
	}

	// A worker that stays behind holds an ack for the maximum hold only.
	sub.SetBehind(true)
	waitFor(t, 5*time.Second, "the broker sees the link behind again", func() bool { return srv.Stats().LinksBehind == 1 })
	if d := wait(publish("flow", `3`), 5*time.Second, "held publish, worker still behind"); d < 500*time.Millisecond {
		t.Fatalf("ack after %v: not held", d)
	}
	if st := srv.Stats(); st.AcksHeldExpired != 1 {
		t.Fatalf("expired %d, want 1", st.AcksHeldExpired)
	}

	// The state survives a reconnect: a link that comes up is told.
	sub.SetBrokers(nil)
	waitFor(t, 5*time.Second, "the link's state cleared on close", func() bool { return srv.Stats().LinksBehind == 0 })
	sub.SetBrokers([]brokerclient.Endpoint{b.ep})
	waitFor(t, 5*time.Second, "re-announced behind", func() bool { return srv.Stats().LinksBehind == 1 })
	sub.SetBehind(false)
	waitFor(t, 5*time.Second, "caught up", func() bool { return srv.Stats().LinksBehind == 0 })
}
