// Package proxyproto encodes and parses the PROXY protocol version 2 header
// (the binary one; see haproxy's proxy-protocol.txt). The balancer writes it
// at the start of every TLS connection it proxies to a worker, so the worker
// sees the client's real address instead of the balancer's.
//
// Reader side, on the worker's proxy socket:
//
//	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
//	h, err := proxyproto.ReadHeader(conn) // reads exactly the header, nothing more
//	if err != nil { conn.Close(); return }  // no valid header: refuse the connection
//	_ = conn.SetReadDeadline(time.Time{})
//	remote := h.Src                         // *net.TCPAddr of the real client
//
// ReadHeader never reads past the header, so the stream that follows (the
// client's HTTP upgrade) is intact on conn and can be handed to anything,
// including a raw fd for epoll. Parse does the same on a byte slice.
package proxyproto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
)

// Signature starts every v2 header.
var Signature = [12]byte{0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A}

const (
	fixedLen = 16 // signature, ver/cmd, fam/proto, length

	verCmdLocal = 0x20 // version 2, LOCAL
	verCmdProxy = 0x21 // version 2, PROXY

	famUnspec     = 0x00
	famTCP4       = 0x11
	famTCP6       = 0x21
	famUnixStream = 0x31

	lenTCP4 = 12  // 4+4+2+2
	lenTCP6 = 36  // 16+16+2+2
	lenUnix = 216 // 108+108
)

// MaxTLVLen bounds the TLV bytes accepted after the addresses. We never send
// TLVs; other proxies may (ALPN, authority, ...), and a small allowance keeps
// those working while a hostile length cannot make the reader buffer 64 KiB.
const MaxTLVLen = 512

// MaxHeaderLen is the largest header ReadHeader and Parse accept.
const MaxHeaderLen = fixedLen + lenUnix + MaxTLVLen

// Errors; every parse error wraps one of them.
var (
	ErrNoSignature = errors.New("proxyproto: no PROXY v2 signature")
	ErrInvalid     = errors.New("proxyproto: invalid PROXY v2 header")
	ErrTooLong     = errors.New("proxyproto: PROXY v2 header too long")
	// ErrIncomplete is returned by Parse when b holds a prefix of a valid
	// header; read more and call again.
	ErrIncomplete = errors.New("proxyproto: incomplete PROXY v2 header")
)

// Header is a parsed PROXY v2 header.
type Header struct {
	// Local is the LOCAL command: the proxy's own connection (a health
	// check), carrying no client. Src and Dst are nil.
	Local bool
	// Src is the client, Dst the address it connected to: *net.TCPAddr for
	// TCP over IPv4/IPv6, *net.UnixAddr for unix streams, nil for UNSPEC.
	Src, Dst net.Addr
}

// Encode returns the header announcing a connection from src to dst. Both
// *net.TCPAddr: TCP4 if both are IPv4, else TCP6 (IPv4 mapped). Both
// *net.UnixAddr: UNIX stream. Anything else (or nil): PROXY with UNSPEC
// addresses, which tells the receiver to use the socket's own addresses.
func Encode(src, dst net.Addr) []byte {
	return AppendHeader(nil, src, dst)
}

// EncodeLocal returns a LOCAL header (for the proxy's own health checks).
func EncodeLocal() []byte {
	b := append([]byte(nil), Signature[:]...)
	return append(b, verCmdLocal, famUnspec, 0, 0)
}

// AppendHeader appends Encode(src, dst) to b.
func AppendHeader(b []byte, src, dst net.Addr) []byte {
	b = append(b, Signature[:]...)
	b = append(b, verCmdProxy)
	st, sok := src.(*net.TCPAddr)
	dt, dok := dst.(*net.TCPAddr)
	if sok && dok && st != nil && dt != nil {
		s4, d4 := st.IP.To4(), dt.IP.To4()
		if s4 != nil && d4 != nil {
			b = append(b, famTCP4, 0, lenTCP4)
			b = append(b, s4...)
			b = append(b, d4...)
		} else {
			b = append(b, famTCP6, 0, lenTCP6)
			b = append(b, ip16(st.IP)...)
			b = append(b, ip16(dt.IP)...)
		}
		b = binary.BigEndian.AppendUint16(b, uint16(st.Port))
		return binary.BigEndian.AppendUint16(b, uint16(dt.Port))
	}
	su, sok := src.(*net.UnixAddr)
	du, dok := dst.(*net.UnixAddr)
	if sok && dok && su != nil && du != nil && len(su.Name) <= 108 && len(du.Name) <= 108 {
		b = append(b, famUnixStream)
		b = binary.BigEndian.AppendUint16(b, lenUnix)
		b = appendUnixPath(b, su.Name)
		return appendUnixPath(b, du.Name)
	}
	return append(b, famUnspec, 0, 0)
}

func ip16(ip net.IP) []byte {
	if v := ip.To16(); v != nil {
		return v
	}
	return make([]byte, 16) // no IP at all: unspecified, not a panic
}

func appendUnixPath(b []byte, name string) []byte {
	var p [108]byte
	copy(p[:], name)
	return append(b, p[:]...)
}

// ReadHeader reads one PROXY v2 header from r, reading exactly its bytes.
// The caller sets a deadline on r: a peer that sends nothing must not hold
// the reader. Any error means the connection must be refused.
func ReadHeader(r io.Reader) (Header, error) {
	var buf [MaxHeaderLen]byte
	got, err := io.ReadFull(r, buf[:fixedLen])
	if err != nil {
		// Judge what did arrive, so a short plain-text request is refused
		// as "no signature" rather than with a bare EOF.
		if _, _, perr := Parse(buf[:got]); perr != nil && !errors.Is(perr, ErrIncomplete) {
			return Header{}, perr
		}
		return Header{}, fmt.Errorf("proxyproto: read header: %w", err)
	}
	if _, _, err := Parse(buf[:fixedLen]); err != nil && !errors.Is(err, ErrIncomplete) {
		return Header{}, err
	}
	n := fixedLen + int(binary.BigEndian.Uint16(buf[14:16]))
	if n > MaxHeaderLen {
		return Header{}, fmt.Errorf("%w: %d bytes (max %d)", ErrTooLong, n, MaxHeaderLen)
	}
	if _, err := io.ReadFull(r, buf[fixedLen:n]); err != nil {
		return Header{}, fmt.Errorf("proxyproto: read header addresses: %w", err)
	}
	h, _, err := Parse(buf[:n])
	return h, err
}

// Parse parses a header at the start of b and returns it with its length.
// It returns ErrIncomplete when b is a valid prefix that is too short, and
// checks every byte it has as early as it can (a stream that is not PROXY v2
// is refused on its first differing byte).
func Parse(b []byte) (Header, int, error) {
	for i := 0; i < len(b) && i < len(Signature); i++ {
		if b[i] != Signature[i] {
			return Header{}, 0, fmt.Errorf("%w (byte %d is %#02x)", ErrNoSignature, i, b[i])
		}
	}
	if len(b) > 12 && b[12] != verCmdLocal && b[12] != verCmdProxy {
		return Header{}, 0, fmt.Errorf("%w: version/command byte %#02x", ErrInvalid, b[12])
	}
	if len(b) > 13 {
		switch b[13] {
		case famUnspec, famTCP4, famTCP6, famUnixStream:
		default:
			// UDP and unix datagrams are valid PROXY v2 but never ours.
			return Header{}, 0, fmt.Errorf("%w: unsupported family/protocol %#02x", ErrInvalid, b[13])
		}
	}
	if len(b) < fixedLen {
		return Header{}, 0, ErrIncomplete
	}
	fam := b[13]
	addrLen := int(binary.BigEndian.Uint16(b[14:16]))
	var need int
	switch fam {
	case famTCP4:
		need = lenTCP4
	case famTCP6:
		need = lenTCP6
	case famUnixStream:
		need = lenUnix
	}
	if addrLen < need {
		return Header{}, 0, fmt.Errorf("%w: length %d shorter than the %d address bytes of family %#02x", ErrInvalid, addrLen, need, fam)
	}
	if addrLen-need > MaxTLVLen {
		return Header{}, 0, fmt.Errorf("%w: %d bytes (max %d)", ErrTooLong, fixedLen+addrLen, MaxHeaderLen)
	}
	total := fixedLen + addrLen
	if len(b) < total {
		return Header{}, 0, ErrIncomplete
	}
	if err := checkTLVs(b[fixedLen+need : total]); err != nil {
		return Header{}, 0, err
	}
	if b[12] == verCmdLocal {
		// LOCAL: addresses, if any, must be ignored (spec).
		return Header{Local: true}, total, nil
	}
	a := b[fixedLen:]
	var h Header
	switch fam {
	case famTCP4:
		h.Src = tcpAddr(a[0:4], a[8:10])
		h.Dst = tcpAddr(a[4:8], a[10:12])
	case famTCP6:
		h.Src = tcpAddr(a[0:16], a[32:34])
		h.Dst = tcpAddr(a[16:32], a[34:36])
	case famUnixStream:
		h.Src = &net.UnixAddr{Name: unixPath(a[0:108]), Net: "unix"}
		h.Dst = &net.UnixAddr{Name: unixPath(a[108:216]), Net: "unix"}
	}
	return h, total, nil
}

func tcpAddr(ip, port []byte) *net.TCPAddr {
	addr, _ := netip.AddrFromSlice(ip)
	return &net.TCPAddr{IP: net.IP(addr.Unmap().AsSlice()), Port: int(binary.BigEndian.Uint16(port))}
}

func unixPath(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// checkTLVs verifies that the bytes after the addresses are whole
// type-length-value records (we skip their contents).
func checkTLVs(b []byte) error {
	for len(b) > 0 {
		if len(b) < 3 {
			return fmt.Errorf("%w: truncated TLV (%d bytes left)", ErrInvalid, len(b))
		}
		l := 3 + int(binary.BigEndian.Uint16(b[1:3]))
		if l > len(b) {
			return fmt.Errorf("%w: TLV type %#02x of %d bytes overruns the header", ErrInvalid, b[0], l)
		}
		b = b[l:]
	}
	return nil
}
