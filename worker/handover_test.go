package worker

import (
	"context"
	"errors"
	"net"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/proto/control"
)

// closeSeen is what one client saw of the server's close.
type closeSeen struct {
	code   ws.StatusCode
	reason string
	at     time.Time
	err    error
}

// readUntilClose reads (answering the close, as wsutil does) until the
// server closes, within d.
func readUntilClose(c net.Conn, d time.Duration) closeSeen {
	_ = c.SetReadDeadline(time.Now().Add(d))
	for range 10000 { // pings at most, bounded by the deadline anyway
		_, _, err := wsutil.ReadServerData(c)
		if err == nil {
			continue
		}
		var ce wsutil.ClosedError
		if errors.As(err, &ce) {
			return closeSeen{code: ce.Code, reason: ce.Reason, at: time.Now()}
		}
		return closeSeen{err: err, at: time.Now()}
	}
	return closeSeen{err: errors.New("no close frame"), at: time.Now()}
}

// Handover closes every socket with the given code, spread over the window in
// batches (never all at once), and returns once they are all gone.
func TestChildHandoverSpreadsCloses(t *testing.T) {
	c, _, addr := startChild(t, nil)
	const n = 40
	clients := make([]*wsClient, n)
	for i := range clients {
		clients[i] = dialWS(t, addr)
		clients[i].handshake("")
	}
	ctx := context.Background()
	if st, err := c.Stats(ctx); err != nil || st.Connections != n {
		t.Fatalf("stats before: %+v %v", st, err)
	}

	seen := make([]closeSeen, n)
	var wg sync.WaitGroup
	for i, cl := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			seen[i] = readUntilClose(cl.c, 10*time.Second)
		}()
	}
	const window = 600 * time.Millisecond
	start := time.Now()
	if err := c.Handover(ctx, 4000, "worker restarting", window, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	wg.Wait()
	if h, _ := c.Health(ctx); h.State != control.StateDraining {
		t.Fatalf("health %v", h)
	}
	if st, _ := c.Stats(ctx); st.Connections != 0 {
		t.Fatalf("%d connections left after Handover returned", st.Connections)
	}

	offs := make([]time.Duration, n)
	for i, s := range seen {
		if s.err != nil {
			t.Fatalf("client %d: %v", i, s.err)
		}
		if s.code != 4000 || s.reason != "worker restarting" {
			t.Fatalf("client %d closed with %d %q", i, s.code, s.reason)
		}
		offs[i] = s.at.Sub(start)
	}
	sort.Slice(offs, func(i, j int) bool { return offs[i] < offs[j] })
	t.Logf("handover of %d sockets over %s: first close after %s, median %s, last %s; returned after %s",
		n, window, offs[0], offs[n/2], offs[n-1], took)
	// 12 batches 50 ms apart: the first goes at once, the last 550 ms later.
	// A loaded machine may delay ticks, never advance them.
	if offs[n-1]-offs[0] < window/2 {
		t.Errorf("closes not spread: first %s, last %s (window %s)", offs[0], offs[n-1], window)
	}
	if early := sort.Search(n, func(i int) bool { return offs[i] >= window/4 }); early > n/2 {
		t.Errorf("%d of %d sockets closed in the first quarter of the window", early, n)
	}
	if took < window-2*handoverStep {
		t.Errorf("Handover returned after %s, before the window of %s", took, window)
	}

	// Drain after a handover (the supervisor stops the worker with Drain and
	// Stop) finds nothing to do and does not fail.
	if err := c.Drain(ctx, time.Second); err != nil {
		t.Fatalf("drain after handover: %v", err)
	}
}

// A client that never answers the close frame does not hold Handover past
// its timeout: it is cut, and Handover reports the deadline.
func TestChildHandoverTimeoutCutsLeftovers(t *testing.T) {
	c, _, addr := startChild(t, func(cfg *configs.Config) { cfg.Worker.WriteTimeout = configs.Duration(30 * time.Second) })
	good := dialWS(t, addr)
	good.handshake("")
	mute := dialWS(t, addr) // reads nothing: never sees or answers the close
	mute.handshake("")

	var wg sync.WaitGroup
	var gs closeSeen
	wg.Add(1)
	go func() {
		defer wg.Done()
		gs = readUntilClose(good.c, 10*time.Second)
	}()
	start := time.Now()
	err := c.Handover(context.Background(), 4000, "worker restarting", 100*time.Millisecond, 700*time.Millisecond)
	took := time.Since(start)
	wg.Wait()
	if gs.err != nil || gs.code != 4000 {
		t.Fatalf("answering client: %+v", gs)
	}
	if err == nil || !strings.Contains(err.Error(), "still open") {
		t.Fatalf("want a deadline error naming the sockets still open, got %v", err)
	}
	if took < 600*time.Millisecond || took > 3*time.Second {
		t.Fatalf("Handover took %s with a 700ms timeout", took)
	}
	// Stop (as the supervisor does next) repeats the shutdown's verdict, and
	// is not held up by the cut socket either.
	sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := c.Stop(sctx); err != nil && !strings.Contains(err.Error(), "still open") {
		t.Fatalf("stop after handover: %v", err)
	}
	// The mute client's socket was cut: its next read ends (close frame
	// buffered by the kernel, then EOF) instead of blocking.
	if s := readUntilClose(mute.c, 5*time.Second); s.err != nil && !isEOF(s.err) {
		t.Fatalf("mute client after the timeout: %v", s.err)
	}
}

func isEOF(err error) bool {
	return err != nil && (errors.Is(err, net.ErrClosed) || strings.Contains(err.Error(), "EOF") || strings.Contains(err.Error(), "reset"))
}

// A code outside the WebSocket range is refused before anything is closed.
func TestChildHandoverBadCode(t *testing.T) {
	c, _, addr := startChild(t, nil)
	cl := dialWS(t, addr)
	cl.handshake("")
	if err := c.Handover(context.Background(), 99, "x", 0, time.Second); err == nil {
		t.Fatal("code 99 accepted")
	}
	if h, _ := c.Health(context.Background()); h.State != control.StateReady {
		t.Fatalf("health after a refused handover: %v", h)
	}
}
