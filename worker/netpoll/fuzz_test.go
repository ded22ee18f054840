package netpoll

import (
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"golang.org/x/sys/unix"
)

// fuzzHandler echoes and checks that OnClose comes once per opened conn.
type fuzzHandler struct {
	mu     sync.Mutex
	closed map[uint64]bool
	bad    atomic.Value // string: the first broken invariant
}

func (h *fuzzHandler) OnOpen(c *Conn) {}

func (h *fuzzHandler) OnMessage(c *Conn, p []byte) {
	_ = c.WriteText(p) // ErrQueueFull is fine: the peer may not read
}

func (h *fuzzHandler) OnClose(c *Conn, code ws.StatusCode, reason string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed[c.ID()] {
		h.bad.CompareAndSwap(nil, fmt.Sprintf("OnClose twice for conn %d", c.ID()))
	}
	h.closed[c.ID()] = true
}

// FuzzFrames feeds arbitrary bytes to an upgraded connection, split into
// random chunks, and checks that the server neither panics nor allocates in
// proportion to what frame headers claim, always hangs up, and releases the
// connection.
func FuzzFrames(f *testing.F) {
	mask := [4]byte{1, 2, 3, 4}
	masked := func(fr ws.Frame) []byte { return ws.MustCompileFrame(ws.MaskFrameWith(fr, mask)) }
	f.Add(uint64(1), masked(ws.NewTextFrame([]byte("hello"))))
	f.Add(uint64(2), append(append(masked(ws.NewFrame(ws.OpText, false, []byte("frag"))),
		masked(ws.NewPingFrame([]byte("p")))...), masked(ws.NewFrame(ws.OpContinuation, true, []byte("ment")))...))
	f.Add(uint64(3), masked(ws.NewCloseFrame(ws.NewCloseFrameBody(1000, "bye"))))
	f.Add(uint64(4), ws.MustCompileFrame(ws.NewTextFrame([]byte("unmasked"))))
	f.Add(uint64(5), []byte{0x81, 0xff, 0, 0, 1, 0, 0, 0, 0, 0, 1, 2, 3, 4})
	f.Add(uint64(6), masked(ws.NewBinaryFrame(make([]byte, 300))))

	h := &fuzzHandler{closed: make(map[uint64]bool)}
	srv, err := New(Config{
		Handler: h, MaxPayload: 4096, SendQueueBytes: 64 << 10,
		WriteTimeout: 2 * time.Second, HandshakeReadTimeout: 2 * time.Second, Pool: 2,
	})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx, ws.StatusGoingAway, ""); err != nil {
			f.Error(err)
		}
	})

	f.Fuzz(func(t *testing.T, seed uint64, data []byte) {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)

		cfd, err := rawUpgraded(srv)
		if err != nil {
			t.Fatal(err)
		}
		defer closeFD(cfd)
		// A bound on every blocking call, so a server that stops
		// reading or never hangs up fails the test instead of hanging it.
		tv := unix.Timeval{Sec: 5}
		_ = unix.SetsockoptTimeval(cfd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		_ = unix.SetsockoptTimeval(cfd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)

		rng := rand.New(rand.NewPCG(seed, uint64(len(data))))
		for p := data; len(p) > 0; {
			n := min(len(p), 1+rng.IntN(64))
			if _, err := unix.Write(cfd, p[:n]); err != nil {
				break // the server hung up (EPIPE/ECONNRESET)
			}
			p = p[n:]
		}
		_ = unix.Shutdown(cfd, unix.SHUT_WR)
		buf := make([]byte, 64<<10)
		for range 10000 {
			n, err := unix.Read(cfd, buf)
			if err == unix.EAGAIN {
				t.Fatal("server did not hang up within 5s")
			}
			if err == unix.EINTR {
				continue
			}
			if n <= 0 || err != nil {
				break
			}
		}
		waitFor(t, 5*time.Second, "conn released", func() bool { return srv.owned.Load() == 0 })
		if bad := h.bad.Load(); bad != nil {
			t.Fatal(bad)
		}
		runtime.ReadMemStats(&after)
		// Echoes and buffers are bounded by the input and MaxPayload; a
		// buffer sized from a frame header's claimed length would not be.
		if grown := after.TotalAlloc - before.TotalAlloc; grown > 2<<20+16*uint64(len(data)) {
			t.Fatalf("allocated %d bytes for %d bytes of input", grown, len(data))
		}
	})
}

// FuzzHandshake feeds arbitrary bytes as the HTTP request head, in random
// chunks: the server must answer or hang up, never panic, and release the
// socket (bounded by HandshakeReadTimeout).
func FuzzHandshake(f *testing.F) {
	f.Add(uint64(1), []byte(upgradeRequest("/socketcluster/", "")))
	f.Add(uint64(2), []byte(upgradeRequest("/socketcluster/", "http://evil.example")))
	f.Add(uint64(3), []byte(upgradeRequest("/other", "")))
	f.Add(uint64(4), []byte("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
	f.Add(uint64(5), []byte("GET /socketcluster/ HTTP/1.1\r\nupgrade: WebSocket\r\nconnection: keep-alive, upgrade\r\n"+
		"host: x\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"))
	f.Add(uint64(6), []byte("POST / HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello"))
	f.Add(uint64(7), []byte("\r\n\r\n"))

	h := &fuzzHandler{closed: make(map[uint64]bool)}
	srv, err := New(Config{
		Handler: h, MaxHeaderBytes: 1024, Origins: []string{"example.com"},
		WriteTimeout: 2 * time.Second, HandshakeReadTimeout: 2 * time.Second, Pool: 2,
	})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx, ws.StatusGoingAway, ""); err != nil {
			f.Error(err)
		}
	})

	f.Fuzz(func(t *testing.T, seed uint64, data []byte) {
		fds, err := socketpair()
		if err != nil {
			t.Fatal(err)
		}
		cfd := fds[1]
		defer closeFD(cfd)
		tv := unix.Timeval{Sec: 5}
		_ = unix.SetsockoptTimeval(cfd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		_ = unix.SetsockoptTimeval(cfd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
		if err := srv.Serve(fds[0], nil, nil); err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(seed, uint64(len(data))))
		for p := data; len(p) > 0; {
			n := min(len(p), 1+rng.IntN(64))
			if _, err := unix.Write(cfd, p[:n]); err != nil {
				break
			}
			p = p[n:]
		}
		_ = unix.Shutdown(cfd, unix.SHUT_WR)
		buf := make([]byte, 4096)
		for range 10000 {
			n, err := unix.Read(cfd, buf)
			if err == unix.EAGAIN {
				t.Fatal("server did not hang up within 5s")
			}
			if err == unix.EINTR {
				continue
			}
			if n <= 0 || err != nil {
				break
			}
		}
		waitFor(t, 5*time.Second, "socket released", func() bool { return srv.owned.Load() == 0 })
		if bad := h.bad.Load(); bad != nil {
			t.Fatal(bad)
		}
	})
}
