package e2e

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/shoalhq/shoal/client"
)

// dialWithClaims connects a Go client with a token carrying claims.
func dialWithClaims(t *testing.T, public string, claims jwt.MapClaims) *client.Client {
	t.Helper()
	claims["exp"] = time.Now().Add(time.Hour).Unix()
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(testAuthKey))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := client.Dial(ctx, "ws://"+public+"/socketcluster/", client.Options{AuthToken: tok})
	if err != nil {
		t.Fatalf("dialing as %v: %v", claims["sub"], err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// TestPresenceInfoAndSocketCounts: the channel list counts subscribed
// sockets (not workers) on channels without presence; presence entries
// carry the token's "info" claim as conn_info; update_info replaces it on
// every worker; user_channels lists a user's presence channels.
func TestPresenceInfoAndSocketCounts(t *testing.T) {
	c := startRealtimeCluster(t, "")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	const plain, pres = "room/plain", "chat/info"
	type user struct {
		cl   *client.Client
		subs map[string]*client.Subscription
	}
	users := map[string]*user{}
	for _, u := range []struct {
		name  string
		info  any
		chans []string
	}{
		{"alice", map[string]any{"device": "ios"}, []string{plain, pres}},
		{"bob", nil, []string{plain, pres}},
		{"carol", "web", []string{plain}},
		{"dave", nil, []string{plain}},
	} {
		claims := jwt.MapClaims{"sub": u.name}
		if u.info != nil {
			claims["info"] = u.info
		}
		x := &user{cl: dialWithClaims(t, c.public, claims), subs: map[string]*client.Subscription{}}
		for _, ch := range u.chans {
			s, err := x.cl.Subscribe(ctx, ch, 16)
			if err != nil {
				t.Fatalf("%s subscribing to %s: %v", u.name, ch, err)
			}
			x.subs[ch] = s
		}
		users[u.name] = x
	}

	numClients := func() map[string]int {
		var ans struct {
			Channels map[string]struct {
				NumClients int `json:"num_clients"`
			} `json:"channels"`
		}
		if st, err := tryAPI(t, c.public, "channels", map[string]any{}, &ans); err != nil || st != http.StatusOK {
			return nil
		}
		out := map[string]int{}
		for ch, v := range ans.Channels {
			out[ch] = v.NumClients
		}
		return out
	}
	var got map[string]int
	waitFor(t, 10*time.Second, "socket counts 4 and 2", func() bool {
		got = numClients()
		return got[plain] == 4 && got[pres] == 2
	})
	if err := users["dave"].cl.Unsubscribe(plain); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "socket count 3 after an unsubscribe", func() bool {
		got = numClients()
		return got[plain] == 3 && got[pres] == 2
	})
	for ch := range got {
		if ch != plain && ch != pres {
			t.Errorf("channel list has %q (internal channels must not be listed)", ch)
		}
	}

	type entry struct {
		User     string          `json:"user"`
		ConnInfo json.RawMessage `json:"conn_info"`
	}
	infoOf := func(name string) string {
		var ans struct {
			Presence map[string]entry `json:"presence"`
		}
		if st := callAPI(t, c.public, "presence", map[string]any{"channel": pres}, &ans); st != http.StatusOK {
			t.Fatalf("presence: %d", st)
		}
		for _, e := range ans.Presence {
			if e.User == name {
				return string(e.ConnInfo)
			}
		}
		return "(absent)"
	}
	waitFor(t, 5*time.Second, "alice's info from her token", func() bool { return infoOf("alice") == `{"device":"ios"}` })
	if got := infoOf("bob"); got != "" {
		t.Fatalf("bob has no info claim, presence says %s", got)
	}

	var upd struct {
		Sessions int `json:"sessions"`
	}
	if st := callAPI(t, c.public, "update_info", map[string]any{"user": "bob", "info": map[string]any{"status": "away"}}, &upd); st != http.StatusOK || upd.Sessions != 1 {
		t.Fatalf("update_info: %d %+v", st, upd)
	}
	waitFor(t, 5*time.Second, "bob's updated info", func() bool { return infoOf("bob") == `{"status":"away"}` })
	if st := callAPI(t, c.public, "update_info", map[string]any{"user": "bob", "info": nil}, &upd); st != http.StatusOK {
		t.Fatalf("update_info null: %d", st)
	}
	waitFor(t, 5*time.Second, "bob's info back to his token's (none)", func() bool { return infoOf("bob") == "" })

	var uc struct {
		Channels []string `json:"channels"`
	}
	if st := callAPI(t, c.public, "user_channels", map[string]any{"user": "alice"}, &uc); st != http.StatusOK || len(uc.Channels) != 1 || uc.Channels[0] != pres {
		t.Fatalf("user_channels alice: %d %v", st, uc.Channels)
	}
}

// TestNoGhostsAfterWorkerFreezes: a worker that stops answering without
// closing anything (SIGSTOP: its sockets stay open and silent, as when its
// node loses power) is dropped by the brokers' link timeout: its client
// leaves presence within 10 s, and the surviving worker reports the user
// offline. (The supervisor would kill a hung child only after ≥10 s of
// failed polls, so the presence drop measured here is the brokers'.)
func TestNoGhostsAfterWorkerFreezes(t *testing.T) {
	sink := &hookSink{}
	srv := httptest.NewServer(sink)
	defer srv.Close()
	c := startRealtimeCluster(t, srv.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	const channel = "chat/freeze"
	frozen := joinOn(t, ctx, c.public, "frozen", channel, "")
	joinOn(t, ctx, c.public, "watcher", channel, frozen.worker)
	waitFor(t, 10*time.Second, "both in presence", func() bool {
		return sameUsers(presenceUsers(t, c.public, channel), "frozen", "watcher")
	})
	waitFor(t, 10*time.Second, "frozen online", func() bool { return sink.has("user.online", "frozen") })

	victim := c.proc(frozen.worker)
	if err := syscall.Kill(victim.Pid, syscall.SIGSTOP); err != nil {
		t.Fatalf("SIGSTOP %s: %v", frozen.worker, err)
	}
	// Whatever happens, do not leave a stopped process behind: the
	// supervisor may be killing it already; SIGCONT lets it go on or die.
	defer func() { _ = syscall.Kill(victim.Pid, syscall.SIGCONT) }()
	stopped := time.Now()
	// The balancer may still send an API call to the frozen worker: poll
	// with a short timeout so such a call is just another miss.
	quick := &http.Client{Timeout: 500 * time.Millisecond, Transport: &http.Transport{DisableKeepAlives: true}}
	presentUsers := func() []string {
		req, err := http.NewRequest(http.MethodPost, "http://"+c.public+"/api/v1/presence", strings.NewReader(`{"channel":"`+channel+`"}`))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-API-Key", testAPIKey)
		resp, err := quick.Do(req)
		if err != nil {
			return nil
		}
		defer resp.Body.Close()
		var p presenceAnswer
		if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&p) != nil {
			return nil
		}
		users := []string{}
		for _, e := range p.Presence {
			users = append(users, e.User)
		}
		return users
	}
	waitFor(t, 10*time.Second, "the frozen worker's client out of presence", func() bool {
		return sameUsers(presentUsers(), "watcher")
	})
	gone := time.Since(stopped)
	waitFor(t, 10*time.Second, "user.offline for the frozen worker's user", func() bool { return sink.has("user.offline", "frozen") })
	t.Logf("presence without the frozen worker's client %v after SIGSTOP; user.offline after %v",
		gone.Round(time.Millisecond), time.Since(stopped).Round(time.Millisecond))
	if sink.has("user.offline", "watcher") || sink.has("channel.vacated", channel) {
		t.Fatal("the watcher's user or the channel was reported gone")
	}
}
