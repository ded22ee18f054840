package middleware

import (
	"strings"
	"testing"
)

// refMatch is the obvious, allocating implementation of pattern matching
// that the fast one must agree with.
func refMatch(p *pattern, ch string, claims map[string]any, checkClaims bool) bool {
	parts := strings.Split(ch, "/")
	for i, sg := range p.segs {
		if sg.kind == segRest {
			rest := parts[i:]
			if len(rest) == 0 {
				return false
			}
			return strings.Join(rest, "/") != ""
		}
		if i >= len(parts) {
			return false
		}
		part := parts[i]
		switch sg.kind {
		case segLit:
			if part != sg.text {
				return false
			}
		case segStar:
			if part == "" {
				return false
			}
		case segPrefix:
			if !strings.HasPrefix(part, sg.text) || len(part) == len(sg.text) {
				return false
			}
		case segClaim:
			if part == "" || checkClaims && !claimEquals(claims, sg.text, part) {
				return false
			}
		}
	}
	return len(parts) == len(p.segs)
}

func FuzzPatternMatch(f *testing.F) {
	for _, s := range [][2]string{
		{"private/**", "private/a/b"}, {"user/{sub}/**", "user/alice/x"}, {"a/*/c", "a//c"},
		{"chat.*", "chat.x"}, {"**", "/"}, {"x", "x/"}, {"a/**", "a//"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pat, ch string) {
		p, err := compilePattern(pat)
		if err != nil {
			return
		}
		claims := map[string]any{"sub": "alice"}
		for _, check := range []bool{false, true} {
			if got, want := p.match(ch, claims, check), refMatch(&p, ch, claims, check); got != want {
				t.Fatalf("match(%q, %q, %v) = %v, reference says %v", pat, ch, check, got, want)
			}
		}
	})
}
