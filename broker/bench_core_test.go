package broker

import (
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/shoalhq/shoal/broker/chanopts"
	"github.com/shoalhq/shoal/broker/store"
	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/proto/link"
)

// discardConn is a net.Conn that accepts every write at once: it isolates
// the broker's own cost from sockets and receivers.
type discardConn struct{ net.Conn }

func (discardConn) Write(b []byte) (int, error)      { return len(b), nil }
func (discardConn) SetWriteDeadline(time.Time) error { return nil }
func (discardConn) Close() error                     { return nil }

// BenchmarkPublishCore is the broker alone: one pub frame → offset, msg
// encoded once, queued on W interested links (their writers discard the
// bytes), puback queued. No sockets, no clients.
func BenchmarkPublishCore(b *testing.B) {
	for _, w := range []int{1, 4, 16, 64} {
		b.Run("workers="+strconv.Itoa(w), func(b *testing.B) {
			s := NewServer(ServerConfig{Name: "b"})
			s.warm.Store(true)
			var links []*blink
			for range w + 1 {
				l := &blink{s: s, conn: discardConn{}, chans: map[string]struct{}{}}
				l.w = link.NewWriter(l.conn, link.WriterConfig{})
				go func() { _ = l.w.Run() }()
				links = append(links, l)
			}
			defer func() {
				for _, l := range links {
					l.w.Close()
					<-l.w.Done()
				}
				close(s.stopSweep)
				s.wg.Wait()
			}()
			for _, l := range links[1:] {
				l.subscribe([]byte("bench"))
			}
			pub := links[0]
			frame := link.AppendPub(nil, 1, "bench", make([]byte, 128))
			var f link.Frame
			var d link.Decoder
			_ = d.Feed(frame, func(fr *link.Frame) error { f = *fr; return nil })
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if err := pub.publish(&f); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkPublishCoreHistory is BenchmarkPublishCore (4 links) on a channel
// with history: in memory, and durable (group commit into the in-memory
// store, which copies each message: its allocation is the store's, not the
// publish path's).
func BenchmarkPublishCoreHistory(b *testing.B) {
	for _, durable := range []bool{false, true} {
		name := "memory"
		if durable {
			name = "durable"
		}
		b.Run(name, func(b *testing.B) {
			cfg := ServerConfig{Name: "b", Rules: chanopts.Compile([]configs.ChannelRule{{Match: "bench", History: configs.History{Size: 1000}, Durable: durable}})}
			if durable {
				cfg.Store = discardStore{}
			}
			s := NewServer(cfg)
			s.warm.Store(true)
			var links []*blink
			for range 5 {
				l := &blink{s: s, conn: discardConn{}, chans: map[string]struct{}{}}
				l.w = link.NewWriter(l.conn, link.WriterConfig{MaxPending: 64 << 20})
				go func() { _ = l.w.Run() }()
				links = append(links, l)
			}
			defer func() {
				for _, l := range links {
					l.w.Close()
					<-l.w.Done()
				}
				close(s.stopSweep)
				s.wg.Wait()
				if s.commit != nil {
					s.commit.close()
				}
			}()
			for _, l := range links[1:] {
				l.subscribe([]byte("bench"))
			}
			pub := links[0]
			frame := link.AppendPub(nil, 1, "bench", make([]byte, 128))
			var f link.Frame
			var d link.Decoder
			_ = d.Feed(frame, func(fr *link.Frame) error { f = *fr; return nil })
			// Fill the ring first: its slots' buffers are then reused.
			for range 1000 {
				_ = pub.publish(&f)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if err := pub.publish(&f); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// discardStore accepts every batch (fsync cost excluded: this measures the
// publish path).
type discardStore struct{}

func (discardStore) Apply([]store.Op) error         { return nil }
func (discardStore) Load() ([]store.Channel, error) { return nil, nil }
func (discardStore) Close() error                   { return nil }
