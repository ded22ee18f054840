// Package multihost runs several `shoal run` nodes as separate "hosts":
// each in a network namespace of its own with a real (virtual) interface,
// joined by cluster.join, and talks to them with the repo's Go client over
// WebSocket, as clients on other machines would. It also checks that the
// worker's IP rules see the client's real address on both the handed-off
// (plain) and the proxied (TLS) path.
//
// The namespace test needs root (CAP_NET_ADMIN); without it, or when the
// kernel refuses a namespace, a bridge or a veth, it says so and skips.
package multihost

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"github.com/shoalhq/shoal/internal/testutil"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	buildDir  string    // removed by TestMain
	buildOnce sync.Once // the binary is built by the first test that needs it
	shoalBin  string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// binary builds ./cmd/shoal once, lazily: a run that skips every test
// (not root, no namespaces) needs no toolchain. SHOAL_BIN names a prebuilt
// binary instead (e.g. one built from a clean commit while the shared
// working tree has half-done edits).
func binary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		if b := os.Getenv("SHOAL_BIN"); b != "" {
			if _, err := os.Stat(b); err != nil {
				buildErr = fmt.Errorf("SHOAL_BIN: %w", err)
			}
			shoalBin = b
			return
		}
		root, err := moduleRoot()
		if err != nil {
			buildErr = err
			return
		}
		if buildDir, err = os.MkdirTemp("", "shoal-multihost-"); err != nil {
			buildErr = err
			return
		}
		shoalBin = filepath.Join(buildDir, "shoal")
		build := exec.Command("go", "build", "-o", shoalBin, "./cmd/shoal")
		build.Dir = root
		if out, err := build.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("building ./cmd/shoal from the working tree (SHOAL_BIN=<binary> skips the build): %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return shoalBin
}

// moduleRoot and waitFor are shared with the other cluster test package.
func moduleRoot() (string, error) { return testutil.ModuleRoot() }

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	testutil.WaitFor(t, timeout, what, cond)
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// logLine is one line of the central log (docs/operations.md).
type logLine struct {
	Time    time.Time
	Level   string
	Proc    string
	Msg     string
	Brokers int // the "brokers" field of "ring changed"
	raw     string
}

// readLog parses a node's central log; unreadable lines are skipped.
func readLog(path string) []logLine {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []logLine
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 4*1024*1024)
	for sc.Scan() {
		var l struct {
			Time    time.Time `json:"time"`
			Level   string    `json:"level"`
			Proc    string    `json:"proc"`
			Msg     string    `json:"msg"`
			Brokers int       `json:"brokers"`
		}
		if json.Unmarshal(sc.Bytes(), &l) != nil {
			continue
		}
		out = append(out, logLine{Time: l.Time, Level: l.Level, Proc: l.Proc, Msg: l.Msg, Brokers: l.Brokers, raw: sc.Text()})
	}
	return out
}

// tailLog returns the last n raw lines of a node's central log.
func tailLog(path string, n int) string {
	ls := readLog(path)
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	var b strings.Builder
	for _, l := range ls {
		b.WriteString(l.raw)
		b.WriteByte('\n')
	}
	return b.String()
}

type procInfo struct {
	Name        string            `json:"name"`
	Role        string            `json:"role"`
	Pid         int               `json:"pid"`
	State       string            `json:"state"`
	Connections int64             `json:"connections"`
	Addrs       map[string]string `json:"addrs"`
}

type clusterInfo struct {
	SupervisorPid int        `json:"supervisor_pid"`
	Processes     []procInfo `json:"processes"`
}

func (ci clusterInfo) allReady() bool {
	if len(ci.Processes) == 0 {
		return false
	}
	for _, p := range ci.Processes {
		if p.State != "ready" {
			return false
		}
	}
	return true
}

// children lists pid's descendants (by walking /proc's parent links).
func descendants(pid int) []int {
	parent := map[int]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) > 1 {
			if pp, err := strconv.Atoi(f[1]); err == nil {
				parent[p] = pp
			}
		}
	}
	var out []int
	for p := range parent {
		for q, hops := parent[p], 0; q != 0 && hops < 64; q, hops = parent[q], hops+1 {
			if q == pid {
				out = append(out, p)
				break
			}
		}
	}
	return out
}

// freePort picks a free loopback port (for the single-host tests).
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
