// Package configs holds Shoal's typed configuration: the structs every
// process reads, the embedded default config, and the loader that names the
// key and line of every mistake.
//
// Zero values mean "use the default": Load starts from Default() and the YAML
// overrides only what it names. The same struct travels to child processes as
// JSON (see proto/control), so every type here must round-trip through both
// YAML and JSON.
package configs

import (
	_ "embed"
	"fmt"
	"os"
	"strings"
	"time"
)

// DefaultYAML is the embedded default config used by `shoal run` with no -c.
//
//go:embed default.yaml
var DefaultYAML []byte

// Config is the whole config file.
type Config struct {
	Cluster    Cluster       `yaml:"cluster" json:"cluster"`
	Listen     Listen        `yaml:"listen" json:"listen"`
	Protocol   Protocol      `yaml:"protocol" json:"protocol"`
	Auth       Auth          `yaml:"auth" json:"auth"`
	Middleware Middleware    `yaml:"middleware" json:"middleware"`
	Channels   []ChannelRule `yaml:"channels" json:"channels"`
	API        API           `yaml:"api" json:"api"`
	Webhooks   Webhooks      `yaml:"webhooks" json:"webhooks"`
	Storage    Storage       `yaml:"storage" json:"storage"`
	Log        Log           `yaml:"log" json:"log"`
	Worker     WorkerTuning  `yaml:"worker" json:"worker"`
	Broker     BrokerTuning  `yaml:"broker" json:"broker"`
}

// Cluster is the process tree and the gossip ring.
type Cluster struct {
	Workers   Count    `yaml:"workers" json:"workers"`     // auto = one per CPU
	Brokers   int      `yaml:"brokers" json:"brokers"`     // broker processes on this node
	Balancers *int     `yaml:"balancers" json:"balancers"` // 0 = SO_REUSEPORT on the workers; nil = 1
	Join      []string `yaml:"join" json:"join"`           // other nodes' gossip addresses
	Gossip    string   `yaml:"gossip" json:"gossip"`       // this node's memberlist bind address
	// SecretEnv names the environment variable holding the cluster secret
	// (at least 16 bytes, the same on every node; comma-separated while it
	// is being changed, see Secrets). Set, it encrypts and authenticates
	// gossip and the workers' TCP links to brokers; unset or empty, both
	// are plain (docs/multihost.md).
	SecretEnv string  `yaml:"secret_env" json:"secret_env"`
	Restart   Restart `yaml:"restart" json:"restart"`
}

// MinClusterSecret is the shortest cluster secret accepted, in bytes.
const MinClusterSecret = 16

// Secrets reads the cluster secrets from the variable SecretEnv names: nil
// when that variable is unset or empty. The variable holds one secret, or
// several separated by commas while a secret is being changed: the first
// is used (gossip encryption, link proofs), every one is accepted
// (docs/multihost.md, "Changing the secret"). An error names the variable
// when a secret is too short to be one.
func (c Cluster) Secrets() ([][]byte, error) {
	if c.SecretEnv == "" {
		return nil, nil
	}
	v := os.Getenv(c.SecretEnv)
	if strings.TrimSpace(v) == "" {
		return nil, nil
	}
	var out [][]byte
	for i, part := range strings.Split(v, ",") {
		part = strings.TrimSpace(part)
		if len(part) < MinClusterSecret {
			return nil, fmt.Errorf("cluster.secret_env: secret %d in $%s has %d bytes; a cluster secret needs at least %d", i+1, c.SecretEnv, len(part), MinClusterSecret)
		}
		out = append(out, []byte(part))
	}
	return out, nil
}

// BalancerCount resolves the balancer count (nil means the default, 1).
func (c Cluster) BalancerCount() int {
	if c.Balancers == nil {
		return 1
	}
	return *c.Balancers
}

// Restart is the supervisor's restart policy.
type Restart struct {
	BackoffMin Duration  `yaml:"backoff_min" json:"backoff_min"` // first delay after a crash
	BackoffMax Duration  `yaml:"backoff_max" json:"backoff_max"`
	CrashLoop  CrashLoop `yaml:"crash_loop" json:"crash_loop"`
}

// CrashLoop: a child that crashes Crashes times within Window is not restarted again.
type CrashLoop struct {
	Crashes int      `yaml:"crashes" json:"crashes"`
	Window  Duration `yaml:"window" json:"window"`
}

// Listen is every address Shoal listens on.
type Listen struct {
	Public string `yaml:"public" json:"public"` // ws:// and plain HTTP
	TLS    TLS    `yaml:"tls" json:"tls"`
	Admin  string `yaml:"admin" json:"admin"` // supervisor admin HTTP; loopback by default
	Path   string `yaml:"path" json:"path"`   // WebSocket path
}

// TLS configures wss:// termination.
type TLS struct {
	Listen string `yaml:"listen" json:"listen"` // empty = no TLS listener
	Cert   string `yaml:"cert" json:"cert"`
	Key    string `yaml:"key" json:"key"`
	Auto   bool   `yaml:"auto" json:"auto"` // generate a self-signed development certificate
}

// Protocol is the SocketCluster protocol's knobs (names follow socketcluster-server).
type Protocol struct {
	Version            int      `yaml:"version" json:"version"` // 2, or 1 for legacy clients
	PingInterval       Duration `yaml:"ping_interval" json:"ping_interval"`
	PingTimeout        Duration `yaml:"ping_timeout" json:"ping_timeout"`
	HandshakeTimeout   Duration `yaml:"handshake_timeout" json:"handshake_timeout"`
	MaxPayload         ByteSize `yaml:"max_payload" json:"max_payload"`
	AllowClientPublish *bool    `yaml:"allow_client_publish" json:"allow_client_publish"`
	SocketChannelLimit int      `yaml:"socket_channel_limit" json:"socket_channel_limit"`
	Origins            []string `yaml:"origins" json:"origins"`
	// PublishAck is when a client's #publish invoke is answered for a
	// channel without history: PublishAckLocal (default, as
	// socketcluster-server) once the publish passed the inbound middleware
	// and was queued on the owning broker's link; PublishAckBroker once
	// that broker acknowledged it. Channels with history always use broker.
	PublishAck string `yaml:"publish_ack" json:"publish_ack"`
}

// The values of protocol.publish_ack.
const (
	PublishAckLocal  = "local"
	PublishAckBroker = "broker"
)

// PublishAckIsLocal reports whether history-less publishes are acknowledged
// once queued on the broker link (publish_ack: local, also when unset).
func (p Protocol) PublishAckIsLocal() bool {
	return p.PublishAck != PublishAckBroker
}

// ClientPublishAllowed resolves allow_client_publish (default true).
func (p Protocol) ClientPublishAllowed() bool {
	return p.AllowClientPublish == nil || *p.AllowClientPublish
}

// Auth configures token verification and signing.
type Auth struct {
	JWT JWT `yaml:"jwt" json:"jwt"`
}

// JWT: keys come from an env var or files, never inline in the config.
type JWT struct {
	Algorithms    []string `yaml:"algorithms" json:"algorithms"`
	KeyEnv        string   `yaml:"key_env" json:"key_env"`                 // HMAC secret in this env var
	KeyFile       string   `yaml:"key_file" json:"key_file"`               // HMAC secret or private key file
	PublicKeyFile string   `yaml:"public_key_file" json:"public_key_file"` // RSA/ECDSA/Ed25519 public key (PEM)
	PublicKeyEnv  string   `yaml:"public_key_env" json:"public_key_env"`   // the same PEM in this env var
	JWKSFile      string   `yaml:"jwks_file" json:"jwks_file"`
	Leeway        Duration `yaml:"leeway" json:"leeway"`
	DefaultExpiry Duration `yaml:"default_expiry" json:"default_expiry"`
}

// Middleware stages; each rule is a one-key map (rule name → options). The
// middleware issue types these; until then they are kept as generic maps.
type Middleware struct {
	Handshake []map[string]any `yaml:"handshake" json:"handshake"`
	Inbound   []map[string]any `yaml:"inbound" json:"inbound"`
	Outbound  []map[string]any `yaml:"outbound" json:"outbound"`
}

// ChannelRule gives options to channels whose name matches a pattern.
type ChannelRule struct {
	Match        string   `yaml:"match" json:"match"`
	History      History  `yaml:"history" json:"history"`
	Durable      bool     `yaml:"durable" json:"durable"`
	Presence     bool     `yaml:"presence" json:"presence"`
	JoinLeave    bool     `yaml:"join_leave" json:"join_leave"`
	Recover      Duration `yaml:"recover" json:"recover"`
	SlowConsumer string   `yaml:"slow_consumer" json:"slow_consumer"` // disconnect | drop_oldest | latest
}

// History bounds a channel's history.
type History struct {
	Size int      `yaml:"size" json:"size"`
	TTL  Duration `yaml:"ttl" json:"ttl"`
}

// API is the server HTTP API on the public port.
type API struct {
	KeyEnv string `yaml:"key_env" json:"key_env"`
}

// Webhooks POSTs cluster events to a backend.
type Webhooks struct {
	URL       string   `yaml:"url" json:"url"`
	SecretEnv string   `yaml:"secret_env" json:"secret_env"`
	Events    []string `yaml:"events" json:"events"`
}

// Storage is where data files go.
type Storage struct {
	Dir string `yaml:"dir" json:"dir"`
}

// Log is the central log.
type Log struct {
	File   string `yaml:"file" json:"file"` // default <storage.dir>/log/shoal.log
	Level  string `yaml:"level" json:"level"`
	Rotate Rotate `yaml:"rotate" json:"rotate"`
}

// Rotate: the log rolls over at Size and keeps Keep old files.
type Rotate struct {
	Size ByteSize `yaml:"size" json:"size"`
	Keep int      `yaml:"keep" json:"keep"`
}

// WorkerTuning holds per-worker limits that are not protocol options.
type WorkerTuning struct {
	GoMaxProcs     int      `yaml:"gomaxprocs" json:"gomaxprocs"`           // Go scheduler threads per worker (default 1)
	SendQueue      ByteSize `yaml:"send_queue" json:"send_queue"`           // bytes queued per socket before the slow-consumer policy applies
	SendQueueMsgs  int      `yaml:"send_queue_msgs" json:"send_queue_msgs"` // messages queued per socket
	MaxConnections int      `yaml:"max_connections" json:"max_connections"` // per worker
	WriteTimeout   Duration `yaml:"write_timeout" json:"write_timeout"`     // a socket that accepts no bytes this long is closed
	DrainWindow    Duration `yaml:"drain_window" json:"drain_window"`       // rolling restart: a worker's clients are told to reconnect spread over this long
}

// BrokerTuning holds per-broker process settings.
type BrokerTuning struct {
	// GoMaxProcs is the Go scheduler threads of each broker (default 1;
	// 0 means the default). A broker's own work per publish is under a
	// microsecond; waking threads costs more. With one P a link's writer
	// goroutine runs on the reader's thread once the reader blocks, so a
	// read batch's replies go out in one write and no other thread is woken
	// (measured in docs/brokers.md, "Go scheduler threads"). Raise it, or
	// add brokers, when one core per broker is not enough.
	GoMaxProcs int `yaml:"gomaxprocs" json:"gomaxprocs"`
}

// Default returns the config every zero field falls back to. It matches
// default.yaml (a test keeps them in step).
func Default() Config {
	one := 1
	return Config{
		Cluster: Cluster{
			Workers:   0,
			Brokers:   2,
			Balancers: &one,
			Gossip:    "127.0.0.1:7946",
			SecretEnv: "SHOAL_CLUSTER_SECRET",
			Restart: Restart{
				BackoffMin: Duration(200 * time.Millisecond),
				BackoffMax: Duration(30 * time.Second),
				CrashLoop:  CrashLoop{Crashes: 5, Window: Duration(60 * time.Second)},
			},
		},
		Listen: Listen{
			Public: ":8000",
			Admin:  "127.0.0.1:8001",
			Path:   "/socketcluster/",
		},
		Protocol: Protocol{
			Version:            2,
			PingInterval:       Duration(8 * time.Second),
			PingTimeout:        Duration(30 * time.Second),
			HandshakeTimeout:   Duration(10 * time.Second),
			MaxPayload:         1 << 20,
			SocketChannelLimit: 1000,
			Origins:            []string{"*"},
			PublishAck:         PublishAckLocal,
		},
		Auth: Auth{JWT: JWT{
			Algorithms:    []string{"HS256"},
			KeyEnv:        "SHOAL_AUTH_KEY",
			Leeway:        Duration(5 * time.Second),
			DefaultExpiry: Duration(24 * time.Hour),
		}},
		API:      API{KeyEnv: "SHOAL_API_KEY"},
		Webhooks: Webhooks{SecretEnv: "SHOAL_WEBHOOK_SECRET"},
		Storage:  Storage{Dir: "./data"},
		Log: Log{
			Level:  "info",
			Rotate: Rotate{Size: 100 << 20, Keep: 5},
		},
		Worker: WorkerTuning{
			GoMaxProcs:     1,
			SendQueue:      4 << 20,
			SendQueueMsgs:  4096,
			MaxConnections: 19000,
			WriteTimeout:   Duration(10 * time.Second),
			DrainWindow:    Duration(2 * time.Second),
		},
		Broker: BrokerTuning{GoMaxProcs: 1},
	}
}
