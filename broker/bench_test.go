package broker

import (
	"context"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/proto/link"
)

// BenchmarkFanOut measures the broker path end to end over unix sockets:
// a publishing worker → broker (offset, encode once) → W interested workers,
// each receiving every message once. One op = one publish, acknowledged and
// delivered to all W workers. allocs/op counts the whole process: the
// publisher's client, the broker and the W receiving clients.
func BenchmarkFanOut(b *testing.B) {
	for _, w := range []int{1, 4, 16} {
		for _, size := range []int{128, 4096} {
			b.Run("workers="+strconv.Itoa(w)+"/payload="+strconv.Itoa(size), func(b *testing.B) {
				benchFanOut(b, w, size)
			})
		}
	}
}

func benchFanOut(b *testing.B, workers, size int) {
	srv := NewServer(ServerConfig{Name: "broker-1"})
	defer srv.Close(context.Background())
	ln, err := link.Listen("unix:" + shortDir(b) + "/b.sock")
	if err != nil {
		b.Fatal(err)
	}
	if err := srv.Serve(ln); err != nil {
		b.Fatal(err)
	}
	ep := []brokerclient.Endpoint{{Name: "broker-1", Addr: link.ListenerAddr(ln)}}

	var delivered atomic.Int64
	for i := range workers {
		c := brokerclient.New(brokerclient.Options{
			Name:      "worker-" + strconv.Itoa(i),
			OnMessage: func(string, []byte, uint64) { delivered.Add(1) },
		})
		defer c.Close()
		c.SetBrokers(ep)
		c.Subscribe("bench")
	}
	pub := brokerclient.New(brokerclient.Options{Name: "publisher"})
	defer pub.Close()
	pub.SetBrokers(ep)
	waitUntil(b, func() bool { return srv.Interest("bench") == workers && pub.Stats().Connected == 1 })
	defer func() {
		if b.Failed() {
			b.Logf("delivered %d; broker %+v", delivered.Load(), srv.Stats())
		}
	}()

	data := make([]byte, size)
	window := make(chan struct{}, 512)
	var failed atomic.Int64
	done := func(_ uint64, err error) {
		if err != nil {
			failed.Add(1)
		}
		<-window
	}
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		window <- struct{}{}
		pub.Publish("bench", data, done)
	}
	want := int64(b.N * workers)
	waitUntil(b, func() bool { return delivered.Load() >= want || failed.Load() > 0 })
	if st := srv.Stats(); st.SlowLinks > 0 {
		b.Fatalf("%d worker links dropped as slow", st.SlowLinks)
	}

	b.StopTimer()
	if n := failed.Load(); n > 0 {
		b.Fatalf("%d publishes failed", n)
	}
	el := time.Since(start).Seconds()
	b.ReportMetric(float64(b.N)/el, "pub/s")
	b.ReportMetric(float64(want)/el, "deliveries/s")
}

func waitUntil(b *testing.B, cond func() bool) {
	b.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			b.Fatalf("benchmark condition not reached in 10s")
		}
		time.Sleep(100 * time.Microsecond)
	}
}
