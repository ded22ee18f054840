package supervisor

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
)

func TestSweepRunDirs(t *testing.T) {
	tmp := t.TempDir()
	// A pid that no longer exists: a child that has been waited for.
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Skipf("cannot run true: %v", err)
	}
	dead := cmd.Process.Pid
	mk := func(name, pid string) string {
		t.Helper()
		d := filepath.Join(tmp, name)
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if pid != "" {
			if err := os.WriteFile(filepath.Join(d, runPIDFile), []byte(pid+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		_ = os.WriteFile(filepath.Join(d, "worker-1.sock"), nil, 0o600)
		return d
	}
	gone := mk("shoal-111", strconv.Itoa(dead))
	alive := mk("shoal-222", strconv.Itoa(os.Getppid()))
	mine := mk("shoal-333", strconv.Itoa(os.Getpid()))
	nopid := mk("shoal-444", "")
	garbage := mk("shoal-555", "not-a-pid")
	other := mk("other-666", strconv.Itoa(dead))

	removed := sweepRunDirs(tmp)
	if len(removed) != 1 || removed[0] != gone {
		t.Fatalf("removed %v, want only %s", removed, gone)
	}
	if _, err := os.Stat(gone); !os.IsNotExist(err) {
		t.Fatalf("%s still there: %v", gone, err)
	}
	for _, d := range []string{alive, mine, nopid, garbage, other} {
		if _, err := os.Stat(d); err != nil {
			t.Fatalf("%s was removed: %v", d, err)
		}
	}
}

func TestMakeRunDirRecordsPID(t *testing.T) {
	t.Setenv("TMPDIR", t.TempDir()) // the sweep below must not touch the real temp dir
	d, err := makeRunDir()
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(d)
	b, err := os.ReadFile(filepath.Join(d, runPIDFile))
	if err != nil || string(b) != strconv.Itoa(os.Getpid())+"\n" {
		t.Fatalf("pid file %q, %v", b, err)
	}
	// Our own directory survives a sweep by another supervisor.
	for _, r := range sweepRunDirs(filepath.Dir(d)) {
		if r == d {
			t.Fatal("swept a live supervisor's run directory")
		}
	}
}
