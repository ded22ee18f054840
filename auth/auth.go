// Package auth verifies and signs the JWTs SocketCluster clients carry
// (#handshake authToken, #authenticate, #setAuthToken), with golang-jwt.
//
// Keys never sit in the config: an HMAC secret comes from the env var named
// by auth.jwt.key_env (default SHOAL_AUTH_KEY) or from key_file; RSA/ECDSA/
// Ed25519 public keys from public_key_file or public_key_env (key_file may
// then hold the private key for signing) or from a JSON Web Key Set file, jwks_file (jwks.go). With no usable key every token is refused; `shoal token`
// and the workers agree only when they see the same key, so set
// SHOAL_AUTH_KEY for the whole cluster.
//
// Verification errors carry the names socketcluster-server puts on the
// wire (AuthTokenExpiredError, AuthTokenInvalidError,
// AuthTokenNotBeforeError) so the official client reacts as it would there.
package auth

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/proto/sc"
)

// DefaultKeyEnv is the env var read for the HMAC secret when key_env is empty.
const DefaultKeyEnv = "SHOAL_AUTH_KEY"

// Keys verifies and signs tokens. It is immutable after New and safe for
// concurrent use.
type Keys struct {
	algs    []string
	hmac    []byte
	pub     crypto.PublicKey
	priv    crypto.PrivateKey
	jwks    []jwk // auth.jwt.jwks_file, selected by kid
	leeway  time.Duration
	expiry  time.Duration
	now     func() time.Time
	parser  *jwt.Parser
	missing string // why no key is usable; "" when one is
}

// Option adjusts Keys (tests inject a clock).
type Option func(*Keys)

// WithClock replaces time.Now.
func WithClock(now func() time.Time) Option { return func(k *Keys) { k.now = now } }

// New loads the keys named by cfg. getenv is os.Getenv outside tests. A
// missing key is not an error (see Enabled); an unreadable or malformed one,
// or an unknown algorithm, is.
func New(cfg configs.JWT, getenv func(string) string, opts ...Option) (*Keys, error) {
	k := &Keys{
		algs:   cfg.Algorithms,
		leeway: cfg.Leeway.D(),
		expiry: cfg.DefaultExpiry.D(),
		now:    time.Now,
	}
	for _, o := range opts {
		o(k)
	}
	if len(k.algs) == 0 {
		k.algs = []string{"HS256"}
	}
	if k.expiry <= 0 {
		k.expiry = 24 * time.Hour
	}
	var needHMAC, needPub bool
	for _, a := range k.algs {
		switch {
		case !KnownAlgorithm(a):
			return nil, fmt.Errorf("auth.jwt.algorithms: unsupported algorithm %q (%s)", a, AlgorithmsHint)
		case strings.HasPrefix(a, "HS"):
			needHMAC = true
		default:
			needPub = true
		}
	}
	if errs := checkConfig(cfg); len(errs) > 0 {
		return nil, fmt.Errorf("%s: %s", errs[0].Key, errs[0].Msg)
	}
	if needHMAC {
		if err := k.loadHMAC(cfg, getenv); err != nil {
			return nil, err
		}
	}
	if needPub {
		if err := k.loadPublic(cfg, getenv); err != nil {
			return nil, err
		}
	}
	if cfg.JWKSFile != "" {
		set, err := loadJWKS(cfg.JWKSFile, "auth.jwt.jwks_file")
		if err != nil {
			return nil, err
		}
		k.jwks = set
	}
	switch {
	case k.jwks != nil:
		// The set may hold keys for any allowed algorithm; a token whose
		// key is not in it fails as an invalid signature.
	case needHMAC && k.hmac == nil && (!needPub || k.pub == nil):
		env := cfg.KeyEnv
		if env == "" {
			env = DefaultKeyEnv
		}
		k.missing = fmt.Sprintf("no auth key: set %s (or auth.jwt.key_file)", env)
	case !needHMAC && k.pub == nil && cfg.PublicKeyEnv != "":
		k.missing = fmt.Sprintf("no auth key: set %s (auth.jwt.public_key_env)", cfg.PublicKeyEnv)
	case !needHMAC && k.pub == nil:
		k.missing = "no auth key: set auth.jwt.public_key_file or jwks_file"
	}
	k.parser = jwt.NewParser(jwt.WithValidMethods(k.algs), jwt.WithLeeway(k.leeway), jwt.WithTimeFunc(k.now))
	return k, nil
}

func (k *Keys) loadHMAC(cfg configs.JWT, getenv func(string) string) error {
	if cfg.KeyFile != "" {
		b, err := os.ReadFile(cfg.KeyFile)
		if err != nil {
			return fmt.Errorf("reading auth.jwt.key_file: %w", err)
		}
		// Editors add a final newline; it is never part of a secret.
		b = bytes.TrimRight(b, "\r\n")
		if len(b) == 0 {
			return fmt.Errorf("auth.jwt.key_file %s is empty", cfg.KeyFile)
		}
		k.hmac = b
		return nil
	}
	env := cfg.KeyEnv
	if env == "" {
		env = DefaultKeyEnv
	}
	if v := getenv(env); v != "" {
		k.hmac = []byte(v)
	}
	return nil
}

func (k *Keys) loadPublic(cfg configs.JWT, getenv func(string) string) error {
	var b []byte
	var from string
	switch {
	case cfg.PublicKeyFile != "":
		var err error
		if b, err = os.ReadFile(cfg.PublicKeyFile); err != nil {
			return fmt.Errorf("reading auth.jwt.public_key_file: %w", err)
		}
		from = "auth.jwt.public_key_file " + cfg.PublicKeyFile
	case cfg.PublicKeyEnv != "":
		// Unset is not an error (as key_env): the worker warns and
		// refuses every token until it is set.
		b = []byte(getenv(cfg.PublicKeyEnv))
		from = "auth.jwt.public_key_env " + cfg.PublicKeyEnv
	}
	if len(b) > 0 {
		if pk, err := jwt.ParseRSAPublicKeyFromPEM(b); err == nil {
			k.pub = pk
		} else if pk, err := jwt.ParseECPublicKeyFromPEM(b); err == nil {
			k.pub = pk
		} else if pk, err := jwt.ParseEdPublicKeyFromPEM(b); err == nil {
			k.pub = pk
		} else {
			return fmt.Errorf("%s: not an RSA, ECDSA or Ed25519 public key in PEM", from)
		}
	}
	if cfg.KeyFile != "" {
		b, err := os.ReadFile(cfg.KeyFile)
		if err != nil {
			return fmt.Errorf("reading auth.jwt.key_file: %w", err)
		}
		if pk, err := jwt.ParseRSAPrivateKeyFromPEM(b); err == nil {
			k.priv = pk
		} else if pk, err := jwt.ParseECPrivateKeyFromPEM(b); err == nil {
			k.priv = pk
		} else if pk, err := jwt.ParseEdPrivateKeyFromPEM(b); err == nil {
			k.priv = pk
		} else {
			return fmt.Errorf("auth.jwt.key_file %s: not an RSA, ECDSA or Ed25519 private key in PEM", cfg.KeyFile)
		}
		if k.pub == nil { // verify with the signing key's own public half
			switch pk := k.priv.(type) {
			case *rsa.PrivateKey:
				k.pub = &pk.PublicKey
			case *ecdsa.PrivateKey:
				k.pub = &pk.PublicKey
			case ed25519.PrivateKey:
				k.pub = pk.Public()
			}
		}
	}
	return nil
}

func init() {
	// `shoal config check` reports key settings the worker would refuse.
	configs.RegisterValidator(func(c *configs.Config) []*configs.Error { return checkConfig(c.Auth.JWT) })
}

// KnownAlgorithm reports whether a is a signing algorithm tokens may use
// (AlgorithmsHint lists them).
func KnownAlgorithm(a string) bool { return configs.KnownJWTAlgorithm(a) }

// AlgorithmsHint names the algorithms KnownAlgorithm accepts, for errors.
const AlgorithmsHint = configs.JWTAlgorithmsHint

// checkConfig finds key settings that cannot work, without reading files
// or the environment (those may differ where the config is checked).
func checkConfig(cfg configs.JWT) []*configs.Error {
	var errs []*configs.Error
	var hmac, pub bool
	for _, a := range cfg.Algorithms {
		if strings.HasPrefix(a, "HS") {
			hmac = true
		} else {
			pub = true
		}
	}
	if hmac && pub && cfg.KeyFile != "" {
		errs = append(errs, &configs.Error{Key: "auth.jwt.key_file",
			Msg: "ambiguous when both HMAC and public-key algorithms are allowed (use key_env for the HMAC secret)"})
	}
	if cfg.PublicKeyFile != "" && cfg.PublicKeyEnv != "" {
		errs = append(errs, &configs.Error{Key: "auth.jwt.public_key_env", Msg: "set public_key_file or public_key_env, not both"})
	}
	if pub && cfg.PublicKeyFile == "" && cfg.PublicKeyEnv == "" && cfg.KeyFile == "" && cfg.JWKSFile == "" {
		errs = append(errs, &configs.Error{Key: "auth.jwt.public_key_file",
			Msg: "must be set for " + strings.Join(cfg.Algorithms, ", ") + " (or public_key_env, key_file with the private key, or jwks_file)"})
	}
	return errs
}

// Enabled reports whether a verification key is loaded.
func (k *Keys) Enabled() bool { return k.missing == "" }

// Missing says why no key is usable ("" when Enabled).
func (k *Keys) Missing() string { return k.missing }

// Token is a verified token.
type Token struct {
	Raw    string
	Claims map[string]any
	// Expiry is when the token stops being valid (exp plus leeway); zero
	// when it has no exp.
	Expiry time.Time
}

// Subject is the sub claim ("" if absent or not a string).
func (t *Token) Subject() string {
	s, _ := t.Claims["sub"].(string)
	return s
}

// Expired reports whether the token is past its expiry at now.
func (t *Token) Expired(now time.Time) bool { return !t.Expiry.IsZero() && now.After(t.Expiry) }

// Error is a failed verification, named as socketcluster-server names it.
type Error struct {
	Name       string // AuthTokenExpiredError | AuthTokenInvalidError | AuthTokenNotBeforeError | AuthTokenError
	Message    string
	Expiry     time.Time // AuthTokenExpiredError
	Date       time.Time // AuthTokenNotBeforeError
	IsBadToken bool      // the client should forget the token (#removeAuthToken)
	cause      error
}

func (e *Error) Error() string { return e.Name + ": " + e.Message }
func (e *Error) Unwrap() error { return e.cause }

// jsDate formats a time as JavaScript's Date.toJSON does.
func jsDate(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.000Z") }

// SC is the error as the wire carries it.
func (e *Error) SC() *sc.Error {
	out := sc.NewError(e.Name, e.Message)
	if !e.Expiry.IsZero() {
		out = out.WithString("expiry", jsDate(e.Expiry))
	}
	if !e.Date.IsZero() {
		out = out.WithString("date", jsDate(e.Date))
	}
	return out.WithBool("isBadToken", e.IsBadToken)
}

var errNotString = &Error{Name: "AuthTokenInvalidError", Message: "Invalid token format - Token must be a string", IsBadToken: true}

// InvalidFormat is the error for a token that is not a string (e.g. null in #authenticate).
func InvalidFormat() *Error { e := *errNotString; return &e }

// Verify checks a signed token. The returned error, if any, is an *Error.
func (k *Keys) Verify(raw string) (*Token, error) {
	if raw == "" {
		return nil, InvalidFormat()
	}
	if k.missing != "" {
		return nil, &Error{Name: "AuthTokenInvalidError", Message: "Server has no auth key configured", IsBadToken: true}
	}
	claims := jwt.MapClaims{}
	_, err := k.parser.ParseWithClaims(raw, claims, k.keyFor)
	if err != nil {
		return nil, k.mapError(err, claims)
	}
	t := &Token{Raw: raw, Claims: claims}
	if exp, err := claims.GetExpirationTime(); err == nil && exp != nil {
		t.Expiry = exp.Time.Add(k.leeway)
	}
	return t, nil
}

func (k *Keys) keyFor(t *jwt.Token) (any, error) {
	// A token that names its key (kid) is checked against the key set
	// only; one without kid uses the configured key for its algorithm,
	// else every key of the set that fits.
	if _, named := t.Header["kid"].(string); named && k.jwks != nil {
		return jwksKey(k.jwks, t)
	}
	switch t.Method.(type) {
	case *jwt.SigningMethodHMAC:
		if k.hmac == nil {
			if k.jwks != nil {
				return jwksKey(k.jwks, t)
			}
			return nil, errors.New("no HMAC key")
		}
		return k.hmac, nil
	case *jwt.SigningMethodRSA, *jwt.SigningMethodRSAPSS, *jwt.SigningMethodECDSA, *jwt.SigningMethodEd25519:
		if k.pub == nil {
			if k.jwks != nil {
				return jwksKey(k.jwks, t)
			}
			return nil, errors.New("no public key")
		}
		return k.pub, nil
	}
	return nil, fmt.Errorf("unsupported method %s", t.Method.Alg())
}

// mapError names a golang-jwt failure like jsonwebtoken/ag-auth do.
func (k *Keys) mapError(err error, claims jwt.MapClaims) *Error {
	switch {
	case errors.Is(err, jwt.ErrTokenExpired):
		e := &Error{Name: "AuthTokenExpiredError", Message: "jwt expired", IsBadToken: true, cause: err}
		if exp, cerr := claims.GetExpirationTime(); cerr == nil && exp != nil {
			e.Expiry = exp.Time
		}
		return e
	case errors.Is(err, jwt.ErrTokenNotValidYet):
		e := &Error{Name: "AuthTokenNotBeforeError", Message: "jwt not active", cause: err}
		if nbf, cerr := claims.GetNotBefore(); cerr == nil && nbf != nil {
			e.Date = nbf.Time
		}
		return e
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return &Error{Name: "AuthTokenInvalidError", Message: "invalid signature", IsBadToken: true, cause: err}
	case errors.Is(err, jwt.ErrTokenMalformed):
		return &Error{Name: "AuthTokenInvalidError", Message: "jwt malformed", IsBadToken: true, cause: err}
	case errors.Is(err, errNoKey):
		return &Error{Name: "AuthTokenInvalidError", Message: "unknown signing key", IsBadToken: true, cause: err}
	case errors.Is(err, jwt.ErrTokenUnverifiable):
		return &Error{Name: "AuthTokenInvalidError", Message: "invalid algorithm", IsBadToken: true, cause: err}
	}
	return &Error{Name: "AuthTokenInvalidError", Message: "invalid token", IsBadToken: true, cause: err}
}

// Sign signs claims with the first configured algorithm that has a signing
// key. It adds iat, and exp = iat + default_expiry unless claims has exp.
func (k *Keys) Sign(claims map[string]any) (string, error) {
	alg, key := k.signer()
	if alg == nil {
		return "", errors.New("signing token: " + k.signMissing())
	}
	now := k.now()
	mc := jwt.MapClaims{}
	for c, v := range claims {
		mc[c] = v
	}
	if _, ok := mc["iat"]; !ok {
		mc["iat"] = now.Unix()
	}
	if _, ok := mc["exp"]; !ok {
		mc["exp"] = now.Add(k.expiry).Unix()
	}
	s, err := jwt.NewWithClaims(alg, mc).SignedString(key)
	if err != nil {
		return "", fmt.Errorf("signing token with %s: %w", alg.Alg(), err)
	}
	return s, nil
}

func (k *Keys) signMissing() string {
	if k.missing != "" {
		return k.missing
	}
	return "no private key for " + strings.Join(k.algs, ",") + " (set auth.jwt.key_file)"
}

func (k *Keys) signer() (jwt.SigningMethod, any) {
	for _, a := range k.algs {
		m := jwt.GetSigningMethod(a)
		switch m.(type) {
		case *jwt.SigningMethodHMAC:
			if k.hmac != nil {
				return m, k.hmac
			}
		case *jwt.SigningMethodRSA, *jwt.SigningMethodRSAPSS:
			if _, ok := k.priv.(*rsa.PrivateKey); ok {
				return m, k.priv
			}
		case *jwt.SigningMethodECDSA:
			if pk, ok := k.priv.(*ecdsa.PrivateKey); ok && pk.Curve.Params().BitSize == m.(*jwt.SigningMethodECDSA).CurveBits {
				return m, k.priv
			}
		case *jwt.SigningMethodEd25519:
			if _, ok := k.priv.(ed25519.PrivateKey); ok {
				return m, k.priv
			}
		}
	}
	return nil, nil
}
