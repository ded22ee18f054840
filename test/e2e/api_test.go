package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/shoalhq/shoal/client"
	"github.com/shoalhq/shoal/webhook"
)

// Secrets the realtime cluster's children get through the environment.
const (
	testAPIKey        = "e2e-api-key-0123456789"
	testAuthKey       = "e2e-auth-key-0123456789abcdef"
	testWebhookSecret = "e2e-webhook-secret"
)

// startRealtimeCluster runs `shoal run` with two workers, two brokers,
// history/presence channels, the server API and (if hookURL is set)
// webhooks, the secrets passed in the environment.
func startRealtimeCluster(t *testing.T, hookURL string) *cluster {
	t.Helper()
	c := &cluster{t: t, public: freePort(t), admin: freePort(t), stdout: &syncBuffer{}, stderr: &syncBuffer{}, waited: make(chan error, 1)}
	dir := t.TempDir()
	hooks := ""
	if hookURL != "" {
		hooks = fmt.Sprintf("webhooks:\n  url: %q\n  secret_env: SHOAL_WEBHOOK_SECRET\n", hookURL)
	}
	cfg := fmt.Sprintf(`cluster:
  workers: 2
  brokers: 2
  gossip: 127.0.0.1:0
  restart: {backoff_min: 100ms, backoff_max: 1s}
listen:
  public: %s
  admin: %s
auth:
  jwt: {algorithms: [HS256], key_env: SHOAL_AUTH_KEY}
channels:
  - match: "chat/**"
    history: {size: 100, ttl: 1h}
    presence: true
    join_leave: true
    recover: 120s
api:
  key_env: SHOAL_API_KEY
%sstorage:
  dir: %s
log:
  level: info
`, c.public, c.admin, hooks, filepath.Join(dir, "data"))
	c.cfgPath = filepath.Join(dir, "shoal.yaml")
	if err := os.WriteFile(c.cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	c.cmd = exec.Command(shoalBin, "run", "-c", c.cfgPath)
	c.cmd.Env = append(os.Environ(), "SHOAL_API_KEY="+testAPIKey, "SHOAL_AUTH_KEY="+testAuthKey, "SHOAL_WEBHOOK_SECRET="+testWebhookSecret)
	c.cmd.Stdout, c.cmd.Stderr = c.stdout, c.stderr
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { c.waited <- c.cmd.Wait() }()
	t.Cleanup(func() {
		if !c.exited {
			_ = c.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case err := <-c.waited:
				c.exited, c.exitErr = true, err
			case <-time.After(15 * time.Second):
				_ = c.cmd.Process.Kill()
				c.wait(30 * time.Second)
			}
		}
		if t.Failed() {
			logs, _, _ := shoal(t, "logs", "-c", c.cfgPath, "-n", "80")
			t.Logf("shoal run stdout:\n%s\nlast log lines:\n%s", c.stdout, logs)
		}
	})
	c.waitReady(20 * time.Second)
	return c
}

// userToken signs a token for sub with the cluster's auth key.
func userToken(t *testing.T, sub string) string {
	t.Helper()
	s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": sub, "exp": time.Now().Add(time.Hour).Unix()}).SignedString([]byte(testAuthKey))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

var apiHTTP = &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// callAPI POSTs body to the server API through the balancer and decodes
// the answer into out (may be nil); it returns the HTTP status.
func callAPI(t *testing.T, public, method string, body any, out any) int {
	t.Helper()
	st, err := tryAPI(t, public, method, body, out)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// tryAPI is callAPI that returns a transport error instead of failing (a
// request the balancer sent to a worker that was just killed is reset).
func tryAPI(t *testing.T, public, method string, body any, out any) (int, error) {
	t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		return 0, err
	}
	req, err := http.NewRequest(http.MethodPost, "http://"+public+"/api/v1/"+method, bytes.NewReader(b))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-API-Key", testAPIKey)
	resp, err := apiHTTP.Do(req)
	if err != nil {
		return 0, fmt.Errorf("API %s: %w", method, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, fmt.Errorf("API %s: reading the answer: %w", method, err)
	}
	if out != nil && resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(raw, out); err != nil {
			return 0, fmt.Errorf("API %s: %s: %w", method, raw, err)
		}
	}
	if resp.StatusCode != http.StatusOK {
		t.Logf("API %s answered %d: %s", method, resp.StatusCode, raw)
	}
	return resp.StatusCode, nil
}

// hookSink is the webhook receiver: it checks every signature and keeps
// the events.
type hookSink struct {
	mu     sync.Mutex
	events []map[string]any
	bad    int
}

func (h *hookSink) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := webhook.Verify([]byte(testWebhookSecret), r.Header.Get("X-Shoal-Timestamp"), r.Header.Get("X-Shoal-Signature"), body, 5*time.Minute, time.Now()); err != nil {
		h.bad++
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	var batch struct {
		Events []map[string]any `json:"events"`
	}
	if err := json.Unmarshal(body, &batch); err != nil {
		h.bad++
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	h.events = append(h.events, batch.Events...)
}

// has reports whether an event of typ about key (channel or user) arrived.
func (h *hookSink) has(typ, key string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, e := range h.events {
		if e["type"] == typ && (e["channel"] == key || e["user"] == key) {
			return true
		}
	}
	return false
}

// count is the number of events of typ about key.
func (h *hookSink) count(typ, key string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, e := range h.events {
		if e["type"] == typ && (e["channel"] == key || e["user"] == key) {
			n++
		}
	}
	return n
}

// last is the type of the latest event about key (channel or user), "" if
// none.
func (h *hookSink) last(key string) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i := len(h.events) - 1; i >= 0; i-- {
		if e := h.events[i]; e["channel"] == key || e["user"] == key {
			typ, _ := e["type"].(string)
			return typ
		}
	}
	return ""
}

// closeWatch records the error a client's connection ended with.
type closeWatch struct {
	mu  sync.Mutex
	err error
}

func (w *closeWatch) set(err error) { w.mu.Lock(); w.err = err; w.mu.Unlock() }
func (w *closeWatch) get() error    { w.mu.Lock(); defer w.mu.Unlock(); return w.err }

// events collects a client's non-publish events (#presence, #recovery).
type events struct {
	mu   sync.Mutex
	list []string
}

func (e *events) add(ev string, data json.RawMessage) {
	e.mu.Lock()
	e.list = append(e.list, ev+" "+string(data))
	e.mu.Unlock()
}

func (e *events) contains(sub ...string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
next:
	for _, l := range e.list {
		for _, s := range sub {
			if !strings.Contains(l, s) {
				continue next
			}
		}
		return true
	}
	return false
}

// dialUser connects a Go client as user through the balancer.
func dialUser(t *testing.T, public, user string) (*client.Client, *closeWatch, *events) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cw, ev := &closeWatch{}, &events{}
	cl, err := client.Dial(ctx, "ws://"+public+"/socketcluster/", client.Options{
		AuthToken: userToken(t, user),
		OnClose:   cw.set,
		OnEvent:   ev.add,
	})
	if err != nil {
		t.Fatalf("dialing as %s: %v", user, err)
	}
	t.Cleanup(func() { cl.Close() })
	if !cl.Handshake().IsAuthenticated {
		t.Fatalf("%s: handshake not authenticated: %s", user, cl.Handshake().AuthError)
	}
	return cl, cw, ev
}

// member is a Go client subscribed to a presence channel, with the worker
// that hosts it (read from its own #presence join event, which carries the
// presence entry).
type member struct {
	cl     *client.Client
	sub    *client.Subscription
	closed *closeWatch
	ev     *events
	worker string
}

// joinOn connects user and subscribes to channel (a join_leave channel),
// redialling (at most 10 times) while the balancer puts it on avoid: the
// balancer's least-connections choice works from load figures that lag, so
// two quick connections may share a worker.
func joinOn(t *testing.T, ctx context.Context, public, user, channel, avoid string) member {
	t.Helper()
	for attempt := 0; attempt < 10; attempt++ {
		cl, cw, ev := dialUser(t, public, user)
		sub, err := cl.Subscribe(ctx, channel, 64)
		if err != nil {
			t.Fatalf("%s subscribing to %s: %v", user, channel, err)
		}
		var worker string
		waitFor(t, 5*time.Second, user+"'s own #presence join", func() bool {
			worker = ev.joinWorker(user)
			return worker != ""
		})
		if worker != avoid {
			return member{cl: cl, sub: sub, closed: cw, ev: ev, worker: worker}
		}
		cl.Close()
	}
	t.Fatalf("%s: the balancer kept choosing %s", user, avoid)
	return member{}
}

// joinWorker returns the worker of user's join event ("" if none yet).
func (e *events) joinWorker(user string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, l := range e.list {
		ev, data, _ := strings.Cut(l, " ")
		if ev != "#presence" {
			continue
		}
		var p struct {
			Join *struct {
				User   string `json:"user"`
				Worker string `json:"worker"`
			} `json:"join"`
		}
		if json.Unmarshal([]byte(data), &p) == nil && p.Join != nil && p.Join.User == user {
			return p.Join.Worker
		}
	}
	return ""
}

func recvMsg(t *testing.T, sub *client.Subscription, what string) client.Message {
	t.Helper()
	select {
	case m := <-sub.C:
		return m
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: no message within 5 s", what)
		return client.Message{}
	}
}

type presenceAnswer struct {
	Presence map[string]struct {
		Client string `json:"client"`
		User   string `json:"user"`
	} `json:"presence"`
}

func presenceUsers(t *testing.T, public, channel string) []string {
	t.Helper()
	var p presenceAnswer
	if st, err := tryAPI(t, public, "presence", map[string]any{"channel": channel}, &p); err != nil || st != http.StatusOK {
		return []string{"(no answer)"} // polled again
	}
	var users []string
	for _, e := range p.Presence {
		users = append(users, e.User)
	}
	return users
}

func sameUsers(got []string, want ...string) bool {
	if len(got) != len(want) {
		return false
	}
	seen := map[string]int{}
	for _, u := range got {
		seen[u]++
	}
	for _, u := range want {
		seen[u]--
	}
	for _, n := range seen {
		if n != 0 {
			return false
		}
	}
	return true
}

// TestServerAPI runs the server API, presence, cluster-wide user actions,
// bans and webhooks against one real cluster (two workers, two brokers),
// then SIGKILLs a worker and checks that its presence entries go.
func TestServerAPI(t *testing.T) {
	sink := &hookSink{}
	hs := httptest.NewServer(sink)
	defer hs.Close()
	c := startRealtimeCluster(t, hs.URL+"/events")
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	const ch = "chat/lobby"

	// Two users, one per worker.
	a := joinOn(t, ctx, c.public, "alice", ch, "")
	b := joinOn(t, ctx, c.public, "bob", ch, a.worker)
	alice, aliceClosed, aliceEv, aSub := a.cl, a.closed, a.ev, a.sub
	bobClosed, bSub := b.closed, b.sub
	t.Logf("alice on %s, bob on %s", a.worker, b.worker)

	t.Run("publish", func(t *testing.T) {
		var pos struct {
			Offset uint64 `json:"offset"`
			Epoch  string `json:"epoch"`
		}
		if st := callAPI(t, c.public, "publish", map[string]any{"channel": ch, "data": map[string]any{"text": "hello"}}, &pos); st != http.StatusOK {
			t.Fatalf("publish: %d", st)
		}
		if pos.Offset == 0 || pos.Epoch == "" {
			t.Fatalf("publish answered no position: %+v", pos)
		}
		for name, sub := range map[string]*client.Subscription{"alice": aSub, "bob": bSub} {
			m := recvMsg(t, sub, name)
			if string(m.Data) != `{"text":"hello"}` || m.Offset != pos.Offset || m.Epoch != pos.Epoch {
				t.Fatalf("%s got %s offset %d epoch %q; want the API's publish at %d/%s", name, m.Data, m.Offset, m.Epoch, pos.Offset, pos.Epoch)
			}
		}
		var hist struct {
			Publications []struct {
				Offset uint64          `json:"offset"`
				Data   json.RawMessage `json:"data"`
			} `json:"publications"`
			Offset uint64 `json:"offset"`
			Epoch  string `json:"epoch"`
		}
		if st := callAPI(t, c.public, "history", map[string]any{"channel": ch}, &hist); st != http.StatusOK {
			t.Fatalf("history: %d", st)
		}
		last := hist.Publications[len(hist.Publications)-1]
		if last.Offset != pos.Offset || string(last.Data) != `{"text":"hello"}` || hist.Epoch != pos.Epoch {
			t.Fatalf("history: %+v; want the publish at %d", hist, pos.Offset)
		}
	})

	t.Run("presence", func(t *testing.T) {
		waitFor(t, 5*time.Second, "alice and bob in presence", func() bool {
			return sameUsers(presenceUsers(t, c.public, ch), "alice", "bob")
		})
		var st struct {
			NumClients int `json:"num_clients"`
			NumUsers   int `json:"num_users"`
		}
		if code := callAPI(t, c.public, "presence_stats", map[string]any{"channel": ch}, &st); code != http.StatusOK || st.NumClients != 2 || st.NumUsers != 2 {
			t.Fatalf("presence_stats: %d %+v", code, st)
		}
		// join_leave: alice (subscribed first) was told bob joined.
		waitFor(t, 5*time.Second, "alice's #presence join event for bob", func() bool {
			return aliceEv.contains("#presence", `"join"`, `"user":"bob"`)
		})
		var chans struct {
			Channels map[string]struct {
				NumClients int `json:"num_clients"`
			} `json:"channels"`
		}
		if code := callAPI(t, c.public, "channels", map[string]any{"pattern": "chat/**"}, &chans); code != http.StatusOK || chans.Channels[ch].NumClients != 2 {
			t.Fatalf("channels: %d %+v", code, chans)
		}
	})

	t.Run("webhooks online", func(t *testing.T) {
		// Waited for before the disconnects: within the sender's 1 s
		// debounce an occupied+vacated pair would cancel out.
		waitFor(t, 10*time.Second, "channel.occupied and user.online webhooks", func() bool {
			return sink.has("channel.occupied", ch) && sink.has("user.online", "alice") && sink.has("user.online", "bob")
		})
		// Cluster-wide meaning: bob's worker saw alice's worker already
		// had the channel, so the channel became occupied once.
		if n := sink.count("channel.occupied", ch); n != 1 {
			t.Fatalf("channel.occupied %s sent %d times; want once for the cluster", ch, n)
		}
	})

	t.Run("webhooks for users moving between workers", func(t *testing.T) {
		// Each user leaves one worker and is back on the other within the
		// sender's debounce: the first worker's online+offline pair cancels
		// out, so the second worker must report the user online. (Counting
		// the other workers in a request separate from the join lost that
		// event when the counts interleaved; worker/clusterevents.go.)
		const moves = "chat/moves"
		var users []string
		for i := range 4 {
			u := "mover-" + strconv.Itoa(i)
			first := joinOn(t, ctx, c.public, u, moves, "")
			first.cl.Close()
			joinOn(t, ctx, c.public, u, moves, first.worker)
			users = append(users, u)
		}
		waitFor(t, 10*time.Second, "user.online for every user that moved", func() bool {
			for _, u := range users {
				if sink.last(u) != "user.online" {
					return false
				}
			}
			return true
		})
	})

	t.Run("internal channels refused", func(t *testing.T) {
		var ce *client.Error
		if _, err := alice.Subscribe(ctx, "#user/bob", 1); !errors.As(err, &ce) || ce.Name != "InvalidActionError" {
			t.Fatalf("subscribe #user/bob: %v; want InvalidActionError", err)
		}
		if err := alice.Publish(ctx, "#bans", map[string]any{"op": "ban"}); !errors.As(err, &ce) || ce.Name != "InvalidActionError" {
			t.Fatalf("publish #bans: %v; want InvalidActionError", err)
		}
	})

	t.Run("push_token and kick across workers", func(t *testing.T) {
		// One call per user: alice and bob are on different workers, so
		// one of each pair reaches a user on another worker.
		for _, u := range []struct {
			name string
			cl   *client.Client
		}{{"alice", a.cl}, {"bob", b.cl}} {
			old := u.cl.Token()
			var res struct {
				Sessions int `json:"sessions"`
			}
			if st := callAPI(t, c.public, "push_token", map[string]any{"user": u.name, "claims": map[string]any{"role": "moderator"}}, &res); st != http.StatusOK || res.Sessions != 1 {
				t.Fatalf("push_token %s: %d %+v", u.name, st, res)
			}
			waitFor(t, 5*time.Second, u.name+"'s new token", func() bool { return u.cl.Token() != "" && u.cl.Token() != old })
		}
		var res struct {
			Unsubscribed int `json:"unsubscribed"`
		}
		if st := callAPI(t, c.public, "kick", map[string]any{"user": "bob", "channel": ch, "reason": "off topic"}, &res); st != http.StatusOK || res.Unsubscribed != 1 {
			t.Fatalf("kick bob: %d %+v", st, res)
		}
		waitFor(t, 5*time.Second, "bob's #kickOut", func() bool { return b.ev.contains("#kickOut", "off topic") })
		waitFor(t, 5*time.Second, "only alice in presence after the kick", func() bool {
			return sameUsers(presenceUsers(t, c.public, ch), "alice")
		})
	})

	t.Run("disconnect across workers", func(t *testing.T) {
		// alice and bob are on different workers, so whichever worker
		// serves these calls, one of them targets another worker.
		for _, u := range []struct {
			name string
			w    *closeWatch
		}{{"alice", aliceClosed}, {"bob", bobClosed}} {
			var res struct {
				Disconnected int `json:"disconnected"`
			}
			if st := callAPI(t, c.public, "disconnect", map[string]any{"user": u.name, "code": 4403, "reason": "bye"}, &res); st != http.StatusOK {
				t.Fatalf("disconnect %s: %d", u.name, st)
			}
			if res.Disconnected != 1 {
				t.Fatalf("disconnect %s: %d sessions; want 1", u.name, res.Disconnected)
			}
			waitFor(t, 5*time.Second, u.name+" closed with 4403", func() bool {
				var ce *client.CloseError
				return errors.As(u.w.get(), &ce) && ce.Code == 4403
			})
		}
		waitFor(t, 5*time.Second, "presence empty after the disconnects", func() bool {
			return sameUsers(presenceUsers(t, c.public, ch))
		})
	})

	t.Run("ban", func(t *testing.T) {
		if st := callAPI(t, c.public, "ban", map[string]any{"user": "mallory", "reason": "spam"}, nil); st != http.StatusOK {
			t.Fatalf("ban: %d", st)
		}
		// Several times: the balancer spreads them over both workers (not
		// deterministically), and the ban must hold on each (it reached
		// the other workers over #bans).
		for i := 0; i < 4; i++ {
			waitFor(t, 5*time.Second, "mallory refused at the handshake", func() bool {
				dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
				defer dcancel()
				cl, err := client.Dial(dctx, "ws://"+c.public+"/socketcluster/", client.Options{AuthToken: userToken(t, "mallory")})
				if err == nil {
					cl.Close()
					return false
				}
				return strings.Contains(err.Error(), "spam") || strings.Contains(err.Error(), "4403") || strings.Contains(err.Error(), "Banned")
			})
		}
	})

	t.Run("webhooks offline", func(t *testing.T) {
		waitFor(t, 10*time.Second, "user.offline and channel.vacated webhooks", func() bool {
			return sink.has("user.offline", "alice") && sink.has("user.offline", "bob") && sink.has("channel.vacated", ch)
		})
		if n := sink.count("channel.vacated", ch); n != 1 {
			t.Fatalf("channel.vacated %s sent %d times; want once for the cluster", ch, n)
		}
		sink.mu.Lock()
		bad := sink.bad
		sink.mu.Unlock()
		if bad != 0 {
			t.Fatalf("%d webhook requests with a bad signature or body", bad)
		}
	})

	t.Run("no presence ghosts after SIGKILL of a worker", func(t *testing.T) {
		// carol and dave on different workers, both on the channel.
		carol := joinOn(t, ctx, c.public, "carol", ch, "")
		dave := joinOn(t, ctx, c.public, "dave", ch, carol.worker)
		waitFor(t, 5*time.Second, "carol and dave in presence", func() bool {
			return sameUsers(presenceUsers(t, c.public, ch), "carol", "dave")
		})
		victim := c.proc(carol.worker)
		if err := syscall.Kill(victim.Pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		killed := time.Now()
		waitFor(t, 10*time.Second, "only dave left in presence", func() bool {
			return sameUsers(presenceUsers(t, c.public, ch), "dave")
		})
		if carol.closed.get() == nil {
			// The kernel closed the killed worker's socket; the client may
			// notice a moment later.
			waitFor(t, 5*time.Second, "carol's connection to end", func() bool { return carol.closed.get() != nil })
		}
		if dave.closed.get() != nil {
			t.Fatalf("dave, on the surviving worker, lost his connection: %v", dave.closed.get())
		}
		t.Logf("presence without the killed worker's entry %s after SIGKILL", time.Since(killed).Round(time.Millisecond))
	})
}
