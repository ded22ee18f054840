package brokerclient

import (
	"slices"
	"testing"
)

func TestVotedView(t *testing.T) {
	a := Endpoint{Name: "broker-1", Addr: "unix:/a"}
	b := Endpoint{Name: "broker-2", Addr: "unix:/b"}
	c := Endpoint{Name: "broker-3", Addr: "unix:/c"}
	d := Endpoint{Name: "broker-4", Addr: "unix:/d"}
	c2 := Endpoint{Name: "broker-3", Addr: "unix:/c2"} // restarted on a new address
	for _, tc := range []struct {
		name    string
		reports []report
		want    []Endpoint
	}{
		{"one reporter is the set", []report{{"broker-1", []Endpoint{b, a}}}, []Endpoint{a, b}},
		// broker-2 has not heard of broker-3 yet: it must not remove it.
		{"a lagging reporter is outvoted", []report{{"broker-1", []Endpoint{a, b, c}}, {"broker-2", []Endpoint{a, b}}, {"broker-3", []Endpoint{a, b, c}}}, []Endpoint{a, b, c}},
		{"a lagging reporter of two is outvoted", []report{{"broker-1", []Endpoint{a, b, c}}, {"broker-2", []Endpoint{a, b}}}, []Endpoint{a, b, c}},
		// A join waits until half of the others know of it.
		{"a join seen by one of three waits", []report{{"broker-1", []Endpoint{a, b, c, d}}, {"broker-2", []Endpoint{a, b, c}}, {"broker-3", []Endpoint{a, b, c}}}, []Endpoint{a, b, c}},
		// broker-3 died; its own link (and report) is gone, and both others noticed.
		{"a departure", []report{{"broker-1", []Endpoint{a, b}}, {"broker-2", []Endpoint{a, b}}}, []Endpoint{a, b}},
		// broker-3 and broker-4 are cut off by a partition; their links to
		// this worker have not timed out yet and still carry their old views.
		{"stale views of a cut-off side do not keep it in", []report{
			{"broker-1", []Endpoint{a, b}}, {"broker-2", []Endpoint{a, b}},
			{"broker-3", []Endpoint{a, b, c, d}}, {"broker-4", []Endpoint{a, b, c, d}},
		}, []Endpoint{a, b}},
		{"an address change needs the others", []report{{"broker-1", []Endpoint{a, b, c2}}, {"broker-2", []Endpoint{b, a, c2}}, {"broker-3", []Endpoint{a, c}}}, []Endpoint{a, b, c2}},
	} {
		if got := votedView(tc.reports); !slices.Equal(got, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestViewsReportChangesOnly: OnMembers sees the combined view once per
// change, a down link's view stops counting, and nothing is reported after
// Close.
func TestViewsReportChangesOnly(t *testing.T) {
	var got [][]Endpoint
	c := New(Options{Name: "w", OnMembers: func(eps []Endpoint) { got = append(got, eps) }})
	a := Endpoint{Name: "broker-1", Addr: "unix:/a"}
	b := Endpoint{Name: "broker-2", Addr: "unix:/b"}
	x := Endpoint{Name: "broker-3", Addr: "unix:/c"}
	l1 := &bconn{ep: a}
	l2 := &bconn{ep: b}
	l3 := &bconn{ep: x}
	c.noteView(l1, []Endpoint{a, b})
	c.noteView(l2, []Endpoint{a, b, x}) // broker-3 listed by 1 of the 2 others: half
	c.noteView(l3, []Endpoint{x, b, a}) // broker-3's own view: no change
	c.noteView(l2, []Endpoint{a, b})    // now by neither
	c.noteView(l1, []Endpoint{a, b, x}) // by one again
	c.dropView(l3)
	c.dropView(l3) // already gone: no report
	c.noteView(l1, []Endpoint{a, b})
	want := [][]Endpoint{{a, b}, {a, b, x}, {a, b}, {a, b, x}, {a, b}}
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("reports %v, want %v", got, want)
	}
	c.Close()
	c.noteView(l1, []Endpoint{a})
	if len(got) != len(want) {
		t.Fatalf("reported after Close: %v", got[len(want):])
	}
}
