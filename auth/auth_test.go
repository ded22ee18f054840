package auth

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/shoalhq/shoal/configs"
)

var t0 = time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)

func hsKeys(t *testing.T, algs ...string) *Keys {
	t.Helper()
	cfg := configs.Default().Auth.JWT
	if len(algs) > 0 {
		cfg.Algorithms = algs
	}
	k, err := New(cfg, func(name string) string {
		if name == "SHOAL_AUTH_KEY" {
			return "s3cret"
		}
		return ""
	}, WithClock(func() time.Time { return t0 }))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func sign(t *testing.T, alg jwt.SigningMethod, key any, claims jwt.MapClaims) string {
	t.Helper()
	s, err := jwt.NewWithClaims(alg, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func wantErr(t *testing.T, err error, name string, bad bool) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("err = %v, want %s", err, name)
	}
	if e.Name != name || e.IsBadToken != bad {
		t.Fatalf("got %s (bad=%v) %q, want %s (bad=%v)", e.Name, e.IsBadToken, e.Message, name, bad)
	}
	return e
}

func TestVerifyHMAC(t *testing.T) {
	k := hsKeys(t)
	key := []byte("s3cret")
	good := sign(t, jwt.SigningMethodHS256, key, jwt.MapClaims{"sub": "alice", "exp": t0.Add(time.Hour).Unix()})
	tok, err := k.Verify(good)
	if err != nil {
		t.Fatal(err)
	}
	if tok.Subject() != "alice" || !tok.Expiry.Equal(t0.Add(time.Hour+5*time.Second)) {
		t.Fatalf("token %+v", tok)
	}
	if tok.Expired(t0) || !tok.Expired(t0.Add(2*time.Hour)) {
		t.Fatal("Expired wrong")
	}

	// Within the 5 s leeway a just-expired token still passes.
	if _, err := k.Verify(sign(t, jwt.SigningMethodHS256, key, jwt.MapClaims{"exp": t0.Add(-2 * time.Second).Unix()})); err != nil {
		t.Fatalf("leeway: %v", err)
	}
	e := wantErr(t, verifyErr(k, sign(t, jwt.SigningMethodHS256, key, jwt.MapClaims{"exp": t0.Add(-time.Minute).Unix()})), "AuthTokenExpiredError", true)
	if e.Message != "jwt expired" || !e.Expiry.Equal(t0.Add(-time.Minute)) {
		t.Fatalf("expired: %+v", e)
	}
	b, _ := json.Marshal(json.RawMessage(e.SC().AppendJSON(nil)))
	if string(b) != `{"message":"jwt expired","name":"AuthTokenExpiredError","expiry":"2026-11-22T11:59:00.000Z","isBadToken":true}` {
		t.Fatalf("wire form %s", b)
	}
	wantErr(t, verifyErr(k, sign(t, jwt.SigningMethodHS256, key, jwt.MapClaims{"nbf": t0.Add(time.Hour).Unix()})), "AuthTokenNotBeforeError", false)
	wantErr(t, verifyErr(k, sign(t, jwt.SigningMethodHS256, []byte("other"), jwt.MapClaims{})), "AuthTokenInvalidError", true)
	wantErr(t, verifyErr(k, sign(t, jwt.SigningMethodHS512, key, jwt.MapClaims{})), "AuthTokenInvalidError", true) // not allowed
	wantErr(t, verifyErr(k, "not.a.jwt"), "AuthTokenInvalidError", true)
	wantErr(t, verifyErr(k, ""), "AuthTokenInvalidError", true)
	none := sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, jwt.MapClaims{"sub": "mallory"})
	wantErr(t, verifyErr(k, none), "AuthTokenInvalidError", true)

	k2 := hsKeys(t, "HS256", "HS512")
	if _, err := k2.Verify(sign(t, jwt.SigningMethodHS512, key, jwt.MapClaims{})); err != nil {
		t.Fatalf("HS512 allowed: %v", err)
	}
}

// verifyErr drops the token so failures read in one line.
func verifyErr(k *Keys, raw string) error { _, err := k.Verify(raw); return err }

func TestSignRoundTrip(t *testing.T) {
	k := hsKeys(t)
	s, err := k.Sign(map[string]any{"sub": "bob"})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := k.Verify(s)
	if err != nil {
		t.Fatal(err)
	}
	if tok.Subject() != "bob" || tok.Claims["iat"].(float64) != float64(t0.Unix()) ||
		tok.Claims["exp"].(float64) != float64(t0.Add(24*time.Hour).Unix()) {
		t.Fatalf("claims %v", tok.Claims)
	}
}

func TestNoKey(t *testing.T) {
	k, err := New(configs.Default().Auth.JWT, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if k.Enabled() || k.Missing() == "" {
		t.Fatal("enabled without a key")
	}
	tok := sign(t, jwt.SigningMethodHS256, []byte(""), jwt.MapClaims{})
	wantErr(t, verifyErr(k, tok), "AuthTokenInvalidError", true)
	if _, err := k.Sign(map[string]any{}); err == nil {
		t.Fatal("signed without a key")
	}
}

func TestKeyFileAndBadConfig(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "secret")
	if err := os.WriteFile(f, []byte("filesecret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := configs.Default().Auth.JWT
	cfg.KeyFile = f
	k, err := New(cfg, func(string) string { return "ignored" })
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k.Verify(sign(t, jwt.SigningMethodHS256, []byte("filesecret"), jwt.MapClaims{})); err != nil {
		t.Fatal(err)
	}
	cfg.Algorithms = []string{"XX1"}
	if _, err := New(cfg, os.Getenv); err == nil {
		t.Fatal("unknown algorithm accepted")
	}
	cfg = configs.Default().Auth.JWT
	cfg.KeyFile = filepath.Join(dir, "missing")
	if _, err := New(cfg, os.Getenv); err == nil {
		t.Fatal("missing key file accepted")
	}
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestPublicKeys(t *testing.T) {
	dir := t.TempDir()
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ek, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	edPub, edPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		alg  string
		m    jwt.SigningMethod
		priv any
		pub  any
	}{
		{"RS256", jwt.SigningMethodRS256, rk, &rk.PublicKey},
		{"ES256", jwt.SigningMethodES256, ek, &ek.PublicKey},
		{"EdDSA", jwt.SigningMethodEdDSA, edPriv, edPub},
	} {
		t.Run(tc.alg, func(t *testing.T) {
			pubDER, err := x509.MarshalPKIXPublicKey(tc.pub)
			if err != nil {
				t.Fatal(err)
			}
			privDER, err := x509.MarshalPKCS8PrivateKey(tc.priv)
			if err != nil {
				t.Fatal(err)
			}
			cfg := configs.Default().Auth.JWT
			cfg.Algorithms = []string{tc.alg}
			cfg.PublicKeyFile = filepath.Join(dir, tc.alg+".pub")
			writePEM(t, cfg.PublicKeyFile, "PUBLIC KEY", pubDER)
			k, err := New(cfg, os.Getenv)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := k.Verify(sign(t, tc.m, tc.priv, jwt.MapClaims{"sub": "x"})); err != nil {
				t.Fatalf("verify: %v", err)
			}
			// An HMAC token made with the public key as secret must fail
			// (algorithm confusion).
			wantErr(t, verifyErr(k, sign(t, jwt.SigningMethodHS256, pubDER, jwt.MapClaims{})), "AuthTokenInvalidError", true)
			if _, err := k.Sign(map[string]any{}); err == nil {
				t.Fatal("signed with only a public key")
			}
			cfg.KeyFile = filepath.Join(dir, tc.alg+".key")
			writePEM(t, cfg.KeyFile, "PRIVATE KEY", privDER)
			k, err = New(cfg, os.Getenv)
			if err != nil {
				t.Fatal(err)
			}
			s, err := k.Sign(map[string]any{"sub": "y"})
			if err != nil {
				t.Fatal(err)
			}
			if tok, err := k.Verify(s); err != nil || tok.Subject() != "y" {
				t.Fatalf("round trip: %v", err)
			}
		})
	}
}

func TestConfigCheck(t *testing.T) {
	for _, tc := range []struct {
		yml, key string
	}{
		{"auth:\n  jwt:\n    algorithms: [RS256]\n", "auth.jwt.public_key_file"},
		{"auth:\n  jwt:\n    algorithms: [HS256, ES256]\n    key_file: /k\n", "auth.jwt.key_file"},
	} {
		_, err := configs.Load([]byte(tc.yml), "test.yaml")
		var errs configs.Errors
		if !errors.As(err, &errs) || len(errs) != 1 || errs[0].Key != tc.key {
			t.Errorf("%q: got %v, want an error at %s", tc.yml, err, tc.key)
		}
	}
	for _, ok := range []string{
		"auth:\n  jwt:\n    algorithms: [HS256, HS512]\n",
		"auth:\n  jwt:\n    algorithms: [RS256, ES256]\n    jwks_file: /x.json\n",
	} {
		if _, err := configs.Load([]byte(ok), "ok.yaml"); err != nil {
			t.Errorf("valid auth config %q refused: %v", ok, err)
		}
	}
}
