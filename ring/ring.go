// Package ring is the brokers' gossip membership: a hashicorp/memberlist
// cluster whose node metadata says what each member is (role), where workers
// reach it (link address) and which build it runs (version). Consumers get
// the live member list as coalesced change notifications; channel ownership
// itself is computed by the workers (brokerclient) from that list.
//
// Delegates never block: memberlist calls them on its own goroutines, so
// they only copy what they need and set a "changed" flag; one goroutine owned
// by the Ring turns flags into OnChange calls.
package ring

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/memberlist"
)

// Meta is a node's metadata, gossiped with its membership.
type Meta struct {
	Role    string // "broker" (other roles may join later as non-owning members)
	Link    string // link address for workers: "unix:/path" or "tcp:host:port"
	Version string // build version, for mixed-version rollouts
}

const metaFormat = 1

// Encode packs m into memberlist's metadata (limit 512 bytes): a format
// byte, then three u16-length strings.
func (m Meta) Encode() ([]byte, error) {
	b := []byte{metaFormat}
	for _, s := range []string{m.Role, m.Link, m.Version} {
		if len(s) > 0xffff {
			return nil, fmt.Errorf("ring: meta field of %d bytes", len(s))
		}
		b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
		b = append(b, s...)
	}
	if len(b) > memberlist.MetaMaxSize {
		return nil, fmt.Errorf("ring: meta of %d bytes exceeds memberlist's %d", len(b), memberlist.MetaMaxSize)
	}
	return b, nil
}

// DecodeMeta unpacks Encode's output.
func DecodeMeta(b []byte) (Meta, error) {
	if len(b) < 1 || b[0] != metaFormat {
		return Meta{}, errors.New("ring: unknown meta format")
	}
	b = b[1:]
	var out [3]string
	for i := range out {
		if len(b) < 2 {
			return Meta{}, errors.New("ring: truncated meta")
		}
		n := int(binary.BigEndian.Uint16(b))
		if len(b) < 2+n {
			return Meta{}, errors.New("ring: truncated meta")
		}
		out[i] = string(b[2 : 2+n])
		b = b[2+n:]
	}
	return Meta{Role: out[0], Link: out[1], Version: out[2]}, nil
}

// Member is one live node.
type Member struct {
	Name   string // unique in the ring
	Gossip string // host:port
	Meta   Meta
}

// Config configures a Ring. Zero durations take the Tuned profile.
type Config struct {
	Name      string   // unique node name
	Bind      string   // host:port for gossip (UDP and TCP); port 0 = ephemeral
	Advertise string   // host:port others should use; default: the bound address
	Join      []string // contacts; joining is retried in the background while alone
	Meta      Meta
	Logger    hclog.Logger
	// OnChange receives the live members (sorted by name) after every
	// change, coalesced, from one goroutine owned by the Ring. It may block
	// briefly; changes during the call are folded into the next one.
	OnChange func([]Member)
	// Tune, if set, adjusts the memberlist config after the Tuned profile.
	Tune func(*memberlist.Config)
	// Secrets, if set (the cluster secrets), encrypt and authenticate all
	// gossip with memberlist's AES-GCM keyring: members without the same
	// secret cannot join, read the ring or inject state. The first
	// encrypts; every one decrypts (while the secret is being changed).
	Secrets [][]byte
}

// gossipKey derives memberlist's AES-256 key from the cluster secret; the
// label keeps it apart from the key the links derive from the same secret.
func gossipKey(secret []byte) []byte {
	k := sha256.Sum256(append([]byte("shoal gossip key\x00"), secret...))
	return k[:]
}

// Tuned applies Shoal's failure-detection profile for a LAN or one host:
// memberlist's loopback profile, made faster. A SIGKILLed member is declared
// dead after: waiting to be probed (members are probed round-robin, one per
// ProbeInterval), ProbeTimeout plus the indirect probes (the rest of that
// interval), then the suspicion timeout, SuspicionMult × max(1,
// log10(N)) × ProbeInterval = 300 ms for up to 10 members (memberlist
// expects no confirmations when SuspicionMult ≤ 2, so it uses the minimum).
// Measured: 0.4–0.7 s with 3 brokers. 100 ms probes (with a 50 ms timeout)
// were faster still but declared healthy members dead when the CPUs were
// saturated (TestTunedProfileStableUnderCPULoad), so 150 ms it is. The cost
// is a few small UDP packets per member every 150 ms.
func Tuned(c *memberlist.Config) {
	c.ProbeInterval = 150 * time.Millisecond // how often each member probes one other
	c.ProbeTimeout = 75 * time.Millisecond   // direct-probe RTT budget; loopback/LAN RTT is < 1 ms
	c.IndirectChecks = 2                     // others asked to probe a silent member before suspicion
	c.SuspicionMult = 2                      // suspicion timeout multiplier (see above)
	c.SuspicionMaxTimeoutMult = 4            // cap when confirmations are missing
	c.GossipInterval = 50 * time.Millisecond // state changes spread within a few intervals
	c.GossipNodes = 3
	c.GossipToTheDeadTime = 5 * time.Second // keep telling a dead member it is dead, briefly
	c.RetransmitMult = 3
	c.PushPullInterval = 5 * time.Second // full-state sync: heals missed gossip
	c.TCPTimeout = time.Second           // push/pull and TCP-fallback probes
	c.DeadNodeReclaimTime = time.Second  // a restarted broker may rejoin under its name at a new address
	c.AwarenessMaxMultiplier = 4         // a struggling member slows its probing at most 4×
	c.EnableCompression = false          // tiny messages; compression only costs CPU
}

// Ring is a running membership.
type Ring struct {
	cfg Config
	log hclog.Logger
	ml  *memberlist.Memberlist
	d   *delegate

	changed chan struct{} // cap 1: "the member list changed"
	stop    chan struct{}
	wg      sync.WaitGroup
	once    sync.Once

	// joined are the contacts given to Join (sibling brokers from the
	// supervisor's topology), for announceTargets; at most maxJoined.
	joinedMu sync.Mutex
	joined   []string
}

const maxJoined = 64

// delegate implements memberlist.Delegate and EventDelegate without ever
// blocking. It keeps its own copy of the member list: memberlist calls the
// event methods while it holds its node lock, so copying there is safe,
// whereas the *Node values Members() returns are mutated later under that
// lock (reading them races).
type delegate struct {
	meta    atomic.Pointer[[]byte]
	changed chan struct{}
	log     hclog.Logger

	mu      sync.Mutex
	members map[string]Member
	// failed remembers the gossip address of each member that died (not one
	// that left gracefully), with when, so the rejoin loop keeps trying it:
	// after a partition each side believes the other dead, and memberlist
	// itself never dials a dead member again.
	failed map[string]time.Time
}

func (d *delegate) NodeMeta(limit int) []byte {
	m := *d.meta.Load()
	if len(m) > limit {
		return nil
	}
	return m
}
func (d *delegate) NotifyMsg([]byte)                {}
func (d *delegate) GetBroadcasts(int, int) [][]byte { return nil }
func (d *delegate) LocalState(bool) []byte          { return nil }
func (d *delegate) MergeRemoteState([]byte, bool)   {}
func (d *delegate) NotifyJoin(n *memberlist.Node)   { d.upsert(n) }
func (d *delegate) NotifyUpdate(n *memberlist.Node) { d.upsert(n) }
func (d *delegate) NotifyLeave(n *memberlist.Node) {
	addr := net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))
	dead := n.State == memberlist.StateDead || n.State == memberlist.StateSuspect
	d.mu.Lock()
	delete(d.members, n.Name)
	if dead {
		d.failed[addr] = time.Now()
	} else {
		delete(d.failed, addr) // a graceful leave: it is not coming back here
	}
	d.mu.Unlock()
	d.kick()
}

// rejoinTargets lists the contacts and failed members' addresses that are
// not live members now, forgetting failed ones older than forget.
func (d *delegate) rejoinTargets(contacts []string, forget time.Duration) []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	live := make(map[string]bool, len(d.members))
	for _, m := range d.members {
		live[m.Gossip] = true
	}
	var out []string
	for _, c := range contacts {
		if !live[c] {
			out = append(out, c)
		}
	}
	for addr, when := range d.failed {
		switch {
		case live[addr]:
			delete(d.failed, addr)
		case time.Since(when) > forget:
			delete(d.failed, addr)
		case !slices.Contains(out, addr):
			out = append(out, addr)
		}
	}
	return out
}

func (d *delegate) upsert(n *memberlist.Node) {
	meta, err := DecodeMeta(n.Meta)
	if err != nil {
		d.log.Warn("ignoring a ring member with unreadable metadata", "member", n.Name, "error", err)
		return
	}
	m := Member{Name: n.Name, Gossip: net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port))), Meta: meta}
	d.mu.Lock()
	d.members[n.Name] = m
	d.mu.Unlock()
	d.kick()
}

func (d *delegate) kick() {
	select {
	case d.changed <- struct{}{}:
	default: // a notification is already pending; it will see this change too
	}
}

// Start creates the memberlist, binds, and tries the contacts once; when
// none answers, joining is retried in the background while the node is
// alone.
func Start(cfg Config) (*Ring, error) {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	host, portStr, err := net.SplitHostPort(cfg.Bind)
	if err != nil {
		return nil, fmt.Errorf("ring: gossip bind address %q: %w", cfg.Bind, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("ring: gossip bind port %q: %w", portStr, err)
	}
	meta, err := cfg.Meta.Encode()
	if err != nil {
		return nil, err
	}
	changed := make(chan struct{}, 1)
	d := &delegate{changed: changed, log: cfg.Logger, members: map[string]Member{}, failed: map[string]time.Time{}}
	d.meta.Store(&meta)

	mc := memberlist.DefaultLocalConfig()
	Tuned(mc)
	if cfg.Tune != nil {
		cfg.Tune(mc)
	}
	mc.Name = cfg.Name
	mc.BindAddr = host
	mc.BindPort = port
	mc.AdvertisePort = port
	if cfg.Advertise != "" {
		ah, ap, err := net.SplitHostPort(cfg.Advertise)
		if err != nil {
			return nil, fmt.Errorf("ring: advertise address %q: %w", cfg.Advertise, err)
		}
		mc.AdvertiseAddr = ah
		if mc.AdvertisePort, err = strconv.Atoi(ap); err != nil {
			return nil, fmt.Errorf("ring: advertise port %q: %w", ap, err)
		}
	}
	if len(cfg.Secrets) > 0 {
		keys := make([][]byte, len(cfg.Secrets))
		for i, s := range cfg.Secrets {
			keys[i] = gossipKey(s)
		}
		kr, err := memberlist.NewKeyring(keys, keys[0])
		if err != nil {
			return nil, fmt.Errorf("ring: gossip keyring: %w", err)
		}
		mc.Keyring = kr
		mc.GossipVerifyIncoming, mc.GossipVerifyOutgoing = true, true
	}
	mc.Delegate = d
	mc.Events = d
	mc.Logger = log.New(&logBridge{l: cfg.Logger.Named("memberlist")}, "", 0)
	tr, err := newTransport(host, port, cfg.Logger.Named("memberlist"))
	if err != nil {
		return nil, err
	}
	mc.Transport = tr
	// With port 0 the kernel chose: memberlist takes the port from its
	// config for addresses given without one and for its own node.
	mc.BindPort = tr.tcp.Addr().(*net.TCPAddr).Port
	if mc.AdvertisePort == 0 {
		mc.AdvertisePort = mc.BindPort
	}

	ml, err := memberlist.Create(mc)
	if err != nil {
		tr.Shutdown()
		return nil, fmt.Errorf("ring: starting memberlist on %s: %w", cfg.Bind, err)
	}
	r := &Ring{cfg: cfg, log: cfg.Logger, ml: ml, d: d, changed: changed, stop: make(chan struct{})}
	if len(cfg.Join) > 0 {
		if n, err := ml.Join(cfg.Join); err != nil {
			r.log.Info("no ring contact answered yet; retrying in the background", "join", cfg.Join, "error", err)
		} else {
			r.log.Info("joined the ring", "contacts", n, "members", ml.NumMembers())
		}
	}
	r.wg.Add(2)
	go r.notifyLoop()
	go r.rejoinLoop()
	d.kick() // report the initial list
	return r, nil
}

// Addr returns the advertised gossip address (host:port; the real port when
// Bind asked for port 0).
func (r *Ring) Addr() string {
	n := r.ml.LocalNode()
	return net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))
}

// SetMeta replaces this node's metadata and gossips it (e.g. once the
// advertised IP is known); it waits up to timeout for the update to go out.
func (r *Ring) SetMeta(m Meta, timeout time.Duration) error {
	b, err := m.Encode()
	if err != nil {
		return err
	}
	r.d.meta.Store(&b)
	if err := r.ml.UpdateNode(timeout); err != nil {
		return fmt.Errorf("ring: gossiping new metadata: %w", err)
	}
	return nil
}

// NumMembers returns how many members are alive, this node included.
func (r *Ring) NumMembers() int { return r.ml.NumMembers() }

// Members returns the live members, sorted by name.
func (r *Ring) Members() []Member {
	r.d.mu.Lock()
	out := make([]Member, 0, len(r.d.members))
	for _, m := range r.d.members {
		out = append(out, m)
	}
	r.d.mu.Unlock()
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Join adds contacts (e.g. peers from the supervisor's topology); it blocks
// for at most memberlist's TCP timeout per contact.
func (r *Ring) Join(addrs []string) error {
	if len(addrs) == 0 {
		return nil
	}
	r.joinedMu.Lock()
	for _, a := range addrs {
		if !slices.Contains(r.joined, a) && len(r.joined) < maxJoined {
			r.joined = append(r.joined, a)
		}
	}
	r.joinedMu.Unlock()
	if _, err := r.ml.Join(addrs); err != nil {
		return fmt.Errorf("ring: joining %v: %w", addrs, err)
	}
	return nil
}

func (r *Ring) notifyLoop() {
	defer r.wg.Done()
	for {
		select {
		case <-r.stop:
			return
		case <-r.changed:
			if r.cfg.OnChange != nil {
				r.cfg.OnChange(r.Members())
			}
		}
	}
}

// rejoinLoop heals the ring without an operator. Every second it tries the
// contacts (cluster.join and sibling brokers) that are not live members, and
// the members that died within forgetFailed: a broker that started before
// its peers, a node whose two brokers found each other but not the rest, and
// both sides of a healed partition all find each other again. (Retrying only
// while alone left such rings split for good.) A join to an address that is
// down costs one failed TCP dial per second.
func (r *Ring) rejoinLoop() {
	defer r.wg.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	started := time.Now()
	for {
		select {
		case <-r.stop:
			return
		case <-t.C:
			targets := r.d.rejoinTargets(r.cfg.Join, forgetFailed)
			if time.Since(started) < announceFor {
				targets = r.announceTargets(targets)
			}
			if len(targets) == 0 {
				continue
			}
			before := r.ml.NumMembers()
			if n, err := r.ml.Join(targets); err == nil && r.ml.NumMembers() > before {
				r.log.Info("joined the ring", "contacts", n, "members", r.ml.NumMembers())
			}
		}
	}
}

// announceFor is how long after its start a member keeps joining its
// contacts even when it already counts them as live. A broker restarted
// under its name at a new address is refused by members that still hold
// the old address as alive, or dead for less than DeadNodeReclaimTime
// (memberlist logs "conflicting address"); yet its own join succeeded, so
// it sees them as live and would otherwise wait for the next full-state
// sync (PushPullInterval, 5 s and more) to be taken back. Each join is a
// push/pull that re-announces it; the old address is declared dead within
// ~0.3–1.2 s (awareness can stretch it 4×), plus the reclaim time.
const announceFor = 15 * time.Second

// announceTargets adds the contacts (cluster.join and those given to Join)
// other than this member to targets.
func (r *Ring) announceTargets(targets []string) []string {
	self := r.Addr()
	r.joinedMu.Lock()
	contacts := append(slices.Clone(r.cfg.Join), r.joined...)
	r.joinedMu.Unlock()
	for _, c := range contacts {
		if c != self && !slices.Contains(targets, c) {
			targets = append(targets, c)
		}
	}
	return targets
}

// forgetFailed is how long a dead member's address is retried: long enough
// for a restarted node or a healed network (serf's reconnect_timeout idea).
const forgetFailed = 24 * time.Hour

// Leave announces a graceful departure (others drop this node at once
// instead of after the suspicion timeout).
func (r *Ring) Leave(timeout time.Duration) error {
	if err := r.ml.Leave(timeout); err != nil {
		return fmt.Errorf("ring: leaving: %w", err)
	}
	return nil
}

// Shutdown stops gossip without announcing (use Leave first for a clean
// exit) and waits for the Ring's goroutines. Idempotent.
func (r *Ring) Shutdown() error {
	var err error
	r.once.Do(func() {
		close(r.stop)
		r.wg.Wait()
		if e := r.ml.Shutdown(); e != nil {
			err = fmt.Errorf("ring: shutting down memberlist: %w", e)
		}
	})
	return err
}

// logBridge sends memberlist's "[LEVEL] memberlist: text" lines to hclog at
// their level.
type logBridge struct{ l hclog.Logger }

var _ io.Writer = (*logBridge)(nil)

func (b *logBridge) Write(p []byte) (int, error) {
	s := strings.TrimSpace(string(p))
	switch {
	case strings.HasPrefix(s, "[ERR]"):
		b.l.Error(strings.TrimSpace(strings.TrimPrefix(s, "[ERR]")))
	case strings.HasPrefix(s, "[WARN]"):
		b.l.Warn(strings.TrimSpace(strings.TrimPrefix(s, "[WARN]")))
	case strings.HasPrefix(s, "[INFO]"):
		b.l.Info(strings.TrimSpace(strings.TrimPrefix(s, "[INFO]")))
	default:
		b.l.Debug(strings.TrimSpace(strings.TrimPrefix(s, "[DEBUG]")))
	}
	return len(p), nil
}
