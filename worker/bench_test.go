package worker

import (
	"fmt"
	"net"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/gobwas/ws"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/middleware"
	"github.com/shoalhq/shoal/worker/netpoll"
)

// nullConn accepts every frame and keeps nothing.
type nullConn struct{ n atomic.Int64 }

func (c *nullConn) WriteFrame(f []byte) error               { c.n.Add(1); return nil }
func (c *nullConn) Close(code ws.StatusCode, reason string) {}
func (c *nullConn) RemoteAddr() net.Addr                    { return nil }

// BenchmarkDeliver: one broker message fanned out to 1000 local
// subscribers: framed once (one allocation), the same bytes to everyone.
func BenchmarkDeliver(b *testing.B) {
	env := newEnvWith(b, nil, netpoll.AppendTextFrame, netpoll.ErrQueueFull)
	conns := make([]*nullConn, 1000)
	for i := range conns {
		conns[i] = &nullConn{}
		s := env.e.Open(conns[i])
		env.e.Message(s, []byte(`{"event":"#handshake","data":{},"cid":1}`))
		env.e.Message(s, []byte(`{"event":"#subscribe","data":{"channel":"room"},"cid":2}`))
	}
	data := []byte(`{"text":"hello world, this is a chat message","user":"alice"}`)
	b.ReportAllocs()
	for b.Loop() {
		env.e.Deliver("room", data, 1)
	}
	b.ReportMetric(float64(conns[0].n.Load())/float64(b.N), "frames/sub/op")
}

// BenchmarkInboundPublish: a client #publish invoke through the engine to
// the (loopback) broker, with no local subscriber.
func BenchmarkInboundPublish(b *testing.B) {
	env := newEnvWith(b, nil, netpoll.AppendTextFrame, netpoll.ErrQueueFull)
	c := &nullConn{}
	s := env.e.Open(c)
	env.e.Message(s, []byte(`{"event":"#handshake","data":{},"cid":1}`))
	frames := make([][]byte, 64)
	for i := range frames {
		frames[i] = []byte(fmt.Sprintf(`{"event":"#publish","data":{"channel":"chat/room-1","data":{"text":"hello","n":%d}},"cid":%d}`, i, i+2))
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		env.e.Message(s, frames[i%len(frames)])
		i++
	}
}

// BenchmarkSessionMemory reports the engine's heap per handshaken session
// subscribed to one channel (the transport's own per-connection cost is
// netpoll's to report).
func BenchmarkSessionMemory(b *testing.B) {
	env := newEnvWith(b, nil, netpoll.AppendTextFrame, netpoll.ErrQueueFull)
	const n = 10000
	var before, after runtime.MemStats
	for b.Loop() {
		runtime.GC()
		runtime.ReadMemStats(&before)
		sessions := make([]*Session, n)
		for i := range sessions {
			s := env.e.Open(&nullConn{})
			env.e.Message(s, []byte(`{"event":"#handshake","data":{},"cid":1}`))
			env.e.Message(s, []byte(fmt.Sprintf(`{"event":"#subscribe","data":{"channel":"user/%d"},"cid":2}`, i)))
			sessions[i] = s
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "B/session")
		for _, s := range sessions {
			env.e.Closed(s, ws.StatusNormalClosure, "")
		}
	}
}

// BenchmarkInboundPublishWithRules is BenchmarkInboundPublish with a
// per-socket rate, a max_payload and a channels rule that all allow: the
// middleware must not add allocations to an allowed publish.
func BenchmarkInboundPublishWithRules(b *testing.B) {
	env := newEnvWith(b, nil, netpoll.AppendTextFrame, netpoll.ErrQueueFull)
	cfg, err := configs.Load([]byte(`
middleware:
  inbound:
    - rate: {per_socket: 1000000000/s}
    - max_payload: 64KiB
    - channels:
        - match: "readonly/**"
          publish: deny
`), "bench.yaml")
	if err != nil {
		b.Fatal(err)
	}
	chain, err := middleware.Compile(cfg)
	if err != nil {
		b.Fatal(err)
	}
	env.e.SetChain(chain)
	c := &nullConn{}
	s := env.e.Open(c)
	env.e.Message(s, []byte(`{"event":"#handshake","data":{},"cid":1}`))
	frames := make([][]byte, 64)
	for i := range frames {
		frames[i] = []byte(fmt.Sprintf(`{"event":"#publish","data":{"channel":"chat/room-1","data":{"text":"hello","n":%d}},"cid":%d}`, i, i+2))
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		env.e.Message(s, frames[i%len(frames)])
		i++
	}
}

// BenchmarkSessionLifecycle: the engine's share of one connection: Open,
// #handshake (no token) and its reply, Closed. The transport's share
// (upgrade, epoll, sockets) is netpoll's BenchmarkConnect.
func BenchmarkSessionLifecycle(b *testing.B) {
	env := newEnvWith(b, nil, netpoll.AppendTextFrame, netpoll.ErrQueueFull)
	hs := []byte(`{"event":"#handshake","data":{"authToken":null},"cid":1}`)
	c := &nullConn{}
	b.ReportAllocs()
	for b.Loop() {
		s := env.e.Open(c)
		env.e.Message(s, hs)
		env.e.Closed(s, 1000, "")
	}
}
