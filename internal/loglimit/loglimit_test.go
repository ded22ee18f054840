package loglimit

import (
	"testing"
	"time"
)

func TestBurstThenOnePerEvery(t *testing.T) {
	l := Limiter{Every: time.Second, Burst: 2}
	t0 := time.Unix(1000, 0)
	for i, want := range []bool{true, true, false, false} {
		if ok, _ := l.Allow(t0); ok != want {
			t.Fatalf("line %d at once: %v", i, ok)
		}
	}
	// Half a period: still nothing; a whole one: one line, reporting the
	// three held back.
	if ok, _ := l.Allow(t0.Add(500 * time.Millisecond)); ok {
		t.Fatal("let through before a period passed")
	}
	ok, held := l.Allow(t0.Add(time.Second))
	if !ok || held != 3 {
		t.Fatalf("after a period: ok %v, held back %d, want 3", ok, held)
	}
	// A long quiet time refills only up to the burst.
	t1 := t0.Add(time.Hour)
	n := 0
	for range 5 {
		if ok, _ := l.Allow(t1); ok {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("%d lines after an hour, want the burst of 2", n)
	}
}
