package balancer

import (
	"crypto/tls"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/proxyproto"
)

// testLinger replaces halfCloseLinger where a test waits it out; longer
// than the 1 s no-spin window below.
const testLinger = 1500 * time.Millisecond

// holdingWorker accepts proxied streams, reads their header and then holds
// them without reading or closing: the worst case for the proxy's epoll
// interest handling.
func holdingWorker(t *testing.T) (proxyPath string, held func() int) {
	t.Helper()
	proxyPath = filepath.Join(t.TempDir(), "hold.proxy.sock")
	ln, err := net.Listen("unix", proxyPath)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := proxyproto.ReadHeader(c); err != nil {
				c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	return proxyPath, func() int { mu.Lock(); defer mu.Unlock(); return len(conns) }
}

func loopWakeups(c *Child) int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	var n int64
	for _, l := range c.loops {
		n += l.wakeups.Load()
	}
	return n
}

// A client that half-closes while the worker keeps its side open must not
// make the event loop spin on the level-triggered hang-up; the connection
// is closed after the linger time.
func TestTLSHalfCloseNoSpin(t *testing.T) {
	proxyPath, held := holdingWorker(t)
	b := startBalancerWith(t, testConfig(t, true), topology(1, control.Peer{
		Name: "hold", Role: control.RoleWorker, State: control.StateReady, Pid: 1,
		Addrs: map[string]string{control.AddrProxy: proxyPath},
	}), func(c *Child) { c.linger = testLinger })
	c, err := tls.Dial("tcp", b.tls, &tls.Config{RootCAs: devCertPool(t, b.storage)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil { // close_notify
		t.Fatal(err)
	}
	if err := c.NetConn().(*net.TCPConn).CloseWrite(); err != nil { // FIN
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the worker to hold the stream", func() bool { return held() == 1 })
	waitFor(t, 5*time.Second, "one active connection", func() bool { return b.counter(t, "active_tls") == 1 })
	// Spinning shows as epoll_wait returning over and over; an idle loop
	// wakes about twice a second (its deadline tick).
	w0, t0 := loopWakeups(b.Child), time.Now()
	waitFor(t, 5*time.Second, "a second to pass", func() bool { return time.Since(t0) >= time.Second })
	if n := loopWakeups(b.Child) - w0; n > 50 {
		t.Fatalf("the event loops woke %d times in 1s with one half-closed idle connection: they spin", n)
	}
	// The linger later, the proxy gives up on the worker.
	waitFor(t, testLinger+5*time.Second, "the linger to end the connection", func() bool { return b.counter(t, "active_tls") == 0 })
}

// Past the fd-derived cap the balancer refuses new TLS connections at once
// instead of running out of descriptors.
func TestTLSOverLimitRefused(t *testing.T) {
	proxyPath, held := holdingWorker(t)
	b := startBalancerWith(t, testConfig(t, true), topology(1, control.Peer{
		Name: "hold", Role: control.RoleWorker, State: control.StateReady, Pid: 1,
		Addrs: map[string]string{control.AddrProxy: proxyPath},
	}), func(c *Child) { c.linger = testLinger })
	b.mu.Lock()
	b.proxyLimit = 1
	b.mu.Unlock()
	conf := &tls.Config{RootCAs: devCertPool(t, b.storage)}
	c1, err := tls.Dial("tcp", b.tls, conf)
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	waitFor(t, 5*time.Second, "the first connection proxied", func() bool { return held() == 1 })
	d := &net.Dialer{Timeout: 5 * time.Second}
	if c2, err := tls.DialWithDialer(d, "tcp", b.tls, conf); err == nil {
		c2.Close()
		t.Fatal("second connection accepted past the cap")
	}
	if n := b.counter(t, ctrOverLimit); n != 1 {
		t.Errorf("over_limit = %d", n)
	}
	// The cap frees up when the first one closes (the holding worker never
	// answers, so after the half-close linger).
	c1.Close()
	waitFor(t, testLinger+5*time.Second, "the slot to free", func() bool { return b.counter(t, "active_tls") == 0 })
}

// A worker that stops reading is cut off after worker.write_timeout too,
// even while the client keeps sending.
func TestTLSStalledWorkerClosed(t *testing.T) {
	proxyPath, held := holdingWorker(t)
	cfg := testConfig(t, true)
	cfg.Worker.WriteTimeout = configs.Duration(time.Second)
	b := startBalancer(t, cfg, topology(1, control.Peer{
		Name: "hold", Role: control.RoleWorker, State: control.StateReady, Pid: 1,
		Addrs: map[string]string{control.AddrProxy: proxyPath},
	}))
	c, err := tls.Dial("tcp", b.tls, &tls.Config{RootCAs: devCertPool(t, b.storage)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitFor(t, 5*time.Second, "the worker to hold the stream", func() bool { return held() == 1 })
	writeErr := make(chan error, 1)
	go func() {
		// Far more than the socket buffers: the proxy must queue, then give up.
		chunk := make([]byte, 64<<10)
		for range 512 {
			if _, err := c.Write(chunk); err != nil {
				writeErr <- err
				return
			}
		}
		writeErr <- nil
	}()
	waitFor(t, 15*time.Second, "the stalled connection to be closed", func() bool { return b.counter(t, "active_tls") == 0 })
	c.Close() // unblocks the writer if it is still blocked
	<-writeErr
}
