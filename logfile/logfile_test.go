package logfile

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestRoundTrip(t *testing.T) {
	at := time.Date(2026, 11, 22, 1, 2, 3, 456789000, time.UTC)
	e := Entry{
		Time: at, Level: LevelError, Proc: "worker-1", Pid: 42, Msg: "crashed \"hard\"",
		Fields: []Field{
			{"exit", "signal: killed"},
			{"restarts", 3},
			{"err", errors.New("boom")},
			{"backoff", 200 * time.Millisecond},
			{"msg", "a field named like a fixed key"},
			{"stderr", "panic: x\ngoroutine 1 [running]:"},
			{"raw", json.RawMessage(`{"a":[1,2]}`)},
		},
	}
	line := AppendJSON(nil, e)
	if !strings.HasPrefix(string(line), `{"time":"2026-11-22T01:02:03.456789Z","level":"error","proc":"worker-1","pid":42,"msg":`) {
		t.Fatalf("fixed keys not first or wrong: %s", line)
	}
	if line[len(line)-1] != '\n' || strings.Count(string(line), "\n") != 1 {
		t.Fatalf("want exactly one trailing newline: %q", line)
	}
	var generic map[string]any
	if err := json.Unmarshal(line, &generic); err != nil {
		t.Fatalf("line is not JSON: %v", err)
	}
	if generic["msg_"] != "a field named like a fixed key" || generic["msg"] != `crashed "hard"` {
		t.Fatalf("fixed key collision not renamed: %v", generic)
	}
	got, err := ParseLine(line)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Time.Equal(at) || got.Level != LevelError || got.Proc != "worker-1" || got.Pid != 42 || got.Msg != e.Msg {
		t.Fatalf("fixed fields differ: %+v", got)
	}
	wantKeys := []string{"exit", "restarts", "err", "backoff", "msg_", "stderr", "raw"}
	if len(got.Fields) != len(wantKeys) {
		t.Fatalf("fields: %v", got.Fields)
	}
	for i, k := range wantKeys {
		if got.Fields[i].Key != k {
			t.Fatalf("field %d = %q, want %q (order kept)", i, got.Fields[i].Key, k)
		}
	}
	for k, want := range map[string]string{"exit": "signal: killed", "restarts": "3", "err": "boom", "backoff": "200ms", "raw": `{"a":[1,2]}`} {
		if v := got.GetString(k); v != want {
			t.Errorf("%s = %q, want %q", k, v, want)
		}
	}
	if _, err := ParseLine([]byte("panic: not json")); !errors.Is(err, ErrNotJSON) {
		t.Fatalf("want ErrNotJSON, got %v", err)
	}
}

func TestFormat(t *testing.T) {
	e := Entry{
		Time: time.Now(), Level: LevelWarn, Proc: "supervisor", Pid: 7, Msg: "worker-2 crashed",
		Fields: []Field{{"exit", "exit status 2"}, {"stderr", "panic: boom\n\ngoroutine 1 [running]:\nmain.main()"}, {"n", 1}},
	}
	out := string(Format(nil, e))
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if !strings.Contains(lines[0], `WARN  supervisor[7] worker-2 crashed exit="exit status 2" n=1`) {
		t.Fatalf("first line: %q", lines[0])
	}
	if lines[1] != "    stderr:" || lines[2] != "      panic: boom" || !strings.Contains(out, "      main.main()") {
		t.Fatalf("stderr block not indented below the line:\n%s", out)
	}
	brief := string(FormatBrief(nil, e))
	if strings.Count(brief, "\n") != 1 || !strings.Contains(brief, "more lines") {
		t.Fatalf("brief form must be one line: %q", brief)
	}
}

func TestFilter(t *testing.T) {
	now := time.Now()
	entries := []Entry{
		{Time: now.Add(-time.Hour), Level: LevelError, Proc: "worker-1", Msg: "old"},
		{Time: now, Level: LevelInfo, Proc: "worker-1", Msg: "info"},
		{Time: now, Level: LevelError, Proc: "worker-12", Msg: "w12"},
		{Time: now, Level: LevelError, Proc: "workers", Msg: "not a worker"},
		{Time: now, Level: LevelWarn, Proc: "broker-1", Msg: "b1"},
		{Time: now, Level: LevelError, Proc: "supervisor", Msg: "sup"},
	}
	cases := []struct {
		name string
		f    Filter
		want []string
	}{
		{"all", Filter{}, []string{"old", "info", "w12", "not a worker", "b1", "sup"}},
		{"level", Filter{MinLevel: LevelWarn}, []string{"old", "w12", "not a worker", "b1", "sup"}},
		{"role prefix", Filter{Procs: []string{"worker"}}, []string{"old", "info", "w12"}},
		{"exact", Filter{Procs: []string{"worker-1", "supervisor"}}, []string{"old", "info", "sup"}},
		{"since", Filter{Since: now.Add(-time.Minute), MinLevel: LevelError, Procs: []string{"worker"}}, []string{"w12"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var got []string
			for _, e := range entries {
				if c.f.Match(e) {
					got = append(got, e.Msg)
				}
			}
			if fmt.Sprint(got) != fmt.Sprint(c.want) {
				t.Fatalf("got %v, want %v", got, c.want)
			}
		})
	}
}

func TestParseSince(t *testing.T) {
	now := time.Date(2026, 1, 2, 15, 0, 0, 0, time.UTC)
	if got, err := ParseSince("10m", now); err != nil || !got.Equal(now.Add(-10*time.Minute)) {
		t.Fatalf("duration: %v %v", got, err)
	}
	if got, err := ParseSince("2026-01-02T14:00:00Z", now); err != nil || !got.Equal(now.Add(-time.Hour)) {
		t.Fatalf("rfc3339: %v %v", got, err)
	}
	if _, err := ParseSince("yesterday", now); err == nil {
		t.Fatal("want an error for nonsense")
	}
}

func entryN(i int) Entry {
	return Entry{Time: time.Now(), Level: LevelInfo, Proc: "worker-1", Pid: 1, Msg: fmt.Sprintf("line %04d", i),
		Fields: []Field{{"pad", strings.Repeat("x", 60)}}}
}

func readAll(t *testing.T, path string, f Filter) []string {
	t.Helper()
	var got []string
	if err := Read(path, f, func(e Entry) error { got = append(got, e.Msg); return nil }); err != nil {
		t.Fatal(err)
	}
	return got
}

func TestRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log", "shoal.log")
	const maxSize = 2048
	w, err := Open(Options{Path: path, MaxSize: maxSize, Keep: 2})
	if err != nil {
		t.Fatal(err)
	}
	const n = 200 // ~150 bytes a line: many rotations
	for i := 0; i < n; i++ {
		if err := w.Write(entryN(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	files := Files(path)
	if len(files) != 3 || files[0] != path+".2" || files[1] != path+".1" || files[2] != path {
		t.Fatalf("files = %v, want .2 .1 and the live file", files)
	}
	if _, err := os.Stat(path + ".3"); err == nil {
		t.Fatal("keep=2 must not leave a .3")
	}
	for _, f := range files {
		fi, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Size() > maxSize {
			t.Fatalf("%s is %d bytes, over the %d limit", f, fi.Size(), maxSize)
		}
	}
	// What is kept is the newest lines, contiguous and in order.
	got := readAll(t, path, Filter{})
	if len(got) == 0 || got[len(got)-1] != fmt.Sprintf("line %04d", n-1) {
		t.Fatalf("last line missing: %v", got)
	}
	first := n - len(got)
	for i, m := range got {
		if want := fmt.Sprintf("line %04d", first+i); m != want {
			t.Fatalf("line %d = %q, want %q", i, m, want)
		}
	}

	// Reopening appends to the live file instead of truncating it.
	w, err = Open(Options{Path: path, MaxSize: maxSize, Keep: 2})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Write(entryN(n)); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if got2 := readAll(t, path, Filter{}); got2[len(got2)-1] != fmt.Sprintf("line %04d", n) || len(got2) < 2 {
		t.Fatalf("reopen lost lines: %v", got2)
	}
}

func TestRotationKeepZero(t *testing.T) {
	path := filepath.Join(t.TempDir(), "shoal.log")
	w, err := Open(Options{Path: path, MaxSize: 1024, Keep: 0})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for i := 0; i < 50; i++ {
		if err := w.Write(entryN(i)); err != nil {
			t.Fatal(err)
		}
	}
	if files := Files(path); len(files) != 1 {
		t.Fatalf("keep=0 must keep only the live file: %v", files)
	}
}

func TestEcho(t *testing.T) {
	var echo strings.Builder
	w, err := Open(Options{Path: filepath.Join(t.TempDir(), "l"), Echo: &echo, EchoLevel: LevelWarn})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	_ = w.Write(Entry{Time: time.Now(), Level: LevelInfo, Proc: "a", Msg: "quiet"})
	_ = w.Write(Entry{Time: time.Now(), Level: LevelError, Proc: "b", Msg: "loud"})
	if s := echo.String(); strings.Contains(s, "quiet") || !strings.Contains(s, "ERROR b loud") {
		t.Fatalf("echo = %q", s)
	}
}

func TestFollowAcrossRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "shoal.log")
	w, err := Open(Options{Path: path, MaxSize: 1500, Keep: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if err := w.Write(entryN(0)); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	var (
		mu  sync.Mutex
		got []string
	)
	done := make(chan error, 1)
	go func() {
		done <- Follow(ctx, path, Filter{}, FollowOptions{History: true, Poll: 5 * time.Millisecond}, func(e Entry) error {
			mu.Lock()
			got = append(got, e.Msg)
			mu.Unlock()
			return nil
		})
	}()
	count := func() int { mu.Lock(); defer mu.Unlock(); return len(got) }
	waitFor(t, 5*time.Second, "the history line", func() bool { return count() >= 1 })

	// Write in bursts that each stay below one rotation, waiting for the
	// follower between bursts: with keep=1 a follower that is more than one
	// rotation behind could legitimately miss a file.
	const n = 120
	for i := 1; i < n; i++ {
		if err := w.Write(entryN(i)); err != nil {
			t.Fatal(err)
		}
		if i%5 == 0 {
			want := i + 1
			waitFor(t, 5*time.Second, fmt.Sprintf("%d lines", want), func() bool { return count() >= want })
		}
	}
	waitFor(t, 5*time.Second, "every line", func() bool { return count() >= n })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != n {
		t.Fatalf("got %d lines, want %d (duplicates?)", len(got), n)
	}
	for i, m := range got {
		if want := fmt.Sprintf("line %04d", i); m != want {
			t.Fatalf("line %d = %q, want %q", i, m, want)
		}
	}
	if len(Files(path)) != 2 {
		t.Fatalf("expected rotations to have happened: %v", Files(path))
	}
}

func TestFollowWaitsForFileAndFilters(t *testing.T) {
	path := filepath.Join(t.TempDir(), "later.log")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	got := make(chan Entry, 10)
	done := make(chan error, 1)
	go func() {
		done <- Follow(ctx, path, Filter{MinLevel: LevelError}, FollowOptions{History: true, Poll: 5 * time.Millisecond},
			func(e Entry) error { got <- e; return nil })
	}()
	w, err := Open(Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	_ = w.Write(Entry{Time: time.Now(), Level: LevelInfo, Proc: "x", Msg: "skip"})
	_ = w.Write(Entry{Time: time.Now(), Level: LevelError, Proc: "x", Msg: "keep"})
	select {
	case e := <-got:
		if e.Msg != "keep" {
			t.Fatalf("filter let through %q", e.Msg)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("follower never saw the error line")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
