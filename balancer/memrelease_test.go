package balancer

import "testing"

// TestReleaseDue: the heap goes back to the OS once per burst of handshakes,
// when the burst is over, and not for a trickle.
func TestReleaseDue(t *testing.T) {
	for _, tc := range []struct {
		name                string
		n, last, releasedAt int64
		want                bool
	}{
		{"burst still going", 5000, 4000, 0, false},
		{"burst over", 5000, 4990, 0, true},
		{"nothing new", 5000, 5000, 0, true},
		{"already released", 5000, 5000, 5000, false},
		{"trickle since the release", 5100, 5095, 5000, false},
		{"next burst over", 9000, 9000, 5000, true},
	} {
		if got := releaseDue(tc.n, tc.last, tc.releasedAt); got != tc.want {
			t.Errorf("%s: releaseDue(%d, %d, %d) = %v, want %v", tc.name, tc.n, tc.last, tc.releasedAt, got, tc.want)
		}
	}
}
