package supervisor

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/shoalhq/shoal/configs"
)

// Port 0 with kernel balancing (cluster.balancers: 0). Every worker binds
// the public ports itself with SO_REUSEPORT; left at port 0, each would get
// a different random port. So before any worker starts, the supervisor
// binds each such address once with SO_REUSEPORT, without listening, and
// keeps that socket until it exits: the kernel routes connections only to
// listening sockets, so the reservation never receives one, but the port
// stays taken for everyone except processes of the same user that also set
// SO_REUSEPORT, i.e. the workers, including the ones started later by a
// restart or a rolling reload. The config the children get names the port.

// portReservation holds the reserved sockets and the addresses they pin.
type portReservation struct {
	fds []int
	// pins maps a configured address with port 0 to the reserved host:port.
	pins map[string]string
}

// reservePorts reserves a port for every listen address of cfg that asks
// for port 0 when the workers bind the public ports themselves. It returns
// nil when there is nothing to reserve.
func reservePorts(cfg configs.Config) (*portReservation, error) {
	if cfg.Cluster.BalancerCount() != 0 {
		return nil, nil
	}
	r := &portReservation{pins: map[string]string{}}
	for _, kv := range []struct{ key, addr string }{
		{"listen.public", cfg.Listen.Public},
		{"listen.tls.listen", cfg.Listen.TLS.Listen},
	} {
		if kv.addr == "" || r.pins[kv.addr] != "" {
			continue // unset, or the same address as listen.public (shared port)
		}
		host, port, err := net.SplitHostPort(kv.addr)
		if err != nil || port != "0" {
			continue // configs validated it; a fixed port needs no pin
		}
		bound, fd, err := reserveReusePort(host)
		if err != nil {
			r.release()
			return nil, fmt.Errorf("%s %s: reserving a port for the workers: %w", kv.key, kv.addr, err)
		}
		r.fds = append(r.fds, fd)
		r.pins[kv.addr] = bound
	}
	if len(r.pins) == 0 {
		return nil, nil
	}
	return r, nil
}

// apply rewrites cfg's port-0 listen addresses to the reserved ports.
func (r *portReservation) apply(cfg *configs.Config) {
	if r == nil {
		return
	}
	if v := r.pins[cfg.Listen.Public]; v != "" {
		cfg.Listen.Public = v
	}
	if v := r.pins[cfg.Listen.TLS.Listen]; v != "" {
		cfg.Listen.TLS.Listen = v
	}
}

func (r *portReservation) release() {
	if r == nil {
		return
	}
	for _, fd := range r.fds {
		_ = unix.Close(fd)
	}
	r.fds = nil
}

// reserveReusePort binds host:0 with SO_REUSEPORT (no listen) and returns
// the bound host:port and the socket.
func reserveReusePort(host string) (string, int, error) {
	ip := net.ParseIP(host)
	if host == "" || host == "localhost" {
		ip = net.IPv4zero
		if host == "localhost" {
			ip = net.IPv4(127, 0, 0, 1)
		}
	}
	if ip == nil {
		addrs, err := net.LookupIP(host)
		if err != nil || len(addrs) == 0 {
			return "", -1, fmt.Errorf("resolving %s: %w", host, err)
		}
		ip = addrs[0]
	}
	family := unix.AF_INET6
	var sa unix.Sockaddr
	if ip4 := ip.To4(); ip4 != nil {
		family = unix.AF_INET
		a := &unix.SockaddrInet4{}
		copy(a.Addr[:], ip4)
		sa = a
	} else {
		a := &unix.SockaddrInet6{}
		copy(a.Addr[:], ip.To16())
		sa = a
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return "", -1, fmt.Errorf("socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		_ = unix.Close(fd)
		return "", -1, fmt.Errorf("SO_REUSEPORT: %w", err)
	}
	if err := unix.Bind(fd, sa); err != nil {
		_ = unix.Close(fd)
		return "", -1, fmt.Errorf("bind: %w", err)
	}
	got, err := unix.Getsockname(fd)
	if err != nil {
		_ = unix.Close(fd)
		return "", -1, fmt.Errorf("getsockname: %w", err)
	}
	var port int
	switch a := got.(type) {
	case *unix.SockaddrInet4:
		port = a.Port
	case *unix.SockaddrInet6:
		port = a.Port
	}
	return net.JoinHostPort(host, strconv.Itoa(port)), fd, nil
}

// migrateReqHint explains, once at start with balancers: 0, what a worker
// closing its listener (drain, rolling reload) does to connections still in
// its accept queue on this kernel: without net.ipv4.tcp_migrate_req (Linux
// 5.14+) they are reset rather than moved to another worker's socket.
func migrateReqHint(cfg configs.Config) string {
	if cfg.Cluster.BalancerCount() != 0 {
		return ""
	}
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
	if err == nil && strings.TrimSpace(string(b)) == "1" {
		return ""
	}
	return "balancers: 0: a draining worker's not yet accepted connections are reset (the client retries); " +
		"sysctl net.ipv4.tcp_migrate_req=1 (Linux 5.14+) moves them to another worker instead"
}

// keepRunningLayout keeps, in a re-read config, what the running node was
// laid out with and children must agree on: cluster.balancers (workers
// started by a rolling reload with another value would either fight the
// balancer for the port or leave it unserved) and, when the workers bind
// the public ports themselves, those addresses (moving a port needs a
// restart of shoal run, as with a balancer). The caller warns about the
// difference first.
func keepRunningLayout(old configs.Config, cfg *configs.Config) {
	cfg.Cluster.Balancers = old.Cluster.Balancers
	if old.Cluster.BalancerCount() == 0 {
		cfg.Listen.Public = old.Listen.Public
		cfg.Listen.TLS.Listen = old.Listen.TLS.Listen
	}
}
