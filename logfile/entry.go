// Package logfile is Shoal's central log: one JSON-lines file that the
// supervisor writes for every process of the node (itself and each child),
// rotated by size, and the reader and follower behind `shoal logs`.
//
// Each line is one JSON object whose first keys are always, in this order:
//
//	{"time":"<RFC3339Nano>","level":"info","proc":"worker-1","pid":1234,"msg":"...", <extra fields>}
//
// Extra fields follow in the order they were logged. A field named like one of
// the fixed keys gets a trailing underscore so that no line has a key twice.
package logfile

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Level is a log line's severity, ordered from least to most severe.
type Level int

const (
	LevelTrace Level = iota
	LevelDebug
	LevelInfo
	LevelWarn
	LevelError
)

var levelNames = [...]string{"trace", "debug", "info", "warn", "error"}

func (l Level) String() string {
	if l < LevelTrace || l > LevelError {
		return "level(" + strconv.Itoa(int(l)) + ")"
	}
	return levelNames[l]
}

// ParseLevel reads a level name; "warning" and "err" are accepted as aliases
// because operators type them.
func ParseLevel(s string) (Level, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "trace":
		return LevelTrace, nil
	case "debug":
		return LevelDebug, nil
	case "info", "":
		return LevelInfo, nil
	case "warn", "warning":
		return LevelWarn, nil
	case "error", "err":
		return LevelError, nil
	}
	return LevelInfo, fmt.Errorf("unknown log level %q (use trace, debug, info, warn or error)", s)
}

// Field is one extra key/value of a line. Written values may be any
// JSON-encodable value (errors and Stringers are written as text); values
// read back from a file are json.RawMessage.
type Field struct {
	Key   string
	Value any
}

// Entry is one log line.
type Entry struct {
	Time   time.Time
	Level  Level
	Proc   string // process name: "supervisor", "worker-1", ...
	Pid    int
	Msg    string
	Fields []Field
}

// Get returns the value of an extra field, or nil.
func (e Entry) Get(key string) any {
	for _, f := range e.Fields {
		if f.Key == key {
			return f.Value
		}
	}
	return nil
}

// GetString returns an extra field as text ("" if absent).
func (e Entry) GetString(key string) string {
	return valueText(e.Get(key))
}

func isFixedKey(k string) bool {
	switch k {
	case "time", "level", "proc", "pid", "msg":
		return true
	}
	return false
}

// AppendJSON appends e as one JSON line (with the trailing newline) to dst.
func AppendJSON(dst []byte, e Entry) []byte {
	dst = append(dst, `{"time":"`...)
	dst = e.Time.UTC().AppendFormat(dst, time.RFC3339Nano)
	dst = append(dst, `","level":"`...)
	dst = append(dst, e.Level.String()...)
	dst = append(dst, `","proc":`...)
	dst = appendJSONString(dst, e.Proc)
	dst = append(dst, `,"pid":`...)
	dst = strconv.AppendInt(dst, int64(e.Pid), 10)
	dst = append(dst, `,"msg":`...)
	dst = appendJSONString(dst, e.Msg)
	for _, f := range e.Fields {
		k := f.Key
		for isFixedKey(k) {
			k += "_"
		}
		dst = append(dst, ',')
		dst = appendJSONString(dst, k)
		dst = append(dst, ':')
		dst = appendValue(dst, f.Value)
	}
	return append(dst, '}', '\n')
}

func appendJSONString(dst []byte, s string) []byte {
	b, err := json.Marshal(s)
	if err != nil { // cannot happen for a string; keep the line valid anyway
		return append(dst, `""`...)
	}
	return append(dst, b...)
}

func appendValue(dst []byte, v any) []byte {
	switch x := v.(type) {
	case nil:
		return append(dst, "null"...)
	case json.RawMessage:
		if json.Valid(x) {
			return append(dst, x...)
		}
		return appendJSONString(dst, string(x))
	case string:
		return appendJSONString(dst, x)
	case []byte:
		return appendJSONString(dst, string(x))
	case error:
		return appendJSONString(dst, x.Error())
	case fmt.Stringer:
		return appendJSONString(dst, x.String())
	case bool:
		return strconv.AppendBool(dst, x)
	case int:
		return strconv.AppendInt(dst, int64(x), 10)
	case int64:
		return strconv.AppendInt(dst, x, 10)
	case uint64:
		return strconv.AppendUint(dst, x, 10)
	}
	b, err := json.Marshal(v)
	if err != nil {
		return appendJSONString(dst, fmt.Sprint(v))
	}
	return append(dst, b...)
}

// ErrNotJSON is returned by ParseLine for a line that is not a JSON object.
var ErrNotJSON = errors.New("not a JSON log line")

// ParseLine reads one line written by AppendJSON. Keys it does not know
// become Fields, in file order.
func ParseLine(line []byte) (Entry, error) {
	var e Entry
	line = bytes.TrimSpace(line)
	if len(line) == 0 || line[0] != '{' {
		return e, ErrNotJSON
	}
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.UseNumber()
	if _, err := dec.Token(); err != nil {
		return e, fmt.Errorf("%w: %v", ErrNotJSON, err)
	}
	e.Level = LevelInfo
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return e, fmt.Errorf("%w: %v", ErrNotJSON, err)
		}
		key, _ := tok.(string)
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return e, fmt.Errorf("%w: value of %q: %v", ErrNotJSON, key, err)
		}
		switch key {
		case "time":
			var s string
			if json.Unmarshal(raw, &s) == nil {
				e.Time, _ = time.Parse(time.RFC3339Nano, s)
			}
		case "level":
			var s string
			if json.Unmarshal(raw, &s) == nil {
				e.Level, _ = ParseLevel(s)
			}
		case "proc":
			_ = json.Unmarshal(raw, &e.Proc)
		case "pid":
			_ = json.Unmarshal(raw, &e.Pid)
		case "msg":
			_ = json.Unmarshal(raw, &e.Msg)
		default:
			e.Fields = append(e.Fields, Field{Key: key, Value: raw})
		}
	}
	return e, nil
}

// valueText renders a field value as plain text: strings unquoted, other
// JSON as written.
func valueText(v any) string {
	switch x := v.(type) {
	case nil:
		return ""
	case json.RawMessage:
		var s string
		if len(x) > 0 && x[0] == '"' && json.Unmarshal(x, &s) == nil {
			return s
		}
		return string(x)
	case string:
		return x
	case error:
		return x.Error()
	case fmt.Stringer:
		return x.String()
	}
	return fmt.Sprint(v)
}
