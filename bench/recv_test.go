package bench

import (
	"testing"
	"time"
)

// slowPayload is the general path of onPacket for a #publish: the payload
// as field finds it, or false when the packet is not a #publish.
func slowPayload(pkt []byte) ([]byte, bool) {
	ev, ok := field(pkt, "event")
	if !ok || string(ev) != `"#publish"` {
		return nil, false
	}
	data, ok := field(pkt, "data")
	if !ok {
		return nil, false
	}
	return field(data, "data")
}

// TestPublishPayloadMatchesField: wherever the fast path answers, it finds
// the payload the general path finds; it declines every other shape.
func TestPublishPayloadMatchesField(t *testing.T) {
	for _, tc := range []struct {
		pkt  string
		fast bool
	}{
		{`{"event":"#publish","data":{"channel":"a","data":"0.1.2.xx"}}`, true},
		{`{"event":"#publish","data":{"channel":"a\"b","data":"0.1.2.x\\\"y"}}`, true},
		{`{"event":"#publish","data":{"channel":"a\\","data":"0.1.2.x"}}`, true},
		{`{"event":"#publish","data":{"channel":"","data":""}}`, true},
		// Shapes the fast path leaves to field.
		{`{"event":"#publish","data":{"channel":"a","data":{"x":1}}}`, false},
		{`{"event":"#publish","data":{"channel":"a","data":null}}`, false},
		{`{"event":"#publish","data":{"data":"0.1.2.x","channel":"a"}}`, false},
		{`{"event":"#publish", "data":{"channel":"a","data":"0.1.2.x"}}`, false},
		{`{"event":"#publish","data":{"channel":"a","data":"0.1.2.x"}} `, false},
		{`{"event":"#publish","data":{"channel":"a","data":"0.1.2.x"},"x":1}`, false},
		{`{"event":"#publish","data":{"channel":"a","data":"0.1.2.x`, false},
		{`{"event":"#publish","data":{"channel":"a`, false},
		{`{"event":"#publish","data":{"channel":"`, false},
		{`{"rid":1,"data":null}`, false},
	} {
		got, ok := publishPayload([]byte(tc.pkt))
		if ok != tc.fast {
			t.Errorf("%s: fast path %v, want %v", tc.pkt, ok, tc.fast)
			continue
		}
		if !ok {
			continue
		}
		want, wok := slowPayload([]byte(tc.pkt))
		if !wok || string(got) != string(want) {
			t.Errorf("%s: fast %q, field %q (%v)", tc.pkt, got, want, wok)
		}
	}
}

func FuzzPublishPayload(f *testing.F) {
	f.Add([]byte(`{"event":"#publish","data":{"channel":"a","data":"0.1.2.xx"}}`))
	f.Add([]byte(`{"event":"#publish","data":{"channel":"a\"","data":"\\"}}`))
	f.Fuzz(func(t *testing.T, pkt []byte) {
		got, ok := publishPayload(pkt)
		if !ok {
			return
		}
		want, wok := slowPayload(pkt)
		if !wok || string(got) != string(want) {
			t.Fatalf("%q: fast %q, field %q (%v)", pkt, got, want, wok)
		}
	})
}

// BenchmarkReceiveRead is the receive path as the poller runs it at a
// paced fan-out: a read brings a few frames (here 4) of one socket, and
// the read's time stamps them all. Compare with BenchmarkReceivePublish
// (one frame per call, a clock read per message).
func BenchmarkReceiveRead(b *testing.B) {
	a := &agent{spec: agentSpec{Publishers: 1}}
	p := &poller{a: a}
	c := &conn{fd: -1}
	const n, perRead = 64, 4
	var reads [][]byte
	var buf []byte
	for seq := range uint64(n) {
		data := appendPublishData(nil, "bench/1", 0, seq, 1, 100)
		buf = append(buf, unmaskedServerFrame(opText, true, appendTransmit(nil, "#publish", data))...)
		if (seq+1)%perRead == 0 {
			reads = append(reads, buf)
			buf = nil
		}
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if i%len(reads) == 0 {
			clear(c.last) // replay the same seqs without counting violations
		}
		c.rx = time.Now().UnixNano()
		if !p.consume(c, reads[i%len(reads)]) {
			b.Fatal("dropped")
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*perRead), "ns/msg")
	if p.st.orderViolations.Load() != 0 || p.st.badPayload.Load() != 0 {
		b.Fatalf("violations %d bad %d", p.st.orderViolations.Load(), p.st.badPayload.Load())
	}
}
