package worker

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/shoalhq/shoal/api"
)

// Cluster-wide bans. Each worker keeps the bans in an api.MemoryBans; a ban
// or unban made through any worker's API is published on the internal
// channel "#bans", which every worker follows, and applied by each (the
// asker included, when its own message comes back). A worker that starts
// publishes {"op":"sync"}; every worker that holds bans answers with its
// list, so a restarted worker enforces the bans of the running cluster.
// Bans are checked at the handshake: the user (token sub) and the client's
// address. Persistence: bans live as long as one worker of the cluster
// does; a restart of the whole cluster forgets them (docs/api.md).

// ClusterBans is the worker's api.BanStore.
type ClusterBans struct {
	e     *Engine
	local *api.MemoryBans
}

var _ api.BanStore = (*ClusterBans)(nil)

// NewClusterBans returns the ban store of e's worker; set it as
// EngineConfig.Bans so the engine applies what other workers publish.
func NewClusterBans() *ClusterBans {
	return &ClusterBans{local: api.NewMemoryBans(nil)}
}

// wireBan is a ban on the "#bans" channel.
type wireBan struct {
	User    string    `json:"user,omitempty"`
	IP      string    `json:"ip,omitempty"`
	Reason  string    `json:"reason,omitempty"`
	Created time.Time `json:"created"`
	Expires time.Time `json:"expires,omitzero"`
}

func toWire(b api.Ban) wireBan {
	w := wireBan{User: b.User, Reason: b.Reason, Created: b.Created, Expires: b.Expires}
	if b.IP.IsValid() {
		w.IP = b.IP.String()
	}
	return w
}

func fromWire(w wireBan) (api.Ban, error) {
	b := api.Ban{User: w.User, Reason: w.Reason, Created: w.Created, Expires: w.Expires}
	if w.IP != "" {
		p, err := netip.ParsePrefix(w.IP)
		if err != nil {
			return b, fmt.Errorf("ban ip %q: %w", w.IP, err)
		}
		b.IP = p
	}
	if b.User == "" && !b.IP.IsValid() {
		return b, fmt.Errorf("ban without user or ip")
	}
	return b, nil
}

// Ban stores b here and tells every worker.
func (c *ClusterBans) Ban(ctx context.Context, b api.Ban) error {
	if err := c.local.Ban(ctx, b); err != nil {
		return err
	}
	if c.e != nil && c.e.cfg.Broker != nil {
		c.e.publishControl(bansChannel, ctrlMsg{Op: "ban", From: c.e.cfg.Name, Bans: []wireBan{toWire(b)}})
	}
	return nil
}

// Unban removes the ban here and on every worker.
func (c *ClusterBans) Unban(ctx context.Context, t api.BanTarget) (bool, error) {
	ok, err := c.local.Unban(ctx, t)
	if err != nil {
		return ok, err
	}
	if c.e != nil && c.e.cfg.Broker != nil {
		w := wireBan{User: t.User}
		if t.IP.IsValid() {
			w.IP = t.IP.String()
		}
		c.e.publishControl(bansChannel, ctrlMsg{Op: "unban", From: c.e.cfg.Name, Bans: []wireBan{w}})
	}
	return ok, nil
}

// Bans lists the bans this worker enforces.
func (c *ClusterBans) Bans(ctx context.Context) ([]api.Ban, error) { return c.local.Bans(ctx) }

// Banned reports the ban on user or addr (the handshake's check).
func (c *ClusterBans) Banned(user string, addr netip.Addr) (api.Ban, bool) {
	return c.local.Banned(user, addr)
}

// applyBanControl applies a message of the "#bans" channel.
func (e *Engine) applyBanControl(c ctrlMsg) {
	ctx := context.Background()
	store := e.cfg.Bans
	switch c.Op {
	case "disconnect_ip":
		p, err := netip.ParsePrefix(c.Prefix)
		if err != nil {
			e.log.Warn("malformed disconnect_ip", "prefix", c.Prefix, "error", err)
			return
		}
		n := e.disconnectLocal(func(s *Session) bool { return p.Contains(s.remoteIP()) }, c.Code, c.Reason)
		if c.Reply != "" && c.ID != "" {
			e.publishControl(c.Reply, ctrlMsg{Op: "reply", ID: c.ID, N: n})
		}
	case "ban":
		if store == nil || c.From == e.cfg.Name { // ours is stored already
			return
		}
		for _, w := range c.Bans {
			b, err := fromWire(w)
			if err != nil {
				e.log.Warn("malformed ban", "error", err)
				continue
			}
			if err := store.local.Ban(ctx, b); err != nil {
				e.log.Warn("storing a cluster ban", "error", err)
			}
		}
	case "unban":
		if store == nil || c.From == e.cfg.Name {
			return
		}
		for _, w := range c.Bans {
			t := api.BanTarget{User: w.User}
			if w.IP != "" {
				p, err := netip.ParsePrefix(w.IP)
				if err != nil {
					continue
				}
				t.IP = p
			}
			_, _ = store.local.Unban(ctx, t)
		}
	case "sync":
		if store == nil || c.From == e.cfg.Name {
			return
		}
		list, _ := store.local.Bans(ctx)
		if len(list) == 0 {
			return
		}
		out := make([]wireBan, 0, len(list))
		for _, b := range list {
			out = append(out, toWire(b))
		}
		// Answered as "ban" messages: every worker merges them (a ban
		// already held is simply replaced by the same one).
		e.publishControl(bansChannel, ctrlMsg{Op: "ban", From: e.cfg.Name, Bans: out})
	}
}

// banned is the handshake's check; reason is the ban's.
func (e *Engine) banned(user string, addr netip.Addr) (string, bool) {
	if e.cfg.Bans == nil {
		return "", false
	}
	b, ok := e.cfg.Bans.Banned(user, addr)
	if !ok {
		return "", false
	}
	if b.Reason == "" {
		return "Banned", true
	}
	return b.Reason, true
}
