package middleware

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"sort"
	"strings"

	"github.com/shoalhq/shoal/auth"
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/proto/sc"
)

// ---- jwt -----------------------------------------------------------------

// jwtRule puts conditions on the client's auth token at one point of the
// chain. auth.jwt stays the verifier that makes a socket authenticated;
// this rule can only narrow what it accepts (docs/middleware.md, "jwt"):
//
//   - handshake (handshakeSC): a gate. Without a token the socket is denied
//     unless require is false; with one, the token must have been accepted
//     by auth.jwt and pass the rule, else the handshake is denied (error,
//     then close 4008 unless error.code).
//   - inbound (authenticate): runs for each token auth.jwt accepted, from
//     #handshake or #authenticate; a token the rule refuses becomes the
//     authError and the socket stays unauthenticated, as a block in
//     socketcluster-server's authenticate middleware.
type jwtRule struct {
	require  bool
	algs     map[string]bool // nil: any algorithm auth.jwt allows
	keys     *auth.Keys      // the rule's own keys; nil: auth.jwt's verdict only
	global   *auth.Keys      // auth.jwt's keys, to name why a token failed
	required []string        // claims that must be present
	claims   []claimReq      // claims that must hold one of the values
	custom   bool            // error: set, used for every failure
	err      errSpec
}

var jwtOptions = []string{"require", "algorithms", "key_env", "key_file", "public_key_file", "public_key_env", "jwks_file", "leeway", "required_claims", "claims", "error"}

func buildJWT(b *builder, v any) (rule, []Action) {
	o, ok := newOpts(b.p, b.key, v)
	if !ok {
		return nil, nil
	}
	r := &jwtRule{require: true, err: newErrSpec("AuthError", "Authentication required", 401)}
	var acts []Action
	switch b.stage {
	case StageHandshake:
		acts = []Action{HandshakeSC}
		if req, ok := o.boolv("require"); ok {
			r.require = req
		}
	case StageInbound:
		acts = []Action{Authenticate}
		if _, ok := o.get("require"); ok {
			b.p.add(o.sub("require"), "only for the handshake stage: in inbound the rule runs for tokens that arrive (authenticate)")
		}
	default:
		b.p.add(b.key, "jwt rules check tokens at the handshake or at authenticate: put them in middleware.handshake or middleware.inbound")
		return nil, nil
	}
	if algs, ok := o.strList("algorithms"); ok {
		r.algs = map[string]bool{}
		for _, a := range algs {
			if !auth.KnownAlgorithm(a) {
				b.p.add(o.sub("algorithms"), "unsupported algorithm %q (%s)", a, auth.AlgorithmsHint)
			}
			r.algs[a] = true
		}
	}
	var kc configs.JWT
	kc.KeyEnv, _ = o.str("key_env")
	kc.KeyFile, _ = o.str("key_file")
	kc.PublicKeyFile, _ = o.str("public_key_file")
	kc.PublicKeyEnv, _ = o.str("public_key_env")
	kc.JWKSFile, _ = o.str("jwks_file")
	leeway, hasLeeway := o.duration("leeway")
	ownKeys := kc.KeyEnv != "" || kc.KeyFile != "" || kc.PublicKeyFile != "" || kc.PublicKeyEnv != "" || kc.JWKSFile != ""
	if hasLeeway && !ownKeys {
		b.p.add(o.sub("leeway"), "applies to the rule's own key (key_env, key_file, public_key_file, public_key_env or jwks_file); without one auth.jwt.leeway applies")
	}
	if ownKeys {
		kc.Leeway = configs.Duration(leeway)
		if !hasLeeway {
			kc.Leeway = b.cfg.Auth.JWT.Leeway
		}
		if hasLeeway && leeway < 0 {
			b.p.add(o.sub("leeway"), "must not be negative")
		}
		for a := range r.algs {
			kc.Algorithms = append(kc.Algorithms, a)
		}
		sort.Strings(kc.Algorithms)
		if len(kc.Algorithms) == 0 {
			b.p.add(o.sub("algorithms"), "must be set with the rule's own key (the algorithms that key verifies)")
		} else if k, err := auth.New(kc, os.Getenv); err != nil {
			b.p.add(b.key, "%s", strings.Replace(err.Error(), "auth.jwt.", b.key+".", 1))
		} else {
			r.keys = k
			if !k.Enabled() {
				// Not a config error (the variable may be set where the
				// worker runs), but every token will fail this rule.
				b.c.log.Warn("jwt rule has no usable key: it refuses every token", "rule", b.key, "reason", strings.Replace(k.Missing(), "auth.jwt.", b.key+".", 1))
			}
		}
	}
	if g, err := auth.New(b.cfg.Auth.JWT, os.Getenv); err == nil {
		r.global = g
	}
	if req, ok := o.strList("required_claims"); ok {
		r.required = req
	}
	if cv, ok := o.get("claims"); ok {
		cm, isMap := asMap(cv)
		if !isMap {
			b.p.add(o.sub("claims"), "expected a mapping of claim: value (or [values]), got %s", describe(cv))
		}
		names := make([]string, 0, len(cm))
		for n := range cm {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			if vals, ok := strListOf(b.p, o.sub("claims")+"."+n, cm[n]); ok {
				r.claims = append(r.claims, claimReq{name: n, values: vals})
			}
		}
	}
	if _, ok := o.m["error"]; ok {
		r.custom = true
	}
	r.err = readErrSpec(o, r.err)
	o.finish(jwtOptions...)
	return r, acts
}

// tokenAlg reads the alg header of a token (already verified, or about to
// be refused: it decides nothing alone).
func tokenAlg(raw string) string {
	h, _, ok := strings.Cut(raw, ".")
	if !ok {
		return ""
	}
	b, err := base64.RawURLEncoding.DecodeString(h)
	if err != nil {
		return ""
	}
	var hdr struct {
		Alg string `json:"alg"`
	}
	if json.Unmarshal(b, &hdr) != nil {
		return ""
	}
	return hdr.Alg
}

func (r *jwtRule) check(_ *Chain, in *Input) (Decision, bool) {
	if in.Token == "" && in.BadToken == "" {
		if r.require {
			return r.fail(in, "AuthError", "Authentication required"), true
		}
		return Decision{}, false
	}
	authenticated := in.Token != "" && in.Socket != nil && in.Socket.Authenticated
	if !authenticated {
		// auth.jwt refused it: say why, as auth.jwt would.
		name, msg := "AuthTokenInvalidError", "The auth token was not accepted"
		if ae := in.TokenRefusal; ae != nil && in.BadToken != "" {
			name, msg = ae.Name, ae.Message
		} else if r.global != nil && in.BadToken != "" {
			var ae *auth.Error
			_, err := r.global.Verify(in.BadToken)
			if errors.As(err, &ae) {
				name, msg = ae.Name, ae.Message
			} else if err == nil {
				// auth.jwt accepted it: the authenticate rules refused it,
				// and the handshake carries their authError. A socket
				// that may connect without a token may connect so.
				if !r.require {
					return Decision{}, false
				}
				name, msg = "AuthError", "Authentication required"
			}
		}
		return r.fail(in, name, msg), true
	}
	if r.algs != nil && !r.algs[tokenAlg(in.Token)] {
		return r.fail(in, "AuthTokenInvalidError", "invalid algorithm"), true
	}
	claims := in.Socket.Claims
	if r.keys != nil {
		tok, err := r.keys.Verify(in.Token)
		if err != nil {
			var ae *auth.Error
			if errors.As(err, &ae) {
				return r.fail(in, ae.Name, ae.Message), true
			}
			return r.fail(in, "AuthTokenInvalidError", "invalid token"), true
		}
		claims = tok.Claims
	}
	for _, n := range r.required {
		if v, ok := claims[n]; !ok || v == nil {
			return r.fail(in, "AuthError", "The auth token has no "+n+" claim"), true
		}
	}
	for i := range r.claims {
		if !claimIn(claims[r.claims[i].name], r.claims[i].values) {
			return r.fail(in, "AuthError", "The auth token's "+r.claims[i].name+" claim is not allowed"), true
		}
	}
	return Decision{}, false
}

// fail denies with the rule's error when one is configured, else with the
// reason's own name and message (the rule's status and code still apply).
func (r *jwtRule) fail(in *Input, name, msg string) Decision {
	if r.custom {
		return r.err.decide(in)
	}
	spec := r.err
	spec.name, spec.msg = name, template{parts: []tpart{{lit: msg}}}
	spec.fixed = sc.NewError(name, msg)
	return spec.decide(in)
}

// ---- ban -----------------------------------------------------------------

// BanChecker answers whether a user or an address is banned (the worker's
// cluster-wide ban store). reason is the ban's ("" when it has none).
type BanChecker interface {
	BannedReason(user string, addr netip.Addr) (reason string, banned bool)
}

// banRule refuses banned users and addresses: at handshakeWS by address
// (HTTP 403 before any WebSocket), at handshakeSC by user and address
// (error then close 4403), in inbound at authenticate by user (authError).
type banRule struct {
	custom bool
	err    errSpec
}

// DefaultBanCloseCode is the close code of a ban at handshakeSC: the
// worker's CodeBanned.
const DefaultBanCloseCode = 4403

func buildBan(b *builder, v any) (rule, []Action) {
	o, ok := newOpts(b.p, b.key, v)
	if !ok {
		return nil, nil
	}
	r := &banRule{err: newErrSpec("BannedError", "Banned", 403)}
	r.err.code = DefaultBanCloseCode
	if _, ok := o.m["error"]; ok {
		r.custom = true
	}
	r.err = readErrSpec(o, r.err)
	o.finish("error")
	switch b.stage {
	case StageHandshake:
		return r, []Action{HandshakeWS, HandshakeSC}
	case StageInbound:
		return r, []Action{Authenticate}
	}
	b.p.add(b.key, "ban rules run at the handshake (and at authenticate): put them in middleware.handshake or middleware.inbound")
	return nil, nil
}

func (r *banRule) check(c *Chain, in *Input) (Decision, bool) {
	if c.bans == nil {
		return Decision{}, false
	}
	var user string
	if in.Socket != nil {
		user = in.Socket.UserID
	}
	ip := in.ip()
	if in.Action == Authenticate {
		ip = netip.Addr{} // the address was checked at the handshake
	}
	reason, banned := c.bans.BannedReason(user, ip)
	if !banned {
		return Decision{}, false
	}
	if r.custom || reason == "" {
		return r.err.decide(in), true
	}
	spec := r.err
	spec.msg = template{parts: []tpart{{lit: reason}}}
	spec.fixed = sc.NewError(spec.name, reason)
	return spec.decide(in), true
}

// ChecksBans reports whether the chain has a ban rule in its handshake
// stage; without one the worker checks bans itself after the handshake
// rules.
func (c *Chain) ChecksBans() bool { return c.hasBan }
