package netpoll

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for delay := time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(delay)
	}
}

// closeEvent is one OnClose call.
type closeEvent struct {
	id     uint64
	code   ws.StatusCode
	reason string
}

// recorder is a Handler that records events and, by default, echoes.
type recorder struct {
	mu       sync.Mutex
	opened   []*Conn
	closed   []closeEvent
	messages [][]byte
	echo     bool
	onMsg    func(c *Conn, p []byte)
}

func (r *recorder) OnOpen(c *Conn) {
	r.mu.Lock()
	r.opened = append(r.opened, c)
	r.mu.Unlock()
}

func (r *recorder) OnMessage(c *Conn, p []byte) {
	r.mu.Lock()
	r.messages = append(r.messages, append([]byte(nil), p...))
	echo, f := r.echo, r.onMsg
	r.mu.Unlock()
	if f != nil {
		f(c, p)
	}
	if echo {
		_ = c.WriteText(p)
	}
}

func (r *recorder) OnClose(c *Conn, code ws.StatusCode, reason string) {
	r.mu.Lock()
	for _, e := range r.closed {
		if e.id == c.ID() {
			panic(fmt.Sprintf("OnClose twice for conn %d", c.ID()))
		}
	}
	r.closed = append(r.closed, closeEvent{c.ID(), code, reason})
	r.mu.Unlock()
}

func (r *recorder) openCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.opened)
}

func (r *recorder) closeCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.closed)
}

func (r *recorder) closes() []closeEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]closeEvent(nil), r.closed...)
}

func (r *recorder) closeOf(id uint64) (closeEvent, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.closed {
		if e.id == id {
			return e, true
		}
	}
	return closeEvent{}, false
}

func (r *recorder) conn(i int) *Conn {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.opened[i]
}

// testServer is a Server fed by a loopback TCP listener.
type testServer struct {
	*Server
	ln   net.Listener
	addr string
	done chan struct{}
}

// startServer starts a Server and an accept loop that hands every accepted
// socket to Serve, as the worker does with the balancer's fds.
func startServer(t testing.TB, cfg Config) *testServer {
	t.Helper()
	if cfg.Handler == nil {
		cfg.Handler = &recorder{echo: true}
	}
	srv, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	ts := &testServer{Server: srv, ln: ln, addr: ln.Addr().String(), done: make(chan struct{})}
	go func() {
		defer close(ts.done)
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			fd, err := dupConnFD(nc)
			_ = nc.Close()
			if err != nil {
				t.Errorf("dup accepted fd: %v", err)
				continue
			}
			if err := srv.Serve(fd, nil, nil); err != nil && !errors.Is(err, ErrServerClosed) {
				t.Errorf("Serve: %v", err)
			}
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		<-ts.done
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx, ws.StatusGoingAway, "test over"); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	})
	return ts
}

// dupConnFD returns a duplicate of a net.Conn's socket fd.
func dupConnFD(nc net.Conn) (int, error) {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return -1, errors.New("not a syscall.Conn")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(f uintptr) { fd, derr = unix.Dup(int(f)) }); err != nil {
		return -1, err
	}
	return fd, derr
}

// client is a gobwas/ws client connection.
type client struct {
	net.Conn
	rw io.ReadWriter
}

func (ts *testServer) dial(t testing.TB) *client {
	t.Helper()
	c, err := ts.tryDial(ws.Dialer{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func (ts *testServer) tryDial(d ws.Dialer) (*client, error) {
	conn, br, _, err := d.Dial(context.Background(), "ws://"+ts.addr+"/socketcluster/")
	if err != nil {
		return nil, err
	}
	var r io.Reader = conn
	if br != nil {
		r = io.MultiReader(br, conn)
	}
	return &client{Conn: conn, rw: struct {
		io.Reader
		io.Writer
	}{r, conn}}, nil
}

func (c *client) send(t testing.TB, msg string) {
	t.Helper()
	if err := wsutil.WriteClientText(c, []byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
}

// read reads the next data message (control frames are answered by wsutil).
func (c *client) read(t testing.TB) string {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	p, _, err := wsutil.ReadServerData(c.rw)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return string(p)
}

// readClose reads until the server's close frame and returns its code.
func (c *client) readClose(t testing.TB) (ws.StatusCode, string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for range 1000 {
		_, _, err := wsutil.ReadServerData(c.rw)
		var ce wsutil.ClosedError
		if errors.As(err, &ce) {
			return ce.Code, ce.Reason
		}
		if err != nil {
			t.Fatalf("read close: %v", err)
		}
	}
	t.Fatal("no close frame in 1000 messages")
	return 0, ""
}

// rawRequest sends an HTTP request over a new TCP connection and returns the
// status line of the reply.
func rawRequest(t testing.TB, addr, req string) string {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, req); err != nil {
		t.Fatalf("write request: %v", err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatalf("read status: %v", err)
	}
	return strings.TrimSpace(line)
}

func upgradeRequest(path, origin string) string {
	req := "GET " + path + " HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
	if origin != "" {
		req += "Origin: " + origin + "\r\n"
	}
	return req + "\r\n"
}

// openFDs counts this process's open file descriptors.
func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("read /proc/self/fd: %v", err)
	}
	return len(ents)
}

func socketpair() ([2]int, error) {
	return unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
}

func closeFD(fd int) { _ = unix.Close(fd) }

// fileConn wraps a raw fd as a net.Conn closed at cleanup.
func fileConn(t testing.TB, fd int) net.Conn {
	t.Helper()
	f := os.NewFile(uintptr(fd), "client")
	nc, err := net.FileConn(f)
	_ = f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = nc.Close() })
	return nc
}

// rawUpgraded serves one end of a socketpair and upgrades it from the other
// end with blocking syscalls only. It returns the client fd.
func rawUpgraded(srv *Server) (int, error) {
	fds, err := socketpair()
	if err != nil {
		return -1, fmt.Errorf("socketpair: %w", err)
	}
	return serveAndUpgrade(srv, fds[0], fds[1], &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1})
}

// tcpListener is a raw loopback listening socket.
func tcpListener(tb testing.TB) int {
	tb.Helper()
	lfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { closeFD(lfd) })
	if err := unix.Bind(lfd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		tb.Fatal(err)
	}
	if err := unix.Listen(lfd, 1024); err != nil {
		tb.Fatal(err)
	}
	return lfd
}

// tcpUpgraded connects to the raw listener, serves the accepted socket
// (remote from getpeername, as in production) and upgrades it.
func tcpUpgraded(srv *Server, lfd int) (int, error) {
	sa, err := unix.Getsockname(lfd)
	if err != nil {
		return -1, err
	}
	cfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	if err := unix.Connect(cfd, sa); err != nil {
		closeFD(cfd)
		return -1, fmt.Errorf("connect: %w", err)
	}
	sfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
	if err != nil {
		closeFD(cfd)
		return -1, fmt.Errorf("accept: %w", err)
	}
	return serveAndUpgrade(srv, sfd, cfd, nil)
}

func serveAndUpgrade(srv *Server, sfd, cfd int, remote net.Addr) (int, error) {
	if err := srv.Serve(sfd, nil, remote); err != nil {
		closeFD(cfd)
		return -1, err
	}
	return upgradeClient(cfd)
}

// upgradeClient sends the upgrade request on cfd, whose server end is
// already served, and reads the 101; it closes cfd on failure.
func upgradeClient(cfd int) (int, error) {
	// Bound the blocking calls so a stuck server fails the caller.
	tv := unix.Timeval{Sec: 5}
	_ = unix.SetsockoptTimeval(cfd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if _, err := unix.Write(cfd, []byte(upgradeRequest("/socketcluster/", ""))); err != nil {
		closeFD(cfd)
		return -1, fmt.Errorf("write upgrade: %w", err)
	}
	var resp []byte
	buf := make([]byte, 512)
	for !strings.Contains(string(resp), "\r\n\r\n") {
		n, err := unix.Read(cfd, buf)
		if err == unix.EINTR { // a profiling signal
			continue
		}
		if err != nil || n == 0 {
			closeFD(cfd)
			return -1, fmt.Errorf("read upgrade response: %v", err)
		}
		resp = append(resp, buf[:n]...)
	}
	if !strings.HasPrefix(string(resp), "HTTP/1.1 101 ") {
		closeFD(cfd)
		return -1, fmt.Errorf("upgrade response %q", resp)
	}
	return cfd, nil
}

// readFrame reads one server frame, refusing payloads over 1 MiB.
func readFrame(r io.Reader) (ws.Frame, error) {
	h, err := ws.ReadHeader(r)
	if err != nil {
		return ws.Frame{}, err
	}
	if h.Length > 1<<20 {
		return ws.Frame{}, fmt.Errorf("frame of %d bytes", h.Length)
	}
	p := make([]byte, h.Length)
	if _, err := io.ReadFull(r, p); err != nil {
		return ws.Frame{}, err
	}
	if h.Masked {
		ws.Cipher(p, h.Mask, 0)
	}
	return ws.Frame{Header: h, Payload: p}, nil
}
