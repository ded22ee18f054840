package brokerclient_test

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shoalhq/shoal/broker"
	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/proto/link"
)

// blackHole is a TCP proxy to a broker link that can stop forwarding
// without closing anything: the peers see a silent connection, no FIN, as
// when a node loses power or the network partitions.
type blackHole struct {
	ln     net.Listener
	frozen atomic.Bool
	mu     sync.Mutex
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newBlackHole(t *testing.T, upstream string) *blackHole {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &blackHole{ln: ln}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			u, err := link.Dial(ctx, upstream)
			cancel()
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			p.wg.Add(2)
			go p.pipe(u, c)
			go p.pipe(c, u)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

// pipe copies src to dst until frozen; then it keeps reading (so the
// sender never sees back-pressure) and drops everything.
func (p *blackHole) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !p.frozen.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil { // EOF or closed by the cleanup
			return
		}
	}
}

func (p *blackHole) addr() string { return "tcp:" + p.ln.Addr().String() }

// TestSilentLinkDeclaredDead: a worker whose link goes silent without a FIN
// (its node vanished) loses its presence entries at the broker within the
// default IdleTimeout, and the worker declares the link dead within its
// LinkTimeout. Runs with the default timings, so it takes ~9 s: the point
// is that the defaults meet the "no ghosts 10 s after the node died" bound.
func TestSilentLinkDeclaredDead(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the default link timeouts (~9 s)")
	}
	t.Parallel()
	dir := runDir(t)
	b := startHistoryBroker(t, dir, "broker-1")
	hole := newBlackHole(t, b.ep.Addr)
	far, _ := newClient(t, "far-worker", withRules)
	far.SetBrokers([]brokerclient.Endpoint{{Name: "broker-1", Addr: hole.addr()}})
	waitConnected(t, far, 1)
	near, _ := newClient(t, "near-worker", withRules)
	near.SetBrokers([]brokerclient.Endpoint{b.ep})
	waitConnected(t, near, 1)

	for _, conn := range []string{"c1", "c2"} {
		if err := far.PresenceJoin("hist/live", brokerclient.PresenceEntry{Conn: conn, User: "u-" + conn}); err != nil {
			t.Fatal(err)
		}
	}
	count := func() int {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		n, err := near.PresenceCount(ctx, "hist/live")
		if err != nil {
			t.Fatalf("presence count: %v", err)
		}
		return n
	}
	waitFor(t, 5*time.Second, "far worker's entries", func() bool { return count() == 2 })

	hole.frozen.Store(true)
	start := time.Now()
	bound := broker.DefaultIdleTimeout + time.Second
	waitFor(t, bound, "the silent link's presence entries to go", func() bool { return count() == 0 })
	gone := time.Since(start)
	waitFor(t, bound, "the far worker to declare its link dead", func() bool { return far.Stats().Connected == 0 })
	t.Logf("entries gone %v after the link went silent; worker noticed after %v", gone.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	if gone > 10*time.Second {
		t.Fatalf("presence ghosts lived %v (bound 10 s)", gone)
	}
}

// cut closes every connection the proxy carries now (a network blip: the
// peers see the close and the worker redials through the proxy).
func (p *blackHole) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}
