package logfile

import (
	"encoding/json"
	"strconv"
	"strings"
	"time"
)

// Format appends e in the readable form `shoal logs` prints:
//
//	2026-11-22 01:02:03.456 ERROR supervisor[812] worker-1 crashed exit="signal: killed"
//	    stderr:
//	      panic: boom
//
// Multi-line field values (a crash's stderr, a stack) follow the line as an
// indented block so that a panic stays readable.
func Format(dst []byte, e Entry) []byte {
	return format(dst, e, true)
}

// FormatBrief is Format without the multi-line blocks: one line per entry,
// for echoing warnings to a terminal.
func FormatBrief(dst []byte, e Entry) []byte {
	return format(dst, e, false)
}

func format(dst []byte, e Entry, blocks bool) []byte {
	dst = e.Time.Local().AppendFormat(dst, "2006-01-02 15:04:05.000")
	dst = append(dst, ' ')
	lv := strings.ToUpper(e.Level.String())
	dst = append(dst, lv...)
	for i := len(lv); i < 5; i++ {
		dst = append(dst, ' ')
	}
	dst = append(dst, ' ')
	dst = append(dst, e.Proc...)
	if e.Pid != 0 {
		dst = append(dst, '[')
		dst = strconv.AppendInt(dst, int64(e.Pid), 10)
		dst = append(dst, ']')
	}
	dst = append(dst, ' ')
	msg, rest, multi := strings.Cut(e.Msg, "\n")
	dst = append(dst, msg...)
	var later []Field
	if multi {
		later = append(later, Field{Key: "msg", Value: rest})
	}
	for _, f := range e.Fields {
		v := valueText(f.Value)
		if strings.Contains(v, "\n") {
			later = append(later, Field{Key: f.Key, Value: v})
			continue
		}
		dst = append(dst, ' ')
		dst = append(dst, f.Key...)
		dst = append(dst, '=')
		if isJSONComposite(f.Value) {
			dst = append(dst, v...) // an object or list reads best as JSON
		} else if v == "" || strings.ContainsAny(v, " \t\"=") {
			dst = strconv.AppendQuote(dst, v)
		} else {
			dst = append(dst, v...)
		}
	}
	if !blocks && len(later) > 0 {
		dst = append(dst, " (+"...)
		dst = strconv.AppendInt(dst, int64(len(later)), 10)
		dst = append(dst, " more lines, see shoal logs)"...)
	}
	dst = append(dst, '\n')
	if !blocks {
		return dst
	}
	for _, f := range later {
		dst = append(dst, "    "...)
		dst = append(dst, f.Key...)
		dst = append(dst, ":\n"...)
		for _, l := range strings.Split(strings.TrimRight(valueText(f.Value), "\n"), "\n") {
			dst = append(dst, "      "...)
			dst = append(dst, l...)
			dst = append(dst, '\n')
		}
	}
	return dst
}

// ParseSince reads a --since value: a duration back from now ("10m", "2h")
// or an absolute RFC 3339 time.
func ParseSince(s string, now time.Time) (time.Time, error) {
	s = strings.TrimSpace(s)
	if d, err := time.ParseDuration(s); err == nil {
		if d < 0 {
			d = -d
		}
		return now.Add(-d), nil
	}
	for _, layout := range []string{time.RFC3339Nano, time.RFC3339, "2006-01-02T15:04:05", "2006-01-02 15:04:05", "2006-01-02"} {
		if t, err := time.ParseInLocation(layout, s, time.Local); err == nil {
			return t, nil
		}
	}
	return time.Time{}, &sinceError{s}
}

type sinceError struct{ s string }

func (e *sinceError) Error() string {
	return "invalid --since " + strconv.Quote(e.s) + " (use a duration like 10m or a time like 2026-01-02T15:04:05Z)"
}

func isJSONComposite(v any) bool {
	raw, ok := v.(json.RawMessage)
	return ok && len(raw) > 0 && (raw[0] == '{' || raw[0] == '[')
}
