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
	"github.com/shoalhq/shoal/proto/control"
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

// startFrontLocked binds the public ports when the node has no balancer and
// returns the bound addresses (control.AddrPublic, control.AddrTLS).
func (c *Child) startFrontLocked(ctx context.Context, name string, cfg configs.Config) (map[string]string, error) {
	front := balancer.NewLocal(c.log.Named("listen"), balancer.LocalOptions{
		Plain: func(fd int) { c.serve(fd, nil, nil) },
		Proxy: c.localProxy,
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
func (c *Child) localProxy(src, _ net.Addr) (*net.UnixConn, error) {
	if max := c.cfg.Worker.MaxConnections; max > 0 && c.srv.Len() >= max {
		c.refused.Add(1)
		return nil, errFull
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
	c.serve(fds[0], nil, src)
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
