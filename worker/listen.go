package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"

	"github.com/shoalhq/shoal/balancer"
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/handoff"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/worker/netpoll"
)

// Kernel balancing (cluster.balancers: 0, docs/balancer.md): the worker
// binds listen.public (and listen.tls.listen) itself with SO_REUSEPORT, so
// every worker of the node shares the ports and the kernel spreads new
// connections over them. The front end is the balancer package's, run in
// this process (balancer.NewLocal): plain connections come straight into
// netpoll from accept, with no handoff hop; TLS is terminated by the same
// code as in the balancer (certificates, SIGHUP reload, the shared
// development certificate, the epoll proxy with no idle buffer) and the
// plaintext reaches netpoll over a socketpair, so a wss:// connection costs
// the worker three fds (client socket + both socketpair ends) against one
// for ws://.

// errFull refuses a connection at worker.max_connections.
var errFull = errors.New("worker is at worker.max_connections")

// errFDs refuses a TLS connection that would take the process past its
// file limit.
var errFDs = errors.New("worker: no file descriptors left for another TLS connection")

// fdReserve is the fds kept for everything but client connections:
// listeners, broker links, epoll, logs, plugins.
const fdReserve = 200

// clientFDCap is how many fds client connections may use in this process.
func clientFDCap() int64 {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil || rl.Cur > 1<<31 {
		return 0 // unknown or unlimited: no cap of our own
	}
	return int64(rl.Cur) - fdReserve
}

// startFrontLocked binds the public ports when the node has no balancer and
// returns the bound addresses (control.AddrPublic, control.AddrTLS).
func (c *Child) startFrontLocked(ctx context.Context, name string, cfg configs.Config) (map[string]string, error) {
	// Both are set before Start starts the goroutines that read them.
	c.fdCap.Store(clientFDCap())
	var front *balancer.Child
	front = balancer.NewLocal(c.log.Named("listen"), balancer.LocalOptions{
		Plain: func(fd int, m handoff.Meta) {
			addr, p := handedOver(m)
			c.serve(fd, nil, addr, p)
		},
		Proxy: func(src, dst net.Addr) (*net.UnixConn, error) { return c.localProxy(front, src) },
	})
	data, err := json.Marshal(cfg)
	if err != nil {
		return nil, fmt.Errorf("encoding the config for the public listeners: %w", err)
	}
	res, err := front.Start(ctx, control.StartParams{Name: name, Config: data})
	if err != nil {
		_ = front.Stop(ctx)
		return nil, fmt.Errorf("listening on the public ports (cluster.balancers: 0): %w", err)
	}
	c.front = front
	out := map[string]string{}
	for _, k := range []string{control.AddrPublic, control.AddrTLS} {
		if v := res.Addrs[k]; v != "" {
			out[k] = v
		}
	}
	return out, nil
}

// localProxy is the worker's end of a TLS connection its own front end
// terminated: one end of a socketpair goes to netpoll with the client's
// address (the middleware sees the real peer, as with a PROXY header), the
// other is returned for the front end's proxy loop.
func (c *Child) localProxy(front *balancer.Child, src net.Addr) (*net.UnixConn, error) {
	if max := c.cfg.Worker.MaxConnections; max > 0 && c.srv.Len() >= max {
		c.refused.Add(1)
		return nil, errFull
	}
	// The front end caps TLS alone at a third of the file limit; with
	// plain connections in the same process the sum must fit too: every
	// socket netpoll holds is one fd, every TLS connection two more here.
	if fdCap := c.fdCap.Load(); fdCap > 0 && int64(c.srv.Len())+2*front.ActiveTLS()+2 > fdCap {
		c.refused.Add(1)
		return nil, errFDs
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair for a TLS connection: %w", err)
	}
	f := os.NewFile(uintptr(fds[1]), "tls-proxy")
	conn, err := net.FileConn(f) // dups; f is closed below either way
	_ = f.Close()
	if err != nil {
		_ = unix.Close(fds[0])
		return nil, fmt.Errorf("socketpair for a TLS connection: %w", err)
	}
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		_ = conn.Close()
		_ = unix.Close(fds[0])
		return nil, fmt.Errorf("socketpair for a TLS connection: got %T", conn)
	}
	// A non-blocking unix socket: nothing for netpoll to set.
	c.serve(fds[0], nil, src, netpoll.Nonblocking|netpoll.NoDelay)
	return uc, nil
}

// frontReloadConfig is cfg for the front end's Reload: the ports it bound at
// Start (moving them needs a restart, which the worker already logs), with
// the new certificate settings and timeouts.
func frontReloadConfig(cfg, started configs.Config) ([]byte, error) {
	cfg.Listen.Public = started.Listen.Public
	cfg.Listen.TLS.Listen = started.Listen.TLS.Listen
	return json.Marshal(cfg)
}
