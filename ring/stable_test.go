package ring

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The tuned profile must not declare healthy members dead when the CPUs are
// saturated (a broker under load, a busy CI machine): 3 members, every core
// busy with spinning goroutines plus allocation churn for GC, for 3 s.
func TestTunedProfileStableUnderCPULoad(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for 3 s")
	}
	var drops atomic.Int64
	var mu sync.Mutex
	ready := false
	onChange := func(ms []Member) {
		mu.Lock()
		defer mu.Unlock()
		if ready && len(ms) < 3 {
			drops.Add(1)
		}
	}
	var rings []*Ring
	for i, name := range []string{"a", "b", "c"} {
		var join []string
		if i > 0 {
			join = []string{rings[0].Addr()}
		}
		r, err := Start(Config{Name: name, Bind: "127.0.0.1:0", Join: join, Meta: Meta{Role: "broker"}, OnChange: onChange})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = r.Shutdown() })
		rings = append(rings, r)
	}
	waitFor(t, 5*time.Second, "3 members", func() bool {
		for _, r := range rings {
			if r.NumMembers() != 3 {
				return false
			}
		}
		return true
	})
	mu.Lock()
	ready = true
	mu.Unlock()

	stop := time.Now().Add(3 * time.Second)
	var wg sync.WaitGroup
	var sink atomic.Int64
	for range 2 * runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				b := make([]byte, 64<<10) // garbage, so GC runs too
				sink.Add(int64(len(b)))
			}
		}()
	}
	wg.Wait()
	if n := drops.Load(); n > 0 {
		t.Fatalf("a healthy member was dropped %d times under CPU load", n)
	}
}
