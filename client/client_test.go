package client

import (
	"context"
	"encoding/json"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeServer is a minimal SocketCluster server (the neighbour this unit test
// may fake): handshake, subscribe, publish to every subscriber, v2 pings.
type fakeServer struct {
	ln    net.Listener
	mu    sync.Mutex
	conns map[net.Conn]map[string]bool
	wg    sync.WaitGroup
	// History as docs/history.md has the worker present it: per channel
	// offsets under one epoch, offset/epoch in #publish data, recovery on
	// #subscribe data {"recover":{...}}.
	epoch  string
	hist   map[string][]json.RawMessage // offset i+1 = hist[ch][i]
	refuse bool                         // close new connections at once
	// refuseHS, when set, counts handshakes and refuses them as a ban
	// does: an error reply, then the connection is closed.
	refuseHS atomic.Pointer[atomic.Int64]
}

func newFakeServer(t *testing.T) *fakeServer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &fakeServer{ln: ln, conns: map[net.Conn]map[string]bool{}, epoch: "e1", hist: map[string][]json.RawMessage{}}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			refuse := s.refuse
			s.mu.Unlock()
			if refuse {
				c.Close()
				continue
			}
			if _, err := ws.Upgrade(c); err != nil {
				c.Close()
				continue
			}
			s.mu.Lock()
			s.conns[c] = map[string]bool{}
			s.mu.Unlock()
			s.wg.Add(1)
			go func() { defer s.wg.Done(); s.serve(c) }()
		}
	}()
	t.Cleanup(s.close)
	return s
}

func (s *fakeServer) url() string { return "ws://" + s.ln.Addr().String() + "/socketcluster/" }

func (s *fakeServer) close() {
	s.ln.Close()
	s.dropAll()
	s.wg.Wait()
}

func (s *fakeServer) dropAll() {
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
}

func (s *fakeServer) serve(c net.Conn) {
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	for {
		msg, _, err := wsutil.ReadClientData(c)
		if err != nil {
			return
		}
		if len(msg) == 0 {
			continue // pong
		}
		var p struct {
			Event string          `json:"event"`
			Data  json.RawMessage `json:"data"`
			CID   int64           `json:"cid"`
		}
		if json.Unmarshal(msg, &p) != nil {
			continue
		}
		reply := func(v string) {
			s.mu.Lock()
			wsutil.WriteServerText(c, []byte(v))
			s.mu.Unlock()
		}
		rid := func() string { b, _ := json.Marshal(p.CID); return string(b) }
		switch p.Event {
		case "#handshake":
			if n := s.refuseHS.Load(); n != nil {
				n.Add(1)
				reply(`{"rid":` + rid() + `,"error":{"name":"BannedError","message":"banned"}}`)
				return
			}
			reply(`{"rid":` + rid() + `,"data":{"id":"abc","pingTimeout":30000,"isAuthenticated":false}}`)
			reply(``) // a ping, which the client must answer
		case "#subscribe":
			var d struct {
				Channel string
				Data    struct {
					Recover *struct {
						Offset uint64
						Epoch  string
					}
				}
			}
			json.Unmarshal(p.Data, &d)
			if strings.HasPrefix(d.Channel, "forbidden") {
				reply(`{"rid":` + rid() + `,"error":{"name":"AuthError","message":"no"}}`)
				continue
			}
			// Ack, missed messages and joining the fan-out under one lock:
			// no gap or duplicate at the seam.
			s.mu.Lock()
			h := s.hist[d.Channel]
			recovered := d.Data.Recover != nil && d.Data.Recover.Epoch == s.epoch && d.Data.Recover.Offset <= uint64(len(h))
			ack, _ := json.Marshal(map[string]any{"rid": p.CID, "data": map[string]any{"recovered": recovered, "epoch": s.epoch, "offset": len(h)}})
			wsutil.WriteServerText(c, ack)
			if recovered {
				for i := d.Data.Recover.Offset; i < uint64(len(h)); i++ {
					wsutil.WriteServerText(c, s.publishFrame(d.Channel, h[i], i+1))
				}
			}
			s.conns[c][d.Channel] = true
			s.mu.Unlock()
		case "#publish":
			var d struct {
				Channel string
				Data    json.RawMessage
			}
			json.Unmarshal(p.Data, &d)
			s.mu.Lock()
			s.hist[d.Channel] = append(s.hist[d.Channel], d.Data)
			frame := s.publishFrame(d.Channel, d.Data, uint64(len(s.hist[d.Channel])))
			for other, subs := range s.conns {
				if subs[d.Channel] {
					wsutil.WriteServerText(other, frame)
				}
			}
			s.mu.Unlock()
			if p.CID != 0 {
				reply(`{"rid":` + rid() + `}`)
			}
		case "echo":
			reply(`{"rid":` + rid() + `,"data":` + string(p.Data) + `}`)
		}
	}
}

// publishFrame is a #publish with offset and epoch; s.mu held.
func (s *fakeServer) publishFrame(ch string, data json.RawMessage, off uint64) []byte {
	b, _ := json.Marshal(map[string]any{"event": "#publish", "data": map[string]any{"channel": ch, "data": data, "offset": off, "epoch": s.epoch}})
	return b
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestPubSubInvokeAndErrors(t *testing.T) {
	s := newFakeServer(t)
	c, err := Dial(ctx(t), s.url(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.ID() != "abc" {
		t.Fatalf("id %q", c.ID())
	}
	got, err := c.Invoke(ctx(t), "echo", map[string]int{"x": 1})
	if err != nil || string(got) != `{"x":1}` {
		t.Fatalf("echo: %s %v", got, err)
	}
	sub, err := c.Subscribe(ctx(t), "room", 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := c.Publish(ctx(t), "room", i); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 3; i++ {
		select {
		case m := <-sub.C:
			if string(m.Data) != string(rune('0'+i)) {
				t.Fatalf("message %d: %s", i, m.Data)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no message")
		}
	}
	_, err = c.Subscribe(ctx(t), "forbidden/x", 0)
	var se *Error
	if err == nil || !asError(err, &se) || se.Name != "AuthError" {
		t.Fatalf("want AuthError, got %v", err)
	}
}

func asError(err error, target **Error) bool {
	e, ok := err.(*Error)
	if ok {
		*target = e
	}
	return ok
}

func TestReconnectResubscribes(t *testing.T) {
	s := newFakeServer(t)
	c, err := Dial(ctx(t), s.url(), Options{Reconnect: true, ReconnectDelay: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sub, err := c.Subscribe(ctx(t), "news", 0)
	if err != nil {
		t.Fatal(err)
	}
	s.dropAll()
	// Publish from a second client until the first one, resubscribed, hears it.
	p, err := Dial(ctx(t), s.url(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		p.Publish(ctx(t), "news", "hi")
		select {
		case m := <-sub.C:
			if string(m.Data) != `"hi"` {
				t.Fatalf("got %s", m.Data)
			}
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatal("no message after reconnect")
}

// TestReconnectRecoversTheGap: messages published while the client was
// away arrive after the reconnect, once each and in order; a changed epoch
// is reported as not recovered.
func TestReconnectRecoversTheGap(t *testing.T) {
	s := newFakeServer(t)
	var recMu sync.Mutex
	var recs []Recovery
	c, err := Dial(ctx(t), s.url(), Options{Reconnect: true, ReconnectDelay: 20 * time.Millisecond, OnRecover: func(_ string, r Recovery) {
		recMu.Lock()
		recs = append(recs, r)
		recMu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sub, err := c.Subscribe(ctx(t), "news", 0)
	if err != nil {
		t.Fatal(err)
	}
	p, err := Dial(ctx(t), s.url(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	next := 1
	expect := func(n int) {
		t.Helper()
		for ; next <= n; next++ {
			select {
			case m := <-sub.C:
				if m.Offset != uint64(next) || string(m.Data) != strconv.Itoa(next) || m.Epoch != "e1" {
					t.Fatalf("message %d: %+v", next, m)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("message %d never came", next)
			}
		}
	}
	for i := 1; i <= 3; i++ {
		if err := p.Publish(ctx(t), "news", i); err != nil {
			t.Fatal(err)
		}
	}
	expect(3)
	// The subscriber is cut off and cannot come back until 4..7 are out.
	s.mu.Lock()
	s.refuse = true
	s.mu.Unlock()
	for conn := range s.subscribers("news") {
		conn.Close()
	}
	for i := 4; i <= 7; i++ {
		if err := p.Publish(ctx(t), "news", i); err != nil {
			t.Fatal(err)
		}
	}
	s.mu.Lock()
	s.refuse = false
	s.mu.Unlock()
	// The server acks before it replays: the outcome is recorded by the
	// reader as it reads the ack, so it is there before message 4 is on C.
	expect(4)
	if r := sub.LastRecovery(); !r.Attempted || !r.Recovered || r.Offset != 7 {
		t.Fatalf("recovery not recorded before the replayed messages: %+v", r)
	}
	expect(7)
	if r := sub.LastRecovery(); !r.Attempted || !r.Recovered || r.Offset != 7 {
		t.Fatalf("recovery %+v", r)
	}
	select {
	case m := <-sub.C:
		t.Fatalf("extra message %+v", m)
	default:
	}

	// History lost (new epoch): the client is told, and its position moves.
	s.mu.Lock()
	s.refuse, s.epoch = true, "e2"
	s.mu.Unlock()
	for conn := range s.subscribers("news") {
		conn.Close()
	}
	s.mu.Lock()
	s.refuse = false
	s.mu.Unlock()
	deadline := time.Now().Add(5 * time.Second)
	for sub.LastRecovery().Epoch != "e2" {
		if time.Now().After(deadline) {
			t.Fatal("no resubscription under the new epoch")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if r := sub.LastRecovery(); !r.Attempted || r.Recovered {
		t.Fatalf("recovery across a lost history %+v", r)
	}
	if off, ep := sub.Position(); off != 7 || ep != "e2" {
		t.Fatalf("position %d %s", off, ep)
	}
	recMu.Lock()
	defer recMu.Unlock()
	if len(recs) != 2 || !recs[0].Recovered || recs[1].Recovered {
		t.Fatalf("OnRecover saw %+v", recs)
	}
}

// subscribers returns the server-side connections subscribed to ch.
func (s *fakeServer) subscribers(ch string) map[net.Conn]bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[net.Conn]bool{}
	for c, subs := range s.conns {
		if subs[ch] {
			out[c] = true
		}
	}
	return out
}

// A server that refuses every handshake must see one reconnect attempt at a
// time, backing off, not a growing number of parallel loops.
func TestRefusedReconnectsDoNotMultiply(t *testing.T) {
	s := newFakeServer(t)
	c, err := Dial(ctx(t), s.url(), Options{Reconnect: true, ReconnectDelay: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var attempts atomic.Int64
	s.refuseHS.Store(&attempts)
	s.dropAll()
	time.Sleep(700 * time.Millisecond) // observe the back-off: 10+20+40+80+160+320 ms ≈ 6 attempts
	if n := attempts.Load(); n == 0 || n > 10 {
		t.Fatalf("%d handshake attempts in 700 ms; want a single backing-off loop (≈6)", n)
	}
}
