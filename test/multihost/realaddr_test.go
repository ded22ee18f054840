package multihost

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
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
)

// local is one `shoal run` on 127.0.0.1 (root namespace), with a plain
// public port (connections handed to the worker as file descriptors) and a
// TLS port with the generated development certificate (terminated in the
// balancer and proxied with a PROXY v2 header).
type local struct {
	public, tls, admin string
	dir, logf          string
	out                *syncBuffer
	cmd                *exec.Cmd
	waited             chan error
	roots              *x509.CertPool
}

func startLocal(t *testing.T, middleware string) *local {
	t.Helper()
	c := &local{public: freePort(t), tls: freePort(t), admin: freePort(t), dir: t.TempDir(), out: &syncBuffer{}, waited: make(chan error, 1)}
	data := filepath.Join(c.dir, "data")
	c.logf = filepath.Join(data, "log", "shoal.log")
	cfg := fmt.Sprintf(`cluster:
  workers: 1
  brokers: 1
  balancers: 1
  gossip: 127.0.0.1:0
listen:
  public: %s
  tls: {listen: %s, auto: true}
  admin: %s
storage:
  dir: %s
log:
  level: info
%s`, c.public, c.tls, c.admin, data, middleware)
	path := filepath.Join(c.dir, "shoal.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	c.cmd = exec.Command(binary(t), "run", "-c", path)
	c.cmd.Stdout, c.cmd.Stderr = c.out, c.out
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { c.waited <- c.cmd.Wait() }()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("shoal run output:\n%s\nlast log lines:\n%s", c.out, tailLog(c.logf, 40))
		}
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.waited:
		case <-time.After(15 * time.Second):
			for _, p := range append(descendants(c.cmd.Process.Pid), c.cmd.Process.Pid) {
				_ = syscall.Kill(p, syscall.SIGKILL)
			}
			<-c.waited
			t.Errorf("shoal run did not stop within 15 s of SIGTERM; killed")
		}
	})
	hc := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	waitFor(t, 30*time.Second, "every process ready in /api/cluster", func() bool {
		select {
		case err := <-c.waited:
			c.waited <- err
			t.Fatalf("shoal run exited during startup (%v):\n%s", err, c.out)
		default:
		}
		resp, err := hc.Get("http://" + c.admin + "/api/cluster")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var ci clusterInfo
		return resp.StatusCode == http.StatusOK && json.NewDecoder(resp.Body).Decode(&ci) == nil && ci.allReady()
	})
	pem, err := os.ReadFile(filepath.Join(data, "tls", "dev-cert.pem"))
	if err != nil {
		t.Fatalf("the generated certificate: %v", err)
	}
	c.roots = x509.NewCertPool()
	if !c.roots.AppendCertsFromPEM(pem) {
		t.Fatalf("no certificate in %s", filepath.Join(data, "tls", "dev-cert.pem"))
	}
	return c
}

// scConn is a minimal SocketCluster v2 client with what the repo's client
// lacks here: a TLS config (to trust the generated certificate) together
// with a chosen source address.
type scConn struct {
	conn net.Conn
	cid  int
}

// dialSC opens a WebSocket from source IP src; tls selects the wss:// port.
// The error of a refused upgrade is a ws.StatusError (the HTTP status).
func (c *local) dialSC(ctx context.Context, src string, useTLS bool) (*scConn, error) {
	nd := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	d := ws.Dialer{NetDial: nd.DialContext, Timeout: 5 * time.Second}
	url := "ws://" + c.public + "/socketcluster/"
	if useTLS {
		d.TLSConfig = &tls.Config{RootCAs: c.roots, ServerName: "127.0.0.1"}
		url = "wss://" + c.tls + "/socketcluster/"
	}
	conn, br, _, err := d.Dial(ctx, url)
	if err != nil {
		return nil, err
	}
	if br != nil {
		ws.PutReader(br)
	}
	return &scConn{conn: conn}, nil
}

// invoke sends an event with a cid and returns the matching reply's data
// or its error object (answering pings meanwhile).
func (s *scConn) invoke(event string, data any) (json.RawMessage, json.RawMessage, error) {
	s.cid++
	b, err := json.Marshal(map[string]any{"event": event, "data": data, "cid": s.cid})
	if err != nil {
		return nil, nil, err
	}
	_ = s.conn.SetDeadline(time.Now().Add(5 * time.Second))
	if err := wsutil.WriteClientText(s.conn, b); err != nil {
		return nil, nil, err
	}
	for i := 0; i < 100; i++ {
		msg, err := wsutil.ReadServerText(s.conn)
		if err != nil {
			return nil, nil, err
		}
		if len(msg) == 0 { // v2 ping
			if err := wsutil.WriteClientText(s.conn, nil); err != nil {
				return nil, nil, err
			}
			continue
		}
		var p struct {
			RID   *int            `json:"rid"`
			Data  json.RawMessage `json:"data"`
			Error json.RawMessage `json:"error"`
		}
		if json.Unmarshal(msg, &p) == nil && p.RID != nil && *p.RID == s.cid {
			if len(p.Error) > 0 && !bytes.Equal(p.Error, []byte("null")) {
				return p.Data, p.Error, nil
			}
			return p.Data, nil, nil
		}
	}
	return nil, nil, errors.New("no reply among 100 frames")
}

func (s *scConn) close() { s.conn.Close() }

// handshakeAndSubscribe runs #handshake and #subscribe; it returns the
// subscribe's error object (nil when allowed).
func handshakeAndSubscribe(t *testing.T, s *scConn, channel string) json.RawMessage {
	t.Helper()
	data, e, err := s.invoke("#handshake", map[string]any{"authToken": nil})
	if err != nil || e != nil {
		t.Fatalf("#handshake: %v %s", err, e)
	}
	var hs struct {
		ID string `json:"id"`
	}
	if json.Unmarshal(data, &hs) != nil || hs.ID == "" {
		t.Fatalf("#handshake reply without an id: %s", data)
	}
	_, e, err = s.invoke("#subscribe", map[string]any{"channel": channel})
	if err != nil {
		t.Fatalf("#subscribe: %v", err)
	}
	return e
}

// admit checks that 127.0.0.2, which no rule denies, connects and may
// subscribe to channel; the connection is closed when t ends.
func (c *local) admit(t *testing.T, ctx context.Context, useTLS bool, channel string) {
	t.Helper()
	ok, err := c.dialSC(ctx, "127.0.0.2", useTLS)
	if err != nil {
		t.Fatalf("127.0.0.2 was refused: %v", err)
	}
	t.Cleanup(ok.close)
	if e := handshakeAndSubscribe(t, ok, channel); e != nil {
		t.Errorf("127.0.0.2's subscribe was refused: %s", e)
	}
}

var paths = []struct {
	name string
	tls  bool
}{{"plain-handoff", false}, {"tls-proxied", true}}

// TestRealAddrInboundCIDR: an inbound cidr rule denying 127.0.0.4 refuses
// that client's #subscribe while 127.0.0.2's is allowed, on the plain path
// (the worker reads the peer address of the handed-over socket) and on the
// TLS path (the balancer's PROXY v2 header carries it). Were the worker to
// see the balancer's address, both clients would get the same answer.
func TestRealAddrInboundCIDR(t *testing.T) {
	c := startLocal(t, `middleware:
  inbound:
    - cidr: {deny: ["127.0.0.4/32"]}
`)
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			c.admit(t, ctx, p.tls, "realaddr/a")
			denied, err := c.dialSC(ctx, "127.0.0.4", p.tls)
			if err != nil {
				t.Fatalf("127.0.0.4 (only its subscribes are denied) could not connect: %v", err)
			}
			defer denied.close()
			e := handshakeAndSubscribe(t, denied, "realaddr/a")
			if e == nil {
				t.Fatalf("127.0.0.4's #subscribe was allowed: the worker did not see the client's address")
			}
			if !strings.Contains(string(e), "127.0.0.4") {
				t.Errorf("127.0.0.4 refused with %s; expected the message to name 127.0.0.4", e)
			}
			t.Logf("127.0.0.4 refused: %s", e)
		})
	}
}

// TestRealAddrHandshakeCIDR (issue 7 item 8): a handshake-stage cidr rule
// denying 127.0.0.3 refuses that client's WebSocket upgrade (HTTP 403)
// while 127.0.0.2 is admitted, on both paths.
func TestRealAddrHandshakeCIDR(t *testing.T) {
	c := startLocal(t, `middleware:
  handshake:
    - cidr: {deny: ["127.0.0.3/32"]}
`)
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			c.admit(t, ctx, p.tls, "realaddr/b")
			denied, err := c.dialSC(ctx, "127.0.0.3", p.tls)
			if err == nil {
				defer denied.close()
				// Say how far it got, for the report.
				_, e, ierr := denied.invoke("#handshake", map[string]any{"authToken": nil})
				t.Fatalf("127.0.0.3 was admitted (WebSocket upgraded; #handshake answered error=%s err=%v): "+
					"the handshake-stage cidr rule is not applied to real upgrades", e, ierr)
			}
			var se ws.StatusError
			if !errors.As(err, &se) || int(se) != http.StatusForbidden {
				t.Fatalf("127.0.0.3: %v; want HTTP 403 from the upgrade", err)
			}
		})
	}
}
