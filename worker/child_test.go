package worker

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/handoff"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/proxyproto"
)

// startChild starts a worker Child in a temp run dir and a stand-in
// balancer on 127.0.0.1 that hands every accepted connection over.
func startChild(t *testing.T, mod func(*configs.Config)) (*Child, control.StartResult, string) {
	t.Helper()
	return startNamedChild(t, "worker-1", control.Topology{}, mod)
}

func startNamedChild(t *testing.T, name string, topo control.Topology, mod func(*configs.Config)) (*Child, control.StartResult, string) {
	t.Helper()
	return startTunedChild(t, name, topo, mod, nil)
}

// startTunedChild is startNamedChild with tune, if not nil, applied to
// every accepted socket before the hand-over.
func startTunedChild(t *testing.T, name string, topo control.Topology, mod func(*configs.Config), tune func(*net.TCPConn)) (*Child, control.StartResult, string) {
	t.Helper()
	cfg := configs.Default()
	cfg.Worker.GoMaxProcs = 0 // leave the test binary's scheduler alone
	if mod != nil {
		mod(&cfg)
	}
	js, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := New(hclog.NewNullLogger())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := c.Start(ctx, control.StartParams{Role: control.RoleWorker, Name: name, Index: 1, Config: js, RunDir: t.TempDir(), Topology: topo})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := c.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
	})

	ln, snd := listenAndDialHandoff(t, res.Addrs[control.AddrHandoff])
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			tc := conn.(*net.TCPConn)
			if tune != nil {
				tune(tc)
			}
			if err := snd.SendConn(tc, nil); err != nil {
				t.Errorf("handoff: %v", err)
			}
			conn.Close()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		snd.Close()
	})
	return c, res, ln.Addr().String()
}

func TestChildHandoffHealthAndDrain(t *testing.T) {
	c, res, addr := startChild(t, nil)
	if !strings.HasSuffix(res.Addrs[control.AddrHandoff], "/worker-1.sock") || !strings.HasSuffix(res.Addrs[control.AddrProxy], "/worker-1.proxy.sock") {
		t.Fatalf("addrs %v", res.Addrs)
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}).Get("http://" + addr + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != `{"status":"ok","worker":"worker-1"}` {
		t.Fatalf("healthz: %d %s", resp.StatusCode, body)
	}

	cl := dialWS(t, addr)
	cl.handshake("")
	cl.send(`{"event":"#subscribe","data":{"channel":"a"},"cid":2}`)
	if r := cl.recvData(); r != `{"rid":2}` {
		t.Fatalf("subscribe %s", r)
	}
	ctx := context.Background()
	st, err := c.Stats(ctx)
	if err != nil || st.Connections != 1 || st.Counters["subscriptions"] != 1 {
		t.Fatalf("stats %+v %v", st, err)
	}
	// No broker is known yet: a publish invoke fails with an error, not silence.
	cl.send(`{"event":"#publish","data":{"channel":"a","data":1},"cid":3}`)
	if r := cl.recvData(); !strings.HasPrefix(r, `{"rid":3,"error":{"message":"Failed to publish: `) {
		t.Fatalf("publish without brokers: %s", r)
	}

	drained := make(chan error, 1)
	go func() { drained <- c.Drain(ctx, 5*time.Second) }()
	cl.expectClose(CodeGoingAway)
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
	if h, _ := c.Health(ctx); h.State != control.StateDraining {
		t.Fatalf("health %v", h)
	}
}

func TestChildProxySocket(t *testing.T) {
	c, res, _ := startChild(t, nil)
	path := res.Addrs[control.AddrProxy]
	src := &net.TCPAddr{IP: net.IPv4(203, 0, 113, 7), Port: 40000}
	dst := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 8443}
	d := ws.Dialer{NetDial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		conn, err := net.Dial("unix", path)
		if err != nil {
			return nil, err
		}
		if _, err := conn.Write(proxyproto.Encode(src, dst)); err != nil {
			conn.Close()
			return nil, err
		}
		return conn, nil
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, _, _, err := d.Dial(ctx, "ws://127.0.0.1/socketcluster/")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	cl := &wsClient{t: t, c: conn}
	r := cl.handshake("")
	var hs struct{ Data struct{ ID string } }
	if err := json.Unmarshal([]byte(r), &hs); err != nil {
		t.Fatal(err)
	}
	s := c.eng.Session(hs.Data.ID)
	if s == nil || s.Conn().RemoteAddr().String() != src.String() {
		t.Fatalf("remote address not taken from the PROXY header: %v", s)
	}

	// A stream without a header is refused.
	raw, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if _, err := raw.Write([]byte("GET /socketcluster/ HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	_ = raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	// Closed unanswered: EOF, or a reset because our request was unread.
	line, err := bufio.NewReader(raw).ReadString('\n')
	var ne net.Error
	if line != "" || err == nil || (errors.As(err, &ne) && ne.Timeout()) {
		t.Fatalf("headerless stream answered %q, %v", line, err)
	}
	waitFor(t, 2*time.Second, "refusal counted", func() bool {
		st, _ := c.Stats(context.Background())
		return st.Counters["proxy_refused"] == 1
	})
}

// TestChildFollowsRingMembers: once a broker reported the ring's members,
// the supervisor's topology no longer overrides the broker set.
func TestChildFollowsRingMembers(t *testing.T) {
	topo := func(v int64, name string) control.Topology {
		return control.Topology{Version: v, Peers: []control.Peer{{Name: name, Role: control.RoleBroker,
			State: control.StateReady, Addrs: map[string]string{control.AddrLink: "unix:" + t.TempDir() + "/none.sock"}}}}
	}
	c, _, _ := startNamedChild(t, "worker-1", topo(1, "broker-a"), nil)
	if o := c.bc.Owner("x"); o != "broker-a" {
		t.Fatalf("owner %q from the topology", o)
	}
	ctx := context.Background()
	if err := c.SetTopology(ctx, topo(2, "broker-b")); err != nil || c.bc.Owner("x") != "broker-b" {
		t.Fatalf("topology not followed: %v %q", err, c.bc.Owner("x"))
	}
	c.ringMembers(c.bc, []brokerclient.Endpoint{{Name: "broker-ring", Addr: "unix:" + t.TempDir() + "/ring.sock"}})
	if err := c.SetTopology(ctx, topo(3, "broker-c")); err != nil || c.bc.Owner("x") != "broker-ring" {
		t.Fatalf("topology overrode the ring: %v %q", err, c.bc.Owner("x"))
	}
}

// TestChildProxyOversizedFrame: a frame over max_payload on a proxied
// stream gets a 1009 close frame back on that stream, while the proxy is
// still writing the rest of the frame.
func TestChildProxyOversizedFrame(t *testing.T) {
	_, res, _ := startChild(t, nil)
	path := res.Addrs[control.AddrProxy]
	d := ws.Dialer{NetDial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		conn, err := net.Dial("unix", path)
		if err != nil {
			return nil, err
		}
		src := &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 1234}
		if _, err := conn.Write(proxyproto.Encode(src, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 8443})); err != nil {
			conn.Close()
			return nil, err
		}
		return conn, nil
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, _, _, err := d.Dial(ctx, "ws://127.0.0.1/socketcluster/")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	(&wsClient{t: t, c: conn}).handshake("")
	big := `{"event":"huge","data":"` + strings.Repeat("x", 1<<20+1000) + `"}`
	werr := make(chan error, 1)
	go func() {
		_ = conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
		werr <- wsutil.WriteClientText(conn, []byte(big))
	}()
	// Read raw frames: wsutil would answer the close frame and report the
	// failed write instead (the worker has hung up by then; see the report
	// on netpoll's lingering close).
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	for range 100 {
		f, err := readBoundedFrame(conn, 1<<20)
		if err != nil {
			t.Fatalf("no close frame: %v", err)
		}
		if f.Header.OpCode == ws.OpClose {
			if code, _ := ws.ParseCloseFrameData(f.Payload); code != ws.StatusMessageTooBig {
				t.Fatalf("closed with %d, want 1009", code)
			}
			t.Logf("the proxy's write of the rest of the frame: %v", <-werr)
			return
		}
	}
	t.Fatal("no close frame among 100 frames")
}

// readBoundedFrame reads one frame whose declared length is at most max
// (ws.ReadFrame would trust the peer's length).
func readBoundedFrame(r io.Reader, max int64) (ws.Frame, error) {
	h, err := ws.ReadHeader(r)
	if err != nil {
		return ws.Frame{}, err
	}
	if h.Length > max {
		return ws.Frame{}, fmt.Errorf("frame of %d bytes", h.Length)
	}
	p := make([]byte, h.Length)
	if _, err := io.ReadFull(r, p); err != nil {
		return ws.Frame{}, err
	}
	if h.Masked {
		ws.Cipher(p, h.Mask, 0)
	}
	return ws.Frame{Header: h, Payload: p}, nil
}

// listenAndDialHandoff opens a loopback TCP listener whose accepted
// sockets a test hands over, and a handoff sender to the worker's handoff
// address.
func listenAndDialHandoff(t *testing.T, addr string) (net.Listener, *handoff.Sender) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	snd, err := handoff.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	return ln, snd
}
