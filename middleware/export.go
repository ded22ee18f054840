package middleware

import "fmt"

// ChannelPattern is a compiled channel pattern in the syntax of `channels`
// rules (`*`, `text*`, `**`, `{claim}`). The worker uses it for settings
// keyed by channel outside the middleware section (channels[].slow_consumer),
// so both places read patterns the same way. A {claim} segment matches any
// one segment here: there is no socket to compare with.
type ChannelPattern struct{ p pattern }

// CompileChannelPattern parses s.
func CompileChannelPattern(s string) (ChannelPattern, error) {
	p, err := compilePattern(s)
	if err != nil {
		return ChannelPattern{}, fmt.Errorf("channel pattern: %w", err)
	}
	return ChannelPattern{p: p}, nil
}

// Match reports whether channel has the pattern's shape. It does not allocate.
func (cp *ChannelPattern) Match(channel string) bool { return cp.p.match(channel, nil, false) }

// String is the pattern as written.
func (cp *ChannelPattern) String() string { return cp.p.raw }
