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
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/broker/chanopts"
	"github.com/shoalhq/shoal/broker/store"
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/internal/procstat"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/proto/link"
	"github.com/shoalhq/shoal/ring"
)

// Version is reported in ring metadata.
const Version = "0.1.0"

// Child is the broker's control-plane implementation.
type Child struct {
	log hclog.Logger

	mu         sync.Mutex
	state      string
	name       string
	srv        *Server
	ring       *ring.Ring // nil when gossip is disabled (cluster.gossip "")
	ringName   string
	joining    bool            // a topology-driven join is in flight
	joined     bool            // the ring has had another member at least once
	handedBack bool            // the first hand-back of history has been started
	askedPeers map[string]bool // ring names asked for history to hand back
	contacts   bool            // there is someone to join
	stopped    bool
	wg         sync.WaitGroup
	bg         context.Context // cancelled by Stop: ends background work (hand-back)
	bgCancel   context.CancelFunc
}

var _ control.Child = (*Child)(nil)

// New returns the broker role, ready to be served by control.Serve.
func New(log hclog.Logger) *Child {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	bg, cancel := context.WithCancel(context.Background())
	return &Child{log: log, state: control.StateStarting, bg: bg, bgCancel: cancel}
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
	// One P by default (configs.BrokerTuning): the link reader and writer
	// then take turns on one thread, which coalesces a read batch's
	// replies into one write and wakes no other thread per publish.
	if n := cfg.Broker.GoMaxProcs; n > 0 {
		runtime.GOMAXPROCS(n)
	}
	addr := "unix:" + LinkPath(p.RunDir, p.Name)
	ln, err := link.Listen(addr)
	if err != nil {
		return control.StartResult{}, fmt.Errorf("broker %s: %w", p.Name, err)
	}
	secrets, err := cfg.Cluster.Secrets()
	if err != nil {
		ln.Close()
		return control.StartResult{}, err
	}
	sc := ServerConfig{
		Name:     p.Name,
		MaxFrame: int(cfg.Protocol.MaxPayload) + link.Overhead,
		Logger:   c.log.Named("link"),
		Rules:    chanopts.Compile(cfg.Channels),
	}
	if secrets != nil {
		if sc.Secure, err = link.NewSecure(secrets...); err != nil {
			ln.Close()
			return control.StartResult{}, fmt.Errorf("broker %s: %w", p.Name, err)
		}
	}
	if st, err := openStore(cfg, p.Name); err != nil {
		ln.Close()
		return control.StartResult{}, err
	} else if st != nil {
		sc.Store = st
	}
	if len(cfg.Cluster.Join) > 0 {
		// Workers of other nodes are not in this node's topology: give
		// them a reconnect backoff's time before taking publishes.
		sc.WarmUpMin = 400 * time.Millisecond
	}
	srv := NewServer(sc)
	if err := srv.Restore(); err != nil {
		ln.Close()
		srv.Close(ctx)
		return control.StartResult{}, err
	}
	srv.ExpectWorkers(readyWorkers(p.Topology))
	if cfg.Cluster.Gossip != "" && hasHistory(cfg) {
		// Peers may hold history of channels this broker owns (handback.go):
		// take it back before taking publishes. Released by the first ring
		// view with peers, or after HandbackMax; a broker with nobody to
		// join does not wait.
		if plan, err := PlanGossip(cfg, p.Name, p.Index); err == nil && len(plan.Join) > 0 {
			srv.HoldForHandback()
		}
	}
	if err := srv.Serve(ln); err != nil {
		ln.Close()
		srv.Close(ctx)
		return control.StartResult{}, err
	}
	c.srv, c.name = srv, p.Name
	addrs := map[string]string{control.AddrLink: addr}
	if cfg.Cluster.Gossip != "" {
		gossip, err := c.startRing(cfg, p, srv, addr, secrets)
		if err != nil {
			srv.Close(ctx)
			c.srv = nil
			return control.StartResult{}, err
		}
		addrs[control.AddrGossip] = gossip
	}
	c.state = control.StateReady
	c.log.Info("broker listening", "link", addr, "gossip", addrs[control.AddrGossip], "epoch", srv.Epoch(), "gomaxprocs", runtime.GOMAXPROCS(0))
	return control.StartResult{Addrs: addrs}, nil
}

// StorePath is where a broker keeps its durable channels.
func StorePath(dir, name string) string { return filepath.Join(dir, "broker-"+name+".db") }

// openStore opens the bbolt file when some channel rule is durable (nil
// otherwise: no file is created for a config without durable channels).
// The internal ban log (chanopts) is durable too. Bans are made through the
// server API, which works only with its key in the environment (the
// cluster's processes share it): with that key set the file is opened.
func openStore(cfg configs.Config, name string) (store.Store, error) {
	keyEnv := cfg.API.KeyEnv
	if keyEnv == "" {
		keyEnv = configs.Default().API.KeyEnv
	}
	durable := keyEnv != "" && os.Getenv(keyEnv) != "" && chanopts.InternalDurable()
	for _, r := range cfg.Channels {
		durable = durable || r.Durable
	}
	if !durable {
		return nil, nil
	}
	if err := os.MkdirAll(cfg.Storage.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("broker %s: storage.dir: %w", name, err)
	}
	st, err := store.OpenBolt(StorePath(cfg.Storage.Dir, name))
	if err != nil {
		return nil, fmt.Errorf("broker %s: %w", name, err)
	}
	return st, nil
}

// Server returns the link server (nil before Start); for tests and the ring.
func (c *Child) Server() *Server {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.srv
}

// GossipPlan is where a broker's ring binds and whom it joins, from the
// config and its 1-based index on the node:
//
//   - bind: cluster.gossip's host, port + index - 1 (brokers of one node take
//     consecutive ports from cluster.gossip; port 0 stays 0 = ephemeral);
//   - join: cluster.join, plus every sibling's computed address, so a
//     restarted broker finds its node's ring even when cluster.join is empty;
//   - name: the broker's name on a single node; with cluster.join set,
//     name@bind so names stay unique across nodes;
//   - crossHost: with cluster.join set or a non-loopback bind, the broker
//     also listens for links on TCP and advertises that address.
type GossipPlan struct {
	Bind      string
	Join      []string
	Name      string
	CrossHost bool
}

// PlanGossip computes the GossipPlan.
func PlanGossip(cfg configs.Config, name string, index int) (GossipPlan, error) {
	host, portStr, err := net.SplitHostPort(cfg.Cluster.Gossip)
	if err != nil {
		return GossipPlan{}, fmt.Errorf("broker: cluster.gossip %q: %w", cfg.Cluster.Gossip, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return GossipPlan{}, fmt.Errorf("broker: cluster.gossip %q: bad port", cfg.Cluster.Gossip)
	}
	index = max(index, 1)
	plan := GossipPlan{Name: name}
	bindPort := 0
	if port != 0 {
		bindPort = port + index - 1
		if bindPort > 65535 {
			return GossipPlan{}, fmt.Errorf("broker: cluster.gossip port %d + broker index %d is past 65535", port, index)
		}
		for j := 1; j <= cfg.Cluster.Brokers; j++ {
			if j != index && port+j-1 <= 65535 {
				plan.Join = append(plan.Join, net.JoinHostPort(joinHost(host), strconv.Itoa(port+j-1)))
			}
		}
	}
	plan.Bind = net.JoinHostPort(host, strconv.Itoa(bindPort))
	plan.Join = append(plan.Join, cfg.Cluster.Join...)
	ip := net.ParseIP(host)
	loopback := host == "localhost" || (ip != nil && ip.IsLoopback())
	if len(cfg.Cluster.Join) > 0 || !loopback {
		plan.CrossHost = true
	}
	if len(cfg.Cluster.Join) > 0 {
		plan.Name = name + "@" + plan.Bind
		if host == "" || (ip != nil && ip.IsUnspecified()) {
			hn, _ := os.Hostname()
			plan.Name = name + "@" + net.JoinHostPort(hn, strconv.Itoa(bindPort))
		}
	}
	return plan, nil
}

// joinHost turns a wildcard bind host into one that can be dialled.
func joinHost(h string) string {
	if ip := net.ParseIP(h); h == "" || (ip != nil && ip.IsUnspecified()) {
		return "127.0.0.1"
	}
	return h
}

// startRing joins the gossip ring, its gossip encrypted with secrets (the
// cluster secrets, nil for none); called with c.mu held.
func (c *Child) startRing(cfg configs.Config, p control.StartParams, srv *Server, unixAddr string, secrets [][]byte) (string, error) {
	plan, err := PlanGossip(cfg, p.Name, p.Index)
	if err != nil {
		return "", err
	}
	meta := ring.Meta{Role: string(control.RoleBroker), Link: unixAddr, Version: Version}
	if plan.CrossHost {
		host, _, _ := net.SplitHostPort(plan.Bind)
		ln, err := link.Listen("tcp:" + net.JoinHostPort(host, "0"))
		if err != nil {
			return "", fmt.Errorf("broker %s: listening for links on TCP: %w", p.Name, err)
		}
		if err := srv.ServeSecure(ln); err != nil {
			ln.Close()
			return "", err
		}
		meta.Link = link.ListenerAddr(ln)
	}
	switch {
	case plan.CrossHost && secrets == nil:
		c.log.Warn("gossip and the TCP links to this broker are not encrypted or authenticated: set the same cluster secret on every node ($"+cfg.Cluster.SecretEnv+", docs/multihost.md)", "gossip", plan.Bind)
	case secrets != nil:
		c.log.Info("gossip and TCP links secured with the cluster secret", "gossip", plan.Bind, "link", meta.Link, "secrets_accepted", len(secrets))
	}
	c.ringName = plan.Name
	srv.SetRingName(plan.Name)
	c.contacts = len(plan.Join) > 0
	r, err := ring.Start(ring.Config{
		Name:     plan.Name,
		Bind:     plan.Bind,
		Join:     plan.Join,
		Meta:     meta,
		Logger:   c.log.Named("ring"),
		OnChange: c.ringChanged,
		Secrets:  secrets,
	})
	if err != nil {
		return "", fmt.Errorf("broker %s: %w", p.Name, err)
	}
	if plan.CrossHost {
		// A wildcard TCP listener advertises the IP memberlist chose.
		gh, _, _ := net.SplitHostPort(r.Addr())
		_, lport, _ := net.SplitHostPort(strings.TrimPrefix(meta.Link, "tcp:"))
		if lh, _, _ := net.SplitHostPort(strings.TrimPrefix(meta.Link, "tcp:")); lh != gh {
			meta.Link = "tcp:" + net.JoinHostPort(gh, lport)
			if err := r.SetMeta(meta, time.Second); err != nil {
				c.log.Warn("gossiping the link address", "error", err)
			}
		}
	}
	c.ring = r
	return r.Addr(), nil
}

// ringChanged pushes the live brokers to every worker link. Until the ring
// has had a second member, a broker with contacts keeps quiet: a broker
// that is alone only because it started first would otherwise tell workers
// that it owns every channel.
func (c *Child) ringChanged(ms []ring.Member) {
	c.mu.Lock()
	if len(ms) > 1 {
		c.joined = true
	}
	quiet := c.contacts && !c.joined
	srv := c.srv
	c.mu.Unlock()
	if quiet || srv == nil {
		return
	}
	out := make([]link.Member, 0, len(ms))
	for _, m := range ms {
		if m.Meta.Role == string(control.RoleBroker) && m.Meta.Link != "" {
			out = append(out, link.Member{Name: m.Name, Addr: m.Meta.Link})
		}
	}
	c.log.Info("ring changed", "brokers", len(out))
	srv.SetMembers(out)
	c.mu.Lock()
	self := c.ringName
	// Each peer is asked once, when it first shows up: the first view can
	// hold only some of them (HandBackFrom), and the peer that kept a
	// channel's replica may be among the later ones. install never
	// overwrites history this broker has, so a late answer is safe.
	var ask []string
	if len(out) > 1 && !c.stopped {
		if c.askedPeers == nil {
			c.askedPeers = map[string]bool{}
		}
		for _, m := range out {
			if m.Name != self && !c.askedPeers[m.Name] {
				c.askedPeers[m.Name] = true
				ask = append(ask, m.Name)
			}
		}
	}
	first := len(ask) > 0 && !c.handedBack
	if len(ask) > 0 {
		c.handedBack = true
		c.wg.Add(1)
	}
	c.mu.Unlock()
	if len(ask) > 0 {
		go func() {
			defer c.wg.Done()
			if first {
				defer srv.HandbackDone()
			}
			ctx, cancel := context.WithTimeout(c.bg, HandbackMax)
			defer cancel()
			n, err := srv.HandBackFrom(ctx, self, out, ask)
			if err != nil {
				c.log.Warn("taking history back from peers", "error", err)
			}
			if n > 0 {
				c.log.Info("history taken back from peers", "channels", n)
			}
		}()
	}
}

// hasHistory reports whether any channel rule keeps history.
func hasHistory(cfg configs.Config) bool {
	for _, r := range cfg.Channels {
		if r.History.Size > 0 || r.Durable {
			return true
		}
	}
	return false
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
		"refused":    s.Refused,
		"acks_held":  s.AcksHeld,

		"acks_held_expired": s.AcksHeldExpired,
		"links_behind":      s.LinksBehind,

		"history_channels": s.HistoryChannels,
		"presence_entries": s.PresenceEntries,
		"durable_commits":  s.DurableCommits,
		"durable_writes":   s.DurableWrites,
	}
	return st, nil
}

func readyWorkers(t control.Topology) []string {
	var out []string
	for _, p := range t.ByRole(control.RoleWorker) {
		if p.State == control.StateReady {
			out = append(out, p.Name)
		}
	}
	return out
}

// SetTopology updates the workers a starting broker waits for (warm-up),
// and joins the gossip addresses of the node's other brokers that the ring
// does not know yet (useful when ports are ephemeral). The join runs in the
// background: SetTopology never blocks the supervisor.
func (c *Child) SetTopology(ctx context.Context, t control.Topology) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.srv != nil {
		c.srv.ExpectWorkers(readyWorkers(t))
	}
	if c.ring == nil || c.joining || c.stopped {
		return nil
	}
	known := map[string]bool{}
	for _, m := range c.ring.Members() {
		known[m.Gossip] = true
	}
	var addrs []string
	for _, p := range t.ByRole(control.RoleBroker) {
		if g := p.Addrs[control.AddrGossip]; g != "" && !known[g] && p.Name != c.name && p.State != control.StateDead {
			addrs = append(addrs, g)
		}
	}
	if len(addrs) == 0 {
		return nil
	}
	c.joining = true
	r := c.ring
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		if err := r.Join(addrs); err != nil {
			c.log.Debug("joining brokers from the topology", "error", err)
		}
		c.mu.Lock()
		c.joining = false
		c.mu.Unlock()
	}()
	return nil
}

// Drain leaves the ring and closes every worker link (flushing what is
// queued within timeout); workers then move this broker's channels once the
// supervisor's topology (or the ring) drops it.
func (c *Child) Drain(ctx context.Context, timeout time.Duration) error {
	c.mu.Lock()
	c.state = control.StateDraining
	srv, r := c.srv, c.ring
	c.mu.Unlock()
	if r != nil {
		// The leave broadcast needs no answer to help the others, and the
		// last broker of a node has nobody to wait for; don't let it hold a
		// whole node's shutdown for the drain timeout.
		if err := r.Leave(min(timeout, leaveTimeout)); err != nil {
			c.log.Debug("leaving the ring", "error", err)
		}
	}
	if srv != nil {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		srv.Close(ctx)
	}
	return nil
}

// leaveTimeout bounds the ring's leave broadcast on drain.
const leaveTimeout = 500 * time.Millisecond

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
	c.bgCancel()
	c.wg.Wait() // a topology join in flight ends within memberlist's TCP timeout
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
