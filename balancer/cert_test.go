package balancer

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoalhq/shoal/proto/control"
)

func writePair(t *testing.T, certPath, keyPath string, mod time.Time) {
	t.Helper()
	certPEM, keyPEM, err := generateDevCert(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := writeFileAtomic(keyPath, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := writeFileAtomic(certPath, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{certPath, keyPath} {
		if err := os.Chtimes(p, mod, mod); err != nil {
			t.Fatal(err)
		}
	}
}

// servedFingerprint does a handshake and returns the server certificate's
// fingerprint (the client checks nothing: it only looks).
func servedFingerprint(t *testing.T, addr string) string {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return Fingerprint(c.ConnectionState().PeerCertificates[0])
}

func fileFingerprint(t *testing.T, certPath string) string {
	t.Helper()
	pair, err := tls.LoadX509KeyPair(certPath, certPath[:len(certPath)-len("cert.pem")]+"key.pem")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return Fingerprint(leaf)
}

// Renewed certificate files are served without a restart; a broken pair
// keeps the old certificate.
func TestCertFilesReloaded(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	t0 := time.Now().Add(-time.Hour)
	writePair(t, certPath, keyPath, t0)
	first := fileFingerprint(t, certPath)

	cfg := testConfig(t, false)
	cfg.Listen.TLS.Listen = "127.0.0.1:0"
	cfg.Listen.TLS.Cert, cfg.Listen.TLS.Key = certPath, keyPath
	b := startBalancer(t, cfg, control.Topology{})
	if got := servedFingerprint(t, b.tls); got != first {
		t.Fatalf("served %s, want %s", got, first)
	}

	// A half-written pair (new cert, old key) is not picked up.
	certPEM, _, err := generateDevCert(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certPath, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(certPath, t0.Add(time.Minute), t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	waitFor(t, 5*time.Second, "a reload check to pass", func() bool {
		return time.Since(start) > 1500*time.Millisecond && servedFingerprint(t, b.tls) == first
	})

	writePair(t, certPath, keyPath, t0.Add(2*time.Minute))
	second := fileFingerprint(t, certPath)
	waitFor(t, 5*time.Second, "the renewed certificate", func() bool { return servedFingerprint(t, b.tls) == second })
}

func TestTLSConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		tls  func(c *testConfigTLS)
		want string
	}{
		{"cert without key", func(c *testConfigTLS) { c.cert = "x.pem" }, "listen.tls: cert and key must be set together"},
		{"neither", func(c *testConfigTLS) {}, "listen.tls: set cert and key, or auto: true"},
		{"missing files", func(c *testConfigTLS) { c.cert, c.key = "/nonexistent/c.pem", "/nonexistent/k.pem" }, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var o testConfigTLS
			tc.tls(&o)
			cfg := testConfig(t, false)
			cfg.Listen.TLS.Listen = "127.0.0.1:0"
			cfg.Listen.TLS.Cert, cfg.Listen.TLS.Key = o.cert, o.key
			_, err := New(nil).tlsConfig(cfg)
			if err == nil || (tc.want != "" && err.Error() != tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

type testConfigTLS struct{ cert, key string }

// Reload (SIGHUP) switches to new certificate files for new connections,
// and refuses a config that moves a port.
func TestReloadCertificateAndPorts(t *testing.T) {
	dir := t.TempDir()
	certA, keyA := filepath.Join(dir, "a-cert.pem"), filepath.Join(dir, "a-key.pem")
	certB, keyB := filepath.Join(dir, "b-cert.pem"), filepath.Join(dir, "b-key.pem")
	writePair(t, certA, keyA, time.Now())
	writePair(t, certB, keyB, time.Now())
	cfg := testConfig(t, false)
	cfg.Listen.TLS.Listen = "127.0.0.1:0"
	cfg.Listen.TLS.Cert, cfg.Listen.TLS.Key = certA, keyA
	b := startBalancer(t, cfg, control.Topology{})
	if got := servedFingerprint(t, b.tls); got != fileFingerprint(t, certA) {
		t.Fatal("not serving A")
	}

	cfg.Listen.TLS.Cert, cfg.Listen.TLS.Key = certB, keyB
	raw, _ := json.Marshal(cfg)
	if err := b.Reload(t.Context(), raw); err != nil {
		t.Fatal(err)
	}
	if got := servedFingerprint(t, b.tls); got != fileFingerprint(t, certB) {
		t.Fatal("not serving B after Reload")
	}

	// A bad pair is refused; B stays.
	cfg.Listen.TLS.Cert = certA
	raw, _ = json.Marshal(cfg)
	if err := b.Reload(t.Context(), raw); err == nil {
		t.Fatal("Reload with a mismatched pair succeeded")
	}
	if got := servedFingerprint(t, b.tls); got != fileFingerprint(t, certB) {
		t.Fatal("a failed Reload changed the certificate")
	}

	cfg.Listen.TLS.Cert = certB
	cfg.Listen.Public = "127.0.0.1:1"
	raw, _ = json.Marshal(cfg)
	if err := b.Reload(t.Context(), raw); err == nil || !strings.Contains(err.Error(), "restart the balancer") {
		t.Fatalf("Reload moving a port: %v", err)
	}
}

// Two balancers of one node (cluster.balancers: 2) share the public and TLS
// ports with SO_REUSEPORT and serve the same development certificate; a
// single balancer does not share its port.
func TestTwoBalancersShareThePorts(t *testing.T) {
	freePort := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		return ln.Addr().String()
	}
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	cfg := testConfig(t, true)
	two := 2
	cfg.Cluster.Balancers = &two
	cfg.Listen.Public, cfg.Listen.TLS.Listen = freePort(), freePort()
	topo := topology(1, w1.peer(101, 0))
	a := startBalancer(t, cfg, topo)
	b := startBalancer(t, cfg, topo)
	if a.public != b.public || a.tls != b.tls {
		t.Fatalf("ports differ: %s/%s vs %s/%s", a.public, a.tls, b.public, b.tls)
	}
	// Both serve; the kernel picks which one takes each connection.
	pool := devCertPool(t, cfg.Storage.Dir)
	for range 6 {
		if _, _, err := get(t, "https://"+a.tls+"/", "127.0.0.1", &tls.Config{RootCAs: pool}); err != nil {
			t.Fatal(err)
		}
		if _, _, err := get(t, "http://"+a.public+"/", "127.0.0.1", nil); err != nil {
			t.Fatal(err)
		}
	}
	if fa, fb := servedFingerprint(t, a.tls), fileFingerprint(t, filepath.Join(cfg.Storage.Dir, "tls", devCertFile)); fa != fb {
		t.Fatal("the balancers serve different certificates")
	}

	// One balancer configured: the port is not shared.
	one := 1
	cfg.Cluster.Balancers = &one
	raw, _ := json.Marshal(cfg)
	c := New(nil)
	if _, err := c.Start(t.Context(), control.StartParams{Config: raw}); err == nil || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("third balancer without SO_REUSEPORT: %v", err)
	}
	_ = c.Stop(t.Context())
}
