package client

import (
	"context"
	"encoding/json"
	"net"
	"strings"
	"sync"
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
}

func newFakeServer(t *testing.T) *fakeServer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &fakeServer{ln: ln, conns: map[net.Conn]map[string]bool{}}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
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
			reply(`{"rid":` + rid() + `,"data":{"id":"abc","pingTimeout":30000,"isAuthenticated":false}}`)
			reply(``) // a ping, which the client must answer
		case "#subscribe":
			var d struct{ Channel string }
			json.Unmarshal(p.Data, &d)
			if strings.HasPrefix(d.Channel, "forbidden") {
				reply(`{"rid":` + rid() + `,"error":{"name":"AuthError","message":"no"}}`)
				continue
			}
			s.mu.Lock()
			s.conns[c][d.Channel] = true
			s.mu.Unlock()
			reply(`{"rid":` + rid() + `}`)
		case "#publish":
			var d struct {
				Channel string
				Data    json.RawMessage
			}
			json.Unmarshal(p.Data, &d)
			frame, _ := json.Marshal(map[string]any{"event": "#publish", "data": map[string]any{"channel": d.Channel, "data": d.Data}})
			s.mu.Lock()
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
