package balancer

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/shoalhq/shoal/configs"
)

// Development certificate files, under <storage.dir>/tls/. The key is
// written too (mode 0600) so that every balancer of the node, and the next
// start, serve the same certificate a client was told to trust.
const (
	devCertFile = "dev-cert.pem"
	devKeyFile  = "dev-key.pem"
	devLockFile = ".dev-cert.lock"
	devValidity = 90 * 24 * time.Hour
	// A certificate this close to expiry is replaced at start.
	devRenewBefore = 7 * 24 * time.Hour
)

// tlsConfig builds the server TLS config: TLS 1.2 minimum (1.3 preferred by
// Go's negotiation), TLS 1.2 limited to AEAD suites with forward secrecy,
// and HTTP/1.1 only in ALPN because workers speak HTTP/1.1 (a client that
// negotiated h2 would send frames the worker cannot read).
func (c *Child) tlsConfig(cfg configs.Config) (*tls.Config, error) {
	t := cfg.Listen.TLS
	var cs *certSource
	switch {
	case t.Cert != "" || t.Key != "":
		if t.Cert == "" || t.Key == "" {
			return nil, errors.New("listen.tls: cert and key must be set together")
		}
		var err error
		if cs, err = newFileCertSource(t.Cert, t.Key); err != nil {
			return nil, err
		}
		c.log.Info("TLS certificate loaded", "cert", t.Cert, "sha256", cs.fingerprint())
	case t.Auto:
		cert, path, created, err := loadOrCreateDevCert(filepath.Dir(DevCertPath(cfg.Storage.Dir)), time.Now())
		if err != nil {
			return nil, fmt.Errorf("listen.tls.auto: %w", err)
		}
		cs = &certSource{}
		cs.cur.Store(&cert)
		verb := "using"
		if created {
			verb = "generated"
		}
		c.log.Info(verb+" self-signed development TLS certificate; clients must trust it explicitly",
			"path", path, "sha256", Fingerprint(cert.Leaf))
	default:
		return nil, errors.New("listen.tls: set cert and key, or auto: true")
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		CipherSuites: []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305,
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305,
		},
		NextProtos:     []string{"http/1.1"},
		GetCertificate: cs.get,
	}, nil
}

// DevCertPath is where listen.tls.auto keeps the node's development
// certificate, shared by every process that terminates TLS.
func DevCertPath(storageDir string) string {
	return filepath.Join(storageDir, "tls", devCertFile)
}

// Fingerprint is the SHA-256 of a certificate's DER, as colon-separated hex
// (the form browsers and `openssl x509 -fingerprint -sha256` show).
func Fingerprint(cert *x509.Certificate) string {
	if cert == nil {
		return ""
	}
	sum := sha256.Sum256(cert.Raw)
	var b strings.Builder
	for i, x := range sum {
		if i > 0 {
			b.WriteByte(':')
		}
		fmt.Fprintf(&b, "%02X", x)
	}
	return b.String()
}

// certSource serves the current certificate. For cert/key files it re-reads
// them when they change (checked at most once per second, on a handshake),
// so a renewed certificate is picked up without a restart and without
// touching open connections.
type certSource struct {
	certPath, keyPath string

	cur atomic.Pointer[tls.Certificate]

	mu        sync.Mutex // guards the reload check
	checkedAt time.Time
	modTime   time.Time
}

func newFileCertSource(certPath, keyPath string) (*certSource, error) {
	cs := &certSource{certPath: certPath, keyPath: keyPath}
	cert, mod, err := loadKeyPair(certPath, keyPath)
	if err != nil {
		return nil, err
	}
	cs.cur.Store(cert)
	cs.modTime, cs.checkedAt = mod, time.Now()
	return cs, nil
}

func loadKeyPair(certPath, keyPath string) (*tls.Certificate, time.Time, error) {
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("listen.tls: load cert %s and key %s: %w", certPath, keyPath, err)
	}
	return &cert, newestMod(certPath, keyPath), nil
}

func newestMod(paths ...string) time.Time {
	var t time.Time
	for _, p := range paths {
		if fi, err := os.Stat(p); err == nil && fi.ModTime().After(t) {
			t = fi.ModTime()
		}
	}
	return t
}

func (cs *certSource) fingerprint() string {
	if c := cs.cur.Load(); c != nil {
		return Fingerprint(c.Leaf)
	}
	return ""
}

func (cs *certSource) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	if cs.certPath != "" {
		cs.maybeReload()
	}
	c := cs.cur.Load()
	if c == nil {
		return nil, errors.New("balancer: no TLS certificate")
	}
	return c, nil
}

// maybeReload swaps in the files' new pair if they changed. A half-written
// or mismatched pair keeps the old certificate (and is retried next second).
func (cs *certSource) maybeReload() {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	now := time.Now()
	if now.Sub(cs.checkedAt) < time.Second {
		return
	}
	cs.checkedAt = now
	if mod := newestMod(cs.certPath, cs.keyPath); !mod.After(cs.modTime) {
		return
	}
	cert, mod, err := loadKeyPair(cs.certPath, cs.keyPath)
	if err != nil {
		return
	}
	cs.cur.Store(cert)
	cs.modTime = mod
}

// loadOrCreateDevCert returns the node's development certificate, creating
// it (and dir) if it is missing, unreadable or near expiry. A lock file
// serialises balancers that start together, so they all end up serving the
// one certificate that is on disk.
func loadOrCreateDevCert(dir string, now time.Time) (cert tls.Certificate, certPath string, created bool, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return cert, "", false, fmt.Errorf("create %s: %w", dir, err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, devLockFile), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return cert, "", false, fmt.Errorf("open lock file: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return cert, "", false, fmt.Errorf("lock %s: %w", lock.Name(), err)
	}
	defer func() { _ = syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) }()

	certPath = filepath.Join(dir, devCertFile)
	keyPath := filepath.Join(dir, devKeyFile)
	if c, err := tls.LoadX509KeyPair(certPath, keyPath); err == nil && c.Leaf != nil &&
		now.Add(devRenewBefore).Before(c.Leaf.NotAfter) {
		return c, certPath, false, nil
	}
	certPEM, keyPEM, err := generateDevCert(now)
	if err != nil {
		return cert, "", false, err
	}
	// Key first: a crash between the two writes leaves a mismatched pair,
	// which the next start detects (LoadX509KeyPair fails) and replaces.
	if err := writeFileAtomic(keyPath, keyPEM, 0o600); err != nil {
		return cert, "", false, err
	}
	if err := writeFileAtomic(certPath, certPEM, 0o644); err != nil {
		return cert, "", false, err
	}
	cert, err = tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return cert, "", false, fmt.Errorf("parse generated certificate: %w", err)
	}
	return cert, certPath, true, nil
}

// generateDevCert makes a self-signed ECDSA P-256 certificate for the
// loopback names a developer uses.
func generateDevCert(now time.Time) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, fmt.Errorf("generate serial: %w", err)
	}
	host, _ := os.Hostname()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"Shoal development"}, CommonName: "localhost"},
		NotBefore:             now.Add(-time.Hour), // tolerate small clock skew
		NotAfter:              now.Add(devValidity),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	if host != "" && host != "localhost" {
		tmpl.DNSNames = append(tmpl.DNSNames, host)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("encode key: %w", err)
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	return certPEM, keyPEM, nil
}

// writeFileAtomic writes data beside path and renames it into place, so a
// reader never sees half a file.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	name := tmp.Name()
	_, werr := tmp.Write(data)
	serr := tmp.Sync()
	cerr := tmp.Close()
	if err := errors.Join(werr, serr, cerr, os.Chmod(name, mode)); err != nil {
		_ = os.Remove(name)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(name, path); err != nil {
		_ = os.Remove(name)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
