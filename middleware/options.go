package middleware

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/shoalhq/shoal/configs"
)

// problems collects config mistakes with their dotted keys. Rule options
// arrive as generic values: from YAML (int, float64, string, bool, []any,
// map[string]any) or, in child processes, from JSON (numbers are float64),
// so every reader below accepts both.
type problems struct {
	errs []*configs.Error
}

func (p *problems) add(key, format string, args ...any) {
	p.errs = append(p.errs, &configs.Error{Key: key, Msg: fmt.Sprintf(format, args...)})
}

// opts reads a rule's option map and remembers which keys were read, so
// that finish can report every unknown one.
type opts struct {
	p    *problems
	key  string // dotted path of the map
	m    map[string]any
	seen map[string]bool
}

func newOpts(p *problems, key string, v any) (*opts, bool) {
	if v == nil {
		return &opts{p: p, key: key, m: map[string]any{}, seen: map[string]bool{}}, true
	}
	m, ok := asMap(v)
	if !ok {
		p.add(key, "expected a mapping of options, got %s", describe(v))
		return nil, false
	}
	return &opts{p: p, key: key, m: m, seen: map[string]bool{}}, true
}

func asMap(v any) (map[string]any, bool) {
	switch m := v.(type) {
	case map[string]any:
		return m, true
	case map[any]any:
		out := make(map[string]any, len(m))
		for k, v := range m {
			out[fmt.Sprint(k)] = v
		}
		return out, true
	}
	return nil, false
}

func describe(v any) string {
	switch v.(type) {
	case map[string]any, map[any]any:
		return "a mapping"
	case []any:
		return "a list"
	case nil:
		return "nothing"
	}
	return fmt.Sprintf("%q", fmt.Sprint(v))
}

func (o *opts) sub(name string) string { return o.key + "." + name }

func (o *opts) get(name string) (any, bool) {
	o.seen[name] = true
	v, ok := o.m[name]
	if ok && v == nil {
		return nil, false
	}
	return v, ok
}

// finish reports options that no reader asked for.
func (o *opts) finish(known ...string) {
	var names []string
	for k := range o.m {
		if !o.seen[k] {
			names = append(names, k)
		}
	}
	sort.Strings(names)
	for _, k := range names {
		o.p.add(o.sub(k), "unknown option%s", configs.Suggest(k, known))
	}
}

func (o *opts) str(name string) (string, bool) {
	v, ok := o.get(name)
	if !ok {
		return "", false
	}
	switch s := v.(type) {
	case string:
		return s, true
	case int, int64, float64, bool:
		return fmt.Sprint(s), true
	}
	o.p.add(o.sub(name), "expected a single value, got %s", describe(v))
	return "", false
}

func (o *opts) strList(name string) ([]string, bool) {
	v, ok := o.get(name)
	if !ok {
		return nil, false
	}
	return strListOf(o.p, o.sub(name), v)
}

func strListOf(p *problems, key string, v any) ([]string, bool) {
	switch l := v.(type) {
	case string:
		return []string{l}, true
	case []any:
		out := make([]string, 0, len(l))
		good := true
		for i, e := range l {
			switch s := e.(type) {
			case string:
				out = append(out, s)
			case int, int64, float64, bool:
				out = append(out, fmt.Sprint(s))
			default:
				p.add(fmt.Sprintf("%s[%d]", key, i), "expected a single value, got %s", describe(e))
				good = false
			}
		}
		return out, good
	case []string:
		return l, true
	}
	p.add(key, "expected a list, got %s", describe(v))
	return nil, false
}

// intv reads a non-negative whole number.
func (o *opts) intv(name string) (int64, bool) {
	v, ok := o.get(name)
	if !ok {
		return 0, false
	}
	return intOf(o.p, o.sub(name), v)
}

func intOf(p *problems, key string, v any) (int64, bool) {
	var n int64
	switch x := v.(type) {
	case int:
		n = int64(x)
	case int64:
		n = x
	case float64:
		if x != math.Trunc(x) || x > math.MaxInt64 {
			p.add(key, "expected a whole number, got %v", x)
			return 0, false
		}
		n = int64(x)
	case string:
		i, err := strconv.ParseInt(strings.TrimSpace(x), 10, 64)
		if err != nil {
			p.add(key, "expected a whole number, got %q", x)
			return 0, false
		}
		n = i
	default:
		p.add(key, "expected a whole number, got %s", describe(v))
		return 0, false
	}
	if n < 0 {
		p.add(key, "must not be negative, got %d", n)
		return 0, false
	}
	return n, true
}

func (o *opts) boolv(name string) (bool, bool) {
	v, ok := o.get(name)
	if !ok {
		return false, false
	}
	b, isBool := v.(bool)
	if !isBool {
		o.p.add(o.sub(name), "expected true or false, got %s", describe(v))
		return false, false
	}
	return b, true
}

func (o *opts) duration(name string) (time.Duration, bool) {
	v, ok := o.get(name)
	if !ok {
		return 0, false
	}
	var d configs.Duration
	if err := d.UnmarshalText([]byte(fmt.Sprint(v))); err != nil {
		o.p.add(o.sub(name), "%v", err)
		return 0, false
	}
	return d.D(), true
}

func (o *opts) rate(name string) (configs.Rate, bool) {
	v, ok := o.get(name)
	if !ok {
		return configs.Rate{}, false
	}
	s, isStr := v.(string)
	if !isStr {
		o.p.add(o.sub(name), "expected a rate such as 100/s, got %s", describe(v))
		return configs.Rate{}, false
	}
	var r configs.Rate
	if err := r.UnmarshalText([]byte(s)); err != nil {
		o.p.add(o.sub(name), "%v", err)
		return configs.Rate{}, false
	}
	if r.N <= 0 {
		o.p.add(o.sub(name), "must be more than zero (leave the option out for no limit)")
		return configs.Rate{}, false
	}
	return r, true
}

func byteSizeOf(p *problems, key string, v any) (int64, bool) {
	switch x := v.(type) {
	case int, int64, float64:
		return intOf(p, key, x)
	case string:
		var b configs.ByteSize
		if err := b.UnmarshalText([]byte(x)); err != nil {
			p.add(key, "%v", err)
			return 0, false
		}
		return int64(b), true
	}
	p.add(key, "expected a size such as 64KiB, got %s", describe(v))
	return 0, false
}

// actions reads an `actions:` list limited to the actions of a stage.
func (o *opts) actions(name string, stage Stage, allowed []Action) ([]Action, bool) {
	names, ok := o.strList(name)
	if !ok {
		return nil, false
	}
	var out []Action
	for i, n := range names {
		a, found := actionByName(n)
		if !found || !containsAction(allowed, a) {
			var valid []string
			for _, x := range allowed {
				valid = append(valid, x.String())
			}
			o.p.add(fmt.Sprintf("%s[%d]", o.sub(name), i), "%q is not an action of this rule in the %s stage (use %s)", n, stage, strings.Join(valid, ", "))
			continue
		}
		out = append(out, a)
	}
	return out, true
}

func actionByName(n string) (Action, bool) {
	for i, s := range actionNames {
		if strings.EqualFold(s, n) {
			return Action(i), true
		}
	}
	// Centrifugo-style aliases.
	switch strings.ToLower(n) {
	case "connect", "handshake":
		return HandshakeSC, true
	case "publish":
		return PublishIn, true
	case "rpc":
		return Invoke, true
	}
	return 0, false
}

func containsAction(l []Action, a Action) bool {
	for _, x := range l {
		if x == a {
			return true
		}
	}
	return false
}
