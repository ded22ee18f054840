package e2e

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"

	"github.com/shoalhq/shoal/client"
)

// runConfig starts `shoal run -c cfgPath` with the API and auth secrets in
// the environment and waits until the cluster is ready.
func runConfig(t *testing.T, cfgPath, public, admin string) *cluster {
	t.Helper()
	c := &cluster{t: t, cfgPath: cfgPath, public: public, admin: admin, stdout: &syncBuffer{}, stderr: &syncBuffer{}, waited: make(chan error, 1)}
	c.cmd = exec.Command(shoalBin, "run", "-c", cfgPath)
	c.cmd.Env = append(os.Environ(), "SHOAL_API_KEY="+testAPIKey, "SHOAL_AUTH_KEY="+testAuthKey)
	c.cmd.Stdout, c.cmd.Stderr = c.stdout, c.stderr
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { c.waited <- c.cmd.Wait() }()
	t.Cleanup(func() {
		if !c.exited {
			_ = c.cmd.Process.Kill()
			_ = c.wait(30 * time.Second)
		}
		if t.Failed() {
			logs, _, _ := shoal(t, "logs", "-c", c.cfgPath, "-n", "80")
			t.Logf("shoal run stdout:\n%s\nlast log lines:\n%s", c.stdout, logs)
		}
	})
	c.waitReady(20 * time.Second)
	return c
}

// stop ends the cluster with SIGTERM and waits for it.
func (c *cluster) stop() {
	c.t.Helper()
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	if err := c.wait(30 * time.Second); err != nil {
		c.t.Fatalf("shoal run after SIGTERM: %v", err)
	}
}

// userRefused reports whether a handshake with user's token is refused as
// banned (a dial that succeeds is closed again).
func userRefused(t *testing.T, public, user string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cl, err := client.Dial(ctx, "ws://"+public+"/socketcluster/", client.Options{AuthToken: userToken(t, user)})
	if err == nil {
		cl.Close()
		return false
	}
	return strings.Contains(err.Error(), "BannedError") || strings.Contains(err.Error(), "4403") || strings.Contains(err.Error(), "spam")
}

// handshakeFrom dials from local address src and returns the first reply
// to #handshake (or the error that ended the connection).
func handshakeFrom(t *testing.T, public, src string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d := ws.Dialer{NetDial: func(ctx context.Context, network, addr string) (net.Conn, error) {
		nd := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		return nd.DialContext(ctx, network, addr)
	}}
	conn, _, _, err := d.Dial(ctx, "ws://"+public+"/socketcluster/")
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if err := wsutil.WriteClientText(conn, []byte(`{"event":"#handshake","data":{"authToken":null},"cid":1}`)); err != nil {
		return "", err
	}
	msg, _, err := wsutil.ReadServerData(conn)
	return string(msg), err
}

// TestBansSurviveClusterRestart bans a user and an address through the HTTP
// API, stops the whole cluster with SIGTERM, starts it again on the same
// storage directory, and checks that both are still refused: the bans
// come back from the durable "#bans" log the brokers keep.
func TestBansSurviveClusterRestart(t *testing.T) {
	dir := t.TempDir()
	public, admin := freePort(t), freePort(t)
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
api:
  key_env: SHOAL_API_KEY
storage:
  dir: %s
log:
  level: info
`, public, admin, filepath.Join(dir, "data"))
	cfgPath := filepath.Join(dir, "shoal.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}

	c := runConfig(t, cfgPath, public, admin)
	for _, b := range []map[string]any{
		{"user": "mallory", "reason": "spam"},
		{"ip": "127.0.0.2/32", "reason": "spam from .2"},
		{"user": "trudy", "reason": "lifted later"},
	} {
		if st := callAPI(t, public, "ban", b, nil); st != http.StatusOK {
			t.Fatalf("ban %v: %d", b, st)
		}
	}
	if st := callAPI(t, public, "unban", map[string]any{"user": "trudy"}, nil); st != http.StatusOK {
		t.Fatalf("unban trudy: %d", st)
	}
	waitFor(t, 10*time.Second, "mallory refused before the restart", func() bool { return userRefused(t, public, "mallory") })
	c.stop()

	runConfig(t, cfgPath, public, admin)
	// Every worker replays the log; the balancer spreads the dials, so
	// several in a row must be refused.
	waitFor(t, 15*time.Second, "both bans listed after the restart", func() bool {
		var out struct {
			Bans []struct {
				User string `json:"user"`
				IP   string `json:"ip"`
			} `json:"bans"`
		}
		if st, err := tryAPI(t, public, "bans", map[string]any{}, &out); err != nil || st != http.StatusOK {
			return false
		}
		var user, ip, trudy bool
		for _, b := range out.Bans {
			user = user || b.User == "mallory"
			ip = ip || b.IP == "127.0.0.2/32"
			trudy = trudy || b.User == "trudy"
		}
		if trudy {
			t.Fatalf("trudy was unbanned before the restart but is banned after it: %+v", out.Bans)
		}
		return user && ip
	})
	for i := 0; i < 4; i++ {
		waitFor(t, 10*time.Second, "mallory refused after the restart", func() bool { return userRefused(t, public, "mallory") })
	}
	if userRefused(t, public, "trudy") {
		t.Fatal("trudy (unbanned) is refused after the restart")
	}
	for i := 0; i < 4; i++ {
		waitFor(t, 10*time.Second, "127.0.0.2 refused after the restart", func() bool {
			msg, err := handshakeFrom(t, public, "127.0.0.2")
			return err == nil && strings.Contains(msg, "BannedError") || err != nil && strings.Contains(err.Error(), "4403")
		})
	}
	if msg, err := handshakeFrom(t, public, "127.0.0.1"); err != nil || !strings.Contains(msg, `"rid":1`) || strings.Contains(msg, "error") {
		t.Fatalf("127.0.0.1 (not banned) handshake: %q, %v", msg, err)
	}
	t.Run("shoal ban", func(t *testing.T) { testBanCLI(t, cfgPath, public) })
}

// shoalEnv runs a CLI command with extra environment variables.
func shoalEnv(t *testing.T, env []string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(shoalBin, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("running shoal %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

// testBanCLI drives `shoal ban` against the running cluster of cfgPath.
func testBanCLI(t *testing.T, cfgPath, public string) {
	keyEnv := []string{"SHOAL_API_KEY=" + testAPIKey}
	out, errOut, code := shoalEnv(t, keyEnv, "ban", "list", "-c", cfgPath)
	if code != 0 || !strings.Contains(out, "user mallory") || !strings.Contains(out, "ip 127.0.0.2/32") || !strings.Contains(out, "spam") {
		t.Fatalf("shoal ban list: exit %d\n%s%s", code, out, errOut)
	}
	out, errOut, code = shoalEnv(t, nil, "ban", "add", "--user", "eve", "--reason", "cli test", "--for", "1h", "-c", cfgPath, "--api-key", testAPIKey)
	if code != 0 || !strings.Contains(out, "banned user eve until ") {
		t.Fatalf("shoal ban add: exit %d\n%s%s", code, out, errOut)
	}
	waitFor(t, 10*time.Second, "eve refused after shoal ban add", func() bool { return userRefused(t, public, "eve") })
	out, errOut, code = shoalEnv(t, keyEnv, "ban", "remove", "--user", "eve", "--url", "http://"+public)
	if code != 0 || !strings.Contains(out, "removed the ban on user eve") {
		t.Fatalf("shoal ban remove: exit %d\n%s%s", code, out, errOut)
	}
	waitFor(t, 10*time.Second, "eve admitted after shoal ban remove", func() bool {
		for i := 0; i < 4; i++ { // on every worker the balancer picks
			if userRefused(t, public, "eve") {
				return false
			}
		}
		return true
	})
	out, _, code = shoalEnv(t, keyEnv, "ban", "remove", "--user", "eve", "-c", cfgPath)
	if code != 0 || !strings.Contains(out, "user eve was not banned") {
		t.Fatalf("second remove: exit %d %q", code, out)
	}
	// Clear errors: a wrong key, no key, a bad target.
	_, errOut, code = shoalEnv(t, nil, "ban", "list", "-c", cfgPath, "--api-key", "wrong")
	if code != 1 || !strings.Contains(errOut, "401") {
		t.Fatalf("wrong key: exit %d %q", code, errOut)
	}
	_, errOut, code = shoalEnv(t, []string{"SHOAL_API_KEY="}, "ban", "list", "-c", cfgPath)
	if code != 1 || !strings.Contains(errOut, "no API key: set SHOAL_API_KEY") {
		t.Fatalf("no key: exit %d %q", code, errOut)
	}
	_, errOut, code = shoalEnv(t, keyEnv, "ban", "add", "--ip", "not-an-ip", "-c", cfgPath)
	if code != 1 || !strings.Contains(errOut, "the server refused (400") {
		t.Fatalf("bad ip: exit %d %q", code, errOut)
	}
	_, errOut, code = shoalEnv(t, keyEnv, "ban", "add", "-c", cfgPath)
	if code != 2 || !strings.Contains(errOut, "exactly one of --user or --ip") {
		t.Fatalf("no target: exit %d %q", code, errOut)
	}
}
