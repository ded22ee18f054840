package supervisor

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/logfile"
)

// procLogger is an hclog.Logger that writes into the central log under one
// process name. The supervisor uses one for itself ("supervisor") and gives
// one to go-plugin for each child: go-plugin parses the child's hclog JSON
// stderr lines and replays them on Logger.Named(<binary name>), so a line
// arrives here with the child's level, message and fields (plus a
// "timestamp" field holding the child's own time).
type procLogger struct {
	sink    *logfile.Writer
	proc    string
	pid     func() int
	level   *atomic.Int32 // shared by a logger and its With/Named copies
	implied []any
	// childStream is the name go-plugin gives the logger of the child's
	// stderr (the binary's base name); fromChild marks that logger. The base
	// logger carries go-plugin's own messages about the child.
	childStream string
	fromChild   bool
}

var _ hclog.Logger = (*procLogger)(nil)

func newProcLogger(sink *logfile.Writer, proc string, pid func() int, level hclog.Level) *procLogger {
	lv := new(atomic.Int32)
	lv.Store(int32(level))
	return &procLogger{sink: sink, proc: proc, pid: pid, level: lv}
}

func toFileLevel(l hclog.Level) logfile.Level {
	switch {
	case l <= hclog.Trace:
		return logfile.LevelTrace
	case l == hclog.Debug:
		return logfile.LevelDebug
	case l == hclog.Info:
		return logfile.LevelInfo
	case l == hclog.Warn:
		return logfile.LevelWarn
	}
	return logfile.LevelError
}

func (l *procLogger) Log(level hclog.Level, msg string, args ...any) {
	if level == hclog.Off || level < l.GetLevel() && !(l.fromChild && level == hclog.Debug && len(args) == 0) {
		return
	}
	e := logfile.Entry{Time: time.Now(), Level: toFileLevel(level), Proc: l.proc, Msg: msg}
	if l.pid != nil {
		e.Pid = l.pid()
	}
	if !l.fromChild && msg == "plugin process exited" {
		// go-plugin's own note on the exit: the supervisor's crash report
		// (error level, with the exit status and stderr) says it better, so
		// this stays a plain note without the binary path and pid fields.
		e.Msg, e.Level, args = "process exited", logfile.LevelInfo, nil
	}
	if l.fromChild && len(args) == 0 && level == hclog.Debug {
		// go-plugin hands over a stderr line that is not hclog JSON at Debug
		// (its panic detection only starts at "panic:"). Children log only
		// JSON, so such a line is the runtime or a library talking (a gRPC
		// warning, "fatal error", a signal dump): never drop it.
		e.Level = logfile.LevelWarn
		e.Fields = append(e.Fields, logfile.Field{Key: "stream", Value: "stderr"})
	}
	all := args
	if len(l.implied) > 0 {
		all = append(append([]any{}, l.implied...), args...)
	}
	for i := 0; i < len(all); i += 2 {
		key, ok := all[i].(string)
		if !ok {
			key = fmt.Sprint(all[i])
		}
		var val any = "(missing)"
		if i+1 < len(all) {
			val = all[i+1]
		}
		if l.fromChild {
			switch key {
			case "timestamp": // the child's clock, as go-plugin re-formatted it
				if s, ok := val.(string); ok {
					if t, err := time.Parse(hclog.TimeFormat, s); err == nil {
						e.Time = t
					}
				}
				continue
			case "@module":
				// The child's logger is named after its role; only a
				// sub-logger's name tells the reader something.
				if s, _ := val.(string); s != "" && strings.Contains(s, ".") {
					e.Fields = append(e.Fields, logfile.Field{Key: "module", Value: s})
				}
				continue
			case "@caller":
				key = "caller"
			}
		}
		if h, ok := val.(hclog.Format); ok {
			val = fmt.Sprintf(fmt.Sprint(h[0]), h[1:]...)
		}
		e.Fields = append(e.Fields, logfile.Field{Key: key, Value: val})
	}
	if l.fromChild && len(e.Fields) > 1 {
		// go-plugin decodes the child's JSON into a map, so the order the
		// child logged its fields in is gone: sort them so that lines of one
		// kind read alike.
		sort.SliceStable(e.Fields, func(i, j int) bool { return e.Fields[i].Key < e.Fields[j].Key })
	}
	// A log that cannot be written has nowhere to report to; the writer
	// retries on the next line.
	_ = l.sink.Write(e)
}

func (l *procLogger) Trace(msg string, args ...any) { l.Log(hclog.Trace, msg, args...) }
func (l *procLogger) Debug(msg string, args ...any) { l.Log(hclog.Debug, msg, args...) }
func (l *procLogger) Info(msg string, args ...any)  { l.Log(hclog.Info, msg, args...) }
func (l *procLogger) Warn(msg string, args ...any)  { l.Log(hclog.Warn, msg, args...) }
func (l *procLogger) Error(msg string, args ...any) { l.Log(hclog.Error, msg, args...) }

func (l *procLogger) IsTrace() bool { return l.GetLevel() <= hclog.Trace }
func (l *procLogger) IsDebug() bool { return l.GetLevel() <= hclog.Debug }
func (l *procLogger) IsInfo() bool  { return l.GetLevel() <= hclog.Info }
func (l *procLogger) IsWarn() bool  { return l.GetLevel() <= hclog.Warn }
func (l *procLogger) IsError() bool { return l.GetLevel() <= hclog.Error }

func (l *procLogger) ImpliedArgs() []any { return l.implied }

func (l *procLogger) With(args ...any) hclog.Logger {
	c := *l
	c.implied = append(append([]any{}, l.implied...), args...)
	return &c
}

func (l *procLogger) Name() string { return l.proc }

// Named keeps the process name. go-plugin replays the child's stderr on
// Named(<binary's base name>), and uses other names ("stdio", "yamux") for
// its own parts; only the first carries the child's lines.
func (l *procLogger) Named(name string) hclog.Logger {
	c := *l
	c.fromChild = l.childStream != "" && name == l.childStream
	return &c
}

func (l *procLogger) ResetNamed(name string) hclog.Logger { return l.Named(name) }

func (l *procLogger) SetLevel(level hclog.Level) { l.level.Store(int32(level)) }
func (l *procLogger) GetLevel() hclog.Level      { return hclog.Level(l.level.Load()) }

func (l *procLogger) StandardLogger(opts *hclog.StandardLoggerOptions) *log.Logger {
	return log.New(l.StandardWriter(opts), "", 0)
}

func (l *procLogger) StandardWriter(opts *hclog.StandardLoggerOptions) io.Writer {
	lv := hclog.Info
	if opts != nil && opts.ForceLevel != hclog.NoLevel {
		lv = opts.ForceLevel
	}
	return &lineWriter{fn: func(s string) { l.Log(lv, s) }}
}

// lineWriter calls fn once per line written to it.
type lineWriter struct {
	mu  sync.Mutex
	buf []byte
	fn  func(string)
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		w.fn(string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
	return len(p), nil
}

// stderrRing keeps the last raw stderr lines of one child process for its
// crash report, and the whole start of a Go panic or fatal error (which
// can be longer than the ring), so the report shows where it crashed.
type stderrRing struct {
	mu      sync.Mutex
	partial []byte
	lines   []string // ring of the last ringLines lines
	next    int
	full    bool
	panic   []string // from a "panic:" / "fatal error:" line on, up to panicLines
}

const (
	ringLines  = 30
	panicLines = 120
	maxLineLen = 2048
)

func newStderrRing() *stderrRing { return &stderrRing{lines: make([]string, ringLines)} }

// Write receives go-plugin's raw copy of the child's stderr (a line's bytes
// and its newline may come in separate writes).
func (r *stderrRing) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for rest := p; len(rest) > 0; {
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			if len(r.partial) < maxLineLen {
				r.partial = append(r.partial, rest[:min(len(rest), maxLineLen-len(r.partial))]...)
			}
			break
		}
		if len(r.partial) < maxLineLen {
			r.partial = append(r.partial, rest[:min(i, maxLineLen-len(r.partial))]...)
		}
		r.add(string(r.partial))
		r.partial = r.partial[:0]
		rest = rest[i+1:]
	}
	return len(p), nil
}

func (r *stderrRing) add(line string) {
	if strings.HasPrefix(line, "panic: ") || strings.HasPrefix(line, "fatal error: ") {
		if r.panic == nil {
			r.panic = make([]string, 0, 16)
		}
	}
	if r.panic != nil && len(r.panic) < panicLines {
		r.panic = append(r.panic, line)
	}
	r.lines[r.next] = line
	r.next = (r.next + 1) % len(r.lines)
	if r.next == 0 {
		r.full = true
	}
}

// Report is the text for a crash report: the panic if there was one,
// otherwise the last lines, with hclog JSON lines shown as "[level] message".
func (r *stderrRing) Report() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var lines []string
	if r.panic != nil {
		lines = append(lines, r.panic...)
	} else {
		if r.full {
			lines = append(lines, r.lines[r.next:]...)
		}
		lines = append(lines, r.lines[:r.next]...)
	}
	if len(r.partial) > 0 {
		lines = append(lines, string(r.partial))
	}
	var b strings.Builder
	for _, l := range lines {
		b.WriteString(readableStderr(l))
		b.WriteByte('\n')
	}
	return strings.TrimRight(b.String(), "\n")
}

func readableStderr(line string) string {
	if !strings.HasPrefix(line, "{") {
		return line
	}
	var m struct {
		Level   string `json:"@level"`
		Message string `json:"@message"`
	}
	if json.Unmarshal([]byte(line), &m) != nil || m.Message == "" {
		return line
	}
	return "[" + m.Level + "] " + m.Message
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	sc := bufio.NewScanner(strings.NewReader(s))
	var out []string
	for sc.Scan() {
		out = append(out, sc.Text())
		if len(out) > n {
			out = out[1:]
		}
	}
	return strings.Join(out, "\n")
}
