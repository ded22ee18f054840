package bench

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// Hist is a log-linear latency histogram: each power of two is split into
// 32 linear sub-buckets, so any recorded value is reported within about 3%
// (half a sub-bucket) of its true value, from 1 ns up to hours. Recording
// is one atomic add, so the pollers and publishers of an agent share one
// histogram without a lock; agents send theirs to the parent, which merges
// them by adding counts. The zero value is ready to use.
type Hist struct {
	counts [histBuckets]atomic.Uint64
}

const (
	subBits     = 5
	subCount    = 1 << subBits
	histBuckets = (64 - subBits + 1) * subCount
)

// bucketOf maps a value to its bucket. Values below subCount get one bucket
// each; above, the bucket is (exponent, top subBits bits of the mantissa).
func bucketOf(v uint64) int {
	if v < subCount {
		return int(v)
	}
	e := bits.Len64(v) - subBits // >= 1
	return e*subCount + int(v>>(uint(e)-1)&(subCount-1))
}

// bucketRange returns the smallest and largest value that map to bucket b.
func bucketRange(b int) (lo, hi uint64) {
	e := b / subCount
	m := uint64(b % subCount)
	if e == 0 {
		return m, m
	}
	lo = (subCount | m) << (uint(e) - 1)
	hi = lo + (uint64(1) << (uint(e) - 1)) - 1
	return lo, hi
}

// Record adds one observation.
func (h *Hist) Record(d time.Duration) {
	if d < 0 {
		d = 0 // clocks of two processes can disagree by a hair
	}
	h.counts[bucketOf(uint64(d))].Add(1)
}

// Count returns the number of observations.
func (h *Hist) Count() uint64 {
	var n uint64
	for i := range h.counts {
		n += h.counts[i].Load()
	}
	return n
}

// Quantile returns the value below which a fraction q of the observations
// fall, as the midpoint of the bucket that holds it (0 when empty).
func (h *Hist) Quantile(q float64) time.Duration {
	total := h.Count()
	if total == 0 {
		return 0
	}
	// rank is 1-based: the q-quantile is the ceil(q*total)-th smallest value.
	rank := uint64(q*float64(total) + 0.999999)
	if rank < 1 {
		rank = 1
	}
	if rank > total {
		rank = total
	}
	var seen uint64
	for i := range h.counts {
		seen += h.counts[i].Load()
		if seen >= rank {
			lo, hi := bucketRange(i)
			return time.Duration(lo + (hi-lo)/2)
		}
	}
	return 0
}

// Max returns the upper bound of the highest non-empty bucket.
func (h *Hist) Max() time.Duration {
	for i := len(h.counts) - 1; i >= 0; i-- {
		if h.counts[i].Load() != 0 {
			_, hi := bucketRange(i)
			return time.Duration(hi)
		}
	}
	return 0
}

// Merge adds o's counts into h.
func (h *Hist) Merge(o *Hist) {
	for i := range o.counts {
		if n := o.counts[i].Load(); n != 0 {
			h.counts[i].Add(n)
		}
	}
}

// Sparse returns the non-empty buckets as bucket → count, the form agents
// send to the parent (a few dozen entries instead of 1,920).
func (h *Hist) Sparse() map[int]uint64 {
	m := make(map[int]uint64)
	for i := range h.counts {
		if n := h.counts[i].Load(); n != 0 {
			m[i] = n
		}
	}
	return m
}

// AddSparse adds counts in the form Sparse returns; unknown buckets are
// ignored rather than trusted (they come from another process).
func (h *Hist) AddSparse(m map[int]uint64) {
	for b, n := range m {
		if b >= 0 && b < histBuckets {
			h.counts[b].Add(n)
		}
	}
}
