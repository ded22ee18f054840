package link

import "testing"

// FuzzDecoder feeds arbitrary bytes, whole and split in two, with a small
// frame limit: the decoder must never panic, must decode the same frames
// either way, and must never hold more than the limit.
func FuzzDecoder(f *testing.F) {
	f.Add(sample(), uint16(3))
	f.Add(AppendPub(nil, 1, "a", []byte("b")), uint16(7))
	f.Add([]byte{0, 0, 0, 0, 1}, uint16(2))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 4}, uint16(1))
	f.Fuzz(func(t *testing.T, in []byte, split uint16) {
		const limit = 4096
		decode := func(chunks ...[]byte) (n int, failed bool) {
			d := Decoder{MaxFrame: limit}
			for _, c := range chunks {
				err := d.Feed(c, func(fr *Frame) error {
					n++
					if fr.Type == TypeMembers {
						if _, err := ParseMembers(fr.Data); err != nil {
							t.Fatalf("validated members frame fails to parse: %v", err)
						}
					}
					return nil
				})
				if cap(d.body) > limit {
					t.Fatalf("partial buffer grew to %d > limit %d", cap(d.body), limit)
				}
				if err != nil {
					return n, true
				}
			}
			return n, false
		}
		n1, f1 := decode(in)
		s := int(split) % (len(in) + 1)
		n2, f2 := decode(in[:s], in[s:])
		if n1 != n2 || f1 != f2 {
			t.Fatalf("whole: %d frames failed=%v; split at %d: %d frames failed=%v", n1, f1, s, n2, f2)
		}
	})
}
