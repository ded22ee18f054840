package auth

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/shoalhq/shoal/configs"
)

func b64u(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func rsaJWK(kid, alg string, k *rsa.PublicKey) map[string]any {
	m := map[string]any{"kty": "RSA", "kid": kid, "n": b64u(k.N.Bytes()), "e": b64u(big.NewInt(int64(k.E)).Bytes())}
	if alg != "" {
		m["alg"] = alg
	}
	return m
}

func ecJWK(kid string, k *ecdsa.PublicKey) map[string]any {
	b, err := k.Bytes() // uncompressed point 04||x||y
	if err != nil {
		panic(err)
	}
	size := (k.Curve.Params().BitSize + 7) / 8
	return map[string]any{"kty": "EC", "kid": kid, "crv": k.Curve.Params().Name, "x": b64u(b[1 : 1+size]), "y": b64u(b[1+size:])}
}

func writeJWKS(t *testing.T, keys ...map[string]any) string {
	t.Helper()
	b, err := json.Marshal(map[string]any{"keys": keys})
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "jwks.json")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func signKid(t *testing.T, m jwt.SigningMethod, kid string, key any, claims jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(m, claims)
	if kid != "" {
		tok.Header["kid"] = kid
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestJWKS(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	rsaOther, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	edPub, edPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	secret := []byte("0123456789abcdef0123456789abcdef")
	path := writeJWKS(t,
		rsaJWK("r1", "RS256", &rsaKey.PublicKey),
		rsaJWK("r2", "", &rsaOther.PublicKey),
		ecJWK("e1", &ecKey.PublicKey),
		map[string]any{"kty": "OKP", "kid": "d1", "crv": "Ed25519", "x": b64u(edPub)},
		map[string]any{"kty": "oct", "kid": "h1", "k": b64u(secret)},
		// An encryption key is not for signatures: skipped.
		map[string]any{"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
	)
	cfg := configs.JWT{JWKSFile: path, Algorithms: []string{"RS256", "PS256", "ES256", "EdDSA", "HS256"}}
	k, err := New(cfg, func(string) string { return "" }, WithClock(func() time.Time { return t0 }))
	if err != nil {
		t.Fatal(err)
	}
	if !k.Enabled() {
		t.Fatalf("not enabled: %s", k.Missing())
	}
	claims := jwt.MapClaims{"sub": "alice", "exp": t0.Add(time.Hour).Unix()}
	cases := []struct {
		name    string
		tok     string
		wantErr string // "" for valid
	}{
		{"rsa by kid", signKid(t, jwt.SigningMethodRS256, "r1", rsaKey, claims), ""},
		{"rsa key without alg takes PS256", signKid(t, jwt.SigningMethodPS256, "r2", rsaOther, claims), ""},
		{"ec by kid", signKid(t, jwt.SigningMethodES256, "e1", ecKey, claims), ""},
		{"ed25519 by kid", signKid(t, jwt.SigningMethodEdDSA, "d1", edPriv, claims), ""},
		{"hmac by kid", signKid(t, jwt.SigningMethodHS256, "h1", secret, claims), ""},
		{"no kid: every fitting key is tried", signKid(t, jwt.SigningMethodRS256, "", rsaOther, claims), ""},
		{"unknown kid", signKid(t, jwt.SigningMethodRS256, "zz", rsaKey, claims), "unknown signing key"},
		{"kid of another key", signKid(t, jwt.SigningMethodRS256, "r2", rsaKey, claims), "invalid signature"},
		{"key alg RS256 refuses PS256", signKid(t, jwt.SigningMethodPS256, "r1", rsaKey, claims), "unknown signing key"},
		{"kid of a key of another type", signKid(t, jwt.SigningMethodES256, "r1", ecKey, claims), "unknown signing key"},
		{"alg outside the allow-list", signKid(t, jwt.SigningMethodRS512, "r2", rsaOther, claims), "invalid"},
		{"skipped enc key", signKid(t, jwt.SigningMethodRS256, "enc", rsaKey, claims), "unknown signing key"},
		{"expired", signKid(t, jwt.SigningMethodES256, "e1", ecKey, jwt.MapClaims{"exp": t0.Add(-time.Hour).Unix()}), "jwt expired"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tok, err := k.Verify(tc.tok)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if tok.Subject() != "alice" {
					t.Fatalf("sub %q", tok.Subject())
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
		})
	}
}

// p256JWK is a valid P-256 public key as a JWK naming alg.
func p256JWK(t *testing.T, alg string) string {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	m := ecJWK("", &k.PublicKey)
	delete(m, "kid")
	m["alg"] = alg
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestJWKSFileErrors(t *testing.T) {
	cases := []struct {
		name string
		doc  string
		want string
	}{
		{"not json", `{`, "not a JSON Web Key Set"},
		{"no keys", `{}`, `no "keys" list`},
		{"empty", `{"keys":[]}`, "no signature key"},
		{"unknown kty", `{"keys":[{"kty":"XYZ","kid":"a"}]}`, `unsupported kty "XYZ"`},
		{"missing kty", `{"keys":[{"kid":"a"}]}`, `"kty" is missing`},
		{"rsa without n", `{"keys":[{"kty":"RSA","e":"AQAB"}]}`, `"n" is missing`},
		{"small rsa", `{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}`, "at least 2048"},
		{"bad curve", `{"keys":[{"kty":"EC","crv":"P-192","x":"AA","y":"AA"}]}`, "unsupported EC curve"},
		{"point off the curve", `{"keys":[{"kty":"EC","crv":"P-256","x":"` + b64u(make([]byte, 32)) + `","y":"` + b64u(append(make([]byte, 31), 1)) + `"}]}`, "EC point"},
		{"short ed25519", `{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AAAA"}]}`, "Ed25519 key of 3 bytes"},
		{"bad base64", `{"keys":[{"kty":"oct","k":"!!"}]}`, "not base64url"},
		{"alg of another type", `{"keys":[{"kty":"oct","k":"AAAA","alg":"RS256"}]}`, "does not fit"},
		{"unknown alg", `{"keys":[{"kty":"oct","k":"AAAA","alg":"XX1"}]}`, `unsupported alg "XX1"`},
		{"alg of another curve", `{"keys":[` + p256JWK(t, "ES384") + `]}`, "alg ES384 does not fit curve P-256"},
		{"ec key with an rsa alg", `{"keys":[` + p256JWK(t, "RS256") + `]}`, "alg RS256 does not fit the key type"},
		{"ed25519 key with an hmac alg", `{"keys":[{"kty":"OKP","crv":"Ed25519","x":"` + b64u(make([]byte, 32)) + `","alg":"HS256"}]}`, "alg HS256 does not fit the key type"},
		{"duplicate kid", `{"keys":[{"kty":"oct","kid":"a","k":"AAAA"},{"kty":"oct","kid":"a","k":"AAAB"}]}`, `kid "a" appears twice`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "jwks.json")
			if err := os.WriteFile(p, []byte(tc.doc), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := New(configs.JWT{JWKSFile: p, Algorithms: []string{"RS256"}}, func(string) string { return "" })
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "auth.jwt.jwks_file") {
				t.Fatalf("err = %v, want %q naming auth.jwt.jwks_file", err, tc.want)
			}
		})
	}
	// A missing file names the key too.
	_, err := New(configs.JWT{JWKSFile: filepath.Join(t.TempDir(), "none.json"), Algorithms: []string{"RS256"}}, func(string) string { return "" })
	if err == nil || !strings.Contains(err.Error(), "auth.jwt.jwks_file") {
		t.Fatalf("err = %v", err)
	}
	// config check accepts jwks_file for public-key algorithms.
	if errs := checkConfig(configs.JWT{JWKSFile: "x.json", Algorithms: []string{"ES256"}}); len(errs) != 0 {
		t.Fatalf("checkConfig: %v", errs)
	}
}

func TestPublicKeyEnv(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	pemText := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	env := map[string]string{"ISSUER_PUB": pemText, "GARBAGE": "not a pem"}
	getenv := func(n string) string { return env[n] }
	cfg := configs.JWT{Algorithms: []string{"ES384"}, PublicKeyEnv: "ISSUER_PUB"}
	k, err := New(cfg, getenv, WithClock(func() time.Time { return t0 }))
	if err != nil {
		t.Fatal(err)
	}
	tok := signKid(t, jwt.SigningMethodES384, "", key, jwt.MapClaims{"sub": "alice", "exp": t0.Add(time.Hour).Unix()})
	if got, err := k.Verify(tok); err != nil || got.Subject() != "alice" {
		t.Fatalf("verify: %v", err)
	}
	// Unset: not an error, but no key (every token refused, said why).
	k, err = New(configs.JWT{Algorithms: []string{"ES384"}, PublicKeyEnv: "UNSET"}, getenv)
	if err != nil || k.Enabled() || !strings.Contains(k.Missing(), "set UNSET") {
		t.Fatalf("unset env: %v, enabled=%v, %q", err, k.Enabled(), k.Missing())
	}
	if _, err := New(configs.JWT{Algorithms: []string{"ES384"}, PublicKeyEnv: "GARBAGE"}, getenv); err == nil || !strings.Contains(err.Error(), "auth.jwt.public_key_env GARBAGE") {
		t.Fatalf("garbage: %v", err)
	}
	if errs := checkConfig(configs.JWT{Algorithms: []string{"ES384"}, PublicKeyEnv: "A", PublicKeyFile: "/b"}); len(errs) != 1 || errs[0].Key != "auth.jwt.public_key_env" {
		t.Fatalf("both set: %v", errs)
	}
	if errs := checkConfig(configs.JWT{Algorithms: []string{"ES384"}, PublicKeyEnv: "A"}); len(errs) != 0 {
		t.Fatalf("env only: %v", errs)
	}
}
