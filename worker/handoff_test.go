package worker

import (
	"encoding/json"
	"net"
	"net/netip"
	"sync"
	"testing"

	"github.com/shoalhq/shoal/handoff"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/worker/netpoll"
)

// The client's address comes from the handoff message when the balancer
// sends one (it got it from accept4), not from getpeername on the socket:
// the message names 203.0.113.9, the socket's peer is 127.0.0.1, and the
// session (hence bans and per-IP limits) sees the former.
func TestHandoffPeerFromMessage(t *testing.T) {
	c, res, _ := startChild(t, nil)
	ln, snd := listenAndDialHandoff(t, res.Addrs[control.AddrHandoff])
	claimed := netip.MustParseAddrPort("203.0.113.9:40001")
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		conn, err := ln.Accept() // one connection
		if err != nil {
			return
		}
		defer conn.Close()
		rc, err := conn.(*net.TCPConn).SyscallConn()
		if err != nil {
			t.Errorf("raw conn: %v", err)
			return
		}
		// Go's net made the socket non-blocking and set TCP_NODELAY.
		m := handoff.Meta{Peer: claimed, Nonblock: true, NoDelay: true}
		_ = rc.Control(func(fd uintptr) {
			if err := snd.SendFDMeta(int(fd), m, nil); err != nil {
				t.Errorf("handoff: %v", err)
			}
		})
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		snd.Close()
	})

	cl := dialWS(t, ln.Addr().String())
	var hs struct{ Data struct{ ID string } }
	if err := json.Unmarshal([]byte(cl.handshake("")), &hs); err != nil {
		t.Fatal(err)
	}
	s := c.eng.Session(hs.Data.ID)
	if s == nil {
		t.Fatal("no session")
	}
	if got := s.Conn().RemoteAddr().String(); got != claimed.String() {
		t.Fatalf("remote %s, want %s from the handoff message", got, claimed)
	}
}

func TestHandedOver(t *testing.T) {
	addr, p := handedOver(handoff.Meta{})
	if addr != nil || p != 0 {
		t.Errorf("zero Meta: %v %v", addr, p)
	}
	addr, p = handedOver(handoff.Meta{Peer: netip.MustParseAddrPort("[2001:db8::1]:5"), Nonblock: true, NoDelay: true})
	if addr.String() != "[2001:db8::1]:5" || p != netpoll.Nonblocking|netpoll.NoDelay {
		t.Errorf("full Meta: %v %v", addr, p)
	}
}
