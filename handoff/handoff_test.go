package handoff

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// openFDs counts this process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("read /proc/self/fd: %v", err)
	}
	return len(ents)
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func sockPath(t *testing.T) string {
	t.Helper()
	return filepath.Join(t.TempDir(), "h.sock")
}

func newPair(t *testing.T) (*Listener, *Sender) {
	t.Helper()
	p := sockPath(t)
	l, err := Listen(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	s, err := Dial(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return l, s
}

// tcpPair returns the two ends of a real loopback TCP connection.
func tcpPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.AcceptTCP()
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	return c, s
}

// tcpFilePair is tcpPair with the server end also as an *os.File (a
// duplicate fd, as a balancer would send); all three close with the test.
func tcpFilePair(t *testing.T) (client *net.TCPConn, f *os.File) {
	t.Helper()
	client, server := tcpPair(t)
	t.Cleanup(func() { client.Close(); server.Close() })
	f, err := server.File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return client, f
}

// connFromFD wraps a received fd as a net.Conn (closing the raw fd).
func connFromFD(t *testing.T, fd int) net.Conn {
	t.Helper()
	f := os.NewFile(uintptr(fd), "handed")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatalf("FileConn: %v", err)
	}
	return c
}

func TestPassTCPConnection(t *testing.T) {
	before := openFDs(t)
	l, s := newPair(t)
	client, server := tcpPair(t)
	defer client.Close()

	// The "balancer" read the first bytes, then hands the connection over.
	if _, err := client.Write([]byte("GET / HTTP/1.1\r\n")); err != nil {
		t.Fatal(err)
	}
	pre := make([]byte, 16)
	if _, err := io.ReadFull(server, pre); err != nil {
		t.Fatal(err)
	}
	f, err := server.File()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(f, pre); err != nil {
		t.Fatal(err)
	}
	f.Close()
	server.Close() // the balancer keeps nothing

	fd, prebuf, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(prebuf, pre) {
		t.Fatalf("prebuf = %q, want %q", prebuf, pre)
	}
	wc := connFromFD(t, fd)
	defer wc.Close()
	if got, want := wc.RemoteAddr().String(), client.LocalAddr().String(); got != want {
		t.Errorf("worker sees remote %s, want the client's %s", got, want)
	}
	if _, err := client.Write([]byte("Host: x\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	rest := make([]byte, len("Host: x\r\n\r\n"))
	if err := wc.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(wc, rest); err != nil {
		t.Fatalf("worker reads the rest: %v", err)
	}
	if _, err := wc.Write([]byte("HTTP/1.1 204 No Content\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	if err := client.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(client).ReadString('\n')
	if err != nil || line != "HTTP/1.1 204 No Content\r\n" {
		t.Fatalf("client got %q, %v", line, err)
	}
	wc.Close()
	client.Close()
	_ = s.Close()
	_ = l.Close()
	waitFor(t, 5*time.Second, "fds back to the baseline", func() bool { return openFDs(t) <= before })
}

func TestSendConnNoDup(t *testing.T) {
	l, s := newPair(t)
	client, server := tcpPair(t)
	defer client.Close()
	if err := s.SendConn(server, nil); err != nil {
		t.Fatal(err)
	}
	server.Close()
	fd, prebuf, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if prebuf != nil {
		t.Errorf("prebuf = %q, want nil", prebuf)
	}
	wc := connFromFD(t, fd)
	defer wc.Close()
	if _, err := wc.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2)
	if err := client.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "hi" {
		t.Fatalf("client got %q, %v", buf, err)
	}
}

// Many connections from several concurrent senders (one Sender shared, plus
// a second Sender, as with two balancers) all arrive intact and usable.
func TestManyInARow(t *testing.T) {
	before := openFDs(t)
	l, s1 := newPair(t)
	s2, err := Dial(l.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()

	const perSender, goroutines = 50, 4
	total := perSender * goroutines
	recvErr := make(chan error, 1)
	go func() {
		seen := make(map[string]bool)
		for range total {
			fd, prebuf, err := l.Accept()
			if err != nil {
				recvErr <- err
				return
			}
			c := connFromFD(t, fd)
			// Echo the tag back so the client proves the fd is its socket.
			_, werr := c.Write(prebuf)
			c.Close()
			if werr != nil {
				recvErr <- werr
				return
			}
			if seen[string(prebuf)] {
				recvErr <- fmt.Errorf("duplicate %q", prebuf)
				return
			}
			seen[string(prebuf)] = true
		}
		recvErr <- nil
	}()

	var wg sync.WaitGroup
	errs := make(chan error, total)
	for g := range goroutines {
		s := s1
		if g%2 == 1 {
			s = s2
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perSender {
				client, server := tcpPair(t)
				tag := []byte(fmt.Sprintf("g%d-i%d", g, i))
				err := s.SendConn(server, tag)
				server.Close()
				if err != nil {
					client.Close()
					errs <- err
					return
				}
				_ = client.SetReadDeadline(time.Now().Add(10 * time.Second))
				got, err := io.ReadAll(client)
				client.Close()
				if err != nil || !bytes.Equal(got, tag) {
					errs <- fmt.Errorf("client %s got %q, %v", tag, got, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := <-recvErr; err != nil {
		t.Fatal(err)
	}
	s1.Close()
	s2.Close()
	l.Close()
	waitFor(t, 5*time.Second, "fds back to the baseline", func() bool { return openFDs(t) <= before })
}

func TestPrebufBounds(t *testing.T) {
	l, s := newPair(t)
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	rng := rand.New(rand.NewPCG(1, 2))
	sizes := []int{0, 1, 2, 255, 4096, MaxPrebuf - 1, MaxPrebuf}
	for range 20 {
		sizes = append(sizes, rng.IntN(MaxPrebuf+1))
	}
	for _, n := range sizes {
		want := make([]byte, n)
		for i := range want {
			want[i] = byte(rng.Uint32())
		}
		if err := s.Send(devnull, want); err != nil {
			t.Fatalf("size %d: %v", n, err)
		}
		fd, got, err := l.Accept()
		if err != nil {
			t.Fatalf("size %d: %v", n, err)
		}
		syscall.Close(fd)
		if !bytes.Equal(got, want) || (n == 0) != (got == nil) {
			t.Fatalf("size %d: got %d bytes", n, len(got))
		}
	}
	for _, n := range []int{MaxPrebuf + 1, 1 << 20} {
		err := s.Send(devnull, make([]byte, n))
		if !errors.Is(err, ErrPrebufTooLarge) {
			t.Fatalf("size %d: err = %v, want ErrPrebufTooLarge", n, err)
		}
	}
	// The sender is still usable after a rejected size.
	if err := s.Send(devnull, []byte("ok")); err != nil {
		t.Fatal(err)
	}
	fd, got, err := l.Accept()
	if err != nil || string(got) != "ok" {
		t.Fatalf("after oversize: %q, %v", got, err)
	}
	syscall.Close(fd)
}

func TestReceiverClosed(t *testing.T) {
	before := openFDs(t)
	l, s := newPair(t)
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	// One fd in flight that nobody accepts: Close must release it.
	if err := s.Send(devnull, []byte("unaccepted")); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	var sendErr error
	// The first write after the peer closed may still be queued by the
	// kernel; the next ones fail with EPIPE. Bounded loop.
	for range 10 {
		if sendErr = s.Send(devnull, nil); sendErr != nil {
			break
		}
	}
	if sendErr == nil {
		t.Fatal("Send to a closed listener kept succeeding")
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("Send took %v to fail", d)
	}
	if _, err := Dial(l.Path()); err == nil {
		t.Fatal("Dial after Close succeeded")
	}
	if _, _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v, want net.ErrClosed", err)
	}
	s.Close()
	devnull.Close()
	waitFor(t, 5*time.Second, "fds back to the baseline", func() bool { return openFDs(t) <= before })
}

// A live receiver that never calls Accept must not block Send forever.
func TestReceiverStuck(t *testing.T) {
	_, s := newPair(t)
	s.SetTimeout(100 * time.Millisecond)
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	start := time.Now()
	var sendErr error
	for i := 0; i < 100000 && sendErr == nil; i++ {
		sendErr = s.Send(devnull, make([]byte, 1024))
	}
	if sendErr == nil {
		t.Fatal("Send never pushed back on a receiver that does not read")
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("took %v", d)
	}
	t.Logf("stuck receiver: Send failed after %v: %v", time.Since(start), sendErr)
}

func TestCloseUnblocksAccept(t *testing.T) {
	l, _ := newPair(t)
	done := make(chan error, 1)
	go func() {
		_, _, err := l.Accept()
		done <- err
	}()
	l.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Accept still blocked after Close")
	}
}

// Malformed messages are dropped with their fds closed; valid ones still flow.
func TestBadMessages(t *testing.T) {
	l, s := newPair(t)
	raw, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: l.Path(), Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	f1, _ := os.Open(os.DevNull)
	f2, _ := os.Open(os.DevNull)
	defer f1.Close()
	defer f2.Close()
	// A valid message first, so the listener has accepted raw's connection
	// (its fd exists) before the baseline is taken.
	if _, _, err := raw.WriteMsgUnix([]byte{version}, syscall.UnixRights(int(f1.Fd())), nil); err != nil {
		t.Fatal(err)
	}
	fd, _, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	syscall.Close(fd)
	before := openFDs(t)
	one := syscall.UnixRights(int(f1.Fd()))
	two := syscall.UnixRights(int(f1.Fd()), int(f2.Fd()))
	cases := []struct {
		name string
		msg  []byte
		oob  []byte
	}{
		{"no fd", []byte{version, 'x'}, nil},
		{"wrong version", []byte{9, 'x'}, one},
		{"two fds", []byte{version}, two},
		{"oversized", append([]byte{version}, make([]byte, MaxPrebuf+1)...), one},
		{"v2 without its header", []byte{versionV2, 0}, one},
		{"v2 unknown flag", []byte{versionV2, 0x80, 0}, one},
		{"v2 bad address length", []byte{versionV2, 0, 5, 1, 2, 3, 4, 5}, one},
		{"v2 address cut short", []byte{versionV2, 0, 6, 127, 0, 0}, one},
		{"v2 oversized", append([]byte{versionV2, 0, 0}, make([]byte, MaxPrebuf+1)...), one},
	}
	for _, c := range cases {
		if _, _, err := raw.WriteMsgUnix(c.msg, c.oob, nil); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
	}
	waitFor(t, 5*time.Second, "bad messages counted", func() bool { return l.BadMessages() == int64(len(cases)) })
	waitFor(t, 5*time.Second, "their fds closed", func() bool { return openFDs(t) <= before })
	if err := s.Send(f1, []byte("good")); err != nil {
		t.Fatal(err)
	}
	fd, got, err := l.Accept()
	if err != nil || string(got) != "good" {
		t.Fatalf("valid message after bad ones: %q, %v", got, err)
	}
	syscall.Close(fd)
}

func TestListenStaleAndLive(t *testing.T) {
	p := sockPath(t)
	l, err := Listen(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(p); err == nil {
		t.Fatal("second Listen on a live socket succeeded")
	}
	l.Close()
	// Simulate a crash: a socket file with no listener behind it.
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_SEQPACKET, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: p}); err != nil {
		t.Fatal(err)
	}
	syscall.Close(fd)
	l2, err := Listen(p)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	l2.Close()
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Errorf("socket file left after Close: %v", err)
	}
	if _, err := Dial(p); err == nil {
		t.Fatal("Dial to a removed socket succeeded")
	}
}

func TestSendFD(t *testing.T) {
	l, s := newPair(t)
	client, f := tcpFilePair(t)
	if err := s.SendFD(-1, nil); err == nil {
		t.Fatal("SendFD(-1) succeeded")
	}
	if err := s.SendFD(int(f.Fd()), []byte("pre")); err != nil {
		t.Fatal(err)
	}
	fd, pre, err := l.Accept()
	if err != nil || string(pre) != "pre" {
		t.Fatalf("%q, %v", pre, err)
	}
	wc := connFromFD(t, fd)
	defer wc.Close()
	if got, want := wc.RemoteAddr().String(), client.LocalAddr().String(); got != want {
		t.Errorf("remote %s, want %s", got, want)
	}
}

// A sender that knows the socket (Meta) passes it along: the receiver gets
// the peer address without asking the socket, and the flags as sent; the
// prebuf still arrives intact behind the header.
func TestSendFDMeta(t *testing.T) {
	l, s := newPair(t)
	client, f := tcpFilePair(t)
	peer := netip.MustParseAddrPort(client.LocalAddr().String())
	cases := []struct {
		name   string
		m      Meta
		prebuf []byte
	}{
		{"v4 and both flags", Meta{Peer: peer, Nonblock: true, NoDelay: true}, []byte("GET /")},
		{"v6", Meta{Peer: netip.MustParseAddrPort("[2001:db8::7]:443"), NoDelay: true}, nil},
		{"flags only", Meta{Nonblock: true}, []byte("x")},
		// The zone is not carried: the receiver must ask the socket.
		{"zoned v6", Meta{Peer: netip.MustParseAddrPort("[fe80::1%lo]:80"), Nonblock: true}, nil},
		{"largest prebuf", Meta{Peer: netip.MustParseAddrPort("[2001:db8::7]:443")}, make([]byte, MaxPrebuf)},
	}
	for _, c := range cases {
		if err := s.SendFDMeta(int(f.Fd()), c.m, c.prebuf); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		fd, pre, m, err := l.AcceptMeta()
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		syscall.Close(fd)
		want := c.m
		if want.Peer.Addr().Zone() != "" {
			want.Peer = netip.AddrPort{}
		}
		if m != want {
			t.Errorf("%s: meta %+v, want %+v", c.name, m, want)
		}
		if !bytes.Equal(pre, c.prebuf) {
			t.Errorf("%s: prebuf of %d bytes, want %d", c.name, len(pre), len(c.prebuf))
		}
	}
	// Zero Meta goes out as version 1, which any receiver takes.
	msg, err := s.frame(Meta{}, []byte("pre"))
	if err != nil || string(msg) != "\x01pre" {
		t.Fatalf("zero Meta framed as %q, %v", msg, err)
	}
	// And a version 1 message gives zero Meta.
	if err := s.SendFD(int(f.Fd()), []byte("pre")); err != nil {
		t.Fatal(err)
	}
	fd, pre, m, err := l.AcceptMeta()
	if err != nil || string(pre) != "pre" || m != (Meta{}) {
		t.Fatalf("v1: %q %+v %v", pre, m, err)
	}
	syscall.Close(fd)
}

func FuzzParseHeader(f *testing.F) {
	f.Add([]byte{version, 'a'})
	f.Add(appendHeader(nil, Meta{Peer: netip.MustParseAddrPort("10.0.0.1:80"), NoDelay: true}))
	f.Add(appendHeader(nil, Meta{Peer: netip.MustParseAddrPort("[::1]:80"), Nonblock: true}))
	f.Fuzz(func(t *testing.T, msg []byte) {
		m, pre, ok := parseHeader(msg)
		if !ok {
			return
		}
		// Whatever parses re-encodes to the same bytes.
		var again []byte
		if msg[0] == version {
			again = append([]byte{version}, pre...)
		} else {
			again = append(appendHeader(nil, m), pre...)
		}
		if !bytes.Equal(again, msg) {
			t.Fatalf("%x parsed as %+v %x, re-encodes as %x", msg, m, pre, again)
		}
	})
}

// BenchmarkSendAccept: one handoff round (sendmsg with an fd, recvmsg, close
// of the received fd), the per-connection cost of the plain path.
func BenchmarkSendAccept(b *testing.B) {
	p := filepath.Join(b.TempDir(), "h.sock")
	l, err := Listen(p)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	s, err := Dial(p)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	f, err := os.Open(os.DevNull)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	b.ReportAllocs()
	for b.Loop() {
		if err := s.SendFD(fd, nil); err != nil {
			b.Fatal(err)
		}
		rfd, _, err := l.Accept()
		if err != nil {
			b.Fatal(err)
		}
		syscall.Close(rfd)
	}
}

// parseFDs finds every fd of every SCM_RIGHTS message.
func TestParseFDs(t *testing.T) {
	two := append(syscall.UnixRights(3, 4), syscall.UnixRights(5)...)
	cases := []struct {
		oob  []byte
		want []int
	}{
		{nil, nil},
		{syscall.UnixRights(7), []int{7}},
		{two, []int{3, 4, 5}},
		{syscall.UnixRights(7)[:10], nil},
	}
	for i, c := range cases {
		if got := parseFDs(c.oob); fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("case %d: %v, want %v", i, got, c.want)
		}
	}
}
