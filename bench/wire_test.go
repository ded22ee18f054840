package bench

import (
	"bytes"
	"testing"
)

// unmaskedServerFrame builds a server frame (no mask) for parser tests.
func unmaskedServerFrame(op byte, fin bool, payload []byte) []byte {
	b0 := op
	if fin {
		b0 |= 0x80
	}
	n := len(payload)
	var b []byte
	switch {
	case n < 126:
		b = []byte{b0, byte(n)}
	case n <= 0xFFFF:
		b = []byte{b0, 126, byte(n >> 8), byte(n)}
	default:
		b = []byte{b0, 127, 0, 0, 0, 0, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}
	}
	return append(b, payload...)
}

func TestClientFrameRoundTrip(t *testing.T) {
	for _, n := range []int{0, 1, 125, 126, 65535, 65536, 200000} {
		payload := bytes.Repeat([]byte("ab"), n/2+1)[:n]
		fr := appendClientFrame(nil, opText, payload)
		if fr[1]&0x80 == 0 {
			t.Fatalf("n=%d: client frame not masked", n)
		}
		// parseFrame unmasks in place; feed it one byte short first.
		if _, k, err := parseFrame(fr[:len(fr)-1]); k != 0 || err != nil {
			t.Fatalf("n=%d: truncated frame parsed (%d, %v)", n, k, err)
		}
		f, k, err := parseFrame(fr)
		if err != nil || k != len(fr) || !f.fin || f.op != opText || !bytes.Equal(f.payload, payload) {
			t.Fatalf("n=%d: got k=%d err=%v fin=%v op=%d equal=%v", n, k, err, f.fin, f.op, bytes.Equal(f.payload, payload))
		}
	}
}

func TestParseServerFrames(t *testing.T) {
	var stream []byte
	stream = append(stream, unmaskedServerFrame(opText, true, nil)...)
	stream = append(stream, unmaskedServerFrame(opText, true, []byte(`{"rid":1}`))...)
	stream = append(stream, unmaskedServerFrame(opPing, true, []byte("x"))...)
	var ops []byte
	for off := 0; off < len(stream); {
		f, n, err := parseFrame(stream[off:])
		if err != nil || n == 0 {
			t.Fatalf("at %d: n=%d err=%v", off, n, err)
		}
		ops = append(ops, f.op)
		off += n
	}
	if !bytes.Equal(ops, []byte{opText, opText, opPing}) {
		t.Errorf("ops %v", ops)
	}
	if _, _, err := parseFrame([]byte{0x81 | 0x40, 0}); err == nil {
		t.Error("RSV bit accepted")
	}
	if _, _, err := parseFrame([]byte{0x81, 127, 0, 0, 0, 0, 0x10, 0, 0, 0}); err != errFrameTooBig {
		t.Errorf("oversized frame: %v", err)
	}
}

func TestField(t *testing.T) {
	obj := []byte(` { "event" : "#publish", "x":[1,{"rid":9}], "s":"a\"b}", "e":"q\\", "f":"\\\"", "data":{"channel":"c/1","data":"p"} , "rid": 12 }`)
	for _, c := range []struct{ key, want string }{
		{"event", `"#publish"`},
		{"data", `{"channel":"c/1","data":"p"}`},
		{"rid", "12"},
		{"s", `"a\"b}"`},
		{"x", `[1,{"rid":9}]`},
		{"e", `"q\\"`},  // an escaped backslash, then the closing quote
		{"f", `"\\\""`}, // an escaped backslash, then an escaped quote
	} {
		v, ok := field(obj, c.key)
		if !ok || string(v) != c.want {
			t.Errorf("field %q = %q, %v; want %q", c.key, v, ok, c.want)
		}
	}
	if _, ok := field(obj, "cid"); ok {
		t.Error("absent key found")
	}
	if _, ok := field([]byte(`{"rid":`), "rid"); ok {
		t.Error("truncated object accepted")
	}
	if _, ok := field([]byte(`[1]`), "rid"); ok {
		t.Error("array treated as object")
	}
}

func TestPacketsBatch(t *testing.T) {
	var got []string
	packets([]byte(` [{"event":"a"}, {"rid":2,"data":[1,2]} ,{"event":"b"}]`), func(p []byte) { got = append(got, string(p)) })
	want := []string{`{"event":"a"}`, `{"rid":2,"data":[1,2]}`, `{"event":"b"}`}
	if len(got) != len(want) {
		t.Fatalf("got %q", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("packet %d = %q, want %q", i, got[i], want[i])
		}
	}
}

func TestPayloadRoundTrip(t *testing.T) {
	for _, size := range []int{minPayload, 100, 1000} {
		p := appendPayload(nil, 7, 123456, 1700000000123456789, size)
		if len(p) != size {
			t.Errorf("size %d: payload is %d bytes", size, len(p))
		}
		pub, seq, ns, ok := parsePayload(p)
		if !ok || pub != 7 || seq != 123456 || ns != 1700000000123456789 {
			t.Errorf("size %d: parsed %d %d %d %v from %s", size, pub, seq, ns, ok, p)
		}
	}
	for _, bad := range []string{`""`, `"1.2"`, `"a.b.c."`, `5`, `"1.2.3`} {
		if _, _, _, ok := parsePayload([]byte(bad)); ok {
			t.Errorf("bad payload %s accepted", bad)
		}
	}
}

// The receive path must not allocate per message: parsing a frame, finding
// the fields of a #publish and reading the payload header.
func TestReceivePathAllocs(t *testing.T) {
	data := appendPublishData(nil, "bench/3", 1, 2, 3, 100)
	msg := appendTransmit(nil, "#publish", data)
	fr := unmaskedServerFrame(opText, true, msg)
	allocs := testing.AllocsPerRun(1000, func() {
		f, _, _ := parseFrame(fr)
		packets(f.payload, func(pkt []byte) {
			ev, _ := field(pkt, "event")
			if string(ev) != `"#publish"` {
				t.Fatal("not a publish")
			}
			d, _ := field(pkt, "data")
			v, _ := field(d, "data")
			if _, _, _, ok := parsePayload(v); !ok {
				t.Fatal("payload")
			}
		})
	})
	if allocs != 0 {
		t.Errorf("receive path allocates %.1f times per message", allocs)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte{0x81, 2, '{', '}'})
	f.Add(unmaskedServerFrame(opText, true, []byte(`[{"event":"#publish","data":{"channel":"a","data":"1.2.3.x"}}]`)))
	f.Fuzz(func(t *testing.T, b []byte) {
		// Any input: no panic, and a parsed frame never claims more bytes
		// than it was given.
		for off := 0; off < len(b); {
			fr, n, err := parseFrame(b[off:])
			if err != nil || n == 0 {
				return
			}
			if n > len(b)-off {
				t.Fatalf("frame of %d bytes from %d", n, len(b)-off)
			}
			packets(fr.payload, func(p []byte) {
				_, _ = field(p, "rid")
				d, _ := field(p, "data")
				v, _ := field(d, "data")
				parsePayload(v)
			})
			off += n
		}
	})
}

// BenchmarkReceivePublish measures the bench's own cost per received
// #publish through the poller's path: frame parse, SC scan, payload, order
// and latency accounting.
func BenchmarkReceivePublish(b *testing.B) {
	a := &agent{spec: agentSpec{Publishers: 4}}
	p := &poller{a: a}
	c := &conn{fd: -1}
	const n = 64
	var frames [][]byte
	for seq := range uint64(n) {
		data := appendPublishData(nil, "bench/1", seq%4, seq, 1, 100)
		frames = append(frames, unmaskedServerFrame(opText, true, appendTransmit(nil, "#publish", data)))
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(frames[0])))
	for i := 0; b.Loop(); i++ {
		if i%n == 0 {
			clear(c.last) // replay the same seqs without counting violations
		}
		if !p.consume(c, frames[i%n]) {
			b.Fatal("dropped")
		}
	}
	if p.st.orderViolations.Load() != 0 || p.st.badPayload.Load() != 0 {
		b.Fatalf("violations %d bad %d", p.st.orderViolations.Load(), p.st.badPayload.Load())
	}
}
