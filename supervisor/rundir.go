package supervisor

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// The run directory (<tmp>/shoal-NNN) holds the children's unix sockets. A
// supervisor removes it when it exits, but one that is SIGKILLed cannot, so
// each run directory records its supervisor's pid, and a starting supervisor
// removes the directories whose supervisor is gone.

// runPIDFile names the file in a run directory that holds the pid of the
// supervisor that owns it.
const runPIDFile = "supervisor.pid"

// runDirPrefix is the run directories' name prefix under os.TempDir().
const runDirPrefix = "shoal-"

// makeRunDir creates a private run directory and records this process's pid
// in it.
func makeRunDir() (string, error) {
	dir, err := os.MkdirTemp("", runDirPrefix)
	if err != nil {
		return "", err
	}
	pid := []byte(strconv.Itoa(os.Getpid()) + "\n")
	if err := os.WriteFile(filepath.Join(dir, runPIDFile), pid, 0o600); err != nil {
		_ = os.RemoveAll(dir)
		return "", fmt.Errorf("recording the supervisor pid in %s: %w", dir, err)
	}
	return dir, nil
}

// sweepRunDirs removes the run directories under tmp left by supervisors that
// no longer run, and returns them. It only touches directories that are ours
// beyond doubt: named shoal-*, owned by this user, with a pid file whose
// process does not exist. A directory without a pid file (still being
// created, or made by an older binary) is left alone, as is one whose pid
// is alive (even if the pid was reused: keeping a stale directory is
// harmless, removing a live one is not).
func sweepRunDirs(tmp string) []string {
	entries, err := os.ReadDir(tmp)
	if err != nil {
		return nil
	}
	uid := os.Getuid()
	var removed []string
	for _, e := range entries {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), runDirPrefix) {
			continue
		}
		dir := filepath.Join(tmp, e.Name())
		var st syscall.Stat_t
		if syscall.Lstat(dir, &st) != nil || int(st.Uid) != uid {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, runPIDFile))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 0 || pid == os.Getpid() || processExists(pid) {
			continue
		}
		if os.RemoveAll(dir) == nil {
			removed = append(removed, dir)
		}
	}
	return removed
}

// processExists reports whether a process with this pid exists (EPERM: it
// does, owned by someone else).
func processExists(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
