package balancer

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/handoff"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/proxyproto"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// ---- a fake worker: real handoff and proxy sockets, an HTTP server ----

// chanListener is a net.Listener fed by the fake worker's two sockets.
type chanListener struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *chanListener) Addr() net.Addr { return &net.UnixAddr{Name: "fake", Net: "unix"} }

// addrConn reports the address from the PROXY header as the peer.
type addrConn struct {
	net.Conn
	remote net.Addr
}

func (c addrConn) RemoteAddr() net.Addr { return c.remote }

type fakeWorker struct {
	name        string
	handoffPath string
	proxyPath   string

	hl  *handoff.Listener
	pl  *net.UnixListener
	cl  *chanListener
	srv *http.Server
	wg  sync.WaitGroup

	handed  atomic.Int64 // fds received
	proxied atomic.Int64 // proxy streams with a valid header

	mu      sync.Mutex
	headers []proxyproto.Header
	badHdr  []error
	metas   []handoff.Meta // of every handed fd
	lies    []string       // what a Meta claimed that its socket contradicted
}

func startFakeWorker(t *testing.T, dir, name string) *fakeWorker {
	t.Helper()
	fw := &fakeWorker{
		name:        name,
		handoffPath: filepath.Join(dir, name+".sock"),
		proxyPath:   filepath.Join(dir, name+".proxy.sock"),
		cl:          &chanListener{ch: make(chan net.Conn), done: make(chan struct{})},
	}
	var err error
	if fw.hl, err = handoff.Listen(fw.handoffPath); err != nil {
		t.Fatal(err)
	}
	if fw.pl, err = net.ListenUnix("unix", &net.UnixAddr{Name: fw.proxyPath, Net: "unix"}); err != nil {
		t.Fatal(err)
	}
	fw.srv = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/big" {
				// 8 MiB of a known pattern, for back-pressure tests.
				chunk := bytes.Repeat([]byte("0123456789abcdef"), 4096)
				for range 128 {
					if _, err := w.Write(chunk); err != nil {
						return
					}
				}
				return
			}
			if r.URL.Path == "/refuse" {
				// Answer without reading the (large) body and close, as a
				// worker does when it refuses an oversized message (1009).
				w.Header().Set("Connection", "close")
				fmt.Fprint(w, "refused")
				return
			}
			if r.URL.Path == "/echo" {
				_, _ = io.Copy(w, r.Body)
				return
			}
			fmt.Fprintf(w, "%s %s", fw.name, r.RemoteAddr)
		}),
		ReadHeaderTimeout: 5 * time.Second,
	}
	fw.wg.Add(3)
	go func() {
		defer fw.wg.Done()
		_ = fw.srv.Serve(fw.cl)
	}()
	go func() { // handoff socket → HTTP server
		defer fw.wg.Done()
		for {
			fd, _, m, err := fw.hl.AcceptMeta()
			if err != nil {
				return
			}
			fw.checkMeta(fd, m)
			f := os.NewFile(uintptr(fd), "handed")
			c, err := net.FileConn(f)
			f.Close()
			if err != nil {
				continue
			}
			fw.handed.Add(1)
			if !fw.offer(c) {
				return
			}
		}
	}()
	go func() { // proxy socket → PROXY header → HTTP server
		defer fw.wg.Done()
		for {
			c, err := fw.pl.Accept()
			if err != nil {
				return
			}
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			h, err := proxyproto.ReadHeader(c)
			_ = c.SetReadDeadline(time.Time{})
			fw.mu.Lock()
			if err != nil {
				fw.badHdr = append(fw.badHdr, err)
			} else {
				fw.headers = append(fw.headers, h)
			}
			fw.mu.Unlock()
			if err != nil || h.Src == nil {
				c.Close() // the worker refuses proxied streams without a header
				continue
			}
			fw.proxied.Add(1)
			if !fw.offer(addrConn{Conn: c, remote: h.Src}) {
				return
			}
		}
	}()
	t.Cleanup(func() {
		fw.stop()
		fw.mu.Lock()
		defer fw.mu.Unlock()
		for _, l := range fw.lies {
			t.Errorf("%s: handoff Meta wrong: %s", fw.name, l)
		}
	})
	return fw
}

// checkMeta records m and anything in it that the socket contradicts: a
// worker trusts the Meta instead of asking, so a wrong one would leave a
// blocking socket in its poller, Nagle on, or a wrong client address.
func (fw *fakeWorker) checkMeta(fd int, m handoff.Meta) {
	var lies []string
	if m.Nonblock {
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); err != nil || fl&unix.O_NONBLOCK == 0 {
			lies = append(lies, fmt.Sprintf("Nonblock, but flags %#x (%v)", fl, err))
		}
	}
	if m.NoDelay {
		if v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY); err != nil || v == 0 {
			lies = append(lies, fmt.Sprintf("NoDelay, but TCP_NODELAY %d (%v)", v, err))
		}
	}
	if m.Peer.IsValid() {
		sa, err := unix.Getpeername(fd)
		var got netip.AddrPort
		switch a := sa.(type) {
		case *unix.SockaddrInet4:
			got = netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
		case *unix.SockaddrInet6:
			got = netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
		}
		if err != nil || got != m.Peer {
			lies = append(lies, fmt.Sprintf("peer %s, but the socket's is %s (%v)", m.Peer, got, err))
		}
	}
	fw.mu.Lock()
	fw.metas = append(fw.metas, m)
	fw.lies = append(fw.lies, lies...)
	fw.mu.Unlock()
}

func (fw *fakeWorker) offer(c net.Conn) bool {
	select {
	case fw.cl.ch <- c:
		return true
	case <-fw.cl.done:
		c.Close()
		return false
	}
}

// stop makes the worker vanish: sockets removed, connections closed.
func (fw *fakeWorker) stop() {
	_ = fw.hl.Close()
	_ = fw.pl.Close()
	_ = fw.cl.Close()
	_ = fw.srv.Close()
	fw.wg.Wait()
}

func (fw *fakeWorker) peer(pid int, conns int64) control.Peer {
	return control.Peer{
		Name: fw.name, Role: control.RoleWorker, State: control.StateReady, Pid: pid, Connections: conns,
		Addrs: map[string]string{control.AddrHandoff: fw.handoffPath, control.AddrProxy: fw.proxyPath},
	}
}

// ---- balancer under test ----

type testBalancer struct {
	*Child
	public, tls string
	storage     string
}

func testConfig(t *testing.T, withTLS bool) configs.Config {
	cfg := configs.Default()
	cfg.Listen.Public = "127.0.0.1:0"
	cfg.Storage.Dir = t.TempDir()
	if withTLS {
		cfg.Listen.TLS = configs.TLS{Listen: "127.0.0.1:0", Auto: true}
	}
	return cfg
}

func startBalancer(t *testing.T, cfg configs.Config, topo control.Topology) *testBalancer {
	t.Helper()
	return startBalancerWith(t, cfg, topo, nil)
}

// startBalancerWith lets a test adjust the Child before Start.
func startBalancerWith(t *testing.T, cfg configs.Config, topo control.Topology, tweak func(*Child)) *testBalancer {
	t.Helper()
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := New(nil)
	if tweak != nil {
		tweak(c)
	}
	res, err := c.Start(context.Background(), control.StartParams{
		Role: control.RoleBalancer, Name: "balancer-1", Index: 1, Config: raw, RunDir: t.TempDir(), Topology: topo,
	})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := c.Stop(ctx); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	return &testBalancer{Child: c, public: res.Addrs[control.AddrPublic], tls: res.Addrs[control.AddrTLS], storage: cfg.Storage.Dir}
}

func topology(v int64, peers ...control.Peer) control.Topology {
	return control.Topology{Version: v, Peers: peers}
}

func (b *testBalancer) counter(t *testing.T, name string) int64 {
	t.Helper()
	st, err := b.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st.Counters[name]
}

// get makes one HTTP request on a fresh connection from the given local IP
// and returns the body ("<worker> <remote addr as the worker saw it>") and
// the client's local address.
func get(t *testing.T, url, fromIP string, tlsConf *tls.Config) (body string, local string, err error) {
	t.Helper()
	d := &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(fromIP)}}
	var mu sync.Mutex
	tr := &http.Transport{
		DisableKeepAlives: true,
		TLSClientConfig:   tlsConf,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := d.DialContext(ctx, network, addr)
			if err == nil {
				mu.Lock()
				local = c.LocalAddr().String()
				mu.Unlock()
			}
			return c, err
		},
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return "", "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	mu.Lock()
	defer mu.Unlock()
	return string(b), local, err
}

// ---- tests ----

func TestPlainRequestReachesWorker(t *testing.T) {
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	b := startBalancer(t, testConfig(t, false), topology(1, w1.peer(101, 0)))

	body, local, err := get(t, "http://"+b.public+"/healthz", "127.0.0.2", nil)
	if err != nil {
		t.Fatal(err)
	}
	// The worker read the peer address from the handed-over socket itself.
	if want := "worker-1 " + local; body != want {
		t.Fatalf("body %q, want %q", body, want)
	}
	if !strings.HasPrefix(local, "127.0.0.2:") {
		t.Fatalf("client bound to %s", local)
	}
	if n := b.counter(t, "handed.worker-1"); n != 1 {
		t.Errorf("handed.worker-1 = %d", n)
	}
	if h, _ := b.Health(context.Background()); h.State != control.StateReady {
		t.Errorf("health %+v", h)
	}
}

func TestLeastConnectionsSpreads(t *testing.T) {
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	w2 := startFakeWorker(t, dir, "worker-2")
	// worker-1 already holds 5 connections, worker-2 none.
	b := startBalancer(t, testConfig(t, false), topology(1, w1.peer(101, 5), w2.peer(102, 0)))
	url := "http://" + b.public + "/"
	for i := range 5 {
		body, _, err := get(t, url, "127.0.0.1", nil)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(body, "worker-2 ") {
			t.Fatalf("request %d went to %q; worker-2 was the least loaded", i, body)
		}
	}
	// Now both stand at 5: the next ones alternate.
	counts := map[string]int{}
	for range 6 {
		body, _, err := get(t, url, "127.0.0.1", nil)
		if err != nil {
			t.Fatal(err)
		}
		counts[strings.Fields(body)[0]]++
	}
	if counts["worker-1"] != 3 || counts["worker-2"] != 3 {
		t.Fatalf("equal workers got %v, want 3 each", counts)
	}
	// A fresh topology resets the estimate to the supervisor's figures.
	if err := b.SetTopology(context.Background(), topology(2, w1.peer(101, 0), w2.peer(102, 50))); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		body, _, err := get(t, url, "127.0.0.1", nil)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(body, "worker-1 ") {
			t.Fatalf("after the new topology a request went to %q", body)
		}
	}
	if got := w1.handed.Load() + w2.handed.Load(); got != 14 {
		t.Errorf("workers received %d fds, want 14", got)
	}
}

func TestVanishedWorkerSkippedAtOnce(t *testing.T) {
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	w2 := startFakeWorker(t, dir, "worker-2")
	// worker-1 is the preferred one (fewer connections), then it vanishes
	// before the supervisor notices.
	b := startBalancer(t, testConfig(t, true), topology(1, w1.peer(101, 0), w2.peer(102, 100)))
	w1.stop()
	for i := range 5 {
		body, _, err := get(t, "http://"+b.public+"/", "127.0.0.1", nil)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if !strings.HasPrefix(body, "worker-2 ") {
			t.Fatalf("request %d answered by %q", i, body)
		}
	}
	// One failure marked it dead; the later requests did not try it again
	// (the retry interval is a second; allow one retry on a slow machine).
	if n := b.counter(t, ctrHandoffFailures); n < 1 || n > 2 {
		t.Errorf("handoff_failures = %d, want 1", n)
	}
	// The TLS path skips it too (its proxy socket is gone as well).
	pool := devCertPool(t, b.storage)
	body, _, err := get(t, "https://"+b.tls+"/", "127.0.0.1", &tls.Config{RootCAs: pool})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(body, "worker-2 ") {
		t.Fatalf("TLS request answered by %q", body)
	}
}

func TestNoWorkerClosesConnection(t *testing.T) {
	b := startBalancer(t, testConfig(t, false), control.Topology{})
	c, err := net.DialTimeout("tcp", b.public, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !isReset(err) {
		t.Fatalf("read: %v, want the connection closed", err)
	}
	waitFor(t, 5*time.Second, "no_worker counted", func() bool { return b.counter(t, ctrNoWorker) == 1 })
	if h, _ := b.Health(context.Background()); h.Message == "" {
		t.Errorf("health gives no reason: %+v", h)
	}
}

func isReset(err error) bool { return err != nil && strings.Contains(err.Error(), "connection reset") }

func TestPortInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg := testConfig(t, false)
	cfg.Listen.Public = ln.Addr().String()
	raw, _ := json.Marshal(cfg)
	c := New(nil)
	_, err = c.Start(context.Background(), control.StartParams{Config: raw})
	want := fmt.Sprintf("listen.public: address %s already in use", ln.Addr())
	if err == nil || err.Error() != want {
		t.Fatalf("Start: %v, want %q", err, want)
	}
	_ = c.Stop(context.Background())

	// Same for the TLS port, and the public listener is released again.
	cfg = testConfig(t, true)
	cfg.Listen.TLS.Listen = ln.Addr().String()
	raw, _ = json.Marshal(cfg)
	c = New(nil)
	_, err = c.Start(context.Background(), control.StartParams{Config: raw})
	want = fmt.Sprintf("listen.tls.listen: address %s already in use", ln.Addr())
	if err == nil || err.Error() != want {
		t.Fatalf("Start: %v, want %q", err, want)
	}
	_ = c.Stop(context.Background())
}

func devCertPool(t *testing.T, storage string) *x509.CertPool {
	t.Helper()
	pem, err := os.ReadFile(filepath.Join(storage, "tls", devCertFile))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatal("no certificate in dev-cert.pem")
	}
	return pool
}

func TestTLSProxyCarriesClientAddress(t *testing.T) {
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	w2 := startFakeWorker(t, dir, "worker-2")
	b := startBalancer(t, testConfig(t, true), topology(1, w1.peer(101, 0), w2.peer(102, 0)))

	// The client trusts the generated certificate explicitly, nothing else.
	conf := &tls.Config{RootCAs: devCertPool(t, b.storage), MinVersion: tls.VersionTLS12}
	const n = 8
	for range n {
		body, local, err := get(t, "https://"+b.tls+"/x", "127.0.0.2", conf)
		if err != nil {
			t.Fatal(err)
		}
		f := strings.Fields(body)
		if len(f) != 2 || f[1] != local {
			t.Fatalf("worker saw %q, want the client's address %s", body, local)
		}
	}
	// Each connection closes before the next: every pick is a tie, broken
	// at random, so both workers get some.
	if p1, p2 := w1.proxied.Load(), w2.proxied.Load(); p1+p2 != n || p1 == 0 || p2 == 0 {
		t.Errorf("proxied: worker-1 %d, worker-2 %d; want %d spread over both", p1, p2, n)
	}
	for _, fw := range []*fakeWorker{w1, w2} {
		fw.mu.Lock()
		for _, h := range fw.headers {
			src, dst := h.Src.(*net.TCPAddr), h.Dst.(*net.TCPAddr)
			if !src.IP.Equal(net.IPv4(127, 0, 0, 2)) || dst.String() != b.tls {
				t.Errorf("%s got header %v -> %v, want 127.0.0.2:* -> %s", fw.name, src, dst, b.tls)
			}
		}
		if len(fw.badHdr) != 0 {
			t.Errorf("%s: bad headers %v", fw.name, fw.badHdr)
		}
		fw.mu.Unlock()
	}
	waitFor(t, 5*time.Second, "proxied connections closed", func() bool { return b.counter(t, "active_tls") == 0 })
	if got := b.counter(t, ctrProxied); got != n {
		t.Errorf("proxied = %d", got)
	}
}

func TestTLSRefusesOldVersions(t *testing.T) {
	b := startBalancer(t, testConfig(t, true), control.Topology{})
	// MinVersion too: Go clients refuse to offer TLS 1.0/1.1 unless asked to.
	conf := &tls.Config{RootCAs: devCertPool(t, b.storage), MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS11}
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", b.tls, conf)
	if err == nil {
		c.Close()
		t.Fatal("TLS 1.1 handshake succeeded")
	}
	waitFor(t, 5*time.Second, "handshake failure counted", func() bool { return b.counter(t, ctrTLSHandshakeFail) == 1 })
	// TLS 1.3 and 1.2 work and negotiate http/1.1.
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		conf := &tls.Config{RootCAs: devCertPool(t, b.storage), MinVersion: v, MaxVersion: v, NextProtos: []string{"h2", "http/1.1"}}
		c, err := tls.DialWithDialer(d, "tcp", b.tls, conf)
		if err != nil {
			t.Fatalf("version %x: %v", v, err)
		}
		if p := c.ConnectionState().NegotiatedProtocol; p != "http/1.1" {
			t.Errorf("ALPN %q", p)
		}
		c.Close()
	}
}

// Stop closes proxied connections that are still open and leaves no
// goroutine behind (goleak checks the latter).
func TestStopClosesProxiedConnections(t *testing.T) {
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	b := startBalancer(t, testConfig(t, true), topology(1, w1.peer(101, 0)))
	conf := &tls.Config{RootCAs: devCertPool(t, b.storage)}
	c, err := tls.Dial("tcp", b.tls, conf)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Half a request: the worker waits for the rest.
	if _, err := c.Write([]byte("GET / HTTP/1.1\r\n")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the worker got the stream", func() bool { return w1.proxied.Load() == 1 })
	waitFor(t, 5*time.Second, "one active TLS connection", func() bool { return b.counter(t, "active_tls") == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := b.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := bufio.NewReader(c).ReadByte(); err == nil {
		t.Fatal("connection still open after Stop")
	}
}

func TestDrainStopsAccepting(t *testing.T) {
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	b := startBalancer(t, testConfig(t, true), topology(1, w1.peer(101, 0)))
	if err := b.Drain(context.Background(), time.Second); err != nil {
		t.Fatal(err)
	}
	if h, _ := b.Health(context.Background()); h.State != control.StateDraining {
		t.Errorf("health %+v", h)
	}
	for _, addr := range []string{b.public, b.tls} {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			t.Errorf("%s still accepts after Drain", addr)
		}
	}
}

// A dead worker's replacement (new pid, same name and socket) is used as
// soon as the supervisor announces it, without waiting for the retry.
func TestReplacementWorkerUsedAtOnce(t *testing.T) {
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	b := startBalancer(t, testConfig(t, false), topology(1, w1.peer(101, 0)))
	w1.stop()
	if _, _, err := get(t, "http://"+b.public+"/", "127.0.0.1", nil); err == nil {
		t.Fatal("request succeeded with the only worker gone")
	}
	w1b := startFakeWorker(t, dir, "worker-1")
	if err := b.SetTopology(context.Background(), topology(2, w1b.peer(201, 0))); err != nil {
		t.Fatal(err)
	}
	body, _, err := get(t, "http://"+b.public+"/", "127.0.0.1", nil)
	if err != nil || !strings.HasPrefix(body, "worker-1 ") {
		t.Fatalf("replacement not used: %q, %v", body, err)
	}
	// An older topology arriving late does not undo the newer one.
	if err := b.SetTopology(context.Background(), topology(1)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := get(t, "http://"+b.public+"/", "127.0.0.1", nil); err != nil {
		t.Fatalf("stale topology applied: %v", err)
	}
}

func TestDevCertReusedAndRenewed(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	now := time.Now()
	c1, path, created, err := loadOrCreateDevCert(dir, now)
	if err != nil || !created {
		t.Fatalf("first: created=%v err=%v", created, err)
	}
	c2, _, created, err := loadOrCreateDevCert(dir, now)
	if err != nil || created {
		t.Fatalf("second: created=%v err=%v", created, err)
	}
	if Fingerprint(c1.Leaf) != Fingerprint(c2.Leaf) {
		t.Fatal("second start generated a different certificate")
	}
	if err := c1.Leaf.VerifyHostname("127.0.0.1"); err != nil {
		t.Error(err)
	}
	if err := c1.Leaf.VerifyHostname("localhost"); err != nil {
		t.Error(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, devKeyFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file: %v %v", fi.Mode(), err)
	}
	// Near expiry: replaced.
	c3, _, created, err := loadOrCreateDevCert(dir, now.Add(devValidity))
	if err != nil || !created || Fingerprint(c3.Leaf) == Fingerprint(c1.Leaf) {
		t.Fatalf("near expiry: created=%v err=%v", created, err)
	}
	// A corrupt file: replaced.
	if err := os.WriteFile(path, []byte("junk"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, created, err := loadOrCreateDevCert(dir, now); err != nil || !created {
		t.Fatalf("corrupt: created=%v err=%v", created, err)
	}
}

// Large bodies both ways, on several connections at once, arrive intact
// through the TLS proxy (many bursts, partial TLS records, pooled buffers).
func TestTLSProxyLargeTransfers(t *testing.T) {
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	w2 := startFakeWorker(t, dir, "worker-2")
	b := startBalancer(t, testConfig(t, true), topology(1, w1.peer(101, 0), w2.peer(102, 0)))
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: devCertPool(t, b.storage)}, MaxConnsPerHost: 8}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}

	const conns, size = 8, 512 << 10
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := make([]byte, size+i)
			for j := range body {
				body[j] = byte(j*7 + i)
			}
			resp, err := client.Post("https://"+b.tls+"/echo", "application/octet-stream", bytes.NewReader(body))
			if err != nil {
				errs <- err
				return
			}
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || !bytes.Equal(got, body) {
				errs <- fmt.Errorf("conn %d: %d bytes back of %d, %v", i, len(got), len(body), err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	tr.CloseIdleConnections()
	waitFor(t, 5*time.Second, "proxied connections closed", func() bool { return b.counter(t, "active_tls") == 0 })
	st, err := b.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if min := int64(conns * size); st.BytesIn < min || st.BytesOut < min {
		t.Errorf("bytes in %d, out %d; want at least %d each way", st.BytesIn, st.BytesOut, min)
	}
}

// listen.tls.listen equal to listen.public: one port serves ws:// (handed
// over, first byte untouched) and wss:// (terminated and proxied).
func TestSharedPortSniffs(t *testing.T) {
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	cfg := testConfig(t, true)
	cfg.Listen.TLS.Listen = cfg.Listen.Public // "127.0.0.1:0" both: one listener
	b := startBalancer(t, cfg, topology(1, w1.peer(101, 0)))
	if b.tls != b.public {
		t.Fatalf("tls %s, public %s: want one port", b.tls, b.public)
	}
	body, local, err := get(t, "http://"+b.public+"/", "127.0.0.2", nil)
	if err != nil || body != "worker-1 "+local {
		t.Fatalf("plain on the shared port: %q, %v", body, err)
	}
	body, local, err = get(t, "https://"+b.public+"/", "127.0.0.2", &tls.Config{RootCAs: devCertPool(t, b.storage)})
	if err != nil || body != "worker-1 "+local {
		t.Fatalf("TLS on the shared port: %q, %v", body, err)
	}
	if w1.handed.Load() != 1 || w1.proxied.Load() != 1 {
		t.Errorf("handed %d, proxied %d; want 1 each", w1.handed.Load(), w1.proxied.Load())
	}
	// A client that sends nothing does not hold Stop up (goleak checks the
	// sniffing goroutine is gone).
	c, err := net.Dial("tcp", b.public)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
}

// The goroutine-pair proxy (used when epoll is unavailable) passes the same
// tests as the event loops.
func TestTLSGoroutineFallback(t *testing.T) {
	useEventLoops = false
	defer func() { useEventLoops = true }()
	t.Run("address", TestTLSProxyCarriesClientAddress)
	t.Run("large", TestTLSProxyLargeTransfers)
	t.Run("stop", TestStopClosesProxiedConnections)
	t.Run("slow", TestTLSSlowReaderGetsEverything)
	t.Run("stalled-reader", TestTLSStalledReaderClosed)
	t.Run("stalled-worker", TestTLSStalledWorkerClosed)
}

// A client that reads slower than the worker writes (8 MiB through a 512-byte
// bufio reader, far more than the socket buffers hold) gets every byte: the
// proxy holds back (EPOLLIN off on the worker side) instead of buffering.
func TestTLSSlowReaderGetsEverything(t *testing.T) {
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	b := startBalancer(t, testConfig(t, true), topology(1, w1.peer(101, 0)))
	c, err := tls.Dial("tcp", b.tls, &tls.Config{RootCAs: devCertPool(t, b.storage)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReaderSize(c, 512), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	want := bytes.Repeat([]byte("0123456789abcdef"), 4096)
	buf := make([]byte, len(want))
	for i := range 128 {
		if _, err := io.ReadFull(resp.Body, buf); err != nil {
			t.Fatalf("chunk %d: %v", i, err)
		}
		if !bytes.Equal(buf, want) {
			t.Fatalf("chunk %d corrupted", i)
		}
	}
	if n, _ := io.Copy(io.Discard, resp.Body); n != 0 {
		t.Fatalf("%d extra bytes", n)
	}
}

// A client that stops reading is cut off after worker.write_timeout, and
// the proxy lets go of everything it held for it.
func TestTLSStalledReaderClosed(t *testing.T) {
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	cfg := testConfig(t, true)
	cfg.Worker.WriteTimeout = configs.Duration(time.Second)
	b := startBalancer(t, cfg, topology(1, w1.peer(101, 0)))
	c, err := tls.Dial("tcp", b.tls, &tls.Config{RootCAs: devCertPool(t, b.storage)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("GET /big HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the proxied connection", func() bool { return b.counter(t, "active_tls") == 1 })
	start := time.Now()
	waitFor(t, 15*time.Second, "the stalled connection to be closed", func() bool { return b.counter(t, "active_tls") == 0 })
	if d := time.Since(start); d < 500*time.Millisecond {
		t.Errorf("closed after %v, before the write timeout", d)
	}
}

// The balancer keeps nothing per plain connection: with N connections held
// open by the worker, this process (client + worker + balancer) holds 2N
// more fds, not 3N.
func TestPlainKeepsNoFD(t *testing.T) {
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	b := startBalancer(t, testConfig(t, false), topology(1, w1.peer(101, 0)))
	// Warm up: the handoff socket to the worker is dialled once, and stays.
	if _, _, err := get(t, "http://"+b.public+"/", "127.0.0.1", nil); err != nil {
		t.Fatal(err)
	}
	countFDs := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	// Let the warm-up connection's fds go before the baseline.
	base := countFDs()
	waitFor(t, 5*time.Second, "a stable baseline", func() bool {
		n := countFDs()
		stable := n == base
		base = n
		return stable
	})
	const n = 30
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range n {
		c, err := net.Dial("tcp", b.public)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		// Half a request: the worker holds the connection, waiting.
		if _, err := c.Write([]byte("GET / HTTP/1.1\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 5*time.Second, "all handed over", func() bool { return w1.handed.Load() == n+1 })
	if got := countFDs() - base; got > 2*n+2 {
		t.Fatalf("%d more fds for %d connections; the balancer keeps some (want about %d)", got, n, 2*n)
	}
}

// A worker that finishes while the TLS client is still sending (it refused
// a message it will not read) must not make the balancer reset the client:
// the client gets the worker's last bytes, then close_notify and a FIN, and
// its remaining input is read and dropped until it ends.
func TestTLSWorkerFinishesWhileClientSends(t *testing.T) {
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	b := startBalancer(t, testConfig(t, true), topology(1, w1.peer(101, 0)))
	c, err := tls.Dial("tcp", b.tls, &tls.Config{RootCAs: devCertPool(t, b.storage)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	const size = 8 << 20
	if _, err := fmt.Fprintf(c, "POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", size); err != nil {
		t.Fatal(err)
	}
	wrote := make(chan error, 1)
	go func() {
		chunk := make([]byte, 64<<10)
		for sent := 0; sent < size; sent += len(chunk) {
			if _, err := c.Write(chunk); err != nil {
				wrote <- err
				return
			}
		}
		wrote <- c.CloseWrite()
	}()
	resp, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading the worker's answer: %v (got %q)", err, resp)
	}
	if !bytes.Contains(resp, []byte("refused")) {
		t.Fatalf("the worker's last bytes were lost: %q", resp)
	}
	if err := <-wrote; err != nil {
		t.Fatalf("the client was cut off while sending: %v", err)
	}
	waitFor(t, 5*time.Second, "the proxied connection closed", func() bool { return b.counter(t, "active_tls") == 0 })
}
