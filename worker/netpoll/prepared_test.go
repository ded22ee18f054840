package netpoll

import (
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ServePrepared leaves alone what the caller says is set (no fcntl, no
// setsockopt, no getpeername per connection); Serve sets and asks for it.
// A blocking socket without TCP_NODELAY shows which calls were made.
func TestServePreparedSkipsSyscalls(t *testing.T) {
	rec := &recorder{echo: true}
	ts := startServer(t, Config{Handler: rec})
	lfd := tcpListener(t)
	given := &net.TCPAddr{IP: net.IPv4(203, 0, 113, 9), Port: 40001}
	for i, prepared := range []bool{false, true} {
		sa, err := unix.Getsockname(lfd)
		if err != nil {
			t.Fatal(err)
		}
		cfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer closeFD(cfd)
		if err := unix.Connect(cfd, sa); err != nil {
			t.Fatal(err)
		}
		sfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC) // blocking, Nagle on
		if err != nil {
			t.Fatal(err)
		}
		// A dup to inspect the socket with: it shares the open file.
		probe, err := unix.Dup(sfd)
		if err != nil {
			t.Fatal(err)
		}
		defer closeFD(probe)
		if prepared {
			err = ts.ServePrepared(sfd, nil, given, Nonblocking|NoDelay)
		} else {
			err = ts.Serve(sfd, nil, nil)
		}
		if err != nil {
			t.Fatal(err)
		}
		fl, err := unix.FcntlInt(uintptr(probe), unix.F_GETFL, 0)
		if err != nil {
			t.Fatal(err)
		}
		nodelay, err := unix.GetsockoptInt(probe, unix.IPPROTO_TCP, unix.TCP_NODELAY)
		if err != nil {
			t.Fatal(err)
		}
		if got := fl&unix.O_NONBLOCK != 0; got == prepared {
			t.Errorf("prepared=%v: O_NONBLOCK %v", prepared, got)
		}
		if got := nodelay != 0; got == prepared {
			t.Errorf("prepared=%v: TCP_NODELAY %v", prepared, got)
		}
		if prepared {
			// Now keep the promise, before the client writes anything.
			if err := unix.SetNonblock(probe, true); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := upgradeClient(cfd); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 5*time.Second, "open", func() bool { return rec.openCount() == i+1 })
		want := given.String()
		if !prepared {
			lsa, _ := unix.Getsockname(cfd)
			want = (&net.TCPAddr{IP: lsa.(*unix.SockaddrInet4).Addr[:], Port: lsa.(*unix.SockaddrInet4).Port}).String()
		}
		if got := rec.conn(i).RemoteAddr().String(); got != want {
			t.Errorf("prepared=%v: remote %s, want %s", prepared, got, want)
		}
	}
}
