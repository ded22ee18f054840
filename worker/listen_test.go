package worker

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
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

// writeSelfSigned writes a fresh self-signed pair for 127.0.0.1 and returns
// the certificate's DER.
func writeSelfSigned(t *testing.T, certPath, keyPath string) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return der
}

// servedCert does a TLS handshake with addr and returns the leaf's DER.
func servedCert(t *testing.T, addr string) []byte {
	t.Helper()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].Raw
}

// SIGHUP with balancers: 0: the worker's Reload gives its TLS listener the
// new certificate; new handshakes get it and open wss:// sockets go on.
func TestChildReloadsCertificateWithoutBalancer(t *testing.T) {
	dir := t.TempDir()
	certA, keyA := filepath.Join(dir, "a.pem"), filepath.Join(dir, "a-key.pem")
	certB, keyB := filepath.Join(dir, "b.pem"), filepath.Join(dir, "b-key.pem")
	derA := writeSelfSigned(t, certA, keyA)
	derB := writeSelfSigned(t, certB, keyB)
	var cfg configs.Config
	c, res, _ := startChild(t, func(c *configs.Config) {
		zero := 0
		c.Cluster.Balancers = &zero
		c.Listen.Public = "127.0.0.1:0"
		c.Listen.TLS = configs.TLS{Listen: "127.0.0.1:0", Cert: certA, Key: keyA}
		c.Storage.Dir = dir
		cfg = *c
	})
	addr := res.Addrs[control.AddrTLS]
	if got := servedCert(t, addr); !bytes.Equal(got, derA) {
		t.Fatal("not serving certificate A")
	}
	roots := x509.NewCertPool()
	for _, der := range [][]byte{derA, derB} {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		roots.AddCert(cert)
	}
	open, err := dialFrom(t, "wss://"+addr+"/socketcluster/", "127.0.0.1", roots)
	if err != nil {
		t.Fatal(err)
	}
	open.handshake("")

	// The ports in the reloaded config say 0 again; the worker keeps its own.
	cfg.Listen.TLS.Cert, cfg.Listen.TLS.Key = certB, keyB
	js, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Reload(context.Background(), js); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if got := servedCert(t, addr); !bytes.Equal(got, derB) {
		t.Fatal("not serving certificate B after Reload")
	}
	open.send(`{"event":"#subscribe","data":{"channel":"a"},"cid":2}`)
	if r := open.recvData(); r != `{"rid":2}` {
		t.Fatalf("open socket after Reload: %s", r)
	}

	// A config whose certificate does not load changes nothing.
	cfg.Listen.TLS.Cert = filepath.Join(dir, "missing.pem")
	js, _ = json.Marshal(cfg)
	if err := c.Reload(context.Background(), js); err == nil {
		t.Fatal("Reload with a missing certificate succeeded")
	}
	if got := servedCert(t, addr); !bytes.Equal(got, derB) {
		t.Fatal("a failed Reload changed the certificate")
	}
}

// The fd guard (balancers: 0): a TLS connection costs the worker three fds,
// so one is refused once the worker's sockets plus two fds per TLS
// connection would pass the file limit, whatever max_connections says.
func TestChildTLSRefusedAtFDLimit(t *testing.T) {
	storage := t.TempDir()
	c, res, _ := startChild(t, func(cfg *configs.Config) {
		zero := 0
		cfg.Cluster.Balancers = &zero
		cfg.Listen.Public = "127.0.0.1:0"
		cfg.Listen.TLS = configs.TLS{Listen: "127.0.0.1:0", Auto: true}
		cfg.Storage.Dir = storage
	})
	c.fdCap.Store(4) // room for exactly one TLS connection (1 + 2 + the new one's 1)
	addr := res.Addrs[control.AddrTLS]
	pem, err := os.ReadFile(filepath.Join(storage, "tls", "dev-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	first, err := dialFrom(t, "wss://"+addr+"/socketcluster/", "127.0.0.1", roots)
	if err != nil {
		t.Fatalf("first wss: %v", err)
	}
	first.handshake("")
	if _, err := dialFrom(t, "wss://"+addr+"/socketcluster/", "127.0.0.1", roots); err == nil {
		t.Fatal("a second wss connection was admitted past the fd cap")
	}
	st, _ := c.Stats(context.Background())
	if st.Counters["refused_max_connections"] != 1 || st.Counters["listen_local_refused"] != 1 {
		t.Fatalf("counters %v", st.Counters)
	}
	// Plain connections cost one fd and are not held to it.
	plain, err := dialFrom(t, "ws://"+addr+"/socketcluster/", "127.0.0.1", roots)
	if err != nil {
		t.Fatalf("plain: %v", err)
	}
	plain.handshake("")
}
