package auth

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"strings"

	"github.com/golang-jwt/jwt/v5"
)

// A JSON Web Key Set file (RFC 7517) holds the verification keys of an
// issuer that rotates them: each token names its key with the `kid`
// header. Keys of type RSA, EC (P-256/384/521), OKP (Ed25519) and oct
// (HMAC secret) are read; a key marked `"use":"enc"` is skipped (it is not
// for signatures), and a key of another type is refused, so a file that
// cannot do what it says is found at load time rather than at the first
// token. The file is read when the Keys are built: at worker start and at
// every SIGHUP reload, so a rotated file takes effect on reload.

// errNoKey is a token whose key the set does not hold (or cannot use).
var errNoKey = errors.New("no key for the token")

// jwk is one key of the set, as it is used.
type jwk struct {
	kid string
	alg string // "" when the key does not name one
	key any    // *rsa.PublicKey, *ecdsa.PublicKey, ed25519.PublicKey or []byte
}

type rawJWK struct {
	Kty string `json:"kty"`
	Kid string `json:"kid"`
	Alg string `json:"alg"`
	Use string `json:"use"`
	N   string `json:"n"`
	E   string `json:"e"`
	Crv string `json:"crv"`
	X   string `json:"x"`
	Y   string `json:"y"`
	K   string `json:"k"`
}

// maxJWKSBytes bounds the file read: a key set is a few KiB.
const maxJWKSBytes = 1 << 20

// loadJWKS reads a key set file; key names the config key in errors.
func loadJWKS(path, key string) ([]jwk, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", key, err)
	}
	if st.Size() > maxJWKSBytes {
		return nil, fmt.Errorf("%s %s: larger than %d bytes", key, path, maxJWKSBytes)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", key, err)
	}
	keys, err := parseJWKS(b)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", key, path, err)
	}
	return keys, nil
}

// parseJWKS parses a JSON Web Key Set document ({"keys":[...]}).
func parseJWKS(b []byte) ([]jwk, error) {
	var doc struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("not a JSON Web Key Set: %w", err)
	}
	if doc.Keys == nil {
		return nil, errors.New(`not a JSON Web Key Set: no "keys" list`)
	}
	var out []jwk
	seen := map[string]bool{}
	for i, raw := range doc.Keys {
		var r rawJWK
		if err := json.Unmarshal(raw, &r); err != nil {
			return nil, fmt.Errorf("keys[%d]: %w", i, err)
		}
		if r.Use != "" && r.Use != "sig" {
			continue
		}
		k, err := r.parse()
		if err != nil {
			name := fmt.Sprintf("keys[%d]", i)
			if r.Kid != "" {
				name += fmt.Sprintf(" (kid %q)", r.Kid)
			}
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		if r.Kid != "" {
			if seen[r.Kid] {
				return nil, fmt.Errorf("keys[%d]: kid %q appears twice", i, r.Kid)
			}
			seen[r.Kid] = true
		}
		out = append(out, k)
	}
	if len(out) == 0 {
		return nil, errors.New("no signature key in the set")
	}
	return out, nil
}

func b64(field, s string) ([]byte, error) {
	if s == "" {
		return nil, fmt.Errorf("%q is missing", field)
	}
	// RFC 7518 says unpadded base64url; tolerate padding some tools add.
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(s, "="))
	if err != nil {
		return nil, fmt.Errorf("%q is not base64url: %w", field, err)
	}
	return b, nil
}

func (r *rawJWK) parse() (jwk, error) {
	k := jwk{kid: r.Kid, alg: r.Alg}
	if r.Alg != "" && jwt.GetSigningMethod(r.Alg) == nil {
		return k, fmt.Errorf("unsupported alg %q", r.Alg)
	}
	switch r.Kty {
	case "RSA":
		n, err := b64("n", r.N)
		if err != nil {
			return k, err
		}
		e, err := b64("e", r.E)
		if err != nil {
			return k, err
		}
		eb := new(big.Int).SetBytes(e)
		if !eb.IsInt64() || eb.Int64() < 3 || eb.Int64() > 1<<31-1 {
			return k, errors.New(`"e" is out of range`)
		}
		pub := &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(eb.Int64())}
		if pub.N.BitLen() < 2048 {
			return k, fmt.Errorf("RSA key of %d bits (at least 2048)", pub.N.BitLen())
		}
		k.key = pub
		return k, k.fits()
	case "EC":
		var curve elliptic.Curve
		switch r.Crv {
		case "P-256":
			curve = elliptic.P256()
		case "P-384":
			curve = elliptic.P384()
		case "P-521":
			curve = elliptic.P521()
		default:
			return k, fmt.Errorf("unsupported EC curve %q (P-256, P-384, P-521)", r.Crv)
		}
		x, err := b64("x", r.X)
		if err != nil {
			return k, err
		}
		y, err := b64("y", r.Y)
		if err != nil {
			return k, err
		}
		// Checking the point through the uncompressed encoding refuses
		// a point off the curve (an invalid-curve attack otherwise).
		size := (curve.Params().BitSize + 7) / 8
		if len(x) > size || len(y) > size {
			return k, errors.New("EC coordinates longer than the curve")
		}
		pt := make([]byte, 1+2*size)
		pt[0] = 4
		copy(pt[1+size-len(x):1+size], x)
		copy(pt[1+2*size-len(y):], y)
		pub, err := ecdsa.ParseUncompressedPublicKey(curve, pt)
		if err != nil {
			return k, fmt.Errorf("EC point: %w", err)
		}
		k.key = pub
		return k, k.fits()
	case "OKP":
		if r.Crv != "Ed25519" {
			return k, fmt.Errorf("unsupported OKP curve %q (Ed25519)", r.Crv)
		}
		x, err := b64("x", r.X)
		if err != nil {
			return k, err
		}
		if len(x) != ed25519.PublicKeySize {
			return k, fmt.Errorf("Ed25519 key of %d bytes (want %d)", len(x), ed25519.PublicKeySize)
		}
		k.key = ed25519.PublicKey(x)
		return k, k.fits()
	case "oct":
		s, err := b64("k", r.K)
		if err != nil {
			return k, err
		}
		k.key = s
		return k, k.fits()
	case "":
		return k, errors.New(`"kty" is missing`)
	}
	return k, fmt.Errorf("unsupported kty %q (RSA, EC, OKP, oct)", r.Kty)
}

// fits checks that the key's own alg, when it names one, can use the key
// (the same test as verification's, usable).
func (k *jwk) fits() error {
	if k.alg == "" || k.usable(jwt.GetSigningMethod(k.alg)) {
		return nil
	}
	if ec, ok := k.key.(*ecdsa.PublicKey); ok && strings.HasPrefix(k.alg, "ES") {
		return fmt.Errorf("alg %s does not fit curve %s", k.alg, ec.Curve.Params().Name)
	}
	return fmt.Errorf("alg %s does not fit the key type", k.alg)
}

// usable reports whether k can verify a token signed with method m.
func (k *jwk) usable(m jwt.SigningMethod) bool {
	if k.alg != "" && k.alg != m.Alg() {
		return false
	}
	switch mm := m.(type) {
	case *jwt.SigningMethodHMAC:
		_, ok := k.key.([]byte)
		return ok
	case *jwt.SigningMethodRSA, *jwt.SigningMethodRSAPSS:
		_, ok := k.key.(*rsa.PublicKey)
		return ok
	case *jwt.SigningMethodECDSA:
		ec, ok := k.key.(*ecdsa.PublicKey)
		return ok && ec.Curve.Params().BitSize == mm.CurveBits
	case *jwt.SigningMethodEd25519:
		_, ok := k.key.(ed25519.PublicKey)
		return ok
	}
	return false
}

// jwksKey picks the verification key(s) for t: the key named by its kid
// header, or, for a token without kid, every key of the set that can
// verify its algorithm (golang-jwt tries each).
func jwksKey(set []jwk, t *jwt.Token) (any, error) {
	kid, _ := t.Header["kid"].(string)
	if kid != "" {
		for i := range set {
			if set[i].kid == kid {
				if !set[i].usable(t.Method) {
					return nil, fmt.Errorf("%w: key %q cannot verify %s", errNoKey, kid, t.Method.Alg())
				}
				return set[i].key, nil
			}
		}
		return nil, fmt.Errorf("%w: no key with kid %q", errNoKey, kid)
	}
	var ks jwt.VerificationKeySet
	for i := range set {
		if set[i].usable(t.Method) {
			ks.Keys = append(ks.Keys, set[i].key)
		}
	}
	if len(ks.Keys) == 0 {
		return nil, fmt.Errorf("%w: no key for %s", errNoKey, t.Method.Alg())
	}
	return ks, nil
}
