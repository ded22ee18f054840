package balancer

import (
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/shoalhq/shoal/handoff"
)

// The worker is told the client's address and the socket's flags in the
// handoff message, so it need not ask the socket (getpeername, fcntl,
// setsockopt per connection). startFakeWorker checks every claim against
// the socket itself.
func TestPlainHandoffCarriesMeta(t *testing.T) {
	for _, shared := range []bool{false, true} {
		name := "own port"
		if shared {
			name = "port shared with TLS"
		}
		t.Run(name, func(t *testing.T) {
			w1 := startFakeWorker(t, t.TempDir(), "worker-1")
			cfg := testConfig(t, shared)
			if shared {
				cfg.Listen.TLS.Listen = cfg.Listen.Public // the sniffing accept loop
			}
			b := startBalancer(t, cfg, topology(1, w1.peer(101, 0)))
			_, local, err := get(t, "http://"+b.public+"/", "127.0.0.3", nil)
			if err != nil {
				t.Fatal(err)
			}
			w1.mu.Lock()
			metas := append([]handoff.Meta(nil), w1.metas...)
			w1.mu.Unlock()
			want := handoff.Meta{Peer: netip.MustParseAddrPort(local), Nonblock: true, NoDelay: true}
			if len(metas) != 1 || metas[0] != want {
				t.Fatalf("metas %+v, want [%+v]", metas, want)
			}
		})
	}
}

// Linux copies TCP_NODELAY from a listening socket to the sockets accept
// returns: rawListener sets it once so that no one sets it per connection.
func TestAcceptedSocketsInheritNoDelay(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f, err := rawListener(ln)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	nfd := -1
	var sa syscall.Sockaddr
	var aerr error
	deadline := time.Now().Add(5 * time.Second)
	for nfd < 0 && time.Now().Before(deadline) { // bounded: the dial completed, the accept queue has it
		if err := rc.Control(func(fd uintptr) {
			nfd, sa, aerr = syscall.Accept4(int(fd), syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK)
		}); err != nil {
			t.Fatal(err)
		}
		if aerr == syscall.EAGAIN {
			time.Sleep(time.Millisecond)
			continue
		}
		if aerr != nil {
			t.Fatal(aerr)
		}
	}
	if nfd < 0 {
		t.Fatal("nothing to accept")
	}
	defer syscall.Close(nfd)
	v, err := syscall.GetsockoptInt(nfd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY)
	if err != nil || v == 0 {
		t.Fatalf("accepted socket: TCP_NODELAY %d, %v; want it inherited from the listener", v, err)
	}
	if got, want := sockaddrPort(sa), netip.MustParseAddrPort(c.LocalAddr().String()); got != want {
		t.Fatalf("peer %s, want %s", got, want)
	}
}

func TestSockaddrPort(t *testing.T) {
	cases := []struct {
		sa   syscall.Sockaddr
		want string
	}{
		{&syscall.SockaddrInet4{Port: 80, Addr: [4]byte{10, 0, 0, 1}}, "10.0.0.1:80"},
		{&syscall.SockaddrInet6{Port: 443, Addr: [16]byte{0x20, 0x01, 0x0d, 0xb8, 15: 1}}, "[2001:db8::1]:443"},
		{&syscall.SockaddrInet6{Port: 443, ZoneId: 2, Addr: [16]byte{0xfe, 0x80, 15: 1}}, ""},
		{&syscall.SockaddrUnix{Name: "/x"}, ""},
		{nil, ""},
	}
	for _, c := range cases {
		got := sockaddrPort(c.sa)
		if (c.want == "" && got.IsValid()) || (c.want != "" && got.String() != c.want) {
			t.Errorf("%#v: %s, want %q", c.sa, got, c.want)
		}
	}
}
