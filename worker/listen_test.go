package worker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/gobwas/ws"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/proto/control"
)

// dialFrom opens a WebSocket to url from the local address fromIP; a
// refused upgrade comes back as ws.StatusError.
func dialFrom(t *testing.T, url, fromIP string, roots *x509.CertPool) (*wsClient, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	nd := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(fromIP)}}
	d := ws.Dialer{
		NetDial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return nd.DialContext(ctx, network, addr)
		},
		TLSConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
	}
	c, _, _, err := d.Dial(ctx, url)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	return &wsClient{t: t, c: c}, nil
}

// With cluster.balancers: 0 the worker binds the public ports itself: ws://
// and wss:// (TLS terminated in the worker, the generated certificate) reach
// its sessions with the client's real address, worker.max_connections still
// refuses, and Drain closes the listeners before the sockets.
func TestChildListensWithoutBalancer(t *testing.T) {
	storage := t.TempDir()
	c, res, _ := startChild(t, func(cfg *configs.Config) {
		zero := 0
		cfg.Cluster.Balancers = &zero
		cfg.Listen.Public = "127.0.0.1:0"
		cfg.Listen.TLS = configs.TLS{Listen: "127.0.0.1:0", Auto: true}
		cfg.Storage.Dir = storage
		cfg.Worker.MaxConnections = 2
		cfg.Middleware.Handshake = []map[string]any{{"cidr": map[string]any{"deny": []any{"127.0.0.3/32"}}}}
	})
	// Both at 127.0.0.1:0, i.e. the same address: one port for ws:// and
	// wss://, told apart by the first byte (as in the balancer).
	pub, tlsAddr := res.Addrs[control.AddrPublic], res.Addrs[control.AddrTLS]
	if pub == "" || tlsAddr != pub {
		t.Fatalf("addrs %v: want public = tls", res.Addrs)
	}
	pem, err := os.ReadFile(filepath.Join(storage, "tls", "dev-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)

	// The real address reaches the handshake middleware on both schemes.
	for _, url := range []string{"ws://" + pub + "/socketcluster/", "wss://" + tlsAddr + "/socketcluster/"} {
		_, err := dialFrom(t, url, "127.0.0.3", roots)
		var se ws.StatusError
		if !errors.As(err, &se) || int(se) != 403 {
			t.Fatalf("%s from 127.0.0.3: %v, want HTTP 403", url, err)
		}
	}
	plain, err := dialFrom(t, "ws://"+pub+"/socketcluster/", "127.0.0.2", roots)
	if err != nil {
		t.Fatal(err)
	}
	plain.handshake("")
	secure, err := dialFrom(t, "wss://"+tlsAddr+"/socketcluster/", "127.0.0.2", roots)
	if err != nil {
		t.Fatal(err)
	}
	secure.handshake("")
	ctx := context.Background()
	if st, _ := c.Stats(ctx); st.Connections != 2 || st.Counters["listen_handed"] < 1 || st.Counters["listen_proxied"] < 1 {
		t.Fatalf("stats %d connections, counters %v", st.Connections, st.Counters)
	}

	// Full: a third connection, plain or TLS, is refused.
	for _, url := range []string{"ws://" + pub + "/socketcluster/", "wss://" + tlsAddr + "/socketcluster/"} {
		if _, err := dialFrom(t, url, "127.0.0.2", roots); err == nil {
			t.Fatalf("%s admitted past worker.max_connections", url)
		}
	}
	if st, _ := c.Stats(ctx); st.Counters["refused_max_connections"] < 2 {
		t.Fatalf("refused %v", st.Counters)
	}

	// Drain: the sockets close with 1001 and nothing listens any more (the
	// kernel would route to the other workers).
	drained := make(chan error, 1)
	go func() { drained <- c.Drain(ctx, 5*time.Second) }()
	// Each hangs up after the close frame, as a client does.
	plain.expectClose(CodeGoingAway)
	plain.c.Close()
	secure.expectClose(CodeGoingAway)
	secure.c.Close()
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{pub, tlsAddr} {
		if conn, err := net.DialTimeout("tcp", a, time.Second); err == nil {
			conn.Close()
			t.Fatalf("%s still accepts after Drain", a)
		}
	}
}
