package netpoll

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"golang.org/x/sys/unix"
)

// drainer reads and discards everything that arrives on a set of client
// fds, with one goroutine and its own epoll, so the client side of a
// benchmark costs as little as possible. Like the server's poller it waits
// in Go's netpoller, not in a blocking epoll_wait that would hold the P.
type drainer struct {
	ep    *os.File
	bytes atomic.Int64
	done  chan struct{}
}

func newDrainer(tb testing.TB, fds []int) *drainer {
	tb.Helper()
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		tb.Fatal(err)
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		tb.Fatal(err)
	}
	d := &drainer{ep: os.NewFile(uintptr(epfd), "drainer"), done: make(chan struct{})}
	for _, fd := range fds {
		if err := unix.SetNonblock(fd, true); err != nil {
			tb.Fatal(err)
		}
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: int32(fd)}
		if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
			tb.Fatal(err)
		}
	}
	rc, err := d.ep.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	go d.run(rc)
	return d
}

func (d *drainer) run(rc syscall.RawConn) {
	defer close(d.done)
	events := make([]unix.EpollEvent, 256)
	buf := make([]byte, 256<<10)
	var n int
	wait := func(fd uintptr) bool {
		n, _ = unix.EpollWait(int(fd), events, 0)
		return n > 0
	}
	for rc.Read(wait) == nil {
		for _, ev := range events[:n] {
			for range 1000 { // edge-triggered: read until EAGAIN
				m, err := unix.Read(int(ev.Fd), buf)
				if m <= 0 || err != nil {
					break
				}
				d.bytes.Add(int64(m))
			}
		}
	}
}

func (d *drainer) close() {
	_ = d.ep.Close() // ends rc.Read
	<-d.done
}

// upgradedConns opens n connections to srv, over loopback TCP or unix
// socketpairs, and returns the client fds.
func upgradedConns(b *testing.B, srv *Server, h *recorder, n int, tcp bool) []int {
	b.Helper()
	fds := make([]int, 0, n)
	b.Cleanup(func() {
		for _, fd := range fds {
			closeFD(fd)
		}
	})
	lfd := -1
	if tcp {
		lfd = tcpListener(b)
	}
	for range n {
		var fd int
		var err error
		if tcp {
			fd, err = tcpUpgraded(srv, lfd)
		} else {
			fd, err = rawUpgraded(srv)
		}
		if err != nil {
			b.Fatal(err)
		}
		fds = append(fds, fd)
	}
	waitFor(b, 30*time.Second, "all open", func() bool { return srv.Len() == n && (h == nil || h.openCount() == n) })
	return fds
}

func shutdownBench(b *testing.B, srv *Server) {
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx, ws.StatusGoingAway, "")
	})
}

// BenchmarkFanout writes one 100-byte text frame, built once, to 1,000
// connections per iteration; clients read everything. Reports deliveries/s
// (frames written to a socket and read by the client, end to end).
func BenchmarkFanout(b *testing.B) {
	b.Run("tcp", func(b *testing.B) { benchFanout(b, true, false) })
	b.Run("unix", func(b *testing.B) { benchFanout(b, false, false) })
	// One message at a time: the next is written only when every client
	// got the previous one, so writes cannot coalesce (latency-bound).
	b.Run("tcp-lockstep", func(b *testing.B) { benchFanout(b, true, true) })
}

func benchFanout(b *testing.B, tcp, lockstep bool) {
	const conns = 1000
	h := &recorder{}
	srv, err := New(Config{Handler: h, SendQueueMsgs: 4096, SendQueueBytes: 4 << 20})
	if err != nil {
		b.Fatal(err)
	}
	shutdownBench(b, srv) // runs after the fds close (cleanups are LIFO)
	fds := upgradedConns(b, srv, h, conns, tcp)
	d := newDrainer(b, fds)
	defer d.close()
	h.mu.Lock()
	targets := append([]*Conn(nil), h.opened...)
	h.mu.Unlock()

	frame := AppendTextFrame(nil, make([]byte, 100))
	var retries int
	send := func(iters int) {
		for range iters {
			for _, c := range targets {
				for {
					err := c.WriteFrame(frame)
					if err == nil {
						break
					}
					if !errors.Is(err, ErrQueueFull) {
						b.Fatal(err)
					}
					// Back-pressure: let the flushes run.
					retries++
					runtime.Gosched()
				}
			}
		}
	}
	wait := func(total int64) {
		waitFor(b, time.Minute, "clients received everything", func() bool { return d.bytes.Load() >= total })
	}
	send(10) // warm up: grow the queues and the pool's ring once
	wait(int64(10 * conns * len(frame)))
	start := d.bytes.Load()

	b.ReportAllocs()
	b.ResetTimer()
	t0, cpu0 := time.Now(), cpuTime()
	if lockstep {
		for i := range b.N {
			send(1)
			want := start + int64(i+1)*int64(conns*len(frame))
			for spins := 0; d.bytes.Load() < want; spins++ {
				if spins > 1e8 {
					b.Fatal("clients stopped receiving")
				}
				runtime.Gosched()
			}
		}
	} else {
		send(b.N)
	}
	wait(start + int64(b.N)*int64(conns*len(frame)))
	elapsed, cpu := time.Since(t0), cpuTime()-cpu0
	b.StopTimer()
	b.ReportMetric(float64(b.N*conns)/elapsed.Seconds(), "deliveries/s")
	// CPU of the whole process (server and in-process clients) per
	// delivery: steadier than wall time on a shared machine.
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N*conns), "cpu-ns/delivery")
	b.ReportMetric(float64(retries)/float64(b.N), "queuefull/op")
}

// BenchmarkIdleConnMemory measures the Go heap held per idle, upgraded
// connection (client ends are raw fds and cost no Go memory). Run it with
// -benchtime=1x; n stays well under the 20,000-file limit with two fds per
// connection in one process.
func BenchmarkIdleConnMemory(b *testing.B) {
	b.Run("tcp", func(b *testing.B) { benchIdleMemory(b, true) })
	b.Run("unix", func(b *testing.B) { benchIdleMemory(b, false) })
}

func benchIdleMemory(b *testing.B, tcp bool) {
	const n = 5000
	// A handler that keeps nothing, so the heap growth is the server's.
	srv, err := New(Config{Handler: HandlerFuncs{}})
	if err != nil {
		b.Fatal(err)
	}
	shutdownBench(b, srv)
	goroutines := runtime.NumGoroutine()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	fds := upgradedConns(b, srv, nil, n, tcp) // its fd slice: 8 B per conn
	// Let the last flushes finish and their scratch become garbage.
	waitFor(b, 10*time.Second, "queues empty", func() bool { return srv.Stats().BytesOut > 0 })
	runtime.GC()
	runtime.ReadMemStats(&after)
	b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/n-8, "heapB/conn")
	b.ReportMetric(float64(runtime.NumGoroutine()-goroutines), "goroutines")
	runtime.KeepAlive(fds)
	for range b.N {
	}
}

// BenchmarkEchoRoundTrip measures one message to the server and its echo
// back, on one connection over loopback TCP: the read path's latency
// (poller → pool → OnMessage → flush). The client is a net.Conn, so it waits
// in Go's netpoller rather than in a blocking system call.
func BenchmarkEchoRoundTrip(b *testing.B) {
	ts := startServer(b, Config{Handler: HandlerFuncs{Message: func(c *Conn, p []byte) { _ = c.WriteText(p) }}})
	c := ts.dial(b)
	msg := ws.MustCompileFrame(ws.MaskFrame(ws.NewTextFrame([]byte("ping"))))
	buf := make([]byte, len(AppendTextFrame(nil, []byte("ping"))))
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	for range b.N {
		// The frame is unmasked in place by the server, not here: the
		// client's bytes are copied into the socket, so reuse is safe.
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c.rw, buf); err != nil {
			b.Fatalf("read echo: %v", err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "roundtrips/s")
	b.ReportMetric(float64((cpuTime()-cpu0).Nanoseconds())/float64(b.N), "cpu-ns/roundtrip")
}

// BenchmarkConnect measures connection set-up one at a time: TCP connect,
// accept, Serve, HTTP upgrade until the client has the 101, then the client
// hangs up. The client uses net.Conn (Go's netpoller).
func BenchmarkConnect(b *testing.B) {
	b.Run("nohook", func(b *testing.B) { benchConnect(b, nil) })
	// With an upgrade hook, as the worker always installs one: the request
	// head is parsed into an UpgradeRequest for it.
	b.Run("hook", func(b *testing.B) {
		benchConnect(b, func(r *UpgradeRequest) (any, int, string) {
			if r.Origin == "forbidden" || len(r.Header) == 0 {
				return nil, 403, "no"
			}
			return nil, 0, ""
		})
	})
}

func benchConnect(b *testing.B, hook func(*UpgradeRequest) (any, int, string)) {
	h := &recorder{}
	srv, err := New(Config{Handler: HandlerFuncs{}, Upgrade: hook})
	if err != nil {
		b.Fatal(err)
	}
	shutdownBench(b, srv)
	lfd := tcpListener(b)
	sa, err := unix.Getsockname(lfd)
	if err != nil {
		b.Fatal(err)
	}
	addr := (&net.TCPAddr{IP: sa.(*unix.SockaddrInet4).Addr[:], Port: sa.(*unix.SockaddrInet4).Port}).String()
	req := []byte(upgradeRequest("/socketcluster/", ""))
	buf := make([]byte, 512)
	_ = h
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	for range b.N {
		nc, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		sfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		if err != nil {
			b.Fatal(err)
		}
		if err := srv.Serve(sfd, nil, nil); err != nil {
			b.Fatal(err)
		}
		if _, err := nc.Write(req); err != nil {
			b.Fatal(err)
		}
		for got := 0; !bytes.Contains(buf[:got], []byte("\r\n\r\n")); {
			n, err := nc.Read(buf[got:])
			if err != nil {
				b.Fatal(err)
			}
			got += n
		}
		_ = nc.Close()
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conns/s")
	b.ReportMetric(float64((cpuTime()-cpu0).Nanoseconds())/float64(b.N), "cpu-ns/conn")
	waitFor(b, 10*time.Second, "all released", func() bool { return srv.owned.Load() == 0 })
}

// cpuTime is the process's user+system CPU time so far.
func cpuTime() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkInbound measures the read path: 100 clients pipeline 100-byte
// text messages; the handler only counts them. Reports messages/s; allocs/op
// is per message.
func BenchmarkInbound(b *testing.B) {
	const clients, batch = 100, 64
	var got atomic.Int64
	ts := startServer(b, Config{Handler: HandlerFuncs{Message: func(c *Conn, p []byte) { got.Add(1) }}})
	cs := make([]*client, clients)
	for i := range cs {
		cs[i] = ts.dial(b)
	}
	var buf []byte
	for range batch {
		buf = append(buf, ws.MustCompileFrame(ws.MaskFrame(ws.NewTextFrame(make([]byte, 100))))...)
	}
	b.ReportAllocs()
	b.ResetTimer()
	t0, cpu0 := time.Now(), cpuTime()
	per := (b.N + clients - 1) / clients
	batches := (per + batch - 1) / batch
	errs := make(chan error, clients)
	for _, c := range cs {
		go func() {
			for range batches {
				// Masked frames are copied by the kernel; the server
				// unmasks its own copy, so the buffer is reused.
				if _, err := c.Write(buf); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range clients {
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
	}
	total := int64(clients * batches * batch)
	waitFor(b, time.Minute, "all messages handled", func() bool { return got.Load() >= total })
	elapsed, cpu := time.Since(t0), cpuTime()-cpu0
	b.StopTimer()
	b.ReportMetric(float64(total)/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(total), "cpu-ns/msg")
}
