package middleware

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"

	pmw "github.com/shoalhq/shoal/proto/middleware"
	"github.com/shoalhq/shoal/proto/middleware/middlewarepb"
	"github.com/shoalhq/shoal/proto/sc"
)

// go-plugin middleware: a `plugin:` rule names a binary that serves the
// gRPC Middleware service (proto/middleware). The binary is started once per
// worker, on the first action that needs it (never by `shoal config check`),
// and shared by every chain of a reload lineage with the same path. A plugin
// that exits is restarted on the next action after a back-off (100 ms,
// doubling to 30 s; reset once it has run for a minute); meanwhile, and when
// a call fails or exceeds the rule's timeout, actions are denied with the
// rule's error (default PluginError, 503). Chain.Shutdown kills the plugins.

const (
	defaultPluginTimeout = time.Second
	pluginStartTimeout   = 10 * time.Second
	pluginMinBackoff     = 100 * time.Millisecond
	pluginMaxBackoff     = 30 * time.Second
	pluginStableAfter    = time.Minute
)

type pluginRule struct {
	host    *pluginHost
	timeout time.Duration
	failErr errSpec
}

func buildPlugin(b *builder, v any) (rule, []Action) {
	o, ok := newOpts(b.p, b.key, v)
	if !ok {
		return nil, nil
	}
	r := &pluginRule{timeout: defaultPluginTimeout,
		failErr: newErrSpec("PluginError", "The server could not process the {action} request", 503)}
	path, ok := o.str("path")
	if !ok || path == "" {
		b.p.add(o.sub("path"), "must be set to the plugin binary")
	} else if abs, err := filepath.Abs(path); err != nil {
		b.p.add(o.sub("path"), "%v", err)
	} else {
		path = abs
		if st, err := os.Stat(path); err != nil {
			b.p.add(o.sub("path"), "%v", err)
		} else if st.IsDir() || st.Mode().Perm()&0o111 == 0 {
			b.p.add(o.sub("path"), "%s is not an executable file", path)
		}
	}
	if d, ok := o.duration("timeout"); ok {
		if d <= 0 {
			b.p.add(o.sub("timeout"), "must be positive")
		}
		r.timeout = d
	}
	acts := stageActions[b.stage]
	// `stages` is the example config's name for the list of actions.
	for _, key := range []string{"stages", "actions"} {
		if a, ok := o.actions(key, b.stage, stageActions[b.stage]); ok {
			acts = a
		}
	}
	r.failErr = readErrSpec(o, r.failErr)
	o.finish("path", "timeout", "stages", "actions", "error")
	if len(b.p.errs) > 0 {
		return nil, nil
	}
	r.host = b.c.shared.pluginHost(path, b.c.log)
	return r, acts
}

func (r *pluginRule) wants(*Input) bool { return true }

func (r *pluginRule) check(c *Chain, in *Input) (Decision, bool) {
	return r.call(context.Background(), c, in)
}

func (r *pluginRule) call(ctx context.Context, c *Chain, in *Input) (Decision, bool) {
	mw, err := r.host.get(c.now())
	if err == nil {
		ctx, cancel := context.WithTimeout(ctx, r.timeout)
		var reply *middlewarepb.DecideReply
		reply, err = mw.Decide(ctx, pluginRequest(in))
		cancel()
		if err == nil {
			return r.decision(in, reply)
		}
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			err = fmt.Errorf("no answer within %s: %w", r.timeout, err)
		}
	}
	if ok, suppressed := c.logLim.Allow(c.now()); ok {
		c.log.Warn("middleware plugin failed", "path", r.host.path, "action", in.Action.String(), "error", err, "suppressed", suppressed)
	}
	return r.failErr.decide(in), true
}

func pluginRequest(in *Input) *middlewarepb.DecideRequest {
	req := &middlewarepb.DecideRequest{
		Action:  in.Action.String(),
		Channel: in.Channel,
		Event:   in.Event,
		Data:    in.Data,
		Origin:  in.Origin,
	}
	if ip := in.ip(); ip.IsValid() {
		req.RemoteAddr = ip.Unmap().String()
	}
	if s := in.Socket; s != nil {
		req.SocketId, req.User, req.Authenticated = s.ID, s.UserID, s.Authenticated
		if s.Claims != nil {
			req.ClaimsJson, _ = json.Marshal(s.Claims)
		}
	}
	return req
}

func (r *pluginRule) decision(in *Input, reply *middlewarepb.DecideReply) (Decision, bool) {
	var data []byte
	if reply.GetHasData() {
		data = reply.GetData()
		if err := sc.Valid(data); err != nil {
			return r.failErr.decide(in), true
		}
	}
	switch reply.GetVerdict() {
	case middlewarepb.Verdict_PASS:
		return Decision{Data: data}, false
	case middlewarepb.Verdict_ALLOW:
		d := Decision{Data: data}
		if in.Action == Invoke && data != nil {
			d.Data, d.Reply = nil, data // the plugin answered the procedure
		}
		return d, true
	}
	e := reply.GetError()
	spec := errSpec{name: e.GetName(), status: int(e.GetStatus()), code: int(e.GetCode())}
	if spec.name == "" {
		spec.name = "ForbiddenError"
	}
	msg := e.GetMessage()
	if msg == "" {
		msg = "The " + in.Action.String() + " request was denied"
	}
	if spec.status < 400 || spec.status > 599 {
		spec.status = 403
	}
	if spec.code < 4000 || spec.code > 4999 {
		spec.code = 0
	}
	spec.fixed = sc.NewError(spec.name, msg)
	spec.drop = reply.GetVerdict() == middlewarepb.Verdict_DROP
	return spec.decide(in), true
}

// pluginHost is one plugin process, started lazily and restarted after a
// crash with back-off.
type pluginHost struct {
	path string
	log  hclog.Logger

	mu        sync.Mutex
	client    *plugin.Client
	mw        pmw.Middleware
	started   time.Time
	failures  int
	nextStart time.Time
	closed    bool
}

// pluginHost returns the host for path, shared across reloads.
func (sh *shared) pluginHost(path string, log hclog.Logger) *pluginHost {
	sh.plugins.mu.Lock()
	defer sh.plugins.mu.Unlock()
	if h := sh.plugins.m[path]; h != nil {
		return h
	}
	h := &pluginHost{path: path, log: log.Named("plugin").With("path", path)}
	sh.plugins.m[path] = h
	return h
}

// get returns the running plugin, starting it if needed.
func (h *pluginHost) get(now time.Time) (pmw.Middleware, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, errors.New("middleware plugins are shut down")
	}
	if h.client != nil && !h.client.Exited() {
		return h.mw, nil
	}
	if h.client != nil {
		// It exited on its own: back off before the next start.
		h.client.Kill()
		h.client, h.mw = nil, nil
		if now.Sub(h.started) >= pluginStableAfter {
			h.failures = 0
		}
		h.fail(now)
		h.log.Error("middleware plugin exited; restarting after back-off", "failures", h.failures, "at", h.nextStart)
	}
	if now.Before(h.nextStart) {
		return nil, fmt.Errorf("plugin %s is restarting (next attempt in %s)", h.path, h.nextStart.Sub(now).Round(time.Millisecond))
	}
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  pmw.Handshake,
		Plugins:          pmw.PluginMap(nil),
		Cmd:              exec.Command(h.path),
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		Logger:           h.log,
		StartTimeout:     pluginStartTimeout,
	})
	rpc, err := client.Client()
	if err != nil {
		client.Kill()
		h.fail(now)
		return nil, fmt.Errorf("starting plugin %s: %w", h.path, err)
	}
	raw, err := rpc.Dispense(pmw.PluginName)
	if err != nil {
		client.Kill()
		h.fail(now)
		return nil, fmt.Errorf("opening plugin %s: %w", h.path, err)
	}
	mw, ok := raw.(pmw.Middleware)
	if !ok {
		client.Kill()
		h.fail(now)
		return nil, fmt.Errorf("plugin %s: unexpected type %T", h.path, raw)
	}
	h.client, h.mw, h.started = client, mw, now
	h.log.Info("middleware plugin started")
	return mw, nil
}

func (h *pluginHost) fail(now time.Time) {
	h.failures++
	wait := pluginMinBackoff << min(h.failures-1, 10)
	h.nextStart = now.Add(min(wait, pluginMaxBackoff))
}

func (h *pluginHost) kill() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	if h.client != nil {
		h.client.Kill()
		h.client, h.mw = nil, nil
	}
}

// pluginSet is the plugin processes of a reload lineage, by path.
type pluginSet struct {
	mu sync.Mutex
	m  map[string]*pluginHost
}

// Shutdown kills the chain lineage's plugin processes (worker shutdown).
// Call it after Wait; actions that still reach a plugin rule are denied.
func (c *Chain) Shutdown() {
	ps := c.shared.plugins
	ps.mu.Lock()
	hosts := make([]*pluginHost, 0, len(ps.m))
	for _, h := range ps.m {
		hosts = append(hosts, h)
	}
	ps.mu.Unlock()
	for _, h := range hosts {
		h.kill()
	}
}

// StartPlugins starts the chain's plugin processes now instead of on their
// first action, so a worker pays the start-up before its first client does
// and logs a broken plugin at once. A plugin that fails to start is retried
// on its next action (after the back-off); the error names every failure.
func (c *Chain) StartPlugins() error {
	ps := c.shared.plugins
	ps.mu.Lock()
	hosts := make([]*pluginHost, 0, len(ps.m))
	for _, h := range ps.m {
		hosts = append(hosts, h)
	}
	ps.mu.Unlock()
	var errs []error
	for _, h := range hosts {
		if _, err := h.get(c.now()); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
