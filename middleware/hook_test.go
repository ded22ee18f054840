package middleware

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// backend is a hook backend on 127.0.0.1 that records what it received.
type backend struct {
	*httptest.Server
	mu   sync.Mutex
	reqs []hookRequest
	hdrs []http.Header
}

func newBackend(t *testing.T, h func(w http.ResponseWriter, req hookRequest, r *http.Request)) *backend {
	t.Helper()
	b := &backend{}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req hookRequest
		body, _ := io.ReadAll(r.Body)
		if err := json.Unmarshal(body, &req); err != nil {
			http.Error(w, "bad json", 400)
			return
		}
		b.mu.Lock()
		b.reqs = append(b.reqs, req)
		b.hdrs = append(b.hdrs, r.Header.Clone())
		b.mu.Unlock()
		h(w, req, r)
	}))
	b.Server.Listener.Close()
	b.Server.Listener = l
	b.Start()
	t.Cleanup(b.Close)
	return b
}

func (b *backend) last() (hookRequest, http.Header) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.reqs) == 0 {
		return hookRequest{}, nil
	}
	return b.reqs[len(b.reqs)-1], b.hdrs[len(b.hdrs)-1]
}

func reply(w http.ResponseWriter, s string) {
	w.Header().Set("Content-Type", "application/json")
	io.WriteString(w, s)
}

func TestHook(t *testing.T) {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	be := newBackend(t, func(w http.ResponseWriter, req hookRequest, r *http.Request) {
		switch req.Channel {
		case "allow":
			reply(w, `{}`)
		case "deny":
			reply(w, `{"error":{"name":"NotMemberError","message":"not a member of the room"}}`)
		case "rewrite":
			reply(w, `{"result":{"data":{"text":"***","by":"`+req.User+`"}}}`)
		case "slow":
			select {
			case <-r.Context().Done():
			case <-release:
			}
		case "boom":
			http.Error(w, "internal", http.StatusInternalServerError)
		case "garbage":
			reply(w, `{"result":`)
		default:
			reply(w, `{}`)
		}
	})
	c := load(t, fmt.Sprintf(`
middleware:
  inbound:
    - hook: {url: %q, timeout: 100ms, headers: {X-Shoal-Key: k1}}
    - max_payload: 200
`, be.URL+"/hook"), Options{})
	s := user("s1", "10.0.0.7", "alice", map[string]any{"role": "ops"})
	tests := []struct {
		name    string
		channel string
		data    string
		verdict Verdict
		errName string
		errMsg  string
		newData string
	}{
		{"allow", "allow", `{"text":"hi"}`, Allow, "", "", ""},
		{"deny", "deny", `{"text":"hi"}`, Deny, "NotMemberError", "not a member of the room", ""},
		{"rewrite", "rewrite", `{"text":"darn"}`, Allow, "", "", `{"text":"***","by":"alice"}`},
		{"timeout", "slow", `1`, Deny, "BackendError", "The server could not process the publishIn request", ""},
		{"backend 500", "boom", `1`, Deny, "BackendError", "", ""},
		{"bad json", "garbage", `1`, Deny, "BackendError", "", ""},
		{"later rules still run", "allow", `"` + strings.Repeat("x", 300) + `"`, Deny, "PayloadTooLargeError", "", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := Input{Action: PublishIn, Socket: s, Channel: tc.channel, Data: []byte(tc.data)}
			d := c.Decide(context.Background(), &in)
			if d.Verdict != tc.verdict {
				t.Fatalf("verdict %v want %v: %+v", d.Verdict, tc.verdict, d)
			}
			if tc.errName != "" && d.Error.Name != tc.errName {
				t.Fatalf("error %+v want %s", d.Error, tc.errName)
			}
			if tc.errMsg != "" && d.Error.Message != tc.errMsg {
				t.Fatalf("message %q want %q", d.Error.Message, tc.errMsg)
			}
			if string(d.Data) != tc.newData {
				t.Fatalf("data %s want %s", d.Data, tc.newData)
			}
			if string(in.Data) != tc.data {
				t.Fatalf("the caller's input was changed to %s", in.Data)
			}
		})
	}
	req, hdr := be.last()
	if req.Action != "publish" || req.Client != "s1" || req.User != "alice" || req.RemoteAddr != "10.0.0.7" || req.Claims["role"] != "ops" {
		t.Fatalf("backend saw %+v", req)
	}
	if hdr.Get("X-Shoal-Key") != "k1" || hdr.Get("Content-Type") != "application/json" {
		t.Fatalf("headers %v", hdr)
	}
}

func TestHookAsync(t *testing.T) {
	gate := make(chan struct{})
	be := newBackend(t, func(w http.ResponseWriter, req hookRequest, r *http.Request) {
		<-gate
		if req.Channel == "rooms/1/deny" {
			reply(w, `{"error":{"message":"no"}}`)
			return
		}
		reply(w, `{}`)
	})
	c := load(t, fmt.Sprintf(`
middleware:
  inbound:
    - rate: {per_socket: 1000/s}
    - hook: {url: %q, timeout: 5s, channels: ["rooms/**"]}
`, be.URL), Options{})
	s := anon("s", "10.0.0.1")

	// A channel the hook does not cover is decided at once, synchronously.
	in := Input{Action: Subscribe, Socket: s, Channel: "lobby"}
	if _, pending := c.Run(&in, func(Decision) { t.Error("callback for a synchronous decision") }); pending {
		t.Fatal("uncovered channel went to the backend")
	}

	// A covered one returns pending at once; the read path is not held while
	// the backend thinks (it is blocked on gate here).
	got := make(chan Decision, 2)
	buf := []byte(`{"a":1}`)
	in = Input{Action: Subscribe, Socket: s, Channel: "rooms/1/deny", Data: buf}
	if _, pending := c.Run(&in, func(d Decision) { got <- d }); !pending {
		t.Fatal("not pending")
	}
	// The worker reuses its buffers after Run returns: the chain copied.
	copy(buf, `XXXXXXX`)
	in2 := Input{Action: Subscribe, Socket: s, Channel: "rooms/2"}
	if _, pending := c.Run(&in2, func(d Decision) { got <- d }); !pending {
		t.Fatal("not pending")
	}
	close(gate)
	var denied, allowed int
	for range 2 {
		select {
		case d := <-got:
			switch {
			case d.Verdict == Deny && d.Error.Name == "ForbiddenError" && d.Error.Message == "no":
				denied++
			case d.Verdict == Allow:
				allowed++
			default:
				t.Fatalf("unexpected %+v", d)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("callback never came")
		}
	}
	if denied != 1 || allowed != 1 {
		t.Fatalf("denied %d allowed %d", denied, allowed)
	}
	c.Wait()
	be.mu.Lock()
	defer be.mu.Unlock()
	for _, r := range be.reqs {
		if r.Channel == "rooms/1/deny" && string(r.Data) != `{"a":1}` {
			t.Fatalf("backend got data %s", r.Data)
		}
	}
}

func TestHookConnect(t *testing.T) {
	be := newBackend(t, func(w http.ResponseWriter, req hookRequest, r *http.Request) {
		switch {
		case req.RemoteAddr == "10.6.6.6":
			reply(w, `{"error":{"name":"BannedError","message":"go away","code":4503}}`)
		case req.Token == "":
			reply(w, `{"result":{"user":"guest-1","claims":{"sub":"guest-1","guest":true},"token":"signed.jwt.here"}}`)
		default:
			reply(w, `{}`)
		}
	})
	c := load(t, fmt.Sprintf("middleware:\n  handshake:\n    - hook: {url: %q, forward_headers: [cookie]}\n", be.URL), Options{})
	hdr := http.Header{"Cookie": {"session=abc"}, "X-Other": {"no"}}
	d := c.Decide(context.Background(), &Input{Action: HandshakeSC, Socket: anon("s", "10.0.0.1"), Header: hdr})
	if d.Verdict != Allow || d.Identity == nil || d.Identity.UserID != "guest-1" || d.Identity.Token != "signed.jwt.here" || d.Identity.Claims["guest"] != true {
		t.Fatalf("%+v", d)
	}
	if req, _ := be.last(); req.Action != "connect" || len(req.Headers) != 1 || req.Headers["Cookie"] != "session=abc" {
		t.Fatalf("backend saw %+v", req)
	}
	d = c.Decide(context.Background(), &Input{Action: HandshakeSC, Socket: anon("s", "10.6.6.6")})
	if d.Verdict != Deny || d.CloseCode != 4503 {
		t.Fatalf("%+v", d)
	}
	if got := string(d.Error.AppendJSON(nil)); got != `{"message":"go away","name":"BannedError","statusCode":4503}` {
		t.Fatalf("error JSON %s", got)
	}
}

func TestRPC(t *testing.T) {
	be := newBackend(t, func(w http.ResponseWriter, req hookRequest, r *http.Request) {
		switch req.Method {
		case "user.get":
			reply(w, `{"result":{"data":{"id":`+string(req.Data)+`,"name":"Ann"}}}`)
		case "user.fail":
			reply(w, `{"error":{"name":"NotFoundError","message":"no such user"}}`)
		case "user.void":
			reply(w, `{"result":{}}`)
		default:
			http.Error(w, "nope", http.StatusBadGateway)
		}
	})
	c := load(t, fmt.Sprintf(`
middleware:
  inbound:
    - rpc: {url: %q, procedures: ["user.*"], error: {name: RPCError, message: "{procedure} failed"}}
`, be.URL), Options{})
	s := anon("s", "10.0.0.1")
	tests := []struct {
		proc    string
		verdict Verdict
		reply   string
		errName string
		errMsg  string
	}{
		{"user.get", Allow, `{"id":7,"name":"Ann"}`, "", ""},
		{"user.fail", Deny, "", "NotFoundError", "no such user"},
		{"user.void", Allow, "null", "", ""},
		{"user.broken", Deny, "", "RPCError", "user.broken failed"},
		{"other", Allow, "", "", ""}, // not ours: the worker handles it
	}
	for _, tc := range tests {
		t.Run(tc.proc, func(t *testing.T) {
			d := c.Decide(context.Background(), &Input{Action: Invoke, Socket: s, Event: tc.proc, Data: []byte("7")})
			if d.Verdict != tc.verdict || string(d.Reply) != tc.reply {
				t.Fatalf("got %v reply %s: %+v", d.Verdict, d.Reply, d)
			}
			if tc.errName != "" && (d.Error.Name != tc.errName || d.Error.Message != tc.errMsg) {
				t.Fatalf("error %+v", d.Error)
			}
		})
	}
}

func TestHookMaxInflight(t *testing.T) {
	gate := make(chan struct{})
	arrived := make(chan struct{}, 1)
	be := newBackend(t, func(w http.ResponseWriter, req hookRequest, r *http.Request) {
		arrived <- struct{}{}
		<-gate
		reply(w, `{}`)
	})
	c := load(t, fmt.Sprintf("middleware:\n  inbound:\n    - hook: {url: %q, max_inflight: 1, timeout: 10s}\n", be.URL), Options{})
	s := anon("s", "10.0.0.1")
	first := make(chan Decision, 1)
	in := Input{Action: PublishIn, Socket: s, Channel: "a"}
	if _, pending := c.Run(&in, func(d Decision) { first <- d }); !pending {
		t.Fatal("not pending")
	}
	<-arrived // the backend holds the only slot
	second := make(chan Decision, 1)
	c.Run(&in, func(d Decision) { second <- d })
	if d := <-second; d.Verdict != Deny || d.Error.Name != "BackendError" {
		t.Fatalf("second call while busy: %+v", d)
	}
	close(gate)
	if d := <-first; d.Verdict != Allow {
		t.Fatalf("first: %+v", d)
	}
	c.Wait()
}
