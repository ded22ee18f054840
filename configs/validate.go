package configs

import (
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"time"
)

// Validator checks part of a config that configs does not type itself (e.g.
// middleware rules). Returned errors carry Key (dotted path, like
// "middleware.inbound[1].rate.per_socket"); Load adds the file and line.
type Validator func(c *Config) []*Error

var validators []Validator

// RegisterValidator adds a Validator run by every Load. Call it from an init
// function of the package that owns the checked part.
func RegisterValidator(v Validator) { validators = append(validators, v) }

// normalize fills values derived from others.
func (c *Config) normalize() {
	if c.Log.File == "" {
		c.Log.File = filepath.Join(c.Storage.Dir, "log", "shoal.log")
	}
	if c.Worker.GoMaxProcs <= 0 {
		c.Worker.GoMaxProcs = 1
	}
	if c.Broker.GoMaxProcs == 0 {
		c.Broker.GoMaxProcs = 1
	}
}

func (c *Config) validate() Errors {
	var errs Errors
	bad := func(key, format string, args ...any) {
		errs = append(errs, &Error{Key: key, Msg: fmt.Sprintf(format, args...)})
	}
	if c.Cluster.Brokers < 1 {
		bad("cluster.brokers", "must be at least 1")
	}
	if n := c.Cluster.BalancerCount(); n < 0 || n > 64 {
		bad("cluster.balancers", "must be between 0 and 64")
	}
	if c.Cluster.Restart.CrashLoop.Crashes < 1 {
		bad("cluster.restart.crash_loop.crashes", "must be at least 1")
	}
	if c.Cluster.Restart.BackoffMax < c.Cluster.Restart.BackoffMin {
		bad("cluster.restart.backoff_max", "must not be below backoff_min")
	}
	for i, j := range c.Cluster.Join {
		if _, _, err := net.SplitHostPort(j); err != nil {
			bad(fmt.Sprintf("cluster.join[%d]", i), "expected host:port, got %q", j)
		}
	}
	checkAddr := func(key, addr string, required bool) {
		if addr == "" {
			if required {
				bad(key, "must be set (host:port)")
			}
			return
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			bad(key, "expected host:port, got %q", addr)
		}
	}
	checkAddr("cluster.gossip", c.Cluster.Gossip, true)
	checkAddr("listen.public", c.Listen.Public, true)
	checkAddr("listen.admin", c.Listen.Admin, false)
	checkAddr("listen.tls.listen", c.Listen.TLS.Listen, false)
	if c.Listen.TLS.Listen != "" && !c.Listen.TLS.Auto && (c.Listen.TLS.Cert == "" || c.Listen.TLS.Key == "") {
		bad("listen.tls", "set cert and key, or auto: true, when tls.listen is set")
	}
	if !strings.HasPrefix(c.Listen.Path, "/") {
		bad("listen.path", "must start with /, got %q", c.Listen.Path)
	}
	p := c.Protocol
	if p.Version != 1 && p.Version != 2 {
		bad("protocol.version", "must be 1 or 2, got %d", p.Version)
	}
	if p.PingInterval <= 0 {
		bad("protocol.ping_interval", "must be positive")
	}
	if p.PingTimeout <= p.PingInterval {
		bad("protocol.ping_timeout", "must be longer than ping_interval (%s)", p.PingInterval.D())
	}
	if p.HandshakeTimeout <= 0 {
		bad("protocol.handshake_timeout", "must be positive")
	}
	if p.MaxPayload < 1024 || p.MaxPayload > 64<<20 {
		bad("protocol.max_payload", "must be between 1KiB and 64MiB")
	}
	if p.SocketChannelLimit < 0 {
		bad("protocol.socket_channel_limit", "must not be negative (0 = no limit)")
	}
	switch p.PublishAck {
	case PublishAckLocal, PublishAckBroker:
	default:
		bad("protocol.publish_ack", "must be %q or %q, got %q", PublishAckLocal, PublishAckBroker, p.PublishAck)
	}
	for i, a := range c.Auth.JWT.Algorithms {
		if !KnownJWTAlgorithm(a) {
			bad(fmt.Sprintf("auth.jwt.algorithms[%d]", i), "unsupported algorithm %q (%s)", a, JWTAlgorithmsHint)
		}
	}
	for i, ch := range c.Channels {
		key := fmt.Sprintf("channels[%d]", i)
		if ch.Match == "" {
			bad(key+".match", "must be set")
		}
		switch ch.SlowConsumer {
		case "", "disconnect", "drop_oldest", "latest":
		default:
			bad(key+".slow_consumer", "must be disconnect, drop_oldest or latest, got %q", ch.SlowConsumer)
		}
	}
	switch c.Log.Level {
	case "trace", "debug", "info", "warn", "error":
	default:
		bad("log.level", "must be trace, debug, info, warn or error, got %q", c.Log.Level)
	}
	if c.Log.Rotate.Size < 1<<10 {
		bad("log.rotate.size", "must be at least 1KiB")
	}
	if c.Storage.Dir == "" {
		bad("storage.dir", "must be set")
	}
	w := c.Worker
	if w.SendQueue < 1<<10 {
		bad("worker.send_queue", "must be at least 1KiB")
	}
	if w.SendQueueMsgs < 1 {
		bad("worker.send_queue_msgs", "must be at least 1")
	}
	if w.MaxConnections < 1 {
		bad("worker.max_connections", "must be at least 1")
	}
	// A long window keeps a reload (one worker at a time) and the clients'
	// reconnect storm small, but the supervisor waits window+5s per worker.
	if w.DrainWindow < 0 || w.DrainWindow.D() > 5*time.Minute {
		bad("worker.drain_window", "must be between 0 (all at once) and 5m, got %s", w.DrainWindow.D())
	}
	// Beyond the cores a machine can have, more Ps only add idle threads.
	if n := c.Broker.GoMaxProcs; n < 0 || n > 1024 {
		bad("broker.gomaxprocs", "must be between 1 and 1024 (0: the default, 1), got %d", n)
	}
	for _, v := range validators {
		errs = append(errs, v(c)...)
	}
	return errs
}

// KnownJWTAlgorithm reports whether a JWT "alg" is one Shoal verifies. The
// one list for the config check, package auth and the middleware jwt rule.
func KnownJWTAlgorithm(a string) bool {
	switch a {
	case "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA":
		return true
	}
	return false
}

// JWTAlgorithmsHint names the algorithms KnownJWTAlgorithm accepts, for errors.
const JWTAlgorithmsHint = "use HS256/384/512, RS256/384/512, PS256/384/512, ES256/384/512, EdDSA"
