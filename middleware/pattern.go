package middleware

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// Channel patterns: segments separated by '/'. A segment is a literal, `*`
// (exactly one non-empty segment), `text*` (one segment starting with text,
// for apps that name channels "chat.general"), `**` (last only: one or more
// segments), or `{claim}` (one segment that, where the rule requires it, must equal the
// socket's claim of that name, e.g. user/{sub}/**).

type segKind uint8

const (
	segLit segKind = iota
	segStar
	segRest
	segClaim
	segPrefix // "room-*": a segment that starts with text and has more after it
)

type seg struct {
	kind segKind
	text string // literal text, or the claim name
}

type pattern struct {
	raw    string
	segs   []seg
	claims []string // names used by {claim} segments
}

func compilePattern(s string) (pattern, error) {
	p := pattern{raw: s}
	if s == "" {
		return p, fmt.Errorf("empty pattern")
	}
	parts := strings.Split(s, "/")
	for i, part := range parts {
		switch {
		case part == "**":
			if i != len(parts)-1 {
				return p, fmt.Errorf("** must be the last segment in %q", s)
			}
			p.segs = append(p.segs, seg{kind: segRest})
		case part == "*":
			p.segs = append(p.segs, seg{kind: segStar})
		case strings.HasPrefix(part, "{") && strings.HasSuffix(part, "}") && len(part) > 2:
			name := part[1 : len(part)-1]
			if strings.ContainsAny(name, "{}*") {
				return p, fmt.Errorf("bad claim segment %q in %q", part, s)
			}
			p.segs = append(p.segs, seg{kind: segClaim, text: name})
			p.claims = append(p.claims, name)
		case strings.HasSuffix(part, "*") && !strings.ContainsAny(part[:len(part)-1], "*{}"):
			p.segs = append(p.segs, seg{kind: segPrefix, text: part[:len(part)-1]})
		default:
			if strings.ContainsAny(part, "*{}") {
				return p, fmt.Errorf("segment %q of %q: * may only end a segment, and a {claim} takes a whole segment", part, s)
			}
			p.segs = append(p.segs, seg{kind: segLit, text: part})
		}
	}
	return p, nil
}

// match reports whether ch has the pattern's shape; with claims != nil every
// {claim} segment must also equal that claim. It does not allocate.
func (p *pattern) match(ch string, claims map[string]any, checkClaims bool) bool {
	rest := ch
	for i, sg := range p.segs {
		if sg.kind == segRest {
			if i == 0 {
				return rest != ""
			}
			return len(rest) > 1 && rest[0] == '/'
		}
		if i > 0 {
			// A segment boundary must be next.
			if len(rest) == 0 || rest[0] != '/' {
				return false
			}
			rest = rest[1:]
		}
		var part string
		if j := strings.IndexByte(rest, '/'); j >= 0 {
			part, rest = rest[:j], rest[j:]
		} else {
			part, rest = rest, ""
		}
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
			if len(part) <= len(sg.text) || part[:len(sg.text)] != sg.text {
				return false
			}
		case segClaim:
			if part == "" {
				return false
			}
			if checkClaims && !claimEquals(claims, sg.text, part) {
				return false
			}
		}
	}
	return rest == ""
}

// claimEquals compares a claim with text the way a channel name spells it:
// strings as they are, numbers in their shortest form.
func claimEquals(claims map[string]any, name, text string) bool {
	v, ok := claims[name]
	return ok && valueEquals(v, text)
}

// valueEquals compares one claim value with text without allocating.
func valueEquals(v any, text string) bool {
	var buf [32]byte
	switch x := v.(type) {
	case string:
		return x == text
	case float64:
		return string(strconv.AppendFloat(buf[:0], x, 'f', -1, 64)) == text
	case int:
		return string(strconv.AppendInt(buf[:0], int64(x), 10)) == text
	case int64:
		return string(strconv.AppendInt(buf[:0], x, 10)) == text
	case json.Number:
		return string(x) == text
	case bool:
		return string(strconv.AppendBool(buf[:0], x)) == text
	}
	return false
}
