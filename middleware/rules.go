package middleware

import (
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"github.com/shoalhq/shoal/configs"
)

// ---- channels ------------------------------------------------------------

// chanPolicy is what a channel entry says about one action (subscribe or
// publish).
type chanPolicy struct {
	set          bool
	deny         bool
	allow        bool // explicit allow: the chain stops here
	requireAuth  bool
	requireClaim bool // every {claim} segment must equal the socket's claim
	claims       []claimReq
}

type claimReq struct {
	name   string
	values []string // any of these
}

type chanEntry struct {
	pat      pattern
	sub, pub chanPolicy
	subErr   errSpec
	pubErr   errSpec
}

// channelsRule: the first entry whose pattern matches the channel and that
// has a policy for the action decides; a satisfied requirement passes to the
// next rule, `allow` stops the chain, an unmet one denies.
type channelsRule struct {
	entries []chanEntry
}

func buildChannels(b *builder, v any) (rule, []Action) {
	if b.stage != StageInbound {
		b.p.add(b.key, "channels rules control subscribe and client publish: put them in middleware.inbound")
		return nil, nil
	}
	list, ok := v.([]any)
	if !ok {
		b.p.add(b.key, "expected a list of {match, subscribe, publish, error}, got %s", describe(v))
		return nil, nil
	}
	r := &channelsRule{}
	for i, item := range list {
		key := fmt.Sprintf("%s[%d]", b.key, i)
		o, ok := newOpts(b.p, key, item)
		if !ok {
			continue
		}
		var e chanEntry
		m, ok := o.str("match")
		if !ok {
			b.p.add(o.sub("match"), "must be set (a channel pattern such as private/**)")
		} else if pat, err := compilePattern(m); err != nil {
			b.p.add(o.sub("match"), "%v", err)
		} else {
			e.pat = pat
		}
		if pv, ok := o.get("subscribe"); ok {
			e.sub = readChanPolicy(b.p, o.sub("subscribe"), pv, e.pat)
		}
		if pv, ok := o.get("publish"); ok {
			e.pub = readChanPolicy(b.p, o.sub("publish"), pv, e.pat)
		}
		if !e.sub.set && !e.pub.set {
			b.p.add(key, "set subscribe, publish or both")
		}
		e.subErr = newErrSpec("ForbiddenError", "Cannot subscribe to {channel}", 403)
		e.pubErr = newErrSpec("ForbiddenError", "Cannot publish to {channel}", 403)
		if ev, ok := o.get("error"); ok {
			e.subErr = errSpecOf(b.p, o.sub("error"), ev, e.subErr)
			e.pubErr = errSpecOf(&problems{}, o.sub("error"), ev, e.pubErr) // reported once above
		}
		o.finish("match", "subscribe", "publish", "error")
		r.entries = append(r.entries, e)
	}
	return r, []Action{Subscribe, PublishIn}
}

func readChanPolicy(p *problems, key string, v any, pat pattern) chanPolicy {
	pol := chanPolicy{set: true}
	if s, ok := v.(string); ok {
		switch s {
		case "deny":
			pol.deny = true
		case "allow":
			pol.allow = true
		case "authenticated":
			pol.requireAuth = true
		default:
			p.add(key, "expected deny, allow, authenticated or {require, claims}, got %q", s)
		}
		return pol
	}
	o, ok := newOpts(p, key, v)
	if !ok {
		return pol
	}
	if req, ok := o.str("require"); ok {
		switch req {
		case "authenticated":
			pol.requireAuth = true
		case "claim":
			pol.requireAuth, pol.requireClaim = true, true
			if len(pat.claims) == 0 && pat.raw != "" {
				p.add(o.sub("require"), "require: claim needs a {claim} segment in the pattern (e.g. user/{sub}/**), %q has none", pat.raw)
			}
		default:
			p.add(o.sub("require"), "expected authenticated or claim, got %q", req)
		}
	}
	if cv, ok := o.get("claims"); ok {
		cm, isMap := asMap(cv)
		if !isMap {
			p.add(o.sub("claims"), "expected a mapping of claim: value (or [values]), got %s", describe(cv))
		}
		names := make([]string, 0, len(cm))
		for n := range cm {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			vals, ok := strListOf(p, o.sub("claims")+"."+n, cm[n])
			if ok {
				pol.claims = append(pol.claims, claimReq{name: n, values: vals})
			}
		}
		pol.requireAuth = true
	}
	if d, ok := o.boolv("deny"); ok {
		pol.deny = d
	}
	if a, ok := o.boolv("allow"); ok {
		pol.allow = a
	}
	o.finish("require", "claims", "deny", "allow")
	return pol
}

// ok reports whether the socket meets the policy for channel ch.
func (pol *chanPolicy) ok(in *Input, pat *pattern) bool {
	if pol.deny {
		return false
	}
	s := in.Socket
	if pol.requireAuth && (s == nil || !s.Authenticated) {
		return false
	}
	if pol.requireClaim && !pat.match(in.Channel, s.Claims, true) {
		return false
	}
	for i := range pol.claims {
		if !claimIn(s.Claims[pol.claims[i].name], pol.claims[i].values) {
			return false
		}
	}
	return true
}

// claimIn reports whether a claim (a value, or a list of values as in
// roles: [a, b]) holds one of want.
func claimIn(v any, want []string) bool {
	if l, ok := v.([]any); ok {
		for _, x := range l {
			if claimIn(x, want) {
				return true
			}
		}
		return false
	}
	for _, w := range want {
		if valueEquals(v, w) {
			return true
		}
	}
	return false
}

func (r *channelsRule) check(_ *Chain, in *Input) (Decision, bool) {
	for i := range r.entries {
		e := &r.entries[i]
		pol, spec := &e.sub, &e.subErr
		if in.Action == PublishIn {
			pol, spec = &e.pub, &e.pubErr
		}
		if !pol.set || !e.pat.match(in.Channel, nil, false) {
			continue
		}
		if !pol.ok(in, &e.pat) {
			return spec.decide(in), true
		}
		if pol.allow {
			return Decision{Verdict: Allow}, true
		}
		return Decision{}, false
	}
	return Decision{}, false
}

// ---- cidr ----------------------------------------------------------------

type cidrRule struct {
	allow, deny []netip.Prefix
	err         errSpec
}

func buildCIDR(b *builder, v any) (rule, []Action) {
	o, ok := newOpts(b.p, b.key, v)
	if !ok {
		return nil, nil
	}
	r := &cidrRule{err: newErrSpec("ForbiddenError", "Connections from {ip} are not allowed", 403)}
	r.allow = readPrefixes(o, "allow")
	r.deny = readPrefixes(o, "deny")
	r.err = readErrSpec(o, r.err)
	o.finish("allow", "deny", "error")
	if len(r.allow) == 0 && len(r.deny) == 0 {
		b.p.add(b.key, "set allow, deny or both (lists of addresses or CIDR blocks)")
	}
	return r, defaultActions(b.stage, HandshakeWS)
}

func readPrefixes(o *opts, name string) []netip.Prefix {
	l, ok := o.strList(name)
	if !ok {
		return nil
	}
	var out []netip.Prefix
	for i, s := range l {
		s = strings.TrimSpace(s)
		var pf netip.Prefix
		var err error
		if strings.Contains(s, "/") {
			pf, err = netip.ParsePrefix(s)
			pf = pf.Masked()
		} else {
			var a netip.Addr
			a, err = netip.ParseAddr(s)
			if err == nil {
				a = a.Unmap()
				pf = netip.PrefixFrom(a, a.BitLen())
			}
		}
		if err != nil {
			o.p.add(fmt.Sprintf("%s[%d]", o.sub(name), i), "expected an address or CIDR block such as 10.0.0.0/8, got %q", s)
			continue
		}
		out = append(out, pf)
	}
	return out
}

// defaultActions is where an address-based rule runs in each stage: as early
// as possible in the handshake, on every action elsewhere.
func defaultActions(st Stage, handshake ...Action) []Action {
	if st == StageHandshake {
		return handshake
	}
	return stageActions[st]
}

func (r *cidrRule) check(_ *Chain, in *Input) (Decision, bool) {
	ip := in.ip().Unmap()
	if !ip.IsValid() {
		// Unknown address: only an allow list can say anything, and
		// it cannot vouch for it.
		if len(r.allow) > 0 {
			return r.err.decide(in), true
		}
		return Decision{}, false
	}
	for _, p := range r.deny {
		if p.Contains(ip) {
			return r.err.decide(in), true
		}
	}
	if len(r.allow) == 0 {
		return Decision{}, false
	}
	for _, p := range r.allow {
		if p.Contains(ip) {
			return Decision{}, false
		}
	}
	return r.err.decide(in), true
}

// ---- origins -------------------------------------------------------------

type originPat struct {
	any    bool
	scheme string // "" = any
	host   string // "*" = any; "*.x.com" = subdomains of x.com
	port   string // "" or "*" = any
}

type originsRule struct {
	pats         []originPat
	allowMissing bool
	err          errSpec
}

func buildOrigins(b *builder, v any) (rule, []Action) {
	if b.stage != StageHandshake {
		b.p.add(b.key, "origins is checked at the HTTP upgrade: put it in middleware.handshake")
		return nil, nil
	}
	r := &originsRule{allowMissing: true, err: newErrSpec("ForbiddenError", "Origin not allowed", 403)}
	var list []string
	if _, isList := v.([]any); isList {
		l, ok := strListOf(b.p, b.key, v)
		if !ok {
			return nil, nil
		}
		list = l
	} else {
		o, ok := newOpts(b.p, b.key, v)
		if !ok {
			return nil, nil
		}
		list, _ = o.strList("allow")
		if am, ok := o.boolv("allow_missing"); ok {
			r.allowMissing = am
		}
		r.err = readErrSpec(o, r.err)
		o.finish("allow", "allow_missing", "error")
	}
	if len(list) == 0 {
		b.p.add(b.key, "list the allowed origins (e.g. [\"https://app.example.com\", \"*.example.com\"])")
	}
	for _, s := range list {
		r.pats = append(r.pats, parseOriginPat(s))
	}
	return r, []Action{HandshakeWS}
}

func parseOriginPat(s string) originPat {
	s = strings.ToLower(strings.TrimSpace(s))
	if s == "*" || s == "*:*" {
		return originPat{any: true}
	}
	var p originPat
	if i := strings.Index(s, "://"); i >= 0 {
		p.scheme, s = s[:i], s[i+3:]
	}
	s = strings.TrimSuffix(s, "/")
	p.host = s
	if i := strings.LastIndexByte(s, ':'); i >= 0 && !strings.HasSuffix(s, "]") {
		p.host, p.port = s[:i], s[i+1:]
	}
	return p
}

func splitOrigin(origin string) (scheme, host, port string) {
	o := strings.ToLower(origin)
	if i := strings.Index(o, "://"); i >= 0 {
		scheme, o = o[:i], o[i+3:]
	}
	if i := strings.IndexByte(o, '/'); i >= 0 {
		o = o[:i]
	}
	host = o
	if i := strings.LastIndexByte(o, ':'); i >= 0 && !strings.HasSuffix(o, "]") {
		host, port = o[:i], o[i+1:]
	}
	if port == "" {
		switch scheme {
		case "http", "ws":
			port = "80"
		case "https", "wss":
			port = "443"
		}
	}
	return scheme, host, port
}

func (r *originsRule) check(_ *Chain, in *Input) (Decision, bool) {
	if in.Origin == "" || in.Origin == "null" {
		// Browsers always send Origin; tools and servers do not, and
		// the check protects browsers only.
		if r.allowMissing {
			return Decision{}, false
		}
		return r.err.decide(in), true
	}
	scheme, host, port := splitOrigin(in.Origin)
	for _, p := range r.pats {
		if p.any {
			return Decision{}, false
		}
		if p.scheme != "" && p.scheme != scheme {
			continue
		}
		if p.port != "" && p.port != "*" && p.port != port {
			continue
		}
		switch {
		case p.host == "*":
		case strings.HasPrefix(p.host, "*."):
			if !strings.HasSuffix(host, p.host[1:]) {
				continue
			}
		case p.host != host:
			continue
		}
		return Decision{}, false
	}
	return r.err.decide(in), true
}

// ---- max_payload ---------------------------------------------------------

type maxPayloadRule struct {
	max int
	err errSpec
}

func buildMaxPayload(b *builder, v any) (rule, []Action) {
	if b.stage == StageHandshake {
		b.p.add(b.key, "max_payload limits action data: put it in middleware.inbound or outbound (the frame limit is protocol.max_payload)")
		return nil, nil
	}
	r := &maxPayloadRule{}
	acts := stageActions[b.stage]
	var size int64
	var ok bool
	if m, isMap := asMap(v); isMap {
		o, _ := newOpts(b.p, b.key, m)
		if sv, has := o.get("bytes"); has {
			size, ok = byteSizeOf(b.p, o.sub("bytes"), sv)
		} else {
			b.p.add(o.sub("bytes"), "must be set (e.g. 64KiB)")
		}
		if a, has := o.actions("actions", b.stage, stageActions[b.stage]); has {
			acts = a
		}
		r.err = readErrSpec(o, newErrSpec("PayloadTooLargeError", "", 413))
		o.finish("bytes", "actions", "error")
	} else {
		r.err = newErrSpec("PayloadTooLargeError", "", 413)
		size, ok = byteSizeOf(b.p, b.key, v)
	}
	if !ok {
		return nil, nil
	}
	if size < 1 {
		b.p.add(b.key, "must be at least 1 byte")
		return nil, nil
	}
	r.max = int(min(size, math.MaxInt32))
	if len(r.err.msg.parts) == 0 {
		t, _ := parseTemplate("The {action} data is larger than " + strconv.FormatInt(size, 10) + " bytes")
		r.err.msg = t
		r.err.prebuild()
	}
	return r, acts
}

func (r *maxPayloadRule) check(_ *Chain, in *Input) (Decision, bool) {
	if len(in.Data) > r.max {
		return r.err.decide(in), true
	}
	return Decision{}, false
}

// ---- rate ----------------------------------------------------------------

type rateRule struct {
	socketSlot int // -1 = no per-socket limit
	socketLim  limit
	ip         *store[netip.Addr]
	user       *store[string]
	err        errSpec
}

const defaultMaxKeys = 100_000

func buildRate(b *builder, v any) (rule, []Action) {
	o, ok := newOpts(b.p, b.key, v)
	if !ok {
		return nil, nil
	}
	r := &rateRule{socketSlot: -1, err: newErrSpec("RateLimitError", "Too many {action} requests", 429)}
	burst, hasBurst := o.intv("burst")
	if hasBurst && burst < 1 {
		b.p.add(o.sub("burst"), "must be at least 1")
	}
	maxKeys := int64(defaultMaxKeys)
	if mk, ok := o.intv("max_keys"); ok {
		if mk < 1 {
			b.p.add(o.sub("max_keys"), "must be at least 1")
		}
		maxKeys = mk
	}
	lim := func(rt configs.Rate) limit {
		bu := float64(burst)
		if !hasBurst || burst < 1 {
			// Default burst: one period's worth, at least one.
			bu = math.Max(1, math.Ceil(rt.N))
		}
		return newLimit(rt.PerSecond(), bu)
	}
	var acts []Action
	fp := fingerprint(b, v)
	if b.stage == StageHandshake {
		for _, n := range []string{"per_socket", "per_ip", "per_user", "actions"} {
			if _, has := o.get(n); has {
				b.p.add(o.sub(n), "not a handshake option: use handshakes_per_ip here, per_socket/per_ip/per_user in middleware.inbound")
			}
		}
		if rt, ok := o.rate("handshakes_per_ip"); ok {
			r.ip = sharedStore(b, fp+"|ip", lim(rt), int(maxKeys), func(l limit, m int) *store[netip.Addr] { return newStore[netip.Addr](l, m) })
		} else {
			b.p.add(o.sub("handshakes_per_ip"), "must be set in the handshake stage (e.g. 20/s)")
		}
		acts = []Action{HandshakeWS}
	} else {
		if _, has := o.get("handshakes_per_ip"); has {
			b.p.add(o.sub("handshakes_per_ip"), "only in middleware.handshake")
		}
		if rt, ok := o.rate("per_socket"); ok {
			r.socketSlot = b.c.socketSlots
			b.c.socketSlots++
			r.socketLim = lim(rt)
		}
		if rt, ok := o.rate("per_ip"); ok {
			r.ip = sharedStore(b, fp+"|ip", lim(rt), int(maxKeys), func(l limit, m int) *store[netip.Addr] { return newStore[netip.Addr](l, m) })
		}
		if rt, ok := o.rate("per_user"); ok {
			r.user = sharedStore(b, fp+"|user", lim(rt), int(maxKeys), func(l limit, m int) *store[string] { return newStore[string](l, m) })
		}
		if r.socketSlot < 0 && r.ip == nil && r.user == nil {
			b.p.add(b.key, "set per_socket, per_ip or per_user (e.g. per_socket: 100/s)")
		}
		acts = stageActions[b.stage]
		if a, has := o.actions("actions", b.stage, stageActions[b.stage]); has {
			acts = a
		}
	}
	r.err = readErrSpec(o, r.err)
	o.finish("per_socket", "per_ip", "per_user", "handshakes_per_ip", "burst", "actions", "max_keys", "error")
	return r, acts
}

// sharedStore returns the store for fingerprint fp: the replaced chain's
// when it had the same rule, so reloads keep per-IP and per-user buckets.
func sharedStore[K comparable](b *builder, fp string, lim limit, maxKeys int, mk func(limit, int) *store[K]) *store[K] {
	if n := b.fps[fp]; n > 0 {
		b.fps[fp] = n + 1
		fp += "#" + strconv.Itoa(n)
	} else {
		b.fps[fp] = 1
	}
	if b.prev != nil {
		if s, ok := b.prev.stores[fp].(*store[K]); ok && s.lim == lim && s.max == maxKeys {
			b.c.shared.stores[fp] = s
			return s
		}
	}
	s := mk(lim, maxKeys)
	b.c.shared.stores[fp] = s
	return s
}

// fingerprint names a rule by its stage, kind and options (not its index, so
// inserting a rule above it on reload keeps its state).
func fingerprint(b *builder, v any) string {
	j, _ := json.Marshal(v)
	return b.key[:strings.IndexByte(b.key, '[')] + "|" + b.key[strings.LastIndexByte(b.key, '.')+1:] + "|" + string(j)
}

func (r *rateRule) check(c *Chain, in *Input) (Decision, bool) {
	now := c.nanos()
	if r.socketSlot >= 0 && in.Socket != nil {
		if !c.socketBucket(in.Socket, r.socketSlot, r.socketLim, now) {
			return r.err.decide(in), true
		}
	}
	if r.ip != nil {
		if ip := in.ip(); ip.IsValid() && !r.ip.take(ip.Unmap(), now) {
			return r.err.decide(in), true
		}
	}
	if r.user != nil && in.Socket != nil && in.Socket.UserID != "" {
		if !r.user.take(in.Socket.UserID, now) {
			return r.err.decide(in), true
		}
	}
	return Decision{}, false
}
