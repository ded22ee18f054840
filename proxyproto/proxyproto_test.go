package proxyproto

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"testing/iotest"
)

func tcp(s string) *net.TCPAddr {
	a, err := net.ResolveTCPAddr("tcp", s)
	if err != nil {
		panic(err)
	}
	return a
}

func TestEncodeIPv4Bytes(t *testing.T) {
	got := Encode(tcp("127.0.0.2:40000"), tcp("127.0.0.1:8443"))
	want := append(append([]byte(nil), Signature[:]...),
		0x21, 0x11, 0x00, 0x0C,
		127, 0, 0, 2, 127, 0, 0, 1,
		0x9C, 0x40, 0x20, 0xFB)
	if !bytes.Equal(got, want) {
		t.Fatalf("Encode =\n% x\nwant\n% x", got, want)
	}
}

func TestRoundTrip(t *testing.T) {
	cases := []struct {
		name              string
		src, dst          net.Addr
		wantSrc, wantDst  string
		wantLen           int
		wantNilAddrs, loc bool
		local             bool
	}{
		{name: "ipv4", src: tcp("10.1.2.3:1234"), dst: tcp("127.0.0.1:8443"), wantSrc: "10.1.2.3:1234", wantDst: "127.0.0.1:8443", wantLen: 28},
		{name: "ipv6", src: tcp("[2001:db8::1]:5"), dst: tcp("[::1]:443"), wantSrc: "[2001:db8::1]:5", wantDst: "[::1]:443", wantLen: 52},
		{name: "mixed", src: tcp("[2001:db8::1]:5"), dst: tcp("127.0.0.1:443"), wantSrc: "[2001:db8::1]:5", wantDst: "127.0.0.1:443", wantLen: 52},
		{name: "unix", src: &net.UnixAddr{Name: "/run/a.sock", Net: "unix"}, dst: &net.UnixAddr{Name: "/run/b.sock", Net: "unix"}, wantSrc: "/run/a.sock", wantDst: "/run/b.sock", wantLen: 232},
		{name: "unspec", src: nil, dst: tcp("127.0.0.1:1"), wantNilAddrs: true, wantLen: 16},
		{name: "local", local: true, wantNilAddrs: true, wantLen: 16},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := Encode(c.src, c.dst)
			if c.local {
				b = EncodeLocal()
			}
			if len(b) != c.wantLen {
				t.Fatalf("len = %d, want %d", len(b), c.wantLen)
			}
			h, n, err := Parse(append(b, "GET /"...))
			if err != nil || n != len(b) {
				t.Fatalf("Parse: n=%d err=%v", n, err)
			}
			if h.Local != c.local {
				t.Errorf("Local = %v", h.Local)
			}
			if c.wantNilAddrs {
				if h.Src != nil || h.Dst != nil {
					t.Errorf("addresses %v %v, want nil", h.Src, h.Dst)
				}
				return
			}
			if h.Src.String() != c.wantSrc || h.Dst.String() != c.wantDst {
				t.Errorf("got %v -> %v, want %s -> %s", h.Src, h.Dst, c.wantSrc, c.wantDst)
			}
			// Every proper prefix is incomplete, never an error or a header.
			for i := range len(b) {
				if _, _, err := Parse(b[:i]); !errors.Is(err, ErrIncomplete) {
					t.Fatalf("prefix %d: %v, want ErrIncomplete", i, err)
				}
			}
		})
	}
}

func TestIPv4SrcIsFourBytes(t *testing.T) {
	h, _, err := Parse(Encode(tcp("127.0.0.2:1"), tcp("127.0.0.1:2")))
	if err != nil {
		t.Fatal(err)
	}
	if ip := h.Src.(*net.TCPAddr).IP; len(ip) != 4 || !ip.Equal(net.IPv4(127, 0, 0, 2)) {
		t.Fatalf("src IP %v (len %d)", ip, len(ip))
	}
}

func TestReadHeaderLeavesStream(t *testing.T) {
	hdr := Encode(tcp("127.0.0.2:40000"), tcp("127.0.0.1:8443"))
	r := iotest.OneByteReader(bytes.NewReader(append(hdr, "GET / HTTP/1.1\r\n"...)))
	h, err := ReadHeader(r)
	if err != nil {
		t.Fatal(err)
	}
	if h.Src.String() != "127.0.0.2:40000" {
		t.Fatalf("src %v", h.Src)
	}
	rest, _ := io.ReadAll(r)
	if string(rest) != "GET / HTTP/1.1\r\n" {
		t.Fatalf("rest = %q", rest)
	}
}

func TestRejects(t *testing.T) {
	valid := Encode(tcp("1.2.3.4:5"), tcp("6.7.8.9:10"))
	mod := func(f func(b []byte) []byte) []byte {
		return f(append([]byte(nil), valid...))
	}
	cases := []struct {
		name string
		in   []byte
		want error
	}{
		{"plain http", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), ErrNoSignature},
		{"short plain", []byte("GET /"), ErrNoSignature},
		{"v1 text", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"), ErrNoSignature},
		{"version 1 byte", mod(func(b []byte) []byte { b[12] = 0x11; return b }), ErrInvalid},
		{"command 2", mod(func(b []byte) []byte { b[12] = 0x22; return b }), ErrInvalid},
		{"udp", mod(func(b []byte) []byte { b[13] = 0x12; return b }), ErrInvalid},
		{"unknown family", mod(func(b []byte) []byte { b[13] = 0x41; return b }), ErrInvalid},
		{"length short for tcp4", mod(func(b []byte) []byte { b[15] = 11; return b[:16+11] }), ErrInvalid},
		{"huge length", mod(func(b []byte) []byte { b[14], b[15] = 0xFF, 0xFF; return b }), ErrTooLong},
		{"truncated tlv", mod(func(b []byte) []byte { b[15] = 14; return append(b, 0x01, 0x00) }), ErrInvalid},
		{"overrunning tlv", mod(func(b []byte) []byte { b[15] = 16; return append(b, 0x01, 0x00, 0x09, 'x') }), ErrInvalid},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if _, _, err := Parse(c.in); !errors.Is(err, c.want) {
				t.Errorf("Parse: %v, want %v", err, c.want)
			}
			if _, err := ReadHeader(bytes.NewReader(c.in)); !errors.Is(err, c.want) {
				t.Errorf("ReadHeader: %v, want %v", err, c.want)
			}
		})
	}
}

func TestTLVsSkipped(t *testing.T) {
	b := Encode(tcp("1.2.3.4:5"), tcp("6.7.8.9:10"))
	b[15] = 12 + 3 + 2
	b = append(b, 0x01, 0x00, 0x02, 'h', '2') // PP2_TYPE_ALPN "h2"
	h, n, err := Parse(append(b, 'X'))
	if err != nil || n != len(b) || h.Src.String() != "1.2.3.4:5" {
		t.Fatalf("h=%+v n=%d err=%v", h, n, err)
	}
}

func TestReadHeaderEOF(t *testing.T) {
	hdr := Encode(tcp("1.2.3.4:5"), tcp("6.7.8.9:10"))
	for _, n := range []int{0, 5, 16, 20} {
		if _, err := ReadHeader(bytes.NewReader(hdr[:n])); err == nil || errors.Is(err, ErrNoSignature) {
			t.Errorf("prefix %d: %v, want a read error", n, err)
		}
	}
}

// FuzzParse: Parse never panics, never claims more than it was given, agrees
// with ReadHeader on any split of the input, and re-encodes what it accepts.
func FuzzParse(f *testing.F) {
	f.Add(Encode(tcp("127.0.0.2:40000"), tcp("127.0.0.1:8443")))
	f.Add(Encode(tcp("[2001:db8::1]:5"), tcp("[::1]:443")))
	f.Add(Encode(&net.UnixAddr{Name: "/a", Net: "unix"}, &net.UnixAddr{Name: "/b", Net: "unix"}))
	f.Add(EncodeLocal())
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, n, err := Parse(b)
		if err != nil {
			if n != 0 {
				t.Fatalf("error with n=%d", n)
			}
		} else if n < fixedLen || n > len(b) || n > MaxHeaderLen {
			t.Fatalf("n=%d for %d bytes", n, len(b))
		}
		// The reader path reads in uneven pieces; it must agree.
		rh, rerr := ReadHeader(iotest.HalfReader(bytes.NewReader(b)))
		if (err == nil) != (rerr == nil) && !errors.Is(err, ErrIncomplete) {
			t.Fatalf("Parse err %v, ReadHeader err %v", err, rerr)
		}
		if err == nil {
			if rh.Local != h.Local || addrString(rh.Src) != addrString(h.Src) || addrString(rh.Dst) != addrString(h.Dst) {
				t.Fatalf("Parse %+v, ReadHeader %+v", h, rh)
			}
			if _, isTCP := h.Src.(*net.TCPAddr); isTCP && !h.Local {
				h2, _, err := Parse(Encode(h.Src, h.Dst))
				if err != nil || addrString(h2.Src) != addrString(h.Src) || addrString(h2.Dst) != addrString(h.Dst) {
					t.Fatalf("re-encode: %+v vs %+v, %v", h2, h, err)
				}
			}
		}
	})
}

func addrString(a net.Addr) string {
	if a == nil {
		return "<nil>"
	}
	return a.String()
}
