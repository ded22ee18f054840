package balancer

import (
	"bytes"
	"crypto/tls"
	"reflect"
	"unsafe"
)

// Releasing crypto/tls's read buffers while a proxied connection is idle.
//
// A tls.Conn keeps, for its whole life, the buffers its handshake grew:
// rawInput (ciphertext read from the socket, ~2 KB after a ClientHello) and
// hand (handshake messages, ~1.5 KB). A heap profile of 3,000 idle proxied
// connections (SHOAL_BALANCER_HEAPPROFILE, cost_test.go) put them at 3.5 KB
// of the ~7 KB live heap per connection; a connection that once received a
// full 16 KB record keeps a ~17 KB rawInput forever. crypto/tls has no API
// to release them, and they are empty whenever the connection is idle, so
// the event loop empties them itself: it drops hand after the handshake,
// and lends rawInput one of the loop's buffers only while records arrive,
// taking it back once crypto/tls holds nothing more.
//
// The fields are found by name and type when the package loads. If a Go
// release renames or retypes them, tlsBufs.ok is false and nothing is
// touched: connections then keep their buffers as before, and
// TestTLSBuffersReleased fails so the change is noticed.
//
// Safe because only the goroutine that owns the connection (the handshake
// goroutine, then the event loop) calls into it, and only between calls:
// crypto/tls holds no reference into these buffers between calls except
// input, which points into rawInput's array and is only dropped when empty.
var tlsBufs = findTLSBufs()

type tlsBufFields struct {
	ok                    bool
	rawInput, input, hand uintptr // offsets in tls.Conn
}

func findTLSBufs() tlsBufFields {
	t := reflect.TypeFor[tls.Conn]()
	var f tlsBufFields
	for _, want := range []struct {
		name string
		typ  reflect.Type
		off  *uintptr
	}{
		{"rawInput", reflect.TypeFor[bytes.Buffer](), &f.rawInput},
		{"input", reflect.TypeFor[bytes.Reader](), &f.input},
		{"hand", reflect.TypeFor[bytes.Buffer](), &f.hand},
	} {
		sf, ok := t.FieldByName(want.name)
		if !ok || sf.Type != want.typ || len(sf.Index) != 1 {
			return tlsBufFields{}
		}
		*want.off = sf.Offset
	}
	f.ok = true
	return f
}

func tlsField[T any](tc *tls.Conn, off uintptr) *T {
	return (*T)(unsafe.Add(unsafe.Pointer(tc), off))
}

// evInBufSize is the ciphertext buffer a loop lends a reading connection.
// crypto/tls grows its buffer when a record does not fit in the free end,
// unless the unread bytes plus the room it asks for fit in half of it, in
// which case it slides them to the front. The unread bytes are less than
// one record (16,645 bytes at most in TLS 1.3), plus at most the 1 KiB that
// evConn.Read may read past it, plus the 512 bytes (bytes.MinRead) of room
// it asks for: 18,181, so a buffer of twice 18 KiB is never replaced by a
// larger copy, and a loop keeps one size of buffer.
const evInBufSize = 36 << 10

// evInBufsKept bounds the loop's free buffers; more are only needed while
// several connections wait for the rest of a record at once.
const evInBufsKept = 4

// releaseHandshakeBufs drops what the handshake left in tc: the handshake
// message buffer, and the ciphertext buffer unless it holds records already
// (a TLS 1.3 client sends its request right behind Finished).
func releaseHandshakeBufs(tc *tls.Conn) {
	if !tlsBufs.ok {
		return
	}
	if h := tlsField[bytes.Buffer](tc, tlsBufs.hand); h.Len() == 0 {
		*h = bytes.Buffer{}
	}
	if tlsField[bytes.Buffer](tc, tlsBufs.rawInput).Len() == 0 && tlsField[bytes.Reader](tc, tlsBufs.input).Len() == 0 {
		*tlsField[bytes.Buffer](tc, tlsBufs.rawInput) = bytes.Buffer{}
		tlsField[bytes.Reader](tc, tlsBufs.input).Reset(nil)
	}
}

// lendInBuf gives tc one of the loop's ciphertext buffers before a read, if
// tc has none (it holds no partial record).
func (l *evLoop) lendInBuf(tc *tls.Conn) {
	if !tlsBufs.ok {
		return
	}
	raw := tlsField[bytes.Buffer](tc, tlsBufs.rawInput)
	if raw.Cap() > 0 {
		return // still holds a partial record, in its own or a lent buffer
	}
	var b []byte
	if n := len(l.inBufs); n > 0 {
		b = l.inBufs[n-1]
		l.inBufs[n-1] = nil
		l.inBufs = l.inBufs[:n-1]
	} else {
		b = make([]byte, 0, evInBufSize)
	}
	*raw = *bytes.NewBuffer(b)
}

// reclaimInBuf takes tc's ciphertext buffer back once crypto/tls has
// nothing left in it; a partial record keeps it until the rest arrives.
// It also drops a handshake buffer grown by a post-handshake message
// (KeyUpdate).
func (l *evLoop) reclaimInBuf(tc *tls.Conn) {
	if !tlsBufs.ok {
		return
	}
	if h := tlsField[bytes.Buffer](tc, tlsBufs.hand); h.Cap() > 0 && h.Len() == 0 {
		*h = bytes.Buffer{}
	}
	raw := tlsField[bytes.Buffer](tc, tlsBufs.rawInput)
	in := tlsField[bytes.Reader](tc, tlsBufs.input)
	if raw.Cap() == 0 || raw.Len() > 0 || in.Len() > 0 {
		return
	}
	raw.Reset()
	b := raw.AvailableBuffer() // the whole array, now that it is empty
	*raw = bytes.Buffer{}
	in.Reset(nil) // it pointed into b
	// A buffer crypto/tls had to grow (several records read at once) is
	// left to the GC, so the loop keeps only buffers of one size.
	if cap(b) == evInBufSize && len(l.inBufs) < evInBufsKept {
		l.inBufs = append(l.inBufs, b[:0])
	}
}
