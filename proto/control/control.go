// Package control is the contract between the supervisor and its children:
// the go-plugin handshake, the plugin map, the Child interface each role
// implements, and the gRPC adapters. Callers never see controlpb types.
package control

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
)

// Role names a kind of child process.
type Role string

const (
	RoleBalancer Role = "balancer"
	RoleWorker   Role = "worker"
	RoleBroker   Role = "broker"
)

// Keys of StartResult.Addrs and Peer.Addrs.
const (
	AddrPublic  = "public"  // balancer (or SO_REUSEPORT worker): the public ws:// and HTTP address
	AddrTLS     = "tls"     // the wss:// address
	AddrHandoff = "handoff" // worker: unix socket receiving client fds (SCM_RIGHTS)
	AddrProxy   = "proxy"   // worker: unix socket accepting proxied (PROXY v2) streams
	AddrLink    = "link"    // broker: address of its worker link listener ("unix:/path" or "tcp:host:port")
	AddrGossip  = "gossip"  // broker: memberlist bind address
)

// Peer states in a Topology.
const (
	StateStarting = "starting"
	StateReady    = "ready"
	StateDraining = "draining"
	StateDead     = "dead"
)

// StartParams is everything a child needs to run.
type StartParams struct {
	Role     Role
	Name     string // e.g. "worker-1"
	Index    int    // 1-based within the role
	Config   []byte // JSON of configs.Config
	RunDir   string // private directory for unix sockets
	Topology Topology
}

// StartResult is what the child listens on (see the Addr* keys).
type StartResult struct {
	Addrs map[string]string
}

// Health is a child's own view of itself.
type Health struct {
	State   string // one of the State* values
	Message string
}

// Stats are a child's counters.
type Stats struct {
	Connections int64
	MessagesIn  int64
	MessagesOut int64
	BytesIn     int64
	BytesOut    int64
	HeapBytes   uint64
	SysBytes    uint64
	RSSBytes    uint64
	Goroutines  int
	Counters    map[string]int64 // role-specific extras
}

// Peer is one process in the cluster as the supervisor knows it.
type Peer struct {
	Name        string
	Role        Role
	State       string
	Addrs       map[string]string
	Connections int64
	Pid         int
}

// Topology is the whole set of known peers; Version grows with each change.
type Topology struct {
	Version int64
	Peers   []Peer
}

// ByRole returns the peers of one role.
func (t Topology) ByRole(r Role) []Peer {
	var out []Peer
	for _, p := range t.Peers {
		if p.Role == r {
			out = append(out, p)
		}
	}
	return out
}

// Child is implemented by every role (balancer, worker, broker). Calls may
// come concurrently; Start comes first and once.
type Child interface {
	Start(ctx context.Context, p StartParams) (StartResult, error)
	Health(ctx context.Context) (Health, error)
	Stats(ctx context.Context) (Stats, error)
	SetTopology(ctx context.Context, t Topology) error
	Drain(ctx context.Context, timeout time.Duration) error
	Stop(ctx context.Context) error
}

// Reloader is implemented by roles that can apply a new config in place
// (SIGHUP). It is optional: the supervisor finds it by type assertion on the
// client it dispenses, and a child without it answers codes.Unimplemented.
type Reloader interface {
	Reload(ctx context.Context, config []byte) error
}

// Handoverer is implemented by roles that can drain for a rolling restart:
// client sockets are closed with code (an immediate-reconnect code such as
// 4000) spread over window, instead of all at once with 1001. Optional, like
// Reloader; the supervisor falls back to Drain on Unimplemented.
type Handoverer interface {
	Handover(ctx context.Context, code int, reason string, window, timeout time.Duration) error
}

// Handshake keeps a shoal binary from being started as a child by accident
// and checks that parent and child speak the same control protocol.
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  1,
	MagicCookieKey:   "SHOAL_CHILD_COOKIE",
	MagicCookieValue: "a5f3c1e0-shoal-child",
}

// PluginName is the single plugin every child serves.
const PluginName = "child"

// PluginMap is the plugin set for both sides (the client side needs no Impl).
func PluginMap(impl Child) plugin.PluginSet {
	return plugin.PluginSet{PluginName: &ChildPlugin{Impl: impl}}
}

// Serve runs a child's control server until the supervisor shuts it down. It
// also exits the process when the parent dies, so no child outlives a
// SIGKILLed supervisor (belt and braces with the parent's Pdeathsig).
func Serve(impl Child, logger hclog.Logger) {
	// Only the supervisor decides when a child stops: a SIGTERM sent to the
	// whole process group (systemd's KillMode=control-group, `kill -- -pgid`)
	// must not kill children before the supervisor has drained them. go-plugin
	// already ignores SIGINT for the same reason.
	signal.Ignore(syscall.SIGTERM)
	go watchParent(os.Getppid(), logger)
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: Handshake,
		Plugins:         PluginMap(impl),
		GRPCServer:      plugin.DefaultGRPCServer,
		Logger:          logger,
	})
}

func watchParent(ppid int, logger hclog.Logger) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for range t.C {
		if os.Getppid() != ppid {
			logger.Error("supervisor is gone; exiting", "old_ppid", ppid)
			os.Exit(3)
		}
	}
}

// NewLogger is the logger a child uses: JSON lines on stderr, which go-plugin
// hands to the supervisor's central log. Children never write to stdout: it
// carries the go-plugin handshake.
func NewLogger(name, level string) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:       name,
		Level:      hclog.LevelFromString(level),
		Output:     os.Stderr,
		JSONFormat: true,
	})
}
