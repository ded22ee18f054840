package supervisor

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/logfile"
)

// TestProcLoggerAsGoPluginUsesIt drives the adapter the way go-plugin's
// client does: its own messages on the base logger, the child's stderr on
// Named(<binary name>).
func TestProcLoggerAsGoPluginUsesIt(t *testing.T) {
	path := filepath.Join(t.TempDir(), "shoal.log")
	w, err := logfile.Open(logfile.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	base := childLogger(newProcLogger(w, "worker-3", func() int { return 99 }, hclog.Info), "/usr/bin/shoal")
	child := base.Named("shoal")

	child.Info("hello", "b", 2.0, "a", "x", "@module", "worker", "timestamp", "2026-11-22T01:02:03.456Z")
	child.Error("sub says", "@module", "worker.netpoll")
	child.Debug("SIGQUIT: quit")                   // a raw stderr line: kept, as a warning
	child.Debug("debug from the child", "k", "v")  // a real debug line below the level: dropped
	base.Info("plugin process exited", "id", "99") // go-plugin's own note: simplified
	base.Named("stdio").Debug("received EOF")      // go-plugin internals: not a child line
	base.With("reporter", "supervisor").Warn("w", "n", 1)

	var got []logfile.Entry
	if err := logfile.Read(path, logfile.Filter{}, func(e logfile.Entry) error { got = append(got, e); return nil }); err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, e := range got {
		lines = append(lines, strings.TrimSpace(string(logfile.Format(nil, e))[24:])) // without the local time
		if e.Proc != "worker-3" || e.Pid != 99 {
			t.Errorf("proc/pid: %+v", e)
		}
	}
	want := []string{
		"INFO  worker-3[99] hello a=x b=2",
		"ERROR worker-3[99] sub says module=worker.netpoll",
		"WARN  worker-3[99] SIGQUIT: quit stream=stderr",
		"INFO  worker-3[99] process exited",
		"WARN  worker-3[99] w reporter=supervisor n=1",
	}
	if strings.Join(lines, "\n") != strings.Join(want, "\n") {
		t.Fatalf("got:\n%s\nwant:\n%s", strings.Join(lines, "\n"), strings.Join(want, "\n"))
	}
	if got[0].Time.UTC().Format("15:04:05.000") != "01:02:03.456" {
		t.Errorf("the child's own timestamp must be kept: %v", got[0].Time)
	}
}

func TestGatedWriter(t *testing.T) {
	var out strings.Builder
	g := &gatedWriter{dst: &out}
	_, _ = g.Write([]byte("early\n"))
	if out.Len() != 0 {
		t.Fatal("held lines leaked before open")
	}
	g.open()
	_, _ = g.Write([]byte("late\n"))
	if out.String() != "early\nlate\n" {
		t.Fatalf("got %q", out.String())
	}
	var out2 strings.Builder
	g2 := &gatedWriter{dst: &out2}
	_, _ = g2.Write([]byte("x\n"))
	g2.discard()
	_, _ = g2.Write([]byte("y\n"))
	if out2.Len() != 0 {
		t.Fatalf("discarded writer wrote %q", out2.String())
	}
}
