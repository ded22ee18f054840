package link

import (
	"strings"
	"testing"
)

// TestFlowFrames: the flow-control kinds are empty frames both ways; a body
// is a protocol error, as for ping.
func TestFlowFrames(t *testing.T) {
	var b []byte
	b = AppendEmpty(b, TypeBehind)
	b = AppendEmpty(b, TypeCaughtUp)
	var got []Type
	d := Decoder{}
	if err := d.Feed(b, func(f *Frame) error { got = append(got, f.Type); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != TypeBehind || got[1] != TypeCaughtUp {
		t.Fatalf("decoded %v", got)
	}
	if TypeBehind.String() != "behind" || TypeCaughtUp.String() != "caughtup" {
		t.Fatalf("names %s %s", TypeBehind, TypeCaughtUp)
	}
	bad := append(appendHeader(nil, TypeBehind, 1), 1)
	d = Decoder{}
	err := d.Feed(bad, func(*Frame) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "must be empty") {
		t.Fatalf("behind with a body: %v", err)
	}
	d = Decoder{}
	if err := d.Feed(appendHeader(nil, TypeCaughtUp+1, 0), func(*Frame) error { return nil }); err == nil {
		t.Fatal("a kind past caughtup was accepted")
	}
}
