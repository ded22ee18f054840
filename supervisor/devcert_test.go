package supervisor

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoalhq/shoal/configs"
)

// The ready lines' fingerprint is the SHA-256 of the shared development
// certificate's DER, colon-separated upper-case hex; nothing without auto.
func TestDevCertFingerprint(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cfg := configs.Default()
	cfg.Storage.Dir = t.TempDir()
	cfg.Listen.TLS.Listen, cfg.Listen.TLS.Auto = "127.0.0.1:0", true
	want := filepath.Join(cfg.Storage.Dir, "tls", "dev-cert.pem")
	if path, fp := devCertFingerprint(cfg); path != "" || fp != "" {
		t.Fatalf("no certificate yet: got %q %q", path, fp)
	}
	if err := os.MkdirAll(filepath.Dir(want), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(want, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(der)
	hexes := make([]string, len(sum))
	for i, b := range sum {
		hexes[i] = fmt.Sprintf("%02X", b)
	}
	path, fp := devCertFingerprint(cfg)
	if path != want || fp != strings.Join(hexes, ":") {
		t.Fatalf("got %q %q, want %q %q", path, fp, want, strings.Join(hexes, ":"))
	}
	cfg.Listen.TLS.Auto = false
	if path, fp := devCertFingerprint(cfg); path != "" || fp != "" {
		t.Fatalf("auto off: got %q %q", path, fp)
	}
}
