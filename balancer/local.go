package balancer

import (
	"net"
	"syscall"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/handoff"
)

// Local mode (cluster.balancers: 0): a worker runs this package's front end
// in its own process instead of a separate balancer. Every worker binds the
// public ports with SO_REUSEPORT and the kernel spreads new connections over
// them; each worker's front end then delivers what it accepted to its own
// WebSocket server instead of choosing a worker:
//
//   - plain connections: the accepted fd goes to LocalOptions.Plain (no
//     handoff hop), with what accept established (handoff.Meta);
//   - TLS connections: terminated exactly as in the balancer (same
//     certificates, reload, dev certificate shared through its lock file,
//     same epoll proxy with no idle buffer), and the plaintext is proxied
//     into the stream LocalOptions.Proxy returns (a socketpair whose other
//     end the worker serves), with the client's address passed directly
//     rather than in a PROXY header.
//
// Start, Reload, Drain, Stop and Stats behave as for the balancer role, so
// the worker drives its front end like the supervisor drives a balancer.

// LocalOptions connects a worker's front end to the worker.
type LocalOptions struct {
	// Plain takes an accepted plain connection; the callee owns fd (non-
	// blocking, close-on-exec) and closes it when done or when it refuses.
	// m says what is already known of it: its peer address (if zero, ask
	// the socket) and that O_NONBLOCK and TCP_NODELAY are set.
	Plain func(fd int, m handoff.Meta)
	// Proxy opens a stream into the worker for a terminated TLS connection
	// from src to dst and returns the front end's end of it: the client's
	// plaintext is written to it and the worker's answer read from it (the
	// worker serves the other end). An error refuses the connection (it is
	// closed after its handshake; counted as local_refused).
	Proxy func(src, dst net.Addr) (*net.UnixConn, error)
}

// ctrLocalRefused counts TLS connections the local worker refused (full, or
// stopping).
const ctrLocalRefused = "local_refused"

// NewLocal returns a front end for a worker with cluster.balancers: 0. Its
// listeners always set SO_REUSEPORT (the workers share the ports).
func NewLocal(log hclog.Logger, opts LocalOptions) *Child {
	c := New(log)
	c.local = &opts
	// A proxied connection costs this process three fds here: the client's
	// socket and both ends of the socketpair.
	c.proxyLimit = fdLimitProxiesPer(3)
	return c
}

// localPlain gives a plain connection to the local worker. The conn stays
// the caller's: the worker gets a duplicate of its fd.
func (c *Child) localPlain(sc syscall.Conn, m handoff.Meta) {
	nfd, err := dupConn(sc)
	if err != nil {
		if isLocalExhaustion(err) {
			c.stats.add(ctrFDExhausted, 1)
		}
		return
	}
	c.stats.add(ctrHanded, 1)
	c.local.Plain(nfd, m) // a dup shares the original's open file: same flags
}

// localProxy asks the local worker for the stream of a terminated TLS
// connection.
func (c *Child) localProxy(src, dst net.Addr) *net.UnixConn {
	up, err := c.local.Proxy(src, dst)
	if err != nil {
		c.stats.add(ctrLocalRefused, 1)
		if isLocalExhaustion(err) {
			c.stats.add(ctrFDExhausted, 1)
		}
		return nil
	}
	c.stats.add(ctrProxied, 1)
	return up
}

// ActiveTLS is how many TLS connections the front end holds now
// (handshaking or proxied); each holds two fds of this process besides the
// worker's own socketpair end.
func (c *Child) ActiveTLS() int64 { return c.stats.active.Load() }

// Counters are the front end's counters (Stats without the process
// figures, which the worker reports for itself).
func (c *Child) Counters() map[string]int64 { return c.stats.snapshot() }
