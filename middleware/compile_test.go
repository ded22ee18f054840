package middleware

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/shoalhq/shoal/configs"
)

func TestCompileErrorsNameTheKey(t *testing.T) {
	tests := []struct {
		name string
		yml  string
		key  string
		msg  string
	}{
		{"unknown rule", "middleware:\n  inbound:\n    - rates: {per_socket: 1/s}\n", "middleware.inbound[0].rates", `did you mean "rate"`},
		{"not built rule", "middleware:\n  inbound:\n    - socket_channel_limit: 10\n", "middleware.inbound[0].socket_channel_limit", "not available"},
		{"plugin binary missing", "middleware:\n  inbound:\n    - plugin: {path: ./no-such-plugin}\n", "middleware.inbound[0].plugin.path", "no such file"},
		{"plugin bad stage", "middleware:\n  inbound:\n    - plugin: {path: ./no-such-plugin, stages: [publishOut]}\n", "middleware.inbound[0].plugin.stages[0]", "not an action"},
		{"two keys", "middleware:\n  inbound:\n    - {rate: {per_socket: 1/s}, cidr: {deny: [1.2.3.4]}}\n", "middleware.inbound[0]", "exactly one key"},
		{"unknown option", "middleware:\n  inbound:\n    - rate: {per_sockt: 1/s, per_ip: 2/s}\n", "middleware.inbound[0].rate.per_sockt", `did you mean "per_socket"`},
		{"bad rate", "middleware:\n  inbound:\n    - rate: {per_socket: fast}\n", "middleware.inbound[0].rate.per_socket", "invalid rate"},
		{"zero rate", "middleware:\n  inbound:\n    - rate: {per_socket: 0/s}\n", "middleware.inbound[0].rate.per_socket", "more than zero"},
		{"rate needs a scope", "middleware:\n  inbound:\n    - rate: {burst: 3}\n", "middleware.inbound[0].rate", "per_socket"},
		{"handshake rate option", "middleware:\n  handshake:\n    - rate: {per_socket: 1/s, handshakes_per_ip: 2/s}\n", "middleware.handshake[0].rate.per_socket", "not a handshake option"},
		{"bad action", "middleware:\n  inbound:\n    - rate: {per_socket: 1/s, actions: [publishIn, publishOut]}\n", "middleware.inbound[0].rate.actions[1]", "not an action"},
		{"bad cidr", "middleware:\n  handshake:\n    - cidr: {deny: [\"10.0.0.0/33\"]}\n", "middleware.handshake[0].cidr.deny[0]", "CIDR"},
		{"empty cidr", "middleware:\n  handshake:\n    - cidr: {}\n", "middleware.handshake[0].cidr", "set allow"},
		{"channels not a list", "middleware:\n  inbound:\n    - channels: {match: x}\n", "middleware.inbound[0].channels", "expected a list"},
		{"channels missing match", "middleware:\n  inbound:\n    - channels:\n        - subscribe: deny\n", "middleware.inbound[0].channels[0].match", "must be set"},
		{"star inside a segment", "middleware:\n  inbound:\n    - channels:\n        - {match: \"a*b\", subscribe: deny}\n", "middleware.inbound[0].channels[0].match", "may only end a segment"},
		{"bad pattern", "middleware:\n  inbound:\n    - channels:\n        - {match: \"a/**/b\", subscribe: deny}\n", "middleware.inbound[0].channels[0].match", "last segment"},
		{"claim without template", "middleware:\n  inbound:\n    - channels:\n        - {match: \"a/*\", subscribe: {require: claim}}\n", "middleware.inbound[0].channels[0].subscribe.require", "{claim} segment"},
		{"bad require", "middleware:\n  inbound:\n    - channels:\n        - {match: \"a/*\", publish: {require: admin}}\n", "middleware.inbound[0].channels[0].publish.require", "authenticated or claim"},
		{"bad template", "middleware:\n  inbound:\n    - channels:\n        - {match: \"a/*\", publish: deny, error: {message: \"no {chanel}\"}}\n", "middleware.inbound[0].channels[0].error.message", "unknown variable {chanel}"},
		{"bad close code", "middleware:\n  handshake:\n    - cidr: {deny: [1.2.3.4], error: {code: 1000}}\n", "middleware.handshake[0].cidr.error.code", "between 4000 and 4999"},
		{"channels in handshake", "middleware:\n  handshake:\n    - channels: []\n", "middleware.handshake[0].channels", "middleware.inbound"},
		{"origins in inbound", "middleware:\n  inbound:\n    - origins: [\"*\"]\n", "middleware.inbound[0].origins", "middleware.handshake"},
		{"bad max_payload", "middleware:\n  inbound:\n    - max_payload: lots\n", "middleware.inbound[0].max_payload", "invalid size"},
		{"hook url", "middleware:\n  inbound:\n    - hook: {url: \"ftp://x\"}\n", "middleware.inbound[0].hook.url", "http://"},
		{"hook timeout", "middleware:\n  inbound:\n    - hook: {url: \"http://x\", timeout: soon}\n", "middleware.inbound[0].hook.timeout", "invalid duration"},
		{"rpc in outbound", "middleware:\n  outbound:\n    - rpc: {url: \"http://x\"}\n", "middleware.outbound[0].rpc", "inbound"},
		{"conn_limit negative", "middleware:\n  handshake:\n    - conn_limit: {per_ip: -1}\n", "middleware.handshake[0].conn_limit.per_ip", "negative"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := configs.Load([]byte(tc.yml), "test.yaml")
			var errs configs.Errors
			if !errors.As(err, &errs) {
				t.Fatalf("want configs.Errors, got %v", err)
			}
			for _, e := range errs {
				if e.Key == tc.key && strings.Contains(e.Msg, tc.msg) {
					if e.Line == 0 {
						t.Errorf("%s: no line number", e.Key)
					}
					return
				}
			}
			t.Fatalf("no error with key %q and %q in:\n%v", tc.key, tc.msg, err)
		})
	}
}

func TestCompileAcceptsTheVocabulary(t *testing.T) {
	// The example config minus the go-plugin rule, whose binary
	// (./plugins/audit) does not exist here: config check refuses a missing
	// plugin binary.
	data, err := os.ReadFile("../configs/testdata/example.yaml")
	if err != nil {
		t.Skip("example config not found:", err)
	}
	var kept []string
	for _, l := range strings.Split(string(data), "\n") {
		if !strings.Contains(l, "- plugin:") {
			kept = append(kept, l)
		}
	}
	cfg, err := configs.Load([]byte(strings.Join(kept, "\n")), "example.yaml")
	if err != nil {
		t.Fatalf("example config: %v", err)
	}
	c, err := Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseIdleConnections()
	var kinds []string
	for _, s := range c.Stats() {
		kinds = append(kinds, s.Rule)
	}
	want := "handshake[0].cidr handshake[1].conn_limit handshake[2].rate handshake[3].hook inbound[0].rate inbound[1].channels inbound[2].rpc"
	if got := strings.Join(kinds, " "); got != want {
		t.Fatalf("rules:\n got %s\nwant %s", got, want)
	}
}

func TestCompileFromJSONShapes(t *testing.T) {
	// Child processes get the config as JSON: numbers are float64, lists []any.
	var cfg configs.Config
	cfg.Middleware.Inbound = []map[string]any{
		{"rate": map[string]any{"per_socket": "2/s", "burst": float64(2)}},
		{"max_payload": map[string]any{"bytes": float64(10)}},
	}
	cfg.Middleware.Handshake = []map[string]any{
		{"conn_limit": map[string]any{"per_ip": float64(3)}},
	}
	c, err := Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseIdleConnections()
	if d := decide(c, Input{Action: PublishIn, Socket: anon("a", "10.0.0.1"), Data: []byte(`"12345678901"`)}); d.Verdict != Deny || d.Error.Name != "PayloadTooLargeError" {
		t.Fatalf("got %+v", d)
	}
}
