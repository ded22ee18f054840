package brokerclient

import (
	"slices"
	"testing"
)

func TestMajorityView(t *testing.T) {
	a := Endpoint{Name: "broker-1", Addr: "unix:/a"}
	b := Endpoint{Name: "broker-2", Addr: "unix:/b"}
	c := Endpoint{Name: "broker-3", Addr: "unix:/c"}
	c2 := Endpoint{Name: "broker-3", Addr: "unix:/c2"} // restarted on a new address
	for _, tc := range []struct {
		name  string
		views [][]Endpoint
		want  []Endpoint
	}{
		{"one reporter is the set", [][]Endpoint{{b, a}}, []Endpoint{a, b}},
		// broker-2 has not heard of broker-3 yet: it must not remove it.
		{"a lagging reporter is outvoted", [][]Endpoint{{a, b, c}, {a, b}, {a, b, c}}, []Endpoint{a, b, c}},
		{"a lagging reporter of two is outvoted", [][]Endpoint{{a, b, c}, {a, b}}, []Endpoint{a, b, c}},
		// A joining broker's first report may hold only itself.
		{"a newcomer's partial view removes no one", [][]Endpoint{{a, b, c}, {c}}, []Endpoint{a, b, c}},
		// A join waits until half of the reporters know of it.
		{"a join seen by one of three waits", [][]Endpoint{{a, b, c}, {a, b}, {a, b}}, []Endpoint{a, b}},
		// broker-3 died; its own link (and report) is gone, and two of the
		// three others have noticed.
		{"a departure seen by most", [][]Endpoint{{a, b}, {a, b}, {a, b, c}}, []Endpoint{a, b}},
		{"an address change needs a majority", [][]Endpoint{{a, c}, {a, c2}, {a, c2}}, []Endpoint{a, c2}},
		{"an address change seen by half keeps both for a moment", [][]Endpoint{{a, c}, {a, c2}}, []Endpoint{a, c, c2}},
	} {
		views := map[int][]Endpoint{}
		for i, v := range tc.views {
			views[i] = v
		}
		if got := majorityView(views); !slices.Equal(got, tc.want) {
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
	l1, l2, l3 := &bconn{}, &bconn{}, &bconn{}
	c.noteView(l1, []Endpoint{a, b})
	c.noteView(l2, []Endpoint{a, b, x}) // 1 of 2 lists broker-3: half
	c.noteView(l3, []Endpoint{b, a})    // 1 of 3: not yet
	c.noteView(l3, []Endpoint{x, b, a}) // 2 of 3
	c.noteView(l1, []Endpoint{a, b, x}) // caught up: no change to report
	c.dropView(l3)
	c.dropView(l3)                   // already gone: no report
	c.noteView(l2, []Endpoint{a, b}) // broker-3 gone for half of two: stays
	c.noteView(l1, []Endpoint{a, b}) // and for both
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
