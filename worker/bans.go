package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shoalhq/shoal/api"
	"github.com/shoalhq/shoal/broker/chanopts"
	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/middleware"
)

// Cluster-wide, persisted bans. Each worker keeps the bans in an
// api.MemoryBans; a ban or unban made through any worker's API is published
// on the internal channel "#bans", which every worker follows, and applied
// by each (the asker applied it at once).
//
// "#bans" is also the ban log: chanopts gives it a durable history of
// chanopts.BansHistory messages, which its owning broker keeps in bbolt and
// replicates like any durable channel. A starting worker subscribes, then
// replays that history (replayBans): from the last complete "snapshot"
// (every ban in force at the snapshot's base offset) it applies every op
// after the base, in log order. Ops are idempotent per target (ban
// replaces, unban deletes), so ops between the base and the snapshot itself
// are simply applied again; live ops that arrive during the replay are held
// and applied after it, in order. Thus bans survive a restart of the whole
// cluster, whatever the number of workers and nodes.
//
// Compaction: a worker whose own publish lands BansHistory/2 offsets past
// the last snapshot base folds the log from that snapshot and publishes a
// new snapshot (split in parts of snapshotPart bans), so the log never
// loses the ops a replay needs. Two workers may both do it; snapshots are
// idempotent too. A new epoch of the channel (its storage lost) restarts
// the count.
//
// Without a broker history (a replay that fails for its whole bounded
// retry window), the worker falls back to the old "sync": it asks the
// running workers for their lists.
//
// Bans are checked at the handshake: the user (token sub) and the client's
// address, by the `ban` middleware rule or, without one, after the
// handshake rules (docs/middleware.md).

// snapshotPart and snapshotBytes bound a snapshot message, so it stays far
// below the broker link's 1 MiB frame. Variables for tests, as is
// banLogSize (the log's history, chanopts').
var (
	snapshotPart  = 2000
	snapshotBytes = 256 << 10
	banLogSize    = uint64(chanopts.BansHistory)
	banLogPage    = 256 // messages per history read: the owner builds a page in one buffer
)

// banHistory is what the ban log needs of the broker client beyond Broker
// (*brokerclient.Client has it; tests' fakes may not).
type banHistory interface {
	History(ctx context.Context, channel string, since uint64, limit int) (brokerclient.HistoryPage, error)
}

// ClusterBans is the worker's api.BanStore.
type ClusterBans struct {
	e     *Engine
	local *api.MemoryBans

	mu        sync.Mutex
	replaying bool
	held      []ctrlMsg // live ops that arrived during the replay
	snapBase  uint64    // base offset of the newest snapshot seen
	compact   atomic.Bool
}

var _ api.BanStore = (*ClusterBans)(nil)

// NewClusterBans returns the ban store of e's worker; set it as
// EngineConfig.Bans so the engine applies what other workers publish.
func NewClusterBans() *ClusterBans {
	// Replaying from the start: ops delivered between the worker's
	// subscription to "#bans" and the end of its replay are held
	// (startBans releases them).
	return &ClusterBans{local: api.NewMemoryBans(nil), replaying: true}
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
		c.e.publishBanOp(ctrlMsg{Op: "ban", From: c.e.cfg.Name, Bans: []wireBan{toWire(b)}})
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
		c.e.publishBanOp(ctrlMsg{Op: "unban", From: c.e.cfg.Name, Bans: []wireBan{w}})
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
	if store := e.cfg.Bans; store != nil && (c.Op == "ban" || c.Op == "unban") {
		store.mu.Lock()
		if store.replaying {
			store.held = append(store.held, c)
			store.mu.Unlock()
			return
		}
		store.mu.Unlock()
	}
	e.applyBanOp(c, false)
}

// applyBanOp applies one op; replay also applies this worker's own ops
// (a live one is stored already when it comes back).
func (e *Engine) applyBanOp(c ctrlMsg, replay bool) {
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
	case "snapshot":
		// A running worker has the state already; it only notes where the
		// log was compacted.
		if store != nil {
			store.mu.Lock()
			store.snapBase = max(store.snapBase, c.Base)
			store.mu.Unlock()
		}
	case "ban", "unban":
		if store == nil || (c.From == e.cfg.Name && !replay) { // ours is stored already
			return
		}
		e.applyToStore(store.local, c)
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

// BannedReason is the `ban` middleware rule's check (middleware.BanChecker).
func (c *ClusterBans) BannedReason(user string, addr netip.Addr) (string, bool) {
	b, ok := c.local.Banned(user, addr)
	return b.Reason, ok
}

var _ middleware.BanChecker = (*ClusterBans)(nil)

// banned is the handshake's check; reason is the ban's. A chain with a
// `ban` rule checks bans where the config puts it, so this one stands down.
func (e *Engine) banned(user string, addr netip.Addr) (string, bool) {
	if e.cfg.Bans == nil || e.chain.Load().ChecksBans() {
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

// publishBanOp appends an op to the ban log and compacts the log when this
// op lands far enough past the last snapshot.
func (e *Engine) publishBanOp(c ctrlMsg) {
	b, err := json.Marshal(c)
	if err != nil { // cannot happen: plain fields
		e.log.Error("encoding ban op", "error", err)
		return
	}
	e.cfg.Broker.Publish(bansChannel, b, func(off uint64, err error) {
		if err != nil {
			e.log.Warn("publishing ban op", "op", c.Op, "error", err)
			return
		}
		e.maybeCompactBans(off)
	})
}

// maybeCompactBans starts a compaction when off is half the log's size past
// the last snapshot base (or the log restarted below it: a new epoch).
func (e *Engine) maybeCompactBans(off uint64) {
	store := e.cfg.Bans
	if store == nil {
		return
	}
	store.mu.Lock()
	if off < store.snapBase {
		store.snapBase = 0
	}
	due := off-store.snapBase >= banLogSize/2
	store.mu.Unlock()
	if !due || !store.compact.CompareAndSwap(false, true) {
		return
	}
	hist, ok := e.cfg.Broker.(banHistory)
	if !ok {
		store.compact.Store(false)
		return
	}
	e.bg.Add(1)
	go func() {
		defer e.bg.Done()
		defer store.compact.Store(false)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		go func() {
			select {
			case <-e.stop:
				cancel()
			case <-ctx.Done():
			}
		}()
		if err := e.compactBans(ctx, hist); err != nil {
			e.log.Warn("compacting the ban log", "error", err)
		}
	}()
}

// compactBans folds the log and publishes the result as a snapshot whose
// base is the last offset folded.
func (e *Engine) compactBans(ctx context.Context, hist banHistory) error {
	fold := api.NewMemoryBans(nil)
	last, err := e.foldBanLog(ctx, hist, func(c ctrlMsg) { e.applyToStore(fold, c) })
	if err != nil {
		return err
	}
	list, _ := fold.Bans(ctx)
	// Parts of at most snapshotPart bans and about snapshotBytes of JSON:
	// a broker link frame holds 1 MiB, and a ban's JSON is 100 bytes
	// typically but up to a few KiB (user and reason escaped).
	var chunks [][]wireBan
	var cur []wireBan
	size := 0
	for _, b := range list {
		w := toWire(b)
		wb, _ := json.Marshal(w)
		if len(cur) > 0 && (len(cur) >= snapshotPart || size+len(wb) > snapshotBytes) {
			chunks = append(chunks, cur)
			cur, size = nil, 0
		}
		cur = append(cur, w)
		size += len(wb) + 1
	}
	if len(cur) > 0 || len(chunks) == 0 {
		chunks = append(chunks, cur)
	}
	parts := len(chunks)
	for i, out := range chunks {
		msg, _ := json.Marshal(ctrlMsg{Op: "snapshot", From: e.cfg.Name, Base: last, Part: i, Parts: parts, Bans: out})
		res := make(chan error, 1)
		e.cfg.Broker.Publish(bansChannel, msg, func(_ uint64, err error) { res <- err })
		select {
		case err := <-res:
			if err != nil {
				return fmt.Errorf("publishing snapshot part %d/%d: %w", i+1, parts, err)
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	e.log.Info("compacted the ban log", "base", last, "bans", len(list), "parts", parts)
	return nil
}

// applyToStore applies a ban/unban/snapshot op to m: the worker's store
// (live ops, replay) or one being rebuilt (compaction).
func (e *Engine) applyToStore(m *api.MemoryBans, c ctrlMsg) {
	ctx := context.Background()
	switch c.Op {
	case "ban", "snapshot":
		for _, w := range c.Bans {
			b, err := fromWire(w)
			if err != nil {
				e.log.Warn("malformed ban", "error", err)
				continue
			}
			if err := m.Ban(ctx, b); err != nil {
				e.log.Warn("storing a cluster ban", "error", err)
			}
		}
	case "unban":
		for _, w := range c.Bans {
			if t, ok := unbanTarget(w); ok {
				_, _ = m.Unban(ctx, t)
			}
		}
	}
}

// maxBanLogPages bounds a replay's reads (a page is what the broker sends;
// the log holds at most chanopts.BansHistory messages).
const maxBanLogPages = 1000

// foldBanLog reads the whole ban log and calls apply, in log order, with
// the last complete snapshot (its parts, as one op each) and every ban and
// unban after its base. It returns the last offset read.
func (e *Engine) foldBanLog(ctx context.Context, hist banHistory, apply func(ctrlMsg)) (uint64, error) {
	type entry struct {
		off uint64
		c   ctrlMsg
	}
	var log []entry
	var since uint64
	for page := 0; ; page++ {
		if page == maxBanLogPages {
			return 0, errors.New("ban log: too many pages")
		}
		p, err := hist.History(ctx, bansChannel, since, banLogPage)
		if err != nil {
			return 0, fmt.Errorf("reading the ban log: %w", err)
		}
		for _, m := range p.Messages {
			var c ctrlMsg
			if err := json.Unmarshal(m.Data, &c); err != nil {
				e.log.Warn("malformed ban log entry", "offset", m.Offset, "error", err)
				continue
			}
			log = append(log, entry{m.Offset, c})
			since = m.Offset
		}
		if !p.More || len(p.Messages) == 0 {
			if since == 0 {
				since = p.Offset
			}
			break
		}
	}
	// The newest snapshot whose parts are all in the log.
	var base uint64
	var snap []ctrlMsg
	for i := len(log) - 1; i >= 0 && snap == nil; i-- {
		c := log[i].c
		if c.Op != "snapshot" || c.Part != c.Parts-1 {
			continue
		}
		parts := make([]ctrlMsg, c.Parts)
		have := 0
		for j := i; j >= 0 && have < c.Parts; j-- {
			d := log[j].c
			if d.Op == "snapshot" && d.Base == c.Base && d.From == c.From && d.Parts == c.Parts && d.Part >= 0 && d.Part < d.Parts && parts[d.Part].Op == "" {
				parts[d.Part] = d
				have++
			}
		}
		if have == c.Parts {
			snap, base = parts, c.Base
		}
	}
	for _, c := range snap {
		apply(c)
	}
	// Ops after the base, including those between the base and the
	// snapshot (they may be missing from it).
	for _, en := range log {
		if en.off > base && (en.c.Op == "ban" || en.c.Op == "unban") {
			apply(en.c)
		}
	}
	if e.cfg.Bans != nil {
		e.cfg.Bans.mu.Lock()
		e.cfg.Bans.snapBase = max(e.cfg.Bans.snapBase, base)
		e.cfg.Bans.mu.Unlock()
	}
	return since, nil
}

// startBans replays the ban log (or, without one, asks the running workers
// for their bans), with bounded retries while the broker links come up.
func (e *Engine) startBans() {
	store := e.cfg.Bans
	if store == nil {
		return
	}
	hist, hasHist := e.cfg.Broker.(banHistory)
	e.bg.Add(1)
	go func() {
		defer e.bg.Done()
		ok := hasHist && e.replayBans(hist)
		// Live ops held meanwhile come after the log's: apply them now.
		store.mu.Lock()
		held := store.held
		store.held, store.replaying = nil, false
		store.mu.Unlock()
		for _, c := range held {
			e.applyBanOp(c, true)
		}
		if !ok {
			e.syncBans()
			return
		}
		// Sockets that connected before the replay ended were checked
		// against a partial list: close those the full list bans.
		if n := e.disconnectLocal(func(s *Session) bool {
			var user string
			if id := s.ident.Load(); id != nil {
				user = id.UserID
			}
			_, banned := store.local.Banned(user, s.remoteIP())
			return banned
		}, int(CodeBanned), "Banned"); n > 0 {
			e.log.Info("closed sockets that connected before the ban log was replayed", "sockets", n)
		}
	}()
}

// replayBans applies the ban log to the worker's store, retrying for a
// bounded time while the brokers come up. It reports whether it succeeded.
func (e *Engine) replayBans(hist banHistory) bool {
	store := e.cfg.Bans
	delay := 100 * time.Millisecond
	for attempt := 0; attempt < 15; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		stopWatch := make(chan struct{})
		go func() {
			select {
			case <-e.stop:
				cancel()
			case <-stopWatch:
			}
		}()
		n := 0
		_, err := e.foldBanLog(ctx, hist, func(c ctrlMsg) {
			n++
			e.applyToStore(store.local, c)
		})
		close(stopWatch)
		cancel()
		if err == nil {
			list, _ := store.local.Bans(context.Background())
			e.log.Debug("replayed the ban log", "ops", n, "bans", len(list))
			return true
		}
		select {
		case <-e.stop:
			return false
		default:
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-e.stop:
			t.Stop()
			return false
		}
		delay = min(2*delay, 2*time.Second)
		if attempt == 14 {
			e.log.Warn("could not read the ban log; asking the running workers instead", "error", err)
		}
	}
	return false
}

// syncBans asks the running workers for the bans they hold (a cluster
// without the ban log's history), retrying until a publish is acknowledged.
func (e *Engine) syncBans() {
	b, _ := json.Marshal(ctrlMsg{Op: "sync", From: e.cfg.Name})
	delay := 100 * time.Millisecond
	for attempt := 0; attempt < 12; attempt++ {
		res := make(chan error, 1)
		e.cfg.Broker.Publish(bansChannel, b, func(_ uint64, err error) { res <- err })
		var err error
		select {
		case err = <-res:
		case <-e.stop:
			return
		}
		if err == nil {
			return
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-e.stop:
			t.Stop()
			return
		}
		delay = min(2*delay, 2*time.Second)
	}
	e.log.Warn("could not ask the other workers for their bans; this worker enforces only bans made from now on")
}

// unbanTarget is what an "unban" op on "#bans" lifts; ok is false for an
// address that does not parse (an op from a newer or broken peer: skipped).
func unbanTarget(w wireBan) (api.BanTarget, bool) {
	t := api.BanTarget{User: w.User}
	if w.IP != "" {
		p, err := netip.ParsePrefix(w.IP)
		if err != nil {
			return t, false
		}
		t.IP = p
	}
	return t, true
}
