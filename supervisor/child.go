package supervisor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc/status"

	"github.com/shoalhq/shoal/proto/control"
)

// Timeouts of the control plane.
const (
	handshakeTimeout = 20 * time.Second // exec + go-plugin handshake on a loaded machine
	startTimeout     = 30 * time.Second // the child's Start RPC
	rpcTimeout       = 3 * time.Second  // Stats, SetTopology, Stop
	drainTimeout     = 5 * time.Second  // what a worker gets to close its sockets
	exitPoll         = 50 * time.Millisecond
)

// instance is one running OS process of a proc: its go-plugin client and
// control connection. A restart makes a new instance.
type instance struct {
	name    string
	client  *plugin.Client
	child   control.Child
	cmd     *exec.Cmd
	pid     int
	stderr  *stderrRing
	addrs   map[string]string
	started time.Time

	exited   chan struct{} // closed when the process is gone
	stop     chan struct{} // ends the exit watcher
	watchWG  sync.WaitGroup
	killOnce sync.Once
}

// launch execs one child, completes the go-plugin handshake and calls Start.
// On any error the process is killed before returning.
func (s *Supervisor) launch(ctx context.Context, p *proc) (*instance, error) {
	exe := s.exe
	cmd := exec.Command(exe, "child", string(p.role))
	// Own process group: a terminal's Ctrl-C reaches only the supervisor,
	// which drains the children itself. Pdeathsig: the kernel kills the child
	// if the supervisor dies without cleaning up (control.Serve also watches
	// the parent, for the rare case where the forking thread exits first).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// SkipHostEnv below: we pass the environment ourselves so that our
	// values win over inherited ones of the same name.
	cmd.Env = append(os.Environ(),
		"SHOAL_LOG_LEVEL="+s.cfg().Log.Level,
		"SHOAL_PROC="+p.name,
		// go-plugin's control socket (and those of middleware plugins the
		// workers start, which inherit this) go in the run directory, not
		// in /tmp: a child that is killed cannot remove its socket, and the
		// run directory is removed with the supervisor (or swept).
		plugin.EnvUnixSocketDir+"="+s.runDir,
	)
	ring := newStderrRing()
	pidOf := func() int {
		// go-plugin logs through this only after (or in the goroutine of)
		// cmd.Start, so reading cmd.Process here is ordered after its write.
		if cmd.Process != nil {
			return cmd.Process.Pid
		}
		return 0
	}
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  control.Handshake,
		Plugins:          control.PluginMap(nil),
		Cmd:              cmd,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		Logger:           childLogger(newProcLogger(s.sink, p.name, pidOf, s.level), exe),
		Stderr:           ring,
		SkipHostEnv:      true,
		StartTimeout:     handshakeTimeout,
	})
	rpc, err := client.Client()
	if err != nil {
		client.Kill()
		return nil, fmt.Errorf("%s: starting the process: %w%s", p.name, err, stderrSuffix(ring))
	}
	raw, err := rpc.Dispense(control.PluginName)
	if err != nil {
		client.Kill()
		return nil, fmt.Errorf("%s: opening its control plane: %w", p.name, err)
	}
	child, ok := raw.(control.Child)
	if !ok {
		client.Kill()
		return nil, fmt.Errorf("%s: control plane has unexpected type %T", p.name, raw)
	}
	inst := &instance{
		name: p.name, client: client, child: child, cmd: cmd, pid: cmd.Process.Pid,
		stderr: ring, started: time.Now(),
		exited: make(chan struct{}), stop: make(chan struct{}),
	}
	inst.watchWG.Add(1)
	go inst.watch()
	s.setStarting(p, inst)

	sctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	res, err := child.Start(sctx, control.StartParams{
		Role: p.role, Name: p.name, Index: p.index,
		Config: s.cfgJSON(), RunDir: s.runDir, Topology: s.topology(),
	})
	if err != nil {
		inst.kill()
		return nil, fmt.Errorf("%s: %s", p.name, rpcErrText(err))
	}
	inst.addrs = res.Addrs
	return inst, nil
}

// watch polls go-plugin for the process's exit (go-plugin owns cmd.Wait and
// exposes only Exited()); the poll keeps restarts well within a second.
func (i *instance) watch() {
	defer i.watchWG.Done()
	t := time.NewTicker(exitPoll)
	defer t.Stop()
	for {
		select {
		case <-i.stop:
			return
		case <-t.C:
			if i.client.Exited() {
				close(i.exited)
				return
			}
		}
	}
}

// kill ends the process (go-plugin closes the control connection, waits up to
// 2 s for a clean exit, then SIGKILLs) and its watcher. Idempotent.
func (i *instance) kill() {
	i.killOnce.Do(func() {
		i.client.Kill()
		close(i.stop)
		i.watchWG.Wait()
	})
}

// exitStatus describes how the process ended ("exit status 2", "signal:
// killed (SIGKILL)"). Valid once exited is closed.
func (i *instance) exitStatus() string {
	ps := i.cmd.ProcessState // written by go-plugin's Wait, before Exited() turns true
	if ps == nil {
		return "exited (status unknown)"
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return fmt.Sprintf("signal: %s (%s)", ws.Signal(), signalName(ws.Signal()))
	}
	return ps.String()
}

func signalName(sig syscall.Signal) string {
	switch sig {
	case syscall.SIGKILL:
		return "SIGKILL"
	case syscall.SIGTERM:
		return "SIGTERM"
	case syscall.SIGINT:
		return "SIGINT"
	case syscall.SIGSEGV:
		return "SIGSEGV"
	case syscall.SIGABRT:
		return "SIGABRT"
	case syscall.SIGQUIT:
		return "SIGQUIT"
	case syscall.SIGBUS:
		return "SIGBUS"
	case syscall.SIGHUP:
		return "SIGHUP"
	}
	return fmt.Sprintf("signal %d", int(sig))
}

// rpcErrText is a child's error without gRPC's "rpc error: code = ... desc ="
// wrapping, so the user reads the child's own sentence.
func rpcErrText(err error) string {
	if errors.Is(err, context.DeadlineExceeded) {
		return "did not finish starting in time"
	}
	if st, ok := status.FromError(err); ok {
		return st.Message()
	}
	return err.Error()
}

// stderrSuffix appends the child's last stderr line when it explains a
// failure that the error itself does not (a child that died at start).
func stderrSuffix(r *stderrRing) string {
	rep := strings.TrimSpace(r.Report())
	if rep == "" {
		return ""
	}
	return " (stderr: " + lastLines(rep, 1) + ")"
}

// childLogger readies l for go-plugin, which names the child's stderr
// logger after the executable's base name.
func childLogger(l *procLogger, exe string) *procLogger {
	l.childStream = filepath.Base(exe)
	return l
}

// hclogLevel maps the config's level name.
func hclogLevel(s string) hclog.Level {
	l := hclog.LevelFromString(s)
	if l == hclog.NoLevel {
		return hclog.Info
	}
	return l
}
