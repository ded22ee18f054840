package bench

// A minimal SocketCluster server for tests that must run without Node: real
// sockets on 127.0.0.1, gobwas/ws upgrade, #handshake, #subscribe, #publish
// fan-out, and a v2 heartbeat sent right after the handshake whose pong the
// test checks. It decodes with encoding/json: it is a test fixture, not the
// thing being measured.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"math/big"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
)

type fakeSC struct {
	ln    net.Listener
	tls   bool
	wg    sync.WaitGroup
	pongs atomic.Int64

	mu    sync.Mutex
	subs  map[string][]*fakeConn
	conns map[*fakeConn]bool
}

type fakeConn struct {
	nc net.Conn
	mu sync.Mutex // one writer at a time
}

func (c *fakeConn) send(b []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	_ = wsutil.WriteServerText(c.nc, b)
}

func startFakeSC(t *testing.T, withTLS bool) *fakeSC {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if withTLS {
		ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}})
	}
	s := &fakeSC{ln: ln, tls: withTLS, subs: map[string][]*fakeConn{}, conns: map[*fakeConn]bool{}}
	s.wg.Add(1)
	go s.accept()
	t.Cleanup(s.close)
	return s
}

func (s *fakeSC) url() string {
	scheme := "ws://"
	if s.tls {
		scheme = "wss://"
	}
	return scheme + s.ln.Addr().String() + "/socketcluster/"
}

// selfSigned makes a throwaway certificate for 127.0.0.1.
func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "bench test"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func (s *fakeSC) close() {
	s.ln.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.nc.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

func (s *fakeSC) accept() {
	defer s.wg.Done()
	for {
		nc, err := s.ln.Accept()
		if err != nil {
			return
		}
		c := &fakeConn{nc: nc}
		s.mu.Lock()
		s.conns[c] = true
		s.mu.Unlock()
		s.wg.Add(1)
		go s.serve(c)
	}
}

func (s *fakeSC) serve(c *fakeConn) {
	defer s.wg.Done()
	defer func() {
		c.nc.Close()
		s.mu.Lock()
		delete(s.conns, c)
		for ch, l := range s.subs {
			for i, x := range l {
				if x == c {
					s.subs[ch] = append(l[:i:i], l[i+1:]...)
					break
				}
			}
		}
		s.mu.Unlock()
	}()
	if _, err := ws.Upgrade(c.nc); err != nil {
		return
	}
	for {
		msg, op, err := wsutil.ReadClientData(c.nc)
		if err != nil {
			return
		}
		if op != ws.OpText {
			continue
		}
		if len(msg) == 0 {
			s.pongs.Add(1)
			continue
		}
		var p struct {
			Event string          `json:"event"`
			Data  json.RawMessage `json:"data"`
			CID   *int64          `json:"cid"`
		}
		if json.Unmarshal(msg, &p) != nil {
			return
		}
		reply := func(data string) {
			if p.CID != nil {
				b, _ := json.Marshal(map[string]any{"rid": *p.CID, "data": json.RawMessage(data)})
				c.send(b)
			}
		}
		switch p.Event {
		case "#handshake":
			reply(`{"id":"fake","pingTimeout":30000,"isAuthenticated":false}`)
			c.send(nil) // a v2 ping straight away: the client must answer ""
		case "#subscribe":
			var d struct{ Channel string }
			_ = json.Unmarshal(p.Data, &d)
			s.mu.Lock()
			s.subs[d.Channel] = append(s.subs[d.Channel], c)
			s.mu.Unlock()
			reply("null")
		case "#publish":
			var d struct {
				Channel string          `json:"channel"`
				Data    json.RawMessage `json:"data"`
			}
			_ = json.Unmarshal(p.Data, &d)
			out, _ := json.Marshal(map[string]any{"event": "#publish", "data": d})
			s.mu.Lock()
			targets := append([]*fakeConn(nil), s.subs[d.Channel]...)
			s.mu.Unlock()
			for _, t := range targets {
				t.send(out)
			}
			reply("null")
		}
	}
}
