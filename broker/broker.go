// Package broker is the broker process role: it owns channels. Workers link
// to every broker (proto/link frames over a unix socket, or TCP across
// hosts), register interest per channel with the channel's owner, and
// publish to it; the broker gives each publish the channel's next offset and
// queues one msg frame per interested worker — never one per subscriber.
//
// Which broker owns a channel is decided by the workers (brokerclient, by
// rendezvous hashing over the live broker set); a broker serves whatever it
// is asked. See docs/brokers.md.
package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/internal/procstat"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/proto/link"
)

// Child is the broker's control-plane implementation.
type Child struct {
	log hclog.Logger

	mu      sync.Mutex
	state   string
	name    string
	srv     *Server
	ring    Ring // nil until the ring is started (or when it is disabled)
	stopped bool
}

// Ring is what the broker needs from its gossip membership (package ring);
// an interface so the broker runs, and is tested, without one.
type Ring interface {
	Leave(timeout time.Duration) error
	Shutdown() error
}

var _ control.Child = (*Child)(nil)

// New returns the broker role, ready to be served by control.Serve.
func New(log hclog.Logger) *Child {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &Child{log: log, state: control.StateStarting}
}

// DecodeConfig reads StartParams.Config over the defaults, so a partial or
// empty config still yields every limit.
func DecodeConfig(b []byte) (configs.Config, error) {
	cfg := configs.Default()
	if len(b) == 0 {
		return cfg, nil
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return cfg, fmt.Errorf("broker: decoding config: %w", err)
	}
	return cfg, nil
}

// LinkPath is where a broker's unix link socket lives.
func LinkPath(runDir, name string) string { return filepath.Join(runDir, name+".link.sock") }

// Start decodes the config and listens for worker links.
func (c *Child) Start(ctx context.Context, p control.StartParams) (control.StartResult, error) {
	cfg, err := DecodeConfig(p.Config)
	if err != nil {
		return control.StartResult{}, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.srv != nil {
		return control.StartResult{}, fmt.Errorf("broker %s: started twice", p.Name)
	}
	addr := "unix:" + LinkPath(p.RunDir, p.Name)
	ln, err := link.Listen(addr)
	if err != nil {
		return control.StartResult{}, fmt.Errorf("broker %s: %w", p.Name, err)
	}
	srv := NewServer(ServerConfig{
		Name:     p.Name,
		MaxFrame: int(cfg.Protocol.MaxPayload) + link.Overhead,
		Logger:   c.log.Named("link"),
	})
	if err := srv.Serve(ln); err != nil {
		ln.Close()
		srv.Close(ctx)
		return control.StartResult{}, err
	}
	c.srv, c.name, c.state = srv, p.Name, control.StateReady
	c.log.Info("broker listening", "link", addr, "epoch", srv.Epoch())
	return control.StartResult{Addrs: map[string]string{control.AddrLink: addr}}, nil
}

// Server returns the link server (nil before Start); for tests and the ring.
func (c *Child) Server() *Server {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.srv
}

func (c *Child) Health(ctx context.Context) (control.Health, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return control.Health{State: c.state}, nil
}

func (c *Child) Stats(ctx context.Context) (control.Stats, error) {
	var st control.Stats
	procstat.Fill(&st)
	srv := c.Server()
	if srv == nil {
		return st, nil
	}
	s := srv.Stats()
	st.Connections = s.Links
	st.MessagesIn = s.Publishes
	st.MessagesOut = s.Deliveries
	st.Counters = map[string]int64{
		"channels":   s.Channels,
		"links":      s.Links,
		"publishes":  s.Publishes,
		"deliveries": s.Deliveries,
		"slow_links": s.SlowLinks,
		"bad_frames": s.BadFrames,
	}
	return st, nil
}

// SetTopology is accepted and ignored: workers, not brokers, act on the
// broker set.
func (c *Child) SetTopology(ctx context.Context, t control.Topology) error { return nil }

// Drain leaves the ring and closes every worker link (flushing what is
// queued within timeout); workers then move this broker's channels once the
// supervisor's topology (or the ring) drops it.
func (c *Child) Drain(ctx context.Context, timeout time.Duration) error {
	c.mu.Lock()
	c.state = control.StateDraining
	srv, r := c.srv, c.ring
	c.mu.Unlock()
	if r != nil {
		if err := r.Leave(timeout); err != nil {
			c.log.Warn("leaving the ring", "error", err)
		}
	}
	if srv != nil {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		srv.Close(ctx)
	}
	return nil
}

// Stop closes everything; idempotent.
func (c *Child) Stop(ctx context.Context) error {
	c.mu.Lock()
	if c.stopped {
		c.mu.Unlock()
		return nil
	}
	c.stopped = true
	c.state = control.StateDead
	srv, r := c.srv, c.ring
	c.mu.Unlock()
	var err error
	if r != nil {
		if e := r.Shutdown(); e != nil {
			err = fmt.Errorf("broker: shutting down the ring: %w", e)
		}
	}
	if srv != nil {
		ctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		srv.Close(ctx)
	}
	return err
}
