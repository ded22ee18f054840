package middleware

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/shoalhq/shoal/proto/sc"
)

// Backend hooks, after Centrifugo's proxies: the worker POSTs the action as
// JSON to a backend and the backend's JSON reply decides. One attempt, no
// retries: a backend that fails or answers late gets the action denied with
// a clear error (the rule's `error`, default BackendError).

// hookRequest is the JSON body a backend receives.
type hookRequest struct {
	Action     string            `json:"action"` // connect, subscribe, publish, rpc, transmit, authenticate, publish_out, handshake_ws
	Client     string            `json:"client,omitempty"`
	RemoteAddr string            `json:"remote_addr,omitempty"`
	User       string            `json:"user,omitempty"`
	Claims     map[string]any    `json:"claims,omitempty"`
	Channel    string            `json:"channel,omitempty"`
	Method     string            `json:"method,omitempty"` // invoke procedure / transmit event
	Data       json.RawMessage   `json:"data,omitempty"`
	Token      string            `json:"token,omitempty"`
	Origin     string            `json:"origin,omitempty"`
	Query      string            `json:"query,omitempty"`
	Headers    map[string]string `json:"headers,omitempty"` // forward_headers present in the upgrade request
}

// hookReply is what a backend answers: result to allow (optionally with
// data, identity), or error to deny. An empty object allows.
type hookReply struct {
	Result *struct {
		Data   json.RawMessage `json:"data"`
		User   string          `json:"user"`
		Claims map[string]any  `json:"claims"`
		Token  string          `json:"token"`
	} `json:"result"`
	Error *struct {
		Name    string `json:"name"`
		Message string `json:"message"`
		Code    int    `json:"code"`   // close code for a denied connect (4000-4999)
		Status  int    `json:"status"` // HTTP status for a denied handshake_ws
	} `json:"error"`
}

var hookActionNames = [numActions]string{
	HandshakeWS: "handshake_ws", HandshakeSC: "connect", Transmit: "transmit", Invoke: "rpc",
	Subscribe: "subscribe", PublishIn: "publish", Authenticate: "authenticate", PublishOut: "publish_out",
}

// maxHookReply bounds what is read from a backend.
const maxHookReply = 4 << 20

type hookRule struct {
	url      string
	timeout  time.Duration
	headers  map[string]string
	forward  []string  // upgrade request headers passed to the backend
	channels []pattern // only these channels go to the backend (empty: all)
	methods  []string  // rpc: only these procedures ("x*" = prefix); empty: all
	rpc      bool      // the reply answers the invoke
	failErr  errSpec

	// maxInflight bounds calls under way: past it the action is denied at
	// once, so a flood cannot pile up goroutines waiting on a slow backend.
	maxInflight int64
	inflight    atomic.Int64
}

const defaultMaxInflight = 1000

func buildHook(b *builder, v any) (rule, []Action) {
	r, o := readHookCommon(b, v, 2*time.Second)
	if r == nil {
		return nil, nil
	}
	defActs := map[Stage][]Action{
		StageHandshake: {HandshakeSC},
		StageInbound:   {Subscribe, PublishIn},
		StageOutbound:  {PublishOut},
	}[b.stage]
	acts := defActs
	if a, ok := o.actions("actions", b.stage, stageActions[b.stage]); ok {
		acts = a
	}
	if cl, ok := o.strList("channels"); ok {
		for i, s := range cl {
			p, err := compilePattern(s)
			if err != nil {
				b.p.add(fmt.Sprintf("%s[%d]", o.sub("channels"), i), "%v", err)
				continue
			}
			r.channels = append(r.channels, p)
		}
	}
	o.finish("url", "timeout", "headers", "forward_headers", "max_inflight", "actions", "channels", "error")
	return r, acts
}

func buildRPC(b *builder, v any) (rule, []Action) {
	if b.stage != StageInbound {
		b.p.add(b.key, "rpc answers invokes: put it in middleware.inbound")
		return nil, nil
	}
	r, o := readHookCommon(b, v, 5*time.Second)
	if r == nil {
		return nil, nil
	}
	r.rpc = true
	if ml, ok := o.strList("procedures"); ok {
		r.methods = ml
	}
	o.finish("url", "timeout", "headers", "forward_headers", "max_inflight", "procedures", "error")
	return r, []Action{Invoke}
}

func readHookCommon(b *builder, v any, defTimeout time.Duration) (*hookRule, *opts) {
	o, ok := newOpts(b.p, b.key, v)
	if !ok {
		return nil, nil
	}
	r := &hookRule{timeout: defTimeout, maxInflight: defaultMaxInflight,
		failErr: newErrSpec("BackendError", "The server could not process the {action} request", 503)}
	if u, ok := o.str("url"); ok {
		pu, err := url.Parse(u)
		if err != nil || (pu.Scheme != "http" && pu.Scheme != "https") || pu.Host == "" {
			b.p.add(o.sub("url"), "expected an http:// or https:// URL, got %q", u)
		}
		r.url = u
	} else {
		b.p.add(o.sub("url"), "must be set")
	}
	if d, ok := o.duration("timeout"); ok {
		if d <= 0 {
			b.p.add(o.sub("timeout"), "must be positive")
		}
		r.timeout = d
	}
	if hv, ok := o.get("headers"); ok {
		hm, isMap := asMap(hv)
		if !isMap {
			b.p.add(o.sub("headers"), "expected a mapping of header: value, got %s", describe(hv))
		}
		r.headers = map[string]string{}
		for k, val := range hm {
			s, isStr := val.(string)
			if !isStr {
				b.p.add(o.sub("headers")+"."+k, "expected a string")
				continue
			}
			r.headers[k] = s
		}
	}
	if n, ok := o.intv("max_inflight"); ok {
		if n < 1 {
			b.p.add(o.sub("max_inflight"), "must be at least 1")
		}
		r.maxInflight = n
	}
	if fh, ok := o.strList("forward_headers"); ok {
		for _, h := range fh {
			r.forward = append(r.forward, http.CanonicalHeaderKey(h))
		}
	}
	r.failErr = readErrSpec(o, r.failErr)
	return r, o
}

func (r *hookRule) wants(in *Input) bool {
	if len(r.channels) > 0 {
		found := false
		for i := range r.channels {
			if r.channels[i].match(in.Channel, nil, false) {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	if len(r.methods) > 0 {
		for _, m := range r.methods {
			if m == in.Event || strings.HasSuffix(m, "*") && strings.HasPrefix(in.Event, m[:len(m)-1]) {
				return true
			}
		}
		return false
	}
	return true
}

// check is the synchronous form (used when nobody gave Run a callback).
func (r *hookRule) check(c *Chain, in *Input) (Decision, bool) {
	return r.call(context.Background(), c, in)
}

func (r *hookRule) call(ctx context.Context, c *Chain, in *Input) (Decision, bool) {
	if !r.wants(in) {
		return Decision{}, false
	}
	if r.inflight.Add(1) > r.maxInflight {
		r.inflight.Add(-1)
		if ok, suppressed := c.logLim.Allow(c.now()); ok {
			c.log.Warn("middleware hook busy", "url", r.url, "max_inflight", r.maxInflight, "suppressed", suppressed)
		}
		return r.failErr.decide(in), true
	}
	defer r.inflight.Add(-1)
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	reply, err := r.post(ctx, c, in)
	if err != nil {
		// Limited like deny lines: a dead backend under load must not
		// flood the central log.
		if ok, suppressed := c.logLim.Allow(c.now()); ok {
			c.log.Warn("middleware hook failed", "url", r.url, "action", in.Action.String(), "error", err, "suppressed", suppressed)
		}
		return r.failErr.decide(in), true
	}
	if e := reply.Error; e != nil {
		spec := errSpec{name: e.Name, status: e.Status, code: e.Code}
		if spec.name == "" {
			spec.name = "ForbiddenError"
		}
		msg := e.Message
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
		return spec.decide(in), true
	}
	var d Decision
	if res := reply.Result; res != nil {
		if res.Data != nil {
			if r.rpc {
				d.Reply = res.Data
			} else {
				d.Data = res.Data
			}
		}
		if (in.Action == HandshakeSC || in.Action == Authenticate) && (res.User != "" || res.Claims != nil || res.Token != "") {
			d.Identity = &Identity{UserID: res.User, Claims: res.Claims, Token: res.Token}
		}
	}
	if r.rpc {
		// The backend answered the procedure: the chain stops here.
		if d.Reply == nil {
			d.Reply = []byte("null")
		}
		return d, true
	}
	return d, false
}

func (r *hookRule) post(ctx context.Context, c *Chain, in *Input) (*hookReply, error) {
	req := hookRequest{
		Action:  hookActionNames[in.Action],
		Channel: in.Channel,
		Method:  in.Event,
		Token:   in.Token,
		Origin:  in.Origin,
		Query:   in.Query,
	}
	if len(in.Data) > 0 && json.Valid(in.Data) {
		req.Data = in.Data
	}
	if ip := in.ip(); ip.IsValid() {
		req.RemoteAddr = ip.Unmap().String()
	}
	for _, h := range r.forward {
		if v := in.Header.Get(h); v != "" {
			if req.Headers == nil {
				req.Headers = map[string]string{}
			}
			req.Headers[h] = v
		}
	}
	if s := in.Socket; s != nil {
		req.Client, req.User, req.Claims = s.ID, s.UserID, s.Claims
	}
	body, err := json.Marshal(&req)
	if err != nil {
		return nil, fmt.Errorf("encoding hook request: %w", err)
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, r.url, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("building hook request: %w", err)
	}
	hr.Header.Set("Content-Type", "application/json")
	keys := make([]string, 0, len(r.headers))
	for k := range r.headers {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		hr.Header.Set(k, r.headers[k])
	}
	resp, err := c.client.Do(hr)
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, fmt.Errorf("no answer within %s: %w", r.timeout, err)
		}
		return nil, fmt.Errorf("calling backend: %w", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxHookReply+1))
	if err != nil {
		return nil, fmt.Errorf("reading backend reply: %w", err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return nil, fmt.Errorf("backend answered HTTP %d", resp.StatusCode)
	}
	if len(data) > maxHookReply {
		return nil, fmt.Errorf("backend reply larger than %d bytes", maxHookReply)
	}
	var reply hookReply
	if len(bytes.TrimSpace(data)) == 0 {
		return &reply, nil
	}
	if err := json.Unmarshal(data, &reply); err != nil {
		return nil, fmt.Errorf("decoding backend reply: %w", err)
	}
	return &reply, nil
}
