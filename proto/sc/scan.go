// Package sc is the SocketCluster wire codec (protocol v1 and v2): it scans
// client frames into packets without encoding/json and builds server frames
// with append-style encoders. Payloads (`data`, `error`) are never decoded:
// they travel as the raw JSON bytes the client sent.
//
// The scanner validates the whole frame before it yields a packet, because
// the official server JSON.parses the whole text and treats any parse error
// as a raw string: a batch with one broken element must process nothing.
// Nesting is bounded by MaxDepth so hostile input cannot grow the stack.
package sc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unicode/utf16"
	"unicode/utf8"
)

// Hard limits of the scanner. Frame size is bounded earlier, by the
// WebSocket layer's max payload.
const (
	// MaxDepth is the deepest nesting of arrays and objects accepted in a
	// frame (a batch array counts as one level).
	MaxDepth = 64
	// MaxBatch is the largest number of packets accepted in one array frame.
	// A reconnecting client may batch one #subscribe per channel, so this is
	// above the default socket channel limit.
	MaxBatch = 4096
)

// Errors returned by Reader.Err and the field helpers; wrapped with the
// offset where scanning stopped.
var (
	ErrSyntax   = errors.New("invalid JSON")
	ErrDepth    = errors.New("JSON nested deeper than the limit")
	ErrBatch    = errors.New("too many packets in one frame")
	ErrNotFound = errors.New("field not found")
)

// scanner walks one JSON text, validating as it goes. It recurses once per
// nesting level and refuses to go deeper than MaxDepth.
type scanner struct {
	b     []byte
	i     int
	depth int
}

func (s *scanner) fail(what error, msg string) error {
	return fmt.Errorf("%w at offset %d: %s", what, s.i, msg)
}

func (s *scanner) ws() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// value skips one JSON value (after leading whitespace) and returns its span.
func (s *scanner) value() (start, end int, err error) {
	s.ws()
	if s.i >= len(s.b) {
		return 0, 0, s.fail(ErrSyntax, "unexpected end of input")
	}
	start = s.i
	switch c := s.b[s.i]; {
	case c == '{':
		err = s.object()
	case c == '[':
		err = s.array()
	case c == '"':
		_, _, _, err = s.str()
	case c == 't':
		err = s.lit("true")
	case c == 'f':
		err = s.lit("false")
	case c == 'n':
		err = s.lit("null")
	case c == '-' || (c >= '0' && c <= '9'):
		err = s.number()
	default:
		err = s.fail(ErrSyntax, "unexpected character")
	}
	return start, s.i, err
}

func (s *scanner) enter() error {
	s.depth++
	if s.depth > MaxDepth {
		return s.fail(ErrDepth, "too deep")
	}
	return nil
}

func (s *scanner) object() error {
	if err := s.enter(); err != nil {
		return err
	}
	s.i++ // '{'
	s.ws()
	if s.i < len(s.b) && s.b[s.i] == '}' {
		s.i++
		s.depth--
		return nil
	}
	for {
		s.ws()
		if s.i >= len(s.b) || s.b[s.i] != '"' {
			return s.fail(ErrSyntax, "expected object key")
		}
		if _, _, _, err := s.str(); err != nil {
			return err
		}
		if err := s.colon(); err != nil {
			return err
		}
		if _, _, err := s.value(); err != nil {
			return err
		}
		more, err := s.next('}')
		if err != nil {
			return err
		}
		if !more {
			s.depth--
			return nil
		}
	}
}

func (s *scanner) array() error {
	if err := s.enter(); err != nil {
		return err
	}
	s.i++ // '['
	s.ws()
	if s.i < len(s.b) && s.b[s.i] == ']' {
		s.i++
		s.depth--
		return nil
	}
	for {
		if _, _, err := s.value(); err != nil {
			return err
		}
		more, err := s.next(']')
		if err != nil {
			return err
		}
		if !more {
			s.depth--
			return nil
		}
	}
}

func (s *scanner) colon() error {
	s.ws()
	if s.i >= len(s.b) || s.b[s.i] != ':' {
		return s.fail(ErrSyntax, "expected ':'")
	}
	s.i++
	return nil
}

// next consumes ',' (more = true) or the closing byte (more = false).
func (s *scanner) next(closing byte) (more bool, err error) {
	s.ws()
	if s.i >= len(s.b) {
		return false, s.fail(ErrSyntax, "unexpected end of input")
	}
	switch s.b[s.i] {
	case ',':
		s.i++
		return true, nil
	case closing:
		s.i++
		return false, nil
	}
	return false, s.fail(ErrSyntax, "expected ',' or closing bracket")
}

func (s *scanner) lit(word string) error {
	if len(s.b)-s.i < len(word) || string(s.b[s.i:s.i+len(word)]) != word {
		return s.fail(ErrSyntax, "invalid literal")
	}
	s.i += len(word)
	return nil
}

func (s *scanner) digits() int {
	n := 0
	for s.i < len(s.b) && s.b[s.i] >= '0' && s.b[s.i] <= '9' {
		s.i++
		n++
	}
	return n
}

func (s *scanner) number() error {
	if s.b[s.i] == '-' {
		s.i++
	}
	if s.i >= len(s.b) {
		return s.fail(ErrSyntax, "invalid number")
	}
	if s.b[s.i] == '0' {
		s.i++
	} else if s.digits() == 0 {
		return s.fail(ErrSyntax, "invalid number")
	}
	if s.i < len(s.b) && s.b[s.i] == '.' {
		s.i++
		if s.digits() == 0 {
			return s.fail(ErrSyntax, "invalid number fraction")
		}
	}
	if s.i < len(s.b) && (s.b[s.i] == 'e' || s.b[s.i] == 'E') {
		s.i++
		if s.i < len(s.b) && (s.b[s.i] == '+' || s.b[s.i] == '-') {
			s.i++
		}
		if s.digits() == 0 {
			return s.fail(ErrSyntax, "invalid number exponent")
		}
	}
	return nil
}

// str skips a string starting at '"' and returns the span of its contents
// (without quotes) and whether it holds escapes. Invalid UTF-8 is refused:
// the bytes may be forwarded to browsers inside text frames.
func (s *scanner) str() (start, end int, escaped bool, err error) {
	s.i++ // opening quote
	start = s.i
	for s.i < len(s.b) {
		s.i = skipPlain(s.b, s.i)
		if s.i >= len(s.b) {
			break
		}
		c := s.b[s.i]
		switch {
		case c == '"':
			end = s.i
			s.i++
			return start, end, escaped, nil
		case c == '\\':
			escaped = true
			if s.i+1 >= len(s.b) {
				return 0, 0, false, s.fail(ErrSyntax, "unterminated escape")
			}
			switch s.b[s.i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				s.i += 2
			case 'u':
				if s.i+6 > len(s.b) || !isHex4(s.b[s.i+2:s.i+6]) {
					return 0, 0, false, s.fail(ErrSyntax, "invalid \\u escape")
				}
				s.i += 6
			default:
				return 0, 0, false, s.fail(ErrSyntax, "invalid escape")
			}
		case c < 0x20:
			return 0, 0, false, s.fail(ErrSyntax, "control character in string")
		case c < utf8.RuneSelf:
			s.i++
		default:
			r, size := utf8.DecodeRune(s.b[s.i:])
			if r == utf8.RuneError && size <= 1 {
				return 0, 0, false, s.fail(ErrSyntax, "invalid UTF-8 in string")
			}
			s.i += size
		}
	}
	return 0, 0, false, s.fail(ErrSyntax, "unterminated string")
}

// skipPlain returns the index of the first byte at or after i that a
// string scan must look at: a quote, a backslash, a control character or a
// non-ASCII byte. It tests eight bytes at a time (the classic "has a byte
// less than n" and "has a zero byte" word tricks), because string contents
// are most of what the scanner reads in a publish.
func skipPlain(b []byte, i int) int {
	const (
		ones  = 0x0101010101010101
		highs = 0x8080808080808080
	)
	for ; i+8 <= len(b); i += 8 {
		w := binary.LittleEndian.Uint64(b[i:])
		q := w ^ ('"' * ones)   // zero byte where '"'
		bs := w ^ ('\\' * ones) // zero byte where a backslash
		special := w |          // a high bit: non-ASCII
			((w - 0x20*ones) &^ w) | // a byte below 0x20
			((q - ones) &^ q) | ((bs - ones) &^ bs)
		if special&highs != 0 {
			break
		}
	}
	for ; i < len(b); i++ {
		if c := b[i]; c == '"' || c == '\\' || c < 0x20 || c >= utf8.RuneSelf {
			return i
		}
	}
	return i
}

func isHex4(b []byte) bool {
	for _, c := range b[:4] {
		if !isHex(c) {
			return false
		}
	}
	return true
}

func isHex(c byte) bool {
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}

func hexVal(b []byte) rune {
	var r rune
	for _, c := range b[:4] {
		r <<= 4
		switch {
		case c >= '0' && c <= '9':
			r |= rune(c - '0')
		case c >= 'a' && c <= 'f':
			r |= rune(c - 'a' + 10)
		default:
			r |= rune(c - 'A' + 10)
		}
	}
	return r
}

// unescape decodes the contents of a validated JSON string into dst. Lone
// surrogates become U+FFFD, as encoding/json does (Go strings cannot carry
// them).
func unescape(dst, src []byte) []byte {
	for i := 0; i < len(src); {
		c := src[i]
		if c != '\\' {
			dst = append(dst, c)
			i++
			continue
		}
		switch src[i+1] {
		case 'b':
			dst = append(dst, '\b')
		case 'f':
			dst = append(dst, '\f')
		case 'n':
			dst = append(dst, '\n')
		case 'r':
			dst = append(dst, '\r')
		case 't':
			dst = append(dst, '\t')
		case 'u':
			r := hexVal(src[i+2:])
			i += 6
			if utf16.IsSurrogate(r) {
				if i+6 <= len(src) && src[i] == '\\' && src[i+1] == 'u' {
					if r2 := utf16.DecodeRune(r, hexVal(src[i+2:])); r2 != utf8.RuneError {
						r = r2
						i += 6
					} else {
						r = utf8.RuneError
					}
				} else {
					r = utf8.RuneError
				}
			}
			dst = utf8.AppendRune(dst, r)
			continue
		default: // '"', '\\', '/'
			dst = append(dst, src[i+1])
		}
		i += 2
	}
	return dst
}

// Valid reports whether b is one JSON value within the scanner's limits.
func Valid(b []byte) error {
	s := scanner{b: b}
	if _, _, err := s.value(); err != nil {
		return err
	}
	s.ws()
	if s.i != len(b) {
		return s.fail(ErrSyntax, "trailing data after value")
	}
	return nil
}
