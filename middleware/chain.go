package middleware

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/internal/loglimit"
	"github.com/shoalhq/shoal/proto/sc"
)

func init() {
	// Load runs this: every rule is compiled once at config check time, so
	// `shoal config check` names the key and line of each mistake.
	configs.RegisterValidator(func(c *configs.Config) []*configs.Error {
		_, errs := compile(*c, Options{})
		return errs
	})
}

// Options are the parts of a Chain that do not come from the config.
type Options struct {
	// Logger receives deny lines (rate-limited) and hook failures. Default:
	// discard.
	Logger hclog.Logger
	// Now is the clock for rate limits; tests pass a fake. Default time.Now.
	Now func() time.Time
	// HTTPClient makes hook calls; its own Timeout should be zero or larger
	// than the configured hook timeouts. Default: a client with a private
	// transport.
	HTTPClient *http.Client
	// Bans answers the `ban` rule; nil: ban rules pass (config check). A
	// reload without it keeps the previous chain's.
	Bans BanChecker
	// Previous is the chain this one replaces (config reload). The new chain
	// keeps its connection counts, and the per-IP and per-user rate buckets
	// of every rate rule whose stage and options did not change.
	Previous *Chain
}

// Chain is a compiled middleware config. It is immutable: on reload the
// worker compiles a new one (with Options.Previous) and swaps the pointer;
// sockets keep working across the swap. All methods are safe for concurrent
// use.
type Chain struct {
	lists   [numActions][]*entry
	entries []*entry // config order, for Stats
	shared  *shared
	now     func() time.Time
	log     hclog.Logger
	logLim  loglimit.Limiter
	client  *http.Client

	socketSlots int // per-socket buckets (rate per_socket rules)

	bans   BanChecker // for ban rules
	hasBan bool

	// conn_limit scope: cluster rules: which keys sockets join in the
	// ConnCounter (connlimit.go).
	clusterIP, clusterUser bool
	// holds: the actions whose conn_limit rules keep places (Hold).
	holds [numActions]bool

	inflight sync.WaitGroup // asynchronous decisions (hooks) under way
}

// rule is a compiled rule. check returns decided=false to pass to the next
// rule.
type rule interface {
	check(c *Chain, in *Input) (d Decision, decided bool)
}

// slowRule is a rule that waits for something (a backend): the chain never
// runs it on the caller's goroutine when the caller gave a callback.
type slowRule interface {
	rule
	wants(in *Input) bool // whether this input goes to the backend at all
	call(ctx context.Context, c *Chain, in *Input) (d Decision, decided bool)
}

// slowFallback is a slow rule that still decides something synchronously
// when wants is false (conn_limit: the worker's own count when no round
// trip is needed or possible).
type slowFallback interface {
	fast(c *Chain, in *Input) (d Decision, decided bool)
}

// entry is one rule at one place in the config.
type entry struct {
	stage Stage
	index int
	kind  string
	name  string // "inbound[1].channels"
	r     rule
	slow  slowRule

	allowed atomic.Uint64 // evaluated and did not deny (passed or allowed)
	denied  atomic.Uint64 // denied or dropped
}

// Compile turns cfg.Middleware into a Chain with default Options.
func Compile(cfg configs.Config) (*Chain, error) {
	return CompileWith(cfg, Options{})
}

// CompileWith is Compile with Options (logger, clock, HTTP client, and the
// chain being replaced on reload). A returned error is configs.Errors, each
// naming its dotted key.
func CompileWith(cfg configs.Config, o Options) (*Chain, error) {
	c, errs := compile(cfg, o)
	if len(errs) > 0 {
		return nil, configs.Errors(errs)
	}
	return c, nil
}

// builder carries what rule constructors need.
type builder struct {
	p     *problems
	c     *Chain
	stage Stage
	key   string // "middleware.inbound[1].rate"
	cfg   *configs.Config
	prev  *shared        // state of the replaced chain, or nil
	fps   map[string]int // fingerprints seen in this compile (for duplicates)
}

type ruleBuilder func(b *builder, v any) (r rule, actions []Action)

var ruleBuilders map[string]ruleBuilder

func init() {
	ruleBuilders = map[string]ruleBuilder{
		"channels":    buildChannels,
		"cidr":        buildCIDR,
		"origins":     buildOrigins,
		"max_payload": buildMaxPayload,
		"rate":        buildRate,
		"conn_limit":  buildConnLimit,
		"hook":        buildHook,
		"rpc":         buildRPC,
		"plugin":      buildPlugin,
		"jwt":         buildJWT,
		"ban":         buildBan,
	}
}

// notBuilt are rule names of issue 5 that this package does not implement
// yet. They are refused rather than ignored: a security rule that silently
// does nothing is worse than a config that does not load.
var notBuilt = map[string]string{
	"socket_channel_limit": "use protocol.socket_channel_limit",
}

func compile(cfg configs.Config, o Options) (*Chain, []*configs.Error) {
	c := &Chain{now: o.Now, log: o.Logger, client: o.HTTPClient, bans: o.Bans}
	if c.bans == nil && o.Previous != nil {
		c.bans = o.Previous.bans
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.log == nil {
		c.log = hclog.NewNullLogger()
	}
	var prev *shared
	if o.Previous != nil {
		prev = o.Previous.shared
	}
	if c.client == nil && prev != nil {
		c.client = prev.client // keep the pooled backend connections
	}
	if c.client == nil {
		c.client = &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
	}
	c.shared = newShared(prev, c.now())
	c.shared.client = c.client
	c.logLim = loglimit.Limiter{Every: 200 * time.Millisecond, Burst: 20} // 5 lines/s

	p := &problems{}
	b := &builder{p: p, c: c, prev: prev, fps: map[string]int{}, cfg: &cfg}
	stages := [numStages][]map[string]any{cfg.Middleware.Handshake, cfg.Middleware.Inbound, cfg.Middleware.Outbound}
	for st, list := range stages {
		for i, item := range list {
			key := fmt.Sprintf("middleware.%s[%d]", Stage(st), i)
			if len(item) != 1 {
				p.add(key, "a rule is a mapping with exactly one key, the rule name (got %d keys)", len(item))
				continue
			}
			for kind, v := range item {
				rkey := key + "." + kind
				build, ok := ruleBuilders[kind]
				if !ok {
					if why, known := notBuilt[kind]; known {
						p.add(rkey, "rule %q is not available: %s", kind, why)
					} else {
						names := make([]string, 0, len(ruleBuilders))
						for n := range ruleBuilders {
							names = append(names, n)
						}
						p.add(rkey, "unknown rule%s", configs.Suggest(kind, names))
					}
					continue
				}
				b.stage, b.key = Stage(st), rkey
				r, acts := build(b, v)
				if r == nil {
					continue
				}
				e := &entry{stage: Stage(st), index: i, kind: kind, name: fmt.Sprintf("%s[%d].%s", Stage(st), i, kind), r: r}
				if s, ok := r.(slowRule); ok {
					e.slow = s
				}
				c.entries = append(c.entries, e)
				// Only a handshake ban rule replaces the worker's own
				// check; one in inbound covers authenticate alone.
				c.hasBan = c.hasBan || (kind == "ban" && Stage(st) == StageHandshake)
				for _, a := range acts {
					c.lists[a] = append(c.lists[a], e)
				}
			}
		}
	}
	if len(p.errs) > 0 {
		return nil, p.errs
	}
	return c, nil
}

// HasRules reports whether any rule runs for the action, so the worker can
// skip building an Input when none does.
func (c *Chain) HasRules(a Action) bool { return a < numActions && len(c.lists[a]) > 0 }

// WantsHold reports whether a conn_limit rule checks action a, so that the
// caller gives the Input a Hold (Input.Hold); without one it allocates none.
func (c *Chain) WantsHold(a Action) bool { return a < numActions && c.holds[a] }

// Run decides in. When every rule it reaches is synchronous it returns the
// decision and pending=false, and done is never called. When it reaches a
// backend hook it copies in, returns pending=true at once and calls done
// exactly once, on another goroutine, within the hooks' configured timeouts.
// This is the call for the worker's read path: it never blocks on a backend.
//
// With done == nil Run waits for hooks itself (as Decide with a background
// context).
func (c *Chain) Run(in *Input, done func(Decision)) (d Decision, pending bool) {
	if in.Action >= numActions {
		return Decision{Verdict: Deny, Error: errInvalidAction}, false
	}
	list := c.lists[in.Action]
	for i, e := range list {
		if e.slow != nil {
			if !e.slow.wants(in) {
				if f, ok := e.slow.(slowFallback); ok {
					if d, decided := f.fast(c, in); decided {
						return c.finish(e, in, d, Decision{}), false
					}
				}
				e.allowed.Add(1)
				continue
			}
			if done == nil {
				return c.runFrom(context.Background(), in, list, i, Decision{}), false
			}
			cp := cloneInput(in)
			c.inflight.Add(1)
			go func() {
				defer c.inflight.Done()
				done(c.runFrom(context.Background(), cp, list, i, Decision{}))
			}()
			return Decision{}, true
		}
		if d, decided := e.r.check(c, in); decided {
			return c.finish(e, in, d, Decision{}), false
		}
		e.allowed.Add(1)
	}
	return Decision{}, false
}

var errInvalidAction = sc.NewError("InvalidActionError", "Unknown middleware action")

// Decide is the blocking form of Run: it waits for hooks, giving up when ctx
// ends (each hook also has its configured timeout). For tests, tools, and
// callers that are not on a read path.
func (c *Chain) Decide(ctx context.Context, in *Input) Decision {
	if in.Action >= numActions {
		return Decision{Verdict: Deny, Error: errInvalidAction}
	}
	list := c.lists[in.Action]
	return c.runFrom(ctx, in, list, 0, Decision{})
}

// runFrom evaluates list[from:], calling slow rules inline.
func (c *Chain) runFrom(ctx context.Context, in *Input, list []*entry, from int, acc Decision) Decision {
	for _, e := range list[from:] {
		var d Decision
		var decided bool
		if e.slow != nil {
			d, decided = e.slow.call(ctx, c, in)
		} else {
			d, decided = e.r.check(c, in)
		}
		if decided {
			return c.finish(e, in, d, acc)
		}
		// A hook that passed may have rewritten the data or set an
		// identity: later rules see the new data, the worker gets both.
		if d.Data != nil {
			acc.Data = d.Data
			cp := *in // the caller's Input stays as it was
			cp.Data = d.Data
			in = &cp
		}
		if d.Identity != nil {
			acc.Identity = d.Identity
		}
		e.allowed.Add(1)
	}
	return acc
}

func (c *Chain) finish(e *entry, in *Input, d Decision, acc Decision) Decision {
	d.Rule = e.name
	if d.Verdict == Allow {
		e.allowed.Add(1)
		if d.Data == nil {
			d.Data = acc.Data
		}
		if d.Identity == nil {
			d.Identity = acc.Identity
		}
		return d
	}
	e.denied.Add(1)
	c.logDeny(e, in, d)
	return d
}

// Wait blocks until every asynchronous decision started by Run has called
// its callback (worker shutdown).
func (c *Chain) Wait() { c.inflight.Wait() }

func cloneInput(in *Input) *Input {
	cp := *in
	if in.Data != nil {
		cp.Data = append([]byte(nil), in.Data...)
	}
	if in.Socket != nil {
		in.Socket.stateFor() // the copy must share the socket's state
		s := *in.Socket
		cp.Socket = &s
	}
	return &cp
}

// nanos is the rate-limit clock: nanoseconds since the shared state began.
func (c *Chain) nanos() int64 { return int64(c.now().Sub(c.shared.base)) }

// RuleStats counts one rule's decisions since its chain was compiled.
type RuleStats struct {
	Rule    string // "inbound[1].channels"
	Stage   Stage
	Index   int
	Kind    string
	Allowed uint64 // evaluated and did not deny
	Denied  uint64 // denied or dropped
}

// Stats returns the counters of every rule, in config order. Counters start
// at zero in each compiled chain.
func (c *Chain) Stats() []RuleStats {
	out := make([]RuleStats, len(c.entries))
	for i, e := range c.entries {
		out[i] = RuleStats{Rule: e.name, Stage: e.stage, Index: e.index, Kind: e.kind,
			Allowed: e.allowed.Load(), Denied: e.denied.Load()}
	}
	return out
}

// logDeny writes one line per deny, at most logLim's rate; lines that were
// held back are counted in the next one.
func (c *Chain) logDeny(e *entry, in *Input, d Decision) {
	ok, suppressed := c.logLim.Allow(c.now())
	if !ok {
		return
	}
	args := []any{"rule", e.name, "action", in.Action.String(), "verdict", d.Verdict.String()}
	if ip := in.ip(); ip.IsValid() {
		args = append(args, "client", ip.String())
	}
	if in.Socket != nil {
		args = append(args, "socket", in.Socket.ID)
		if in.Socket.UserID != "" {
			args = append(args, "user", in.Socket.UserID)
		}
	}
	if in.Channel != "" {
		args = append(args, "channel", in.Channel)
	}
	if d.Error != nil {
		args = append(args, "error", d.Error.Name)
	}
	if suppressed > 0 {
		args = append(args, "suppressed", suppressed)
	}
	c.log.Info("middleware denied", args...)
}

// CloseIdleConnections closes the hook client's idle backend connections
// (worker shutdown; chains of one lineage share the client).
func (c *Chain) CloseIdleConnections() { c.client.CloseIdleConnections() }
