package netpoll

import (
	"runtime"
	"testing"
	"time"
)

func BenchmarkDbgLockstep(b *testing.B) {
	h := &recorder{}
	srv, _ := New(Config{Handler: h})
	shutdownBench(b, srv)
	fds := upgradedConns(b, srv, h, 1000, true)
	d := newDrainer(b, fds)
	defer d.close()
	frame := AppendTextFrame(nil, make([]byte, 100))
	var tsend, twait time.Duration
	start := d.bytes.Load()
	for i := range 50 {
		t0 := time.Now()
		for _, c := range h.opened {
			c.WriteFrame(frame)
		}
		t1 := time.Now()
		want := start + int64(i+1)*1000*int64(len(frame))
		var fl time.Duration
		for d.bytes.Load() < want {
			if fl == 0 && srv.Stats().BytesOut >= uint64(want) {
				fl = time.Since(t1)
			}
			runtime.Gosched()
		}
		tsend += t1.Sub(t0)
		twait += time.Since(t1)
		if i < 5 {
			b.Logf("send %v wait %v flushed-after %v", t1.Sub(t0), time.Since(t1), fl)
		}
	}
	b.Logf("avg send %v wait %v", tsend/50, twait/50)
}
