package balancer

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/handoff"
	"github.com/shoalhq/shoal/proto/control"
)

// startLocal starts a worker-style front end (cluster.balancers: 0) that
// delivers into fw: plain fds straight to its HTTP server, TLS plaintext
// over a socketpair carrying the client's address.
func startLocal(t *testing.T, cfg configs.Config, fw *fakeWorker) (*Child, map[string]string) {
	t.Helper()
	c := NewLocal(nil, LocalOptions{
		Plain: func(fd int, _ handoff.Meta) {
			f := os.NewFile(uintptr(fd), "plain")
			conn, err := net.FileConn(f)
			f.Close()
			if err != nil {
				return
			}
			fw.handed.Add(1)
			fw.offer(conn)
		},
		Proxy: func(src, _ net.Addr) (*net.UnixConn, error) {
			fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return nil, err
			}
			ends := make([]*net.UnixConn, 2)
			for i, fd := range fds {
				f := os.NewFile(uintptr(fd), "pair")
				conn, err := net.FileConn(f)
				f.Close()
				if err != nil {
					t.Errorf("socketpair end: %v", err)
					return nil, err
				}
				ends[i] = conn.(*net.UnixConn)
			}
			fw.proxied.Add(1)
			fw.offer(addrConn{Conn: ends[0], remote: src})
			return ends[1], nil
		},
	})
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	res, err := c.Start(context.Background(), control.StartParams{Name: fw.name, Config: raw})
	if err != nil {
		t.Fatalf("Start %s's front end: %v", fw.name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := c.Stop(ctx); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	return c, res.Addrs
}

// Two workers' front ends share both ports with SO_REUSEPORT: the kernel
// spreads connections over them, each worker sees the client's real
// address (plain: the socket's; TLS: passed with the stream), both serve
// the one development certificate, and a drained front end's connections
// go to the other at once.
func TestLocalFrontEndsShareThePort(t *testing.T) {
	dir := t.TempDir()
	wa := startFakeWorker(t, dir, "worker-a")
	wb := startFakeWorker(t, dir, "worker-b")
	cfg := testConfig(t, true)
	fa, addrs := startLocal(t, cfg, wa)
	cfg.Listen.Public, cfg.Listen.TLS.Listen = addrs[control.AddrPublic], addrs[control.AddrTLS]
	_, addrsB := startLocal(t, cfg, wb)
	if addrsB[control.AddrPublic] != cfg.Listen.Public || addrsB[control.AddrTLS] != cfg.Listen.TLS.Listen {
		t.Fatalf("second front end bound %v, want the first's %v", addrsB, addrs)
	}

	conf := &tls.Config{RootCAs: devCertPool(t, cfg.Storage.Dir), MinVersion: tls.VersionTLS12}
	for _, tc := range []struct {
		name string
		url  string
		conf *tls.Config
	}{
		{"plain", "http://" + cfg.Listen.Public + "/", nil},
		{"tls", "https://" + cfg.Listen.TLS.Listen + "/", conf},
	} {
		seen := map[string]int{}
		// Bounded: with random client ports, 60 connections all hashed to
		// one of two sockets has a probability of 2^-59.
		for i := 0; i < 60 && len(seen) < 2; i++ {
			body, local, err := get(t, tc.url, "127.0.0.2", tc.conf)
			if err != nil {
				t.Fatalf("%s request %d: %v", tc.name, i, err)
			}
			f := strings.Fields(body)
			if len(f) != 2 || f[1] != local {
				t.Fatalf("%s: worker saw %q, want the client's address %s", tc.name, body, local)
			}
			seen[f[0]]++
		}
		if len(seen) != 2 {
			t.Fatalf("%s: connections reached only %v", tc.name, seen)
		}
	}

	// Drain closes worker-a's sockets: every new connection goes to b.
	if err := fa.Drain(context.Background(), 0); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		body, _, err := get(t, "http://"+cfg.Listen.Public+"/", "127.0.0.1", nil)
		if err != nil || !strings.HasPrefix(body, "worker-b ") {
			t.Fatalf("request %d after draining worker-a: %q, %v", i, body, err)
		}
	}
	if st, _ := fa.Stats(context.Background()); st.Counters[ctrHanded] == 0 || st.Counters[ctrProxied] == 0 {
		t.Errorf("worker-a's counters %v: want handed and proxied connections", st.Counters)
	}
}

// A refusal from the worker (at max_connections) closes the TLS connection
// and is counted; the front end goes on.
func TestLocalProxyRefusal(t *testing.T) {
	cfg := testConfig(t, true)
	c := NewLocal(nil, LocalOptions{
		Plain: func(fd int, _ handoff.Meta) { _ = unix.Close(fd) },
		Proxy: func(net.Addr, net.Addr) (*net.UnixConn, error) { return nil, unix.EBUSY },
	})
	raw, _ := json.Marshal(cfg)
	res, err := c.Start(context.Background(), control.StartParams{Name: "w", Config: raw})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = c.Stop(ctx)
	}()
	conf := &tls.Config{RootCAs: devCertPool(t, cfg.Storage.Dir), MinVersion: tls.VersionTLS12}
	if _, _, err := get(t, "https://"+res.Addrs[control.AddrTLS]+"/", "127.0.0.1", conf); err == nil {
		t.Fatal("request succeeded with the worker refusing")
	}
	tb := &testBalancer{Child: c}
	waitFor(t, 5*time.Second, "refusal counted and released", func() bool {
		return tb.counter(t, ctrLocalRefused) == 1 && tb.counter(t, "active_tls") == 0
	})
}

// A worker's front end with listen.tls.listen equal to listen.public: the
// sniffed plain connection goes to the worker (a duplicate of its fd, with
// the client's address) and TLS is proxied, as on separate ports.
func TestLocalSharedPort(t *testing.T) {
	w := startFakeWorker(t, t.TempDir(), "worker-a")
	cfg := testConfig(t, true)
	cfg.Listen.TLS.Listen = cfg.Listen.Public
	c, addrs := startLocal(t, cfg, w)
	if addrs[control.AddrTLS] != addrs[control.AddrPublic] {
		t.Fatalf("addrs %v: want one port", addrs)
	}
	body, local, err := get(t, "http://"+addrs[control.AddrPublic]+"/", "127.0.0.2", nil)
	if err != nil || body != "worker-a "+local {
		t.Fatalf("plain on the shared port: %q, %v", body, err)
	}
	conf := &tls.Config{RootCAs: devCertPool(t, cfg.Storage.Dir), MinVersion: tls.VersionTLS12}
	body, local, err = get(t, "https://"+addrs[control.AddrPublic]+"/", "127.0.0.2", conf)
	if err != nil || body != "worker-a "+local {
		t.Fatalf("TLS on the shared port: %q, %v", body, err)
	}
	if w.handed.Load() != 1 || w.proxied.Load() != 1 {
		t.Errorf("handed %d, proxied %d; want 1 each", w.handed.Load(), w.proxied.Load())
	}
	tb := &testBalancer{Child: c}
	if tb.counter(t, ctrHanded) != 1 || tb.counter(t, ctrProxied) != 1 {
		t.Errorf("counters handed %d, proxied %d; want 1 each", tb.counter(t, ctrHanded), tb.counter(t, ctrProxied))
	}
}
