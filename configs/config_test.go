package configs

import (
	"encoding/json"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestDefaultYAMLMatchesDefault(t *testing.T) {
	got := LoadDefault()
	want := Default()
	want.normalize()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("default.yaml and Default() disagree:\n yaml: %+v\n  Go: %+v", got, want)
	}
}

func TestExampleConfigLoads(t *testing.T) {
	// The product's vocabulary (shared/config-example.yaml) is kept as a twin here.
	cfg, err := LoadFile("testdata/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Cluster.Brokers != 2 || cfg.Protocol.MaxPayload != 1<<20 || cfg.Protocol.PingInterval.D() != 8*time.Second {
		t.Fatalf("unexpected values: %+v", cfg)
	}
	if len(cfg.Channels) != 2 || cfg.Channels[0].SlowConsumer != "drop_oldest" || cfg.Channels[0].History.Size != 100 {
		t.Fatalf("channels: %+v", cfg.Channels)
	}
	if len(cfg.Middleware.Inbound) != 4 {
		t.Fatalf("inbound rules: %d", len(cfg.Middleware.Inbound))
	}
}

func TestJSONRoundTrip(t *testing.T) {
	cfg, err := LoadFile("testdata/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var back Config
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	// Generic middleware maps turn numbers into float64 through JSON; compare the rest.
	cfg.Middleware, back.Middleware = Middleware{}, Middleware{}
	if !reflect.DeepEqual(cfg, back) {
		t.Fatalf("JSON round trip changed the config:\n%+v\n%+v", cfg, back)
	}
}

func TestEmptyFileIsDefault(t *testing.T) {
	for _, src := range []string{"", "# nothing\n", "---\n"} {
		cfg, err := Load([]byte(src), "empty.yaml")
		if err != nil {
			t.Fatalf("%q: %v", src, err)
		}
		if cfg.Listen.Public != ":8000" || cfg.Cluster.Brokers != 2 {
			t.Fatalf("%q: not the defaults: %+v", src, cfg)
		}
	}
}

func TestErrorsNameKeyAndLine(t *testing.T) {
	cases := []struct {
		name, src, want string
	}{
		{"unknown key", "cluster:\n  workers: 2\n  brokerz: 3\n", `bad.yaml:3: cluster.brokerz: unknown key (did you mean "brokers"?)`},
		{"unknown top key", "clustr: {}\n", `bad.yaml:1: clustr: unknown key (did you mean "cluster"?)`},
		{"bad duration", "protocol:\n  ping_interval: 8x\n", `bad.yaml:2: protocol.ping_interval: invalid duration "8x"`},
		{"bad int", "protocol:\n  version: two\n", `bad.yaml:2: protocol.version: expected a whole number, got "two"`},
		{"bad size", "protocol:\n  max_payload: lots\n", `bad.yaml:2: protocol.max_payload: invalid size "lots"`},
		{"bad bool", "protocol:\n  allow_client_publish: maybe\n", `bad.yaml:2: protocol.allow_client_publish: expected true or false`},
		{"list expected", "cluster:\n  join: 10.0.0.1:7946\n", `bad.yaml:2: cluster.join: expected a list`},
		{"mapping expected", "listen: 8000\n", `bad.yaml:1: listen: expected a mapping of keys`},
		{"semantic", "protocol:\n  ping_interval: 40s\n", `bad.yaml:1: protocol.ping_timeout: must be longer than ping_interval (40s)`},
		{"semantic in list", "channels:\n  - match: a\n  - match: b\n    slow_consumer: bogus\n", `bad.yaml:4: channels[1].slow_consumer: must be disconnect, drop_oldest or latest`},
		{"bad workers", "cluster:\n  workers: -1\n", `bad.yaml:2: cluster.workers: invalid count "-1"`},
		{"bad address", "listen:\n  public: 8000\n", `bad.yaml:2: listen.public: expected host:port, got "8000"`},
		{"syntax", "cluster: [\n", `bad.yaml:1: did not find expected node content`},
		{"bad rate key", "cluster:\n  restart: {crash_loop: {crashes: 0}}\n", `bad.yaml:2: cluster.restart.crash_loop.crashes: must be at least 1`},
		{"bad broker gomaxprocs", "broker:\n  gomaxprocs: -2\n", `bad.yaml:2: broker.gomaxprocs: must be between 1 and 1024 (0: the default, 1), got -2`},
		{"bad drain window", "worker:\n  drain_window: 10m\n", `bad.yaml:2: worker.drain_window: must be between 0 (all at once) and 5m, got 10m0s`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Load([]byte(c.src), "bad.yaml")
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not contain %q", err, c.want)
			}
		})
	}
}

func TestTypes(t *testing.T) {
	var s ByteSize
	for in, want := range map[string]ByteSize{"1MiB": 1 << 20, "512KiB": 512 << 10, "100MB": 100e6, "65536": 65536, "2 GiB": 2 << 30} {
		if err := s.UnmarshalText([]byte(in)); err != nil || s != want {
			t.Errorf("%q → %d, %v; want %d", in, s, err, want)
		}
	}
	var r Rate
	if err := r.UnmarshalText([]byte("20/s")); err != nil || r.PerSecond() != 20 {
		t.Errorf("rate 20/s → %v %v", r, err)
	}
	if err := r.UnmarshalText([]byte("60/m")); err != nil || r.PerSecond() != 1 {
		t.Errorf("rate 60/m → %v %v", r, err)
	}
	var c Count
	if err := c.UnmarshalText([]byte("auto")); err != nil || c.N() < 1 {
		t.Errorf("auto → %v %v", c, err)
	}
}

func TestLoadFileMissing(t *testing.T) {
	_, err := LoadFile("testdata/does-not-exist.yaml")
	if err == nil || !os.IsNotExist(errUnwrapAll(err)) {
		t.Fatalf("want not-exist error, got %v", err)
	}
}

func errUnwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return err
		}
		err = u.Unwrap()
	}
}

func TestEnvOverrides(t *testing.T) {
	env := map[string]string{
		"SHOAL_PROTOCOL_PING_INTERVAL":        "2s",
		"SHOAL_CLUSTER_WORKERS":               "3",
		"SHOAL_CLUSTER_JOIN":                  "10.0.0.2:7946, 10.0.0.3:7946",
		"SHOAL_PROTOCOL_MAX_PAYLOAD":          "2MiB",
		"SHOAL_CLUSTER_BALANCERS":             "0",
		"SHOAL_AUTH_KEY":                      "not-an-override",
		"SHOAL_PROTOCOL_ALLOW_CLIENT_PUBLISH": "false",
	}
	lookupEnv = func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	defer func() { lookupEnv = os.LookupEnv }()
	cfg, err := Load([]byte("protocol:\n  ping_interval: 5s\n"), "x.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Protocol.PingInterval.D() != 2*time.Second || cfg.Cluster.Workers != 3 || len(cfg.Cluster.Join) != 2 ||
		cfg.Protocol.MaxPayload != 2<<20 || cfg.Cluster.BalancerCount() != 0 || cfg.Protocol.ClientPublishAllowed() {
		t.Fatalf("env not applied: %+v", cfg)
	}
	env = map[string]string{"SHOAL_PROTOCOL_PING_INTERVAL": "soon"}
	_, err = Load(nil, "x.yaml")
	if err == nil || !strings.Contains(err.Error(), "env SHOAL_PROTOCOL_PING_INTERVAL: protocol.ping_interval: invalid duration") {
		t.Fatalf("got %v", err)
	}
	if len(EnvOverrides()) < 30 {
		t.Fatalf("few overrides: %v", EnvOverrides())
	}
}

func TestClusterSecret(t *testing.T) {
	c := Default().Cluster
	if c.SecretEnv != "SHOAL_CLUSTER_SECRET" {
		t.Fatalf("default secret_env %q", c.SecretEnv)
	}
	t.Setenv("SHOAL_CLUSTER_SECRET", "")
	if s, err := c.Secrets(); s != nil || err != nil {
		t.Fatalf("unset: %q %v", s, err)
	}
	t.Setenv("SHOAL_CLUSTER_SECRET", "too short")
	if _, err := c.Secrets(); err == nil || !strings.Contains(err.Error(), "cluster.secret_env: secret 1 in $SHOAL_CLUSTER_SECRET has 9 bytes") {
		t.Fatalf("short secret: %v", err)
	}
	t.Setenv("MY_SECRET", "sixteen bytes ok")
	c.SecretEnv = "MY_SECRET"
	if s, err := c.Secrets(); len(s) != 1 || string(s[0]) != "sixteen bytes ok" || err != nil {
		t.Fatalf("secret from secret_env: %q %v", s, err)
	}
	// While the secret changes: the one in use first, then the accepted.
	t.Setenv("MY_SECRET", " the new secret value , the old secret value ")
	if s, err := c.Secrets(); len(s) != 2 || string(s[0]) != "the new secret value" || string(s[1]) != "the old secret value" || err != nil {
		t.Fatalf("two secrets: %q %v", s, err)
	}
	t.Setenv("MY_SECRET", "the new secret value,old")
	if _, err := c.Secrets(); err == nil || !strings.Contains(err.Error(), "secret 2 in $MY_SECRET has 3 bytes") {
		t.Fatalf("a short second secret: %v", err)
	}
	c.SecretEnv = ""
	if s, err := c.Secrets(); s != nil || err != nil {
		t.Fatalf("secret_env \"\": %q %v", s, err)
	}
}
