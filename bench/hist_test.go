package bench

import (
	"math/rand/v2"
	"sort"
	"testing"
	"time"
)

func TestBucketRangeCoversEveryValue(t *testing.T) {
	// Each value maps to a bucket whose range contains it, and bucket ranges
	// are contiguous and increasing.
	vals := []uint64{0, 1, 31, 32, 33, 63, 64, 65, 1000, 1 << 20, 1<<20 + 12345, 1<<40 - 1, 1 << 62, 1<<64 - 1}
	for _, v := range vals {
		b := bucketOf(v)
		lo, hi := bucketRange(b)
		if v < lo || v > hi {
			t.Errorf("value %d in bucket %d [%d,%d]", v, b, lo, hi)
		}
		if b >= histBuckets {
			t.Errorf("value %d: bucket %d out of range", v, b)
		}
	}
	var prevHi uint64
	for b := 1; b < histBuckets; b++ {
		lo, hi := bucketRange(b)
		if lo != prevHi+1 || hi < lo {
			t.Fatalf("bucket %d [%d,%d] does not follow %d", b, lo, hi, prevHi)
		}
		prevHi = hi
	}
}

func TestHistQuantilesWithinThreePercent(t *testing.T) {
	var h Hist
	r := rand.New(rand.NewPCG(1, 2))
	vals := make([]time.Duration, 100000)
	for i := range vals {
		// Log-uniform from 10 µs to 1 s, like real latencies.
		vals[i] = time.Duration(10e3 * pow10(5*r.Float64()))
		h.Record(vals[i])
	}
	sort.Slice(vals, func(i, j int) bool { return vals[i] < vals[j] })
	for _, q := range []float64{0.5, 0.9, 0.99, 0.999} {
		exact := vals[int(q*float64(len(vals)))-1]
		got := h.Quantile(q)
		if d := float64(got-exact) / float64(exact); d > 0.03 || d < -0.03 {
			t.Errorf("q%.3f = %v, exact %v (%.1f%% off)", q, got, exact, 100*d)
		}
	}
	if h.Count() != uint64(len(vals)) {
		t.Errorf("count %d", h.Count())
	}
	if m := h.Max(); m < vals[len(vals)-1] {
		t.Errorf("max %v below the largest value %v", m, vals[len(vals)-1])
	}
}

func pow10(x float64) float64 {
	v := 1.0
	for x >= 1 {
		v *= 10
		x--
	}
	// 10^x for x in [0,1) by a short series is plenty for a test spread.
	return v * (1 + x*2.302585*(1+x*1.151293*(1+x*0.767528*(1+x*0.575646))))
}

func TestHistSmallCounts(t *testing.T) {
	var h Hist
	if h.Quantile(0.99) != 0 || h.Max() != 0 {
		t.Fatal("empty histogram must report 0")
	}
	h.Record(5 * time.Millisecond)
	for _, q := range []float64{0, 0.5, 0.999, 1} {
		if got := h.Quantile(q); got < 4900*time.Microsecond || got > 5100*time.Microsecond {
			t.Errorf("q%v of a single 5ms = %v", q, got)
		}
	}
	h.Record(-time.Second) // clamped, never a panic
	if h.Quantile(0.01) != 0 {
		t.Errorf("negative value not clamped to 0")
	}
}

func TestHistMergeAndSparseRoundTrip(t *testing.T) {
	var a, b, viaSparse Hist
	for i := range 1000 {
		a.Record(time.Duration(i) * time.Microsecond)
		b.Record(time.Duration(i) * time.Millisecond)
	}
	a.Merge(&b)
	if a.Count() != 2000 {
		t.Fatalf("merged count %d", a.Count())
	}
	viaSparse.AddSparse(a.Sparse())
	viaSparse.AddSparse(map[int]uint64{-1: 5, histBuckets: 5}) // ignored
	for _, q := range []float64{0.1, 0.5, 0.9, 0.99} {
		if a.Quantile(q) != viaSparse.Quantile(q) {
			t.Errorf("q%v: %v after the sparse round trip, %v before", q, viaSparse.Quantile(q), a.Quantile(q))
		}
	}
	if a.Quantile(0.25) > time.Millisecond || a.Quantile(0.75) < 400*time.Millisecond {
		t.Errorf("merged quantiles look wrong: q25 %v q75 %v", a.Quantile(0.25), a.Quantile(0.75))
	}
}

func BenchmarkHistRecord(b *testing.B) {
	var h Hist
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		h.Record(time.Duration(i) * 1000)
	}
}
