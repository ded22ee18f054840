package brokerclient_test

import (
	"context"
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"github.com/shoalhq/shoal/broker"
	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/proto/link"
)

// startSecureBroker serves a broker's links on loopback TCP secured with
// secret, as a broker with cluster.secret_env does for other nodes.
func startSecureBroker(t *testing.T, secret string, mod ...func(*broker.ServerConfig)) brokerclient.Endpoint {
	t.Helper()
	sec, err := link.NewSecure([]byte(secret))
	if err != nil {
		t.Fatal(err)
	}
	cfg := broker.ServerConfig{Name: "broker-tls", Secure: sec}
	for _, f := range mod {
		f(&cfg)
	}
	srv := broker.NewServer(cfg)
	t.Cleanup(func() { srv.Close(context.Background()) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.ServeSecure(ln); err != nil {
		t.Fatal(err)
	}
	return brokerclient.Endpoint{Name: "broker-tls", Addr: link.ListenerAddr(ln)}
}

func withSecret(t *testing.T, secret string) func(*brokerclient.Options) {
	return func(o *brokerclient.Options) {
		if secret == "" {
			return
		}
		sec, err := link.NewSecure([]byte(secret))
		if err != nil {
			t.Fatal(err)
		}
		o.Secure = sec
	}
}

// Workers with the cluster secret publish and receive through a broker's
// secured TCP links exactly as over plain ones; a worker with another
// secret, or none, never gets a link.
func TestSecureLinksNeedTheClusterSecret(t *testing.T) {
	const secret = "correct horse battery staple"
	ep := startSecureBroker(t, secret)

	pub, _ := newClient(t, "worker-1", withSecret(t, secret))
	sub, subRec := newClient(t, "worker-2", withSecret(t, secret))
	for _, c := range []*brokerclient.Client{pub, sub} {
		c.SetBrokers([]brokerclient.Endpoint{ep})
		waitConnected(t, c, 1)
	}
	sub.Subscribe("chat")
	waitFor(t, 5*time.Second, "the subscription over TLS", func() bool {
		_, err := publishSync(t, pub, "chat", `"probe"`)
		return err == nil && len(subRec.get("chat")) > 0
	})
	before := len(subRec.get("chat"))
	const n = 200
	publishNumbered(t, pub, "chat", n)
	waitFor(t, 5*time.Second, "deliveries", func() bool { return len(subRec.get("chat")) == before+n })
	checkInOrder(t, "subscriber", "chat", subRec.get("chat")[before:], n)

	for _, other := range []string{"another cluster's secret value", ""} {
		c, _ := newClient(t, "intruder", withSecret(t, other))
		c.SetBrokers([]brokerclient.Endpoint{ep})
		time.Sleep(300 * time.Millisecond) // several dial attempts (20–250 ms backoff)
		if n := c.Stats().Connected; n != 0 {
			t.Fatalf("a worker with secret %q got a link", other)
		}
	}
}

// Connections that never finish their TLS handshake hold at most
// MaxSecuring places; past that the broker closes new ones at once, and a
// real worker gets its link once the silent ones are gone.
func TestSecureLinksBoundHandshakesInFlight(t *testing.T) {
	const secret = "correct horse battery staple"
	ep := startSecureBroker(t, secret, func(c *broker.ServerConfig) { c.MaxSecuring = 2 })
	addr := ep.Addr[len("tcp:"):]
	var silent []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		silent = append(silent, c)
	}
	time.Sleep(100 * time.Millisecond) // both accepted and waiting in their handshake
	extra, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	_ = extra.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := extra.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a third silent connection was kept: %v", err)
	}
	for _, c := range silent {
		c.Close()
	}
	w, _ := newClient(t, "worker-1", withSecret(t, secret))
	w.SetBrokers([]brokerclient.Endpoint{ep})
	waitConnected(t, w, 1)
}
