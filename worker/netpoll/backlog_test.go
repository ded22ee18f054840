package netpoll

import (
	"testing"
	"time"

	"github.com/gobwas/ws"
	"golang.org/x/sys/unix"
)

// TestReadBacklogBeyondOneTask leaves more input in a socket than one read
// task takes (maxReadRounds reads of readBufSize) and then sends nothing:
// every message must still arrive, so the input left when a task runs out of
// rounds has to be reported again (the one-shot re-arm) and read. It was
// written for an edge-triggered registration (330a703, reverted: no
// measured gain in cluster runs), where no new edge would report it.
func TestReadBacklogBeyondOneTask(t *testing.T) {
	entered, gate := make(chan struct{}), make(chan struct{})
	first := true
	rec := &recorder{onMsg: func(c *Conn, p []byte) {
		if first { // read tasks of one conn are sequential
			first = false
			close(entered)
			select { // hold the read task until the backlog is in the socket
			case <-gate:
			case <-time.After(10 * time.Second):
			}
		}
	}}
	srv, err := New(Config{Handler: rec})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Shutdown(t.Context(), ws.StatusGoingAway, "") })
	cfd, err := rawUpgraded(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer closeFD(cfd)

	payload := make([]byte, 1000)
	frame := ws.MustCompileFrame(ws.MaskFrameWith(ws.NewTextFrame(payload), [4]byte{1, 2, 3, 4}))
	const n = 300 // ≈ 300 KiB > maxReadRounds × readBufSize (256 KiB)
	burst := make([]byte, 0, n*len(frame))
	for range n {
		burst = append(burst, frame...)
	}
	_ = unix.SetsockoptInt(cfd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4<<20)
	if sb, _ := unix.GetsockoptInt(cfd, unix.SOL_SOCKET, unix.SO_SNDBUF); sb < 2*len(burst) {
		t.Skipf("SO_SNDBUF %d cannot hold the %d-byte backlog", sb, len(burst))
	}
	tv := unix.Timeval{Sec: 5}
	_ = unix.SetsockoptTimeval(cfd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	if _, err := unix.Write(cfd, frame); err != nil {
		t.Fatal(err)
	}
	<-entered
	for p := burst; len(p) > 0; {
		w, err := unix.Write(cfd, p)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			t.Fatalf("write backlog: %v after %d bytes", err, len(burst)-len(p))
		}
		p = p[w:]
	}
	close(gate)
	waitFor(t, 5*time.Second, "every message of the backlog", func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return len(rec.messages) == n+1
	})
}
