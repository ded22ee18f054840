package middleware

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/shoalhq/shoal/auth"
	"github.com/shoalhq/shoal/configs"
)

func hs256(t *testing.T, key string, claims jwt.MapClaims) string {
	t.Helper()
	s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(key))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestJWTRule(t *testing.T) {
	t.Setenv("SHOAL_AUTH_KEY", "global-secret")
	t.Setenv("PARTNER_KEY", "partner-secret")
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&ecKey.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	pubPath := filepath.Join(t.TempDir(), "ec.pem")
	if err := os.WriteFile(pubPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("ISSUER_PUB", string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})))
	esTok := func(claims jwt.MapClaims) string {
		s, err := jwt.NewWithClaims(jwt.SigningMethodES256, claims).SignedString(ecKey)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	exp := time.Now().Add(time.Hour).Unix()
	good := hs256(t, "global-secret", jwt.MapClaims{"sub": "alice", "role": "admin", "exp": exp})
	noRole := hs256(t, "global-secret", jwt.MapClaims{"sub": "bob", "exp": exp})
	partner := hs256(t, "partner-secret", jwt.MapClaims{"sub": "carol", "exp": exp})

	// sock builds the identity auth.jwt would give for claims (nil: the
	// socket is not authenticated).
	sock := func(claims map[string]any) *Socket {
		if claims == nil {
			return anon("s1", "10.0.0.1")
		}
		return user("s1", "10.0.0.1", claims["sub"].(string), claims)
	}
	alice := map[string]any{"sub": "alice", "role": "admin"}
	bob := map[string]any{"sub": "bob"}
	carol := map[string]any{"sub": "carol"}

	cases := []struct {
		name   string
		yml    string
		in     Input
		want   Verdict
		errNm  string
		errMsg string
		code   int64
	}{
		{"handshake: missing token denied (require defaults to true)",
			"middleware:\n  handshake:\n    - jwt: {}\n",
			Input{Action: HandshakeSC, Socket: sock(nil)}, Deny, "AuthError", "Authentication required", 4008},
		{"handshake: missing token passes with require: false",
			"middleware:\n  handshake:\n    - jwt: {require: false}\n",
			Input{Action: HandshakeSC, Socket: sock(nil)}, Allow, "", "", 0},
		{"handshake: valid token passes",
			"middleware:\n  handshake:\n    - jwt: {}\n",
			Input{Action: HandshakeSC, Socket: sock(alice), Token: good}, Allow, "", "", 0},
		{"handshake: a token auth.jwt refused is denied with auth.jwt's reason",
			"middleware:\n  handshake:\n    - jwt: {require: false}\n",
			Input{Action: HandshakeSC, Socket: sock(nil), BadToken: partner}, Deny, "AuthTokenInvalidError", "invalid signature", 4008},
		{"handshake: the worker's reason for refusing a token is used, not verified again",
			"middleware:\n  handshake:\n    - jwt: {require: false}\n",
			// good verifies with auth.jwt's key: a second verification
			// would not find the refusal the worker reported.
			Input{Action: HandshakeSC, Socket: sock(nil), BadToken: good, TokenRefusal: &auth.Error{Name: "AuthTokenExpiredError", Message: "jwt expired", IsBadToken: true}}, Deny, "AuthTokenExpiredError", "jwt expired", 4008},
		{"handshake: a token the authenticate rules refused passes with require: false",
			"middleware:\n  handshake:\n    - jwt: {require: false}\n",
			Input{Action: HandshakeSC, Socket: sock(nil), BadToken: good}, Allow, "", "", 0},
		{"handshake: a token the authenticate rules refused is denied with require: true",
			"middleware:\n  handshake:\n    - jwt: {}\n",
			Input{Action: HandshakeSC, Socket: sock(nil), BadToken: good}, Deny, "AuthError", "Authentication required", 4008},
		{"handshake: expired token named as such",
			"middleware:\n  handshake:\n    - jwt: {}\n",
			Input{Action: HandshakeSC, Socket: sock(nil), BadToken: hs256(t, "global-secret", jwt.MapClaims{"sub": "x", "exp": time.Now().Add(-time.Hour).Unix()})}, Deny, "AuthTokenExpiredError", "jwt expired", 4008},
		{"handshake: required claim missing",
			"middleware:\n  handshake:\n    - jwt: {required_claims: [role]}\n",
			Input{Action: HandshakeSC, Socket: sock(bob), Token: noRole}, Deny, "AuthError", "The auth token has no role claim", 4008},
		{"handshake: claim matcher",
			"middleware:\n  handshake:\n    - jwt: {claims: {role: [admin, ops]}}\n",
			Input{Action: HandshakeSC, Socket: sock(alice), Token: good}, Allow, "", "", 0},
		{"handshake: claim matcher refuses, custom error and code",
			"middleware:\n  handshake:\n    - jwt: {claims: {role: admin}, error: {name: NotStaffError, message: 'Staff only, {user}', code: 4501}}\n",
			Input{Action: HandshakeSC, Socket: sock(bob), Token: noRole}, Deny, "NotStaffError", "Staff only, bob", 4501},
		{"algorithm allow-list without own key",
			"middleware:\n  handshake:\n    - jwt: {algorithms: [HS512]}\n",
			Input{Action: HandshakeSC, Socket: sock(alice), Token: good}, Deny, "AuthTokenInvalidError", "invalid algorithm", 4008},
		{"inbound authenticate: own HMAC key from env refuses auth.jwt's tokens",
			"middleware:\n  inbound:\n    - jwt: {algorithms: [HS256], key_env: PARTNER_KEY}\n",
			Input{Action: Authenticate, Socket: sock(alice), Token: good}, Deny, "AuthTokenInvalidError", "invalid signature", 0},
		{"inbound authenticate: own HMAC key accepts its own",
			"middleware:\n  inbound:\n    - jwt: {algorithms: [HS256], key_env: PARTNER_KEY}\n",
			Input{Action: Authenticate, Socket: sock(carol), Token: partner}, Allow, "", "", 0},
		{"inbound authenticate: public key file",
			"middleware:\n  inbound:\n    - jwt: {algorithms: [ES256], public_key_file: " + pubPath + ", required_claims: [sub]}\n",
			Input{Action: Authenticate, Socket: sock(carol), Token: esTok(jwt.MapClaims{"sub": "carol", "exp": exp})}, Allow, "", "", 0},
		{"inbound authenticate: public key from env",
			"middleware:\n  inbound:\n    - jwt: {algorithms: [ES256], public_key_env: ISSUER_PUB}\n",
			Input{Action: Authenticate, Socket: sock(carol), Token: esTok(jwt.MapClaims{"sub": "carol", "exp": exp})}, Allow, "", "", 0},
		{"inbound authenticate: own key with leeway accepts a just-expired token",
			"middleware:\n  inbound:\n    - jwt: {algorithms: [ES256], public_key_file: " + pubPath + ", leeway: 1m}\n",
			Input{Action: Authenticate, Socket: sock(carol), Token: esTok(jwt.MapClaims{"sub": "carol", "exp": time.Now().Add(-10 * time.Second).Unix()})}, Allow, "", "", 0},
		{"inbound authenticate: own key takes auth.jwt.leeway by default",
			"auth:\n  jwt: {leeway: 1m}\nmiddleware:\n  inbound:\n    - jwt: {algorithms: [ES256], public_key_file: " + pubPath + "}\n",
			Input{Action: Authenticate, Socket: sock(carol), Token: esTok(jwt.MapClaims{"sub": "carol", "exp": time.Now().Add(-10 * time.Second).Unix()})}, Allow, "", "", 0},
		{"inbound authenticate: own key with a short leeway refuses it",
			"middleware:\n  inbound:\n    - jwt: {algorithms: [ES256], public_key_file: " + pubPath + ", leeway: 1s}\n",
			Input{Action: Authenticate, Socket: sock(carol), Token: esTok(jwt.MapClaims{"sub": "carol", "exp": time.Now().Add(-10 * time.Second).Unix()})}, Deny, "AuthTokenExpiredError", "jwt expired", 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := load(t, tc.yml, Options{})
			d := decide(c, tc.in)
			if d.Verdict != tc.want {
				t.Fatalf("verdict %v (%+v), want %v", d.Verdict, d.Error, tc.want)
			}
			if tc.want == Allow {
				return
			}
			if d.Error.Name != tc.errNm || d.Error.Message != tc.errMsg {
				t.Fatalf("error %s %q, want %s %q", d.Error.Name, d.Error.Message, tc.errNm, tc.errMsg)
			}
			if d.CloseCode != int(tc.code) {
				t.Fatalf("close code %d, want %d", d.CloseCode, tc.code)
			}
		})
	}
}

func TestJWTRuleConfigErrors(t *testing.T) {
	cases := []struct{ yml, key, msg string }{
		{"middleware:\n  outbound:\n    - jwt: {}\n", "middleware.outbound[0].jwt", "middleware.handshake or middleware.inbound"},
		{"middleware:\n  inbound:\n    - jwt: {require: true}\n", "middleware.inbound[0].jwt.require", "only for the handshake stage"},
		{"middleware:\n  handshake:\n    - jwt: {algorithms: [XX1]}\n", "middleware.handshake[0].jwt.algorithms", "unsupported algorithm"},
		{"middleware:\n  handshake:\n    - jwt: {key_env: K}\n", "middleware.handshake[0].jwt.algorithms", "must be set with the rule's own key"},
		{"middleware:\n  handshake:\n    - jwt: {leeway: 5s}\n", "middleware.handshake[0].jwt.leeway", "applies to the rule's own key"},
		{"middleware:\n  handshake:\n    - jwt: {algorithms: [RS256], jwks_file: /nonexistent/jwks.json}\n", "middleware.handshake[0].jwt", "jwks_file"},
		{"middleware:\n  handshake:\n    - jwt: {requires: true}\n", "middleware.handshake[0].jwt.requires", "unknown option"},
		{"middleware:\n  outbound:\n    - ban: {}\n", "middleware.outbound[0].ban", "middleware.handshake or middleware.inbound"},
	}
	for _, tc := range cases {
		_, err := configs.Load([]byte(tc.yml), "test.yaml")
		if err == nil || !strings.Contains(err.Error(), tc.key) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%q: got %v, want an error at %s saying %q", tc.yml, err, tc.key, tc.msg)
		}
	}
}

type fakeBans map[string]string // user or address → reason

func (f fakeBans) BannedReason(user string, addr netip.Addr) (string, bool) {
	if r, ok := f[user]; ok && user != "" {
		return r, true
	}
	if addr.IsValid() {
		if r, ok := f[addr.String()]; ok {
			return r, true
		}
	}
	return "", false
}

func TestBanRule(t *testing.T) {
	bans := fakeBans{"mallory": "spam", "10.9.9.9": ""}
	c := load(t, "middleware:\n  handshake:\n    - ban: {}\n  inbound:\n    - ban: {}\n", Options{Bans: bans})
	if !c.ChecksBans() {
		t.Fatal("ChecksBans = false with a ban rule")
	}
	// handshakeWS: by address, before any WebSocket.
	d := decide(c, Input{Action: HandshakeWS, RemoteIP: ip("10.9.9.9")})
	if d.Verdict != Deny || d.HTTPStatus != 403 || d.Error.Name != "BannedError" || d.Error.Message != "Banned" {
		t.Fatalf("handshakeWS: %+v %+v", d, d.Error)
	}
	if d := decide(c, Input{Action: HandshakeWS, RemoteIP: ip("10.0.0.1")}); d.Verdict != Allow {
		t.Fatalf("handshakeWS of a free address: %+v", d)
	}
	// handshakeSC: by user; the reason is the message; close 4403.
	d = decide(c, Input{Action: HandshakeSC, Socket: user("s", "10.0.0.1", "mallory", nil)})
	if d.Verdict != Deny || d.CloseCode != 4403 || d.Error.Message != "spam" {
		t.Fatalf("handshakeSC: %+v %+v", d, d.Error)
	}
	// authenticate: a socket that becomes mallory later.
	if d := decide(c, Input{Action: Authenticate, Socket: user("s", "10.0.0.1", "mallory", nil)}); d.Verdict != Deny {
		t.Fatalf("authenticate: %+v", d)
	}
	// authenticate checks the user only: the address was checked at the
	// handshake (a banned address there never gets this far).
	if d := decide(c, Input{Action: Authenticate, Socket: user("s", "10.9.9.9", "alice", nil)}); d.Verdict != Allow {
		t.Fatalf("authenticate of alice from a banned address: %+v", d)
	}
	// handshakeSC checks the address as well as the user.
	if d := decide(c, Input{Action: HandshakeSC, Socket: user("s", "10.9.9.9", "alice", nil)}); d.Verdict != Deny || d.Error.Message != "Banned" {
		t.Fatalf("handshakeSC of alice from a banned address: %+v", d)
	}
	if d := decide(c, Input{Action: HandshakeSC, Socket: user("s", "10.0.0.1", "alice", nil)}); d.Verdict != Allow {
		t.Fatalf("alice: %+v", d)
	}
	// A custom error; a reload keeps the checker.
	c2 := load(t, "middleware:\n  handshake:\n    - ban: {error: {name: GoneError, message: 'No entry for {user}', code: 4600}}\n", Options{Previous: c})
	d = decide(c2, Input{Action: HandshakeSC, Socket: user("s", "10.0.0.1", "mallory", nil)})
	if d.Verdict != Deny || d.CloseCode != 4600 || d.Error.Name != "GoneError" || d.Error.Message != "No entry for mallory" {
		t.Fatalf("custom: %+v %+v", d, d.Error)
	}
	// No checker (config check): the rule passes.
	c3 := load(t, "middleware:\n  handshake:\n    - ban: {}\n", Options{})
	if d := decide(c3, Input{Action: HandshakeSC, Socket: user("s", "10.0.0.1", "mallory", nil)}); d.Verdict != Allow {
		t.Fatalf("without a checker: %+v", d)
	}
	if load(t, "middleware:\n  handshake:\n    - cidr: {deny: [10.0.0.0/8]}\n", Options{}).ChecksBans() {
		t.Fatal("ChecksBans without a ban rule")
	}
	// A ban rule only in inbound leaves the handshake check to the worker.
	if load(t, "middleware:\n  inbound:\n    - ban: {}\n", Options{}).ChecksBans() {
		t.Fatal("ChecksBans with a ban rule in inbound only")
	}
}
