package supervisor

import (
	"context"
	"net"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/shoalhq/shoal/configs"
)

func listenReusePort(addr string) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	return lc.Listen(context.Background(), "tcp", addr)
}

// With balancers: 0 and port 0, one port is reserved for every worker: they
// can all bind it with SO_REUSEPORT, nobody else can, and a reloaded config
// (still saying port 0) gets the same port.
func TestReservePortsForWorkers(t *testing.T) {
	zero, one := 0, 1
	cfg := configs.Default()
	cfg.Cluster.Balancers = &zero
	cfg.Listen.Public = "127.0.0.1:0"
	cfg.Listen.TLS.Listen = "127.0.0.1:0"

	r, err := reservePorts(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer r.release()
	got := cfg
	r.apply(&got)
	if got.Listen.Public == cfg.Listen.Public || got.Listen.TLS.Listen != got.Listen.Public {
		t.Fatalf("pinned public %q tls %q: want one reserved port for both (same address)", got.Listen.Public, got.Listen.TLS.Listen)
	}
	var lns []net.Listener
	for i := range 2 {
		ln, err := listenReusePort(got.Listen.Public)
		if err != nil {
			t.Fatalf("worker %d binding the reserved port: %v", i+1, err)
		}
		lns = append(lns, ln)
	}
	if ln, err := net.Listen("tcp", got.Listen.Public); err == nil {
		ln.Close()
		t.Fatal("a process without SO_REUSEPORT took the reserved port")
	}
	for _, ln := range lns {
		ln.Close()
	}
	again := cfg
	r.apply(&again)
	if again.Listen.Public != got.Listen.Public {
		t.Fatalf("second apply %q, first %q", again.Listen.Public, got.Listen.Public)
	}

	// Nothing to reserve: a balancer binds port 0 itself, or the port is fixed.
	cfg.Cluster.Balancers = &one
	if r, err := reservePorts(cfg); r != nil || err != nil {
		t.Fatalf("balancers: 1 reserved %v, %v", r, err)
	}
	cfg.Cluster.Balancers = &zero
	cfg.Listen.Public, cfg.Listen.TLS.Listen = lns[0].Addr().String(), ""
	if r, err := reservePorts(cfg); r != nil || err != nil {
		t.Fatalf("fixed port reserved %v, %v", r, err)
	}
}

// A re-read config cannot switch balancing modes or, with the workers on
// the ports, move them under a rolling reload.
func TestKeepRunningLayout(t *testing.T) {
	zero, one := 0, 1
	old := configs.Default()
	old.Cluster.Balancers = &zero
	old.Listen.Public, old.Listen.TLS.Listen = "127.0.0.1:4100", "127.0.0.1:4101"
	next := configs.Default()
	next.Cluster.Balancers = &one
	next.Listen.Public, next.Listen.TLS.Listen = "127.0.0.1:4200", ""
	next.Listen.TLS.Cert = "new.pem"
	keepRunningLayout(old, &next)
	if next.Cluster.BalancerCount() != 0 || next.Listen.Public != old.Listen.Public || next.Listen.TLS.Listen != old.Listen.TLS.Listen {
		t.Fatalf("kept %d %q %q", next.Cluster.BalancerCount(), next.Listen.Public, next.Listen.TLS.Listen)
	}
	if next.Listen.TLS.Cert != "new.pem" {
		t.Fatal("a new certificate was dropped")
	}
	// With a balancer, addresses pass through (the balancer refuses a move).
	old.Cluster.Balancers = &one
	next.Listen.Public = "127.0.0.1:4200"
	keepRunningLayout(old, &next)
	if next.Listen.Public != "127.0.0.1:4200" || next.Cluster.BalancerCount() != 1 {
		t.Fatalf("balancer mode: %q %d", next.Listen.Public, next.Cluster.BalancerCount())
	}
}
