package middleware

import (
	"context"
	"net/netip"
	"sync/atomic"
	"time"
)

// ---- conn_limit ----------------------------------------------------------
//
// conn_limit caps the open sockets per client IP (checked at handshakeWS)
// and per user (handshakeSC, and authenticate when the rule is in inbound).
//
// scope: worker counts this worker's sockets (connCounts in state.go): no
// round trip, but with W workers a user can hold W × per_user sockets.
//
// scope: cluster (the default) counts every worker's sockets: each socket
// that completed its handshake joins a key ("ip/<addr>", "user/<sub>") in a
// ConnCounter — the worker's is presence on the key's owning broker — and
// the check asks the counter. The count is never taken below this worker's
// own count, which is exact. When the counter fails (no broker reachable,
// timeout), the rule falls back to the worker's own count: it fails open to
// the per-worker limit, logs a warning (rate-limited) and counts the
// failure (Chain.ConnLimitUnavailable). Without a ConnCounter (config check,
// a worker without brokers) the cluster scope is the worker scope.
//
// Concurrent handshakes: the check keeps a place for the socket (Hold)
// until it opens, on this worker and, when the counter is a ConnReserver
// (the worker's is), in the cluster registry under a reservation id: the
// owning broker counts and joins in one step, so simultaneous connects on
// any workers never pass the limit. Without a reserver (and for an open
// socket re-authenticating as its own user, which holds its place already)
// the broker count and the join are separate: handshakes on different
// workers checked before the others' joins arrived all pass, up to
// limit-1+K for K of them, at most limit per worker.

// ConnCounter is the cluster-wide registry of open sockets behind
// conn_limit with scope: cluster. Join and Leave must not block (queue the
// change); Count asks the current number of sockets joined under key.
// Entries of a process that died must disappear on their own (the brokers
// drop a dead worker's presence).
type ConnCounter interface {
	Join(key, conn string)
	Leave(key, conn string)
	Count(ctx context.Context, key string) (int, error)
}

// ConnReserver is a ConnCounter that joins and counts in one step, as the
// check of a handshake under way: Reserve queues the join of conn under key
// before it returns (so a Leave made later is ordered after it), and wait
// returns how many other entries key held when the join was applied. Since
// the owner of key applies the joins of every worker one at a time, of K
// concurrent handshakes at most limit pass, whatever workers they are on.
type ConnReserver interface {
	Reserve(key, conn string) (wait func(ctx context.Context) (others int, err error), err error)
}

// ConnKeyIP and ConnKeyUser are the ConnCounter keys of an address and a
// user.
func ConnKeyIP(a netip.Addr) string { return "ip/" + a.Unmap().String() }

// ConnKeyUser is the ConnCounter key of a user (token sub).
func ConnKeyUser(user string) string { return "user/" + user }

// defaultConnLimitTimeout bounds one count query.
const defaultConnLimitTimeout = 500 * time.Millisecond

// counterBox holds the ConnCounter; one per chain lineage (reloads share it).
type counterBox struct {
	p           atomic.Pointer[ConnCounter]
	unavailable atomic.Uint64 // count queries that failed (fell back to the worker's count)
}

func (b *counterBox) get() ConnCounter {
	if p := b.p.Load(); p != nil {
		return *p
	}
	return nil
}

// SetConnCounter gives the chain (and every chain that replaces it) the
// cluster-wide registry for conn_limit scope: cluster. The first counter
// set stays; later calls are ignored.
func (c *Chain) SetConnCounter(cc ConnCounter) {
	if cc != nil {
		c.shared.counter.p.CompareAndSwap(nil, &cc)
	}
}

// WantsConnCounter reports whether the chain has a cluster-scoped
// conn_limit rule and no ConnCounter yet (cheap: the worker asks per
// session).
func (c *Chain) WantsConnCounter() bool {
	return (c.clusterIP || c.clusterUser) && c.shared.counter.p.Load() == nil
}

// ConnLimitUnavailable counts the conn_limit count queries that failed and
// fell back to this worker's own count (since the first chain of the
// lineage).
func (c *Chain) ConnLimitUnavailable() uint64 { return c.shared.counter.unavailable.Load() }

type connLimitRule struct {
	perIP, perUser int
	cluster        bool
	timeout        time.Duration
	box            *counterBox
	err            errSpec
}

func buildConnLimit(b *builder, v any) (rule, []Action) {
	o, ok := newOpts(b.p, b.key, v)
	if !ok {
		return nil, nil
	}
	r := &connLimitRule{err: newErrSpec("ConnectionLimitError", "Too many connections", 429),
		cluster: true, timeout: defaultConnLimitTimeout, box: b.c.shared.counter}
	if n, ok := o.intv("per_ip"); ok {
		if n < 1 {
			b.p.add(o.sub("per_ip"), "must be at least 1")
		}
		r.perIP = int(n)
	}
	if n, ok := o.intv("per_user"); ok {
		if n < 1 {
			b.p.add(o.sub("per_user"), "must be at least 1")
		}
		r.perUser = int(n)
	}
	if s, ok := o.str("scope"); ok {
		switch s {
		case "cluster":
		case "worker":
			r.cluster = false
		default:
			b.p.add(o.sub("scope"), "expected cluster or worker, got %q", s)
		}
	}
	if d, ok := o.duration("timeout"); ok {
		if d <= 0 {
			b.p.add(o.sub("timeout"), "must be positive")
		} else {
			r.timeout = d
		}
		if !r.cluster {
			b.p.add(o.sub("timeout"), "only with scope: cluster (scope: worker asks no broker)")
		}
	}
	r.err = readErrSpec(o, r.err)
	o.finish("per_ip", "per_user", "scope", "timeout", "error")
	if r.perIP == 0 && r.perUser == 0 {
		b.p.add(b.key, "set per_ip, per_user or both")
	}
	switch b.stage {
	case StageHandshake:
		acts := []Action{HandshakeWS, HandshakeSC}
		r.mark(b.c, acts...)
		return r, acts
	case StageInbound:
		if r.perIP > 0 {
			b.p.add(o.sub("per_ip"), "per_ip is checked at the handshake: put it in middleware.handshake")
		}
		r.mark(b.c, Authenticate)
		return r, []Action{Authenticate}
	}
	b.p.add(b.key, "conn_limit belongs in middleware.handshake")
	return nil, nil
}

// mark tells the chain which actions keep places and which keys its
// sockets must join.
func (r *connLimitRule) mark(c *Chain, acts ...Action) {
	for _, a := range acts {
		c.holds[a] = true
	}
	if !r.cluster {
		return
	}
	c.clusterIP = c.clusterIP || r.perIP > 0
	c.clusterUser = c.clusterUser || r.perUser > 0
}

// wants reports whether in needs the cluster count (a round trip); when it
// does not, Run uses the synchronous local check.
func (r *connLimitRule) wants(in *Input) bool {
	if !r.cluster || r.box.p.Load() == nil {
		return false
	}
	switch in.Action {
	case HandshakeWS:
		return r.perIP > 0 && in.ip().IsValid()
	case HandshakeSC, Authenticate:
		return r.perUser > 0 && in.Socket != nil && in.Socket.UserID != ""
	}
	return false
}

// fast is the check without a round trip (slowFallback).
func (r *connLimitRule) fast(c *Chain, in *Input) (Decision, bool) { return r.local(c, in) }

func (r *connLimitRule) check(c *Chain, in *Input) (Decision, bool) {
	return r.call(context.Background(), c, in)
}

// local checks this worker's counts (scope: worker, and the fallback).
func (r *connLimitRule) local(c *Chain, in *Input) (Decision, bool) {
	cc := c.shared.conns
	switch in.Action {
	case HandshakeWS:
		if r.perIP > 0 {
			if ip := in.ip(); ip.IsValid() && !cc.admitIP(ip.Unmap(), r.perIP, in.Hold) {
				return r.err.decide(in), true
			}
		}
	case HandshakeSC, Authenticate:
		if r.perUser > 0 && in.Socket != nil && in.Socket.UserID != "" {
			if !cc.admitUser(in.Socket, r.perUser, in.Hold) {
				return r.err.decide(in), true
			}
		}
	}
	return Decision{}, false
}

func (r *connLimitRule) call(ctx context.Context, c *Chain, in *Input) (Decision, bool) {
	if !r.wants(in) {
		return r.local(c, in)
	}
	counter := r.box.get()
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	var key string
	var limit int
	self := false
	if in.Action == HandshakeWS {
		key, limit = ConnKeyIP(in.ip()), r.perIP
	} else {
		key, limit = ConnKeyUser(in.Socket.UserID), r.perUser
		// A socket re-authenticating as its own user is in the count.
		if st := in.Socket.state; st != nil {
			st.mu.Lock()
			self = st.cUser == key
			st.mu.Unlock()
		}
	}
	var n int
	var err error
	if cr, ok := counter.(ConnReserver); ok && in.Hold != nil && !self {
		n, err = in.Hold.reserve(ctx, cr, counter, key)
	} else {
		n, err = counter.Count(ctx, key)
	}
	if err != nil {
		r.box.unavailable.Add(1)
		if ok, suppressed := c.logLim.Allow(c.now()); ok {
			args := []any{"key", key, "error", err}
			if suppressed > 0 {
				args = append(args, "suppressed", suppressed)
			}
			c.log.Warn("conn_limit: cluster count unavailable, checking this worker's count only", args...)
		}
		return r.local(c, in)
	}
	if self && n > 0 {
		n--
	}
	if n >= limit {
		return r.err.decide(in), true
	}
	// The worker's own count is exact and part of the cluster's (the
	// broker may not have seen the latest joins yet).
	return r.local(c, in)
}
