package e2e

import (
	"context"
	"net/http/httptest"
	"syscall"
	"testing"
	"time"
)

// TestWebhooksAfterWorkerSIGKILL: a worker that is SIGKILLed while it holds
// the only session of a user and the only subscriber of a channel cannot
// report user.offline / channel.vacated itself; the broker that removes
// its presence entries hands the notices to the surviving worker, which
// posts them — once each, within a bounded time (debounce 1 s included).
func TestWebhooksAfterWorkerSIGKILL(t *testing.T) {
	sink := &hookSink{}
	srv := httptest.NewServer(sink)
	defer srv.Close()
	c := startRealtimeCluster(t, srv.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	const user, channel = "solo", "chat/solo-room"
	m := joinOn(t, ctx, c.public, user, channel, "")
	waitFor(t, 10*time.Second, "user.online and channel.occupied", func() bool {
		return sink.has("user.online", user) && sink.has("channel.occupied", channel)
	})
	if sink.has("user.offline", user) || sink.has("channel.vacated", channel) {
		t.Fatal("offline/vacated before the worker died")
	}

	victim := c.proc(m.worker)
	if err := syscall.Kill(victim.Pid, syscall.SIGKILL); err != nil {
		t.Fatalf("SIGKILL %s: %v", m.worker, err)
	}
	killed := time.Now()
	waitFor(t, 10*time.Second, "user.offline and channel.vacated from the surviving worker", func() bool {
		return sink.has("user.offline", user) && sink.has("channel.vacated", channel)
	})
	t.Logf("offline/vacated posted %v after SIGKILL of %s", time.Since(killed).Round(time.Millisecond), m.worker)
	// Long enough for a duplicate (another debounce window) to arrive.
	time.Sleep(1500 * time.Millisecond)
	for _, ev := range [][2]string{{"user.offline", user}, {"channel.vacated", channel}} {
		if n := sink.count(ev[0], ev[1]); n != 1 {
			t.Errorf("%s %s posted %d times, want once", ev[0], ev[1], n)
		}
	}
	sink.mu.Lock()
	bad := sink.bad
	sink.mu.Unlock()
	if bad != 0 {
		t.Errorf("%d webhook requests failed verification", bad)
	}
}
