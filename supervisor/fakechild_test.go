package supervisor

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/proto/control"
)

// The supervisor tests run real child processes: the test binary itself,
// re-executed as `<test binary> child <role>` (see TestMain), serving this
// fake role through the real control.Serve. What each child does is read at
// Start from the file <SHOAL_FAKE_DIR>/<name>.do (one word and an argument),
// so a test can make worker-2 panic without touching the others:
//
//	ok               start and log a few lines (the default)
//	panic            panic 50 ms after Start
//	start-error MSG  fail Start with MSG
//	hang-stats       never answer Stats (a deadlocked child)
//	no-handover      serve a child without Handover (an older worker binary:
//	                 the control plane answers Unimplemented); read at launch
//
// Every SetTopology is written to <SHOAL_FAKE_DIR>/<name>.topo as JSON, and
// every Handover to <name>.handover (fakeHandover), with the last topology
// the child had received by then.
const fakeDirEnv = "SHOAL_FAKE_DIR"

type fakeChild struct {
	log       hclog.Logger
	name      string
	dir       string
	hangStats bool

	mu   sync.Mutex
	topo control.Topology // the last SetTopology
}

// fakeHandover is what <name>.handover records of a Handover call.
type fakeHandover struct {
	Code    int
	Reason  string
	Window  time.Duration
	Timeout time.Duration
	Pid     int
	Topo    control.Topology // as the child knew it when the call came
}

// plainChild hides every optional interface (Reloader, Handoverer) of the
// child it wraps.
type plainChild struct{ control.Child }

var _ control.Child = (*fakeChild)(nil)

func runFakeChild(role string) {
	name := os.Getenv("SHOAL_PROC")
	logger := control.NewLogger(role, os.Getenv("SHOAL_LOG_LEVEL"))
	fc := &fakeChild{log: logger, name: name, dir: os.Getenv(fakeDirEnv)}
	if do, _ := os.ReadFile(filepath.Join(fc.dir, name+".do")); strings.TrimSpace(string(do)) == "no-handover" {
		control.Serve(plainChild{fc}, logger)
		return
	}
	control.Serve(fc, logger)
}

func (c *fakeChild) Start(ctx context.Context, p control.StartParams) (control.StartResult, error) {
	do, _ := os.ReadFile(filepath.Join(c.dir, p.Name+".do"))
	verb, arg, _ := strings.Cut(strings.TrimSpace(string(do)), " ")
	switch verb {
	case "start-error":
		return control.StartResult{}, errors.New(arg)
	case "hang-stats":
		c.hangStats = true
	case "panic":
		go func() {
			time.Sleep(50 * time.Millisecond) // let Start's reply reach the supervisor first
			panic("fake boom in " + p.Name)
		}()
	}
	c.log.Info("fake started", "index", p.Index, "run_dir", p.RunDir, "peers", len(p.Topology.Peers))
	c.log.Warn("fake warning", "detail", "something odd")
	c.log.Named("sub").Error("fake sub-logger error", "code", 42)
	return control.StartResult{Addrs: map[string]string{"fake": p.Name}}, nil
}

func (c *fakeChild) Health(context.Context) (control.Health, error) {
	return control.Health{State: control.StateReady}, nil
}

func (c *fakeChild) Stats(ctx context.Context) (control.Stats, error) {
	if c.hangStats {
		<-ctx.Done() // the supervisor's timeout; then it is "late", not an answer
		time.Sleep(time.Hour)
	}
	return control.Stats{Connections: 3, MessagesIn: 5, Counters: map[string]int64{"fake_total": 7}}, nil
}

func (c *fakeChild) SetTopology(_ context.Context, t control.Topology) error {
	c.mu.Lock()
	c.topo = t
	c.mu.Unlock()
	b, err := json.Marshal(t)
	if err != nil {
		return err
	}
	tmp := filepath.Join(c.dir, c.name+".topo.tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(c.dir, c.name+".topo"))
}

func (c *fakeChild) Drain(context.Context, time.Duration) error {
	c.log.Info("fake draining")
	return nil
}

func (c *fakeChild) Stop(context.Context) error { return nil }

// Handover records its parameters to <name>.handover (control.Handoverer).
func (c *fakeChild) Handover(_ context.Context, code int, reason string, window, timeout time.Duration) error {
	c.log.Info("fake handover", "code", code, "window", window)
	c.mu.Lock()
	h := fakeHandover{Code: code, Reason: reason, Window: window, Timeout: timeout, Pid: os.Getpid(), Topo: c.topo}
	c.mu.Unlock()
	b, err := json.Marshal(h)
	if err != nil {
		return err
	}
	tmp := filepath.Join(c.dir, c.name+".handover.tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(c.dir, c.name+".handover"))
}

// Reload writes the config it got to <name>.reload (control.Reloader).
func (c *fakeChild) Reload(_ context.Context, config []byte) error {
	return os.WriteFile(filepath.Join(c.dir, c.name+".reload"), config, 0o644)
}
