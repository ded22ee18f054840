package configs

import (
	"bytes"
	"encoding"
	"errors"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"
)

// Error is one config mistake: where it is and what is wrong.
type Error struct {
	File string // file name as given to Load ("<default>" for the embedded one)
	Line int    // 1-based; 0 when the key is absent from the file
	Key  string // dotted path, e.g. "protocol.ping_interval" or "channels[1].match"
	Msg  string
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	b.WriteString(": ")
	if e.Key != "" {
		fmt.Fprintf(&b, "%s: ", e.Key)
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Errors is every mistake found in one file, in file order.
type Errors []*Error

func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// LoadFile reads and loads a config file.
func LoadFile(path string) (Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("reading config: %w", err)
	}
	return Load(data, path)
}

// LoadDefault loads the embedded default config (with env overrides applied).
// A bad override is reported on stderr and the plain defaults are used; use
// LoadDefaultErr to handle it yourself.
func LoadDefault() Config {
	c, err := LoadDefaultErr()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return defaultsOnly()
	}
	return c
}

// LoadDefaultErr loads the embedded default config with env overrides.
func LoadDefaultErr() (Config, error) { return Load(DefaultYAML, "<default>") }

func defaultsOnly() Config {
	c := Default()
	c.normalize()
	return c
}

// Load parses YAML over Default(), rejecting unknown keys and bad values with
// the key and line, then validates the result. The error, if any, is Errors.
func Load(data []byte, file string) (Config, error) {
	cfg := Default()
	var root yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&root); err != nil {
		if errors.Is(err, errEOF()) {
			return cfg, finish(&cfg, file, nil)
		}
		return Config{}, Errors{{File: file, Line: yamlErrLine(err), Msg: cleanYAMLErr(err)}}
	}
	doc := &root
	if doc.Kind == yaml.DocumentNode && len(doc.Content) == 1 {
		doc = doc.Content[0]
	}
	if doc.Kind == yaml.ScalarNode && doc.Tag == "!!null" {
		return cfg, finish(&cfg, file, nil)
	}
	w := walker{file: file, lines: map[string]int{}}
	w.check(doc, reflect.TypeOf(cfg), "")
	if len(w.errs) > 0 {
		return Config{}, w.errs
	}
	if err := doc.Decode(&cfg); err != nil {
		return Config{}, Errors{{File: file, Line: yamlErrLine(err), Msg: cleanYAMLErr(err)}}
	}
	return cfg, finish(&cfg, file, w.lines)
}

func finish(cfg *Config, file string, lines map[string]int) error {
	if errs := applyEnv(cfg, lookupEnv); len(errs) > 0 {
		return errs
	}
	cfg.normalize()
	errs := cfg.validate()
	if len(errs) == 0 {
		return nil
	}
	for _, e := range errs {
		e.File = file
		e.Line = lookupLine(lines, e.Key)
	}
	return errs
}

// lookupLine finds the line of a key, or of its nearest parent present in the file.
func lookupLine(lines map[string]int, key string) int {
	for k := key; k != ""; {
		if l, ok := lines[k]; ok {
			return l
		}
		i := strings.LastIndexAny(k, ".[")
		if i < 0 {
			break
		}
		k = k[:i]
	}
	return 0
}

func errEOF() error {
	var n yaml.Node
	return yaml.NewDecoder(bytes.NewReader(nil)).Decode(&n)
}

func yamlErrLine(err error) int {
	var line int
	msg := err.Error()
	if i := strings.Index(msg, "line "); i >= 0 {
		fmt.Sscanf(msg[i:], "line %d", &line)
	}
	return line
}

func cleanYAMLErr(err error) string {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	msg = strings.TrimPrefix(msg, "unmarshal errors:\n  ")
	if i := strings.Index(msg, "line "); i == 0 {
		if j := strings.Index(msg, ": "); j > 0 {
			msg = msg[j+2:]
		}
	}
	return msg
}

// walker checks a YAML tree against the config's Go types, so that an unknown
// key or a value of the wrong type is reported with its path and line before
// anything is decoded.
type walker struct {
	file  string
	errs  Errors
	lines map[string]int
}

var textUnmarshaler = reflect.TypeOf((*encoding.TextUnmarshaler)(nil)).Elem()

func (w *walker) fail(n *yaml.Node, key, format string, args ...any) {
	w.errs = append(w.errs, &Error{File: w.file, Line: n.Line, Key: key, Msg: fmt.Sprintf(format, args...)})
}

func (w *walker) check(n *yaml.Node, t reflect.Type, path string) {
	if _, seen := w.lines[path]; path != "" && !seen {
		w.lines[path] = n.Line
	}
	if n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return // null keeps the default
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if reflect.PointerTo(t).Implements(textUnmarshaler) && t.Kind() != reflect.Struct || t == reflect.TypeOf(Rate{}) {
		if n.Kind != yaml.ScalarNode {
			w.fail(n, path, "expected a single value, got a %s", kindName(n))
			return
		}
		v := reflect.New(t)
		if err := v.Interface().(encoding.TextUnmarshaler).UnmarshalText([]byte(n.Value)); err != nil {
			w.fail(n, path, "%v", err)
		}
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			w.fail(n, path, "expected a mapping of keys, got a %s", kindName(n))
			return
		}
		fields := map[string]reflect.Type{}
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			if name != "" && name != "-" {
				fields[name] = f.Type
			}
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			sub := join(path, k.Value)
			ft, ok := fields[k.Value]
			if !ok {
				w.fail(k, sub, "unknown key%s", suggest(k.Value, fields))
				continue
			}
			w.lines[sub] = k.Line
			w.check(v, ft, sub)
		}
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			w.fail(n, path, "expected a list, got a %s", kindName(n))
			return
		}
		for i, e := range n.Content {
			w.check(e, t.Elem(), fmt.Sprintf("%s[%d]", path, i))
		}
	case reflect.Map, reflect.Interface:
		// Free-form (middleware rules): any shape here; registered validators
		// check them. Record the lines so their errors can name them.
		w.record(n, path)
	default:
		if n.Kind != yaml.ScalarNode {
			w.fail(n, path, "expected a single value, got a %s", kindName(n))
			return
		}
		v := reflect.New(t)
		if err := n.Decode(v.Interface()); err != nil {
			w.fail(n, path, "expected %s, got %q", goKindName(t), n.Value)
		}
	}
}

// record notes the line of every key and element under a free-form node.
func (w *walker) record(n *yaml.Node, path string) {
	if _, seen := w.lines[path]; path != "" && !seen {
		w.lines[path] = n.Line
	}
	switch n.Kind {
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			sub := join(path, n.Content[i].Value)
			w.lines[sub] = n.Content[i].Line
			w.record(n.Content[i+1], sub)
		}
	case yaml.SequenceNode:
		for i, e := range n.Content {
			w.record(e, fmt.Sprintf("%s[%d]", path, i))
		}
	}
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "mapping"
	case yaml.SequenceNode:
		return "list"
	default:
		return "value"
	}
}

func goKindName(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int64, reflect.Int32:
		return "a whole number"
	case reflect.Float64, reflect.Float32:
		return "a number"
	case reflect.String:
		return "a string"
	}
	return t.String()
}

// suggest names the known key closest to a misspelt one.
func suggest(key string, fields map[string]reflect.Type) string {
	names := make([]string, 0, len(fields))
	for name := range fields {
		names = append(names, name)
	}
	return Suggest(key, names)
}

// Suggest returns " (did you mean "x"?)" for the known name closest to a
// misspelt one (edit distance under 3), or " (known keys: a, b, …)". Other
// packages that validate config sections (middleware rules) use it so that
// every config error reads alike.
func Suggest(key string, known []string) string {
	if len(known) == 0 {
		return ""
	}
	names := append([]string(nil), known...)
	sort.Strings(names)
	best, bestD := "", 3
	for _, name := range names {
		if d := editDistance(key, name); d < bestD {
			best, bestD = name, d
		}
	}
	if best != "" {
		return fmt.Sprintf(" (did you mean %q?)", best)
	}
	return " (known keys: " + strings.Join(names, ", ") + ")"
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}
