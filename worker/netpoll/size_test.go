package netpoll

import (
	"testing"
	"unsafe"
)

// TestConnSize keeps Conn in the 192-byte allocation class: it is the bulk of
// an idle connection's memory.
func TestConnSize(t *testing.T) {
	if n := unsafe.Sizeof(Conn{}); n > 192 {
		t.Fatalf("Conn is %d bytes, over the 192-byte size class", n)
	}
}
