// Package handoff passes accepted client connections from the balancer to a
// worker as file descriptors (SCM_RIGHTS) over a unix socket, together with
// any bytes the balancer already read from the connection ("prebuf").
//
// Wire format: the socket is SOCK_SEQPACKET, so every Send is exactly one
// message and the kernel never splits or merges them (no short writes, no
// framing to get wrong). A message is either version 1
//
//	byte 0      version (1)
//	bytes 1..n  prebuf (0..MaxPrebuf bytes)
//	ancillary   SCM_RIGHTS with exactly one fd
//
// or version 2, which also carries what the sender knows about the socket
// (Meta), so the receiver can skip the system calls that would find it out
// (fcntl, setsockopt, getpeername: several µs each, per connection):
//
//	byte 0      version (2)
//	byte 1      flags: bit 0 O_NONBLOCK is set, bit 1 TCP_NODELAY is set
//	byte 2      length L of the peer address: 0 (unknown), 6 or 18
//	bytes 3..   peer address: IPv4 or IPv6 bytes, then the port (big endian)
//	then        prebuf (0..MaxPrebuf bytes)
//	ancillary   SCM_RIGHTS with exactly one fd
//
// A sender with nothing to say (zero Meta) sends version 1, and a receiver
// takes both, so a worker and a balancer one release apart still
// understand each other in the direction that matters during an upgrade.
//
// The version byte also keeps every message non-empty: a zero-length read on
// a SEQPACKET socket means the peer has gone.
//
// One Listener accepts any number of senders (one per balancer process).
package handoff

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"
)

// MaxPrebuf is the largest prebuf one Send carries. A balancer only ever
// reads a little of a plain connection before deciding where it goes (at most
// a request line and headers), so 16 KiB is ample and keeps each message well
// under the socket's send buffer.
const MaxPrebuf = 16 << 10

// DefaultSendTimeout bounds how long Send waits for room in a worker's
// receive queue. A live worker drains its queue in microseconds; one that has
// not done so in this time is stuck, and the balancer should route elsewhere.
const DefaultSendTimeout = 2 * time.Second

const (
	version   byte = 1
	versionV2 byte = 2
)

// Version 2 flag bits and the largest header (version, flags, length, IPv6
// address and port).
const (
	flagNonblock byte = 1 << 0
	flagNoDelay  byte = 1 << 1
	maxHeader         = 3 + 16 + 2
)

// Meta is what a sender knows about a socket it passes: whatever it leaves
// zero, the receiver has to find out (or set) itself.
type Meta struct {
	// Peer is the client's address as accept(2) returned it; the zero
	// value means unknown. An IPv6 address with a zone is not carried (the
	// receiver asks the socket), since the zone is an interface index the
	// receiver would have to look up anyway.
	Peer netip.AddrPort
	// Nonblock: O_NONBLOCK is set on the socket's open file description,
	// which the receiver's descriptor shares (accept4 with SOCK_NONBLOCK).
	Nonblock bool
	// NoDelay: TCP_NODELAY is set (inherited from the listening socket,
	// or set by the sender).
	NoDelay bool
}

// oobSpace is room for a few fds, not one: a peer that sends more than one is
// misbehaving, but we want to receive (and close) them instead of relying on
// the kernel's truncation, so the error is explicit.
var oobSpace = syscall.CmsgSpace(4 * 4)

// Errors callers can test with errors.Is.
var (
	// ErrPrebufTooLarge: Send was given more than MaxPrebuf bytes.
	ErrPrebufTooLarge = errors.New("handoff: prebuf larger than MaxPrebuf")
	// ErrBadMessage: the receiver got a message that is not a valid handoff
	// (wrong version, no fd, several fds, truncated). Accept skips such
	// messages after closing any fds they carried; it is exported for logs.
	ErrBadMessage = errors.New("handoff: malformed message")
)

// Sender is the balancer's end of one worker's handoff socket. It is safe for
// concurrent use.
type Sender struct {
	path    string
	timeout time.Duration

	mu   sync.Mutex // serialises Send so the per-call write deadline is its own
	conn *net.UnixConn
}

// Dial connects to the worker's handoff socket at path.
func Dial(path string) (*Sender, error) {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("handoff: dial %s: %w", path, err)
	}
	return &Sender{path: path, timeout: DefaultSendTimeout, conn: c}, nil
}

// SetTimeout changes how long one Send may wait for the receiver (d > 0).
func (s *Sender) SetTimeout(d time.Duration) {
	if d <= 0 {
		return
	}
	s.mu.Lock()
	s.timeout = d
	s.mu.Unlock()
}

// Path is the socket path this Sender is connected to.
func (s *Sender) Path() string { return s.path }

// Send passes a duplicate of f's descriptor and prebuf to the receiver as one
// message. It does not close f: the caller closes its copy afterwards (the
// receiver holds its own). Send fails quickly when the receiver has gone
// (EPIPE / ECONNRESET) and after the send timeout when it has stopped reading;
// after any error the Sender should be considered dead.
func (s *Sender) Send(f *os.File, prebuf []byte) error {
	if f == nil {
		return fmt.Errorf("handoff: send to %s: nil file", s.path)
	}
	return s.SendConn(f, prebuf)
}

// SendConn is Send for anything with a raw descriptor (*net.TCPConn,
// *os.File, ...). It passes the connection's own descriptor without the
// dup(2) that TCPConn.File makes, so the balancer can hand a connection over
// and close it with one syscall less. Like Send, it does not close c.
func (s *Sender) SendConn(c syscall.Conn, prebuf []byte) error {
	msg, err := s.frame(Meta{}, prebuf)
	if err != nil {
		return err
	}

	// SyscallConn (unlike File.Fd) leaves the descriptor's blocking mode
	// alone and keeps it open for the duration of the call.
	rc, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("handoff: send to %s: raw conn: %w", s.path, err)
	}
	var sendErr error
	ctlErr := rc.Control(func(fd uintptr) {
		sendErr = s.sendFD(int(fd), msg)
	})
	if ctlErr != nil {
		return fmt.Errorf("handoff: send to %s: %w", s.path, ctlErr)
	}
	return sendErr
}

// SendFD is Send for a raw descriptor the caller owns (and still closes):
// the balancer's accept loop takes connections with accept4(2) and never
// wraps them in a net.Conn.
func (s *Sender) SendFD(fd int, prebuf []byte) error {
	return s.SendFDMeta(fd, Meta{}, prebuf)
}

// SendFDMeta is SendFD with what the caller knows about the socket, which
// the receiver gets from AcceptMeta (a version 2 message; version 1 when m
// is zero).
func (s *Sender) SendFDMeta(fd int, m Meta, prebuf []byte) error {
	if fd < 0 {
		return fmt.Errorf("handoff: send to %s: bad fd %d", s.path, fd)
	}
	msg, err := s.frame(m, prebuf)
	if err != nil {
		return err
	}
	return s.sendFD(fd, msg)
}

// frame builds one message: version 1 (the version byte, then prebuf) when
// m says nothing, else version 2 (see the package comment).
func (s *Sender) frame(m Meta, prebuf []byte) ([]byte, error) {
	if len(prebuf) > MaxPrebuf {
		return nil, fmt.Errorf("handoff: send %d bytes to %s: %w", len(prebuf), s.path, ErrPrebufTooLarge)
	}
	if m == (Meta{}) {
		msg := make([]byte, 1+len(prebuf))
		msg[0] = version
		copy(msg[1:], prebuf)
		return msg, nil
	}
	return append(appendHeader(make([]byte, 0, maxHeader+len(prebuf)), m), prebuf...), nil
}

// appendHeader appends m as a version 2 header.
func appendHeader(dst []byte, m Meta) []byte {
	var flags byte
	if m.Nonblock {
		flags |= flagNonblock
	}
	if m.NoDelay {
		flags |= flagNoDelay
	}
	ip := m.Peer.Addr()
	if !m.Peer.IsValid() || ip.Zone() != "" {
		return append(dst, versionV2, flags, 0)
	}
	if ip.Is4() {
		a := ip.As4()
		dst = append(append(dst, versionV2, flags, 4+2), a[:]...)
	} else {
		a := ip.As16()
		dst = append(append(dst, versionV2, flags, 16+2), a[:]...)
	}
	return binary.BigEndian.AppendUint16(dst, m.Peer.Port())
}

// parseHeader splits a received message into its Meta and prebuf; ok is
// false when it is neither a valid version 1 nor a valid version 2 message.
func parseHeader(msg []byte) (m Meta, prebuf []byte, ok bool) {
	if len(msg) < 1 {
		return Meta{}, nil, false
	}
	switch msg[0] {
	case version:
		prebuf = msg[1:]
	case versionV2:
		if len(msg) < 3 || msg[1]&^(flagNonblock|flagNoDelay) != 0 {
			return Meta{}, nil, false
		}
		m.Nonblock = msg[1]&flagNonblock != 0
		m.NoDelay = msg[1]&flagNoDelay != 0
		l := int(msg[2])
		rest := msg[3:]
		if len(rest) < l {
			return Meta{}, nil, false
		}
		switch l {
		case 0:
		case 4 + 2:
			m.Peer = netip.AddrPortFrom(netip.AddrFrom4([4]byte(rest[:4])), binary.BigEndian.Uint16(rest[4:6]))
		case 16 + 2:
			m.Peer = netip.AddrPortFrom(netip.AddrFrom16([16]byte(rest[:16])), binary.BigEndian.Uint16(rest[16:18]))
		default:
			return Meta{}, nil, false
		}
		prebuf = rest[l:]
	default:
		return Meta{}, nil, false
	}
	if len(prebuf) > MaxPrebuf {
		return Meta{}, nil, false
	}
	return m, prebuf, true
}

func (s *Sender) sendFD(fd int, msg []byte) error {
	oob := syscall.UnixRights(fd)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil {
		return fmt.Errorf("handoff: send to %s: %w", s.path, net.ErrClosed)
	}
	if err := s.conn.SetWriteDeadline(time.Now().Add(s.timeout)); err != nil {
		return fmt.Errorf("handoff: send to %s: set deadline: %w", s.path, err)
	}
	n, oobn, err := s.conn.WriteMsgUnix(msg, oob, nil)
	if err != nil {
		return fmt.Errorf("handoff: send to %s: %w", s.path, err)
	}
	// SEQPACKET is all or nothing; anything else is a kernel surprise we
	// must not paper over, since the receiver would see a corrupt prebuf.
	if n != len(msg) || oobn != len(oob) {
		return fmt.Errorf("handoff: send to %s: short write %d/%d bytes, %d/%d oob", s.path, n, len(msg), oobn, len(oob))
	}
	return nil
}

// Close closes the connection to the worker. Fds already sent stay with the
// worker (or are released by the kernel if it never reads them).
func (s *Sender) Close() error {
	s.mu.Lock()
	c := s.conn
	s.conn = nil
	s.mu.Unlock()
	if c == nil {
		return nil
	}
	if err := c.Close(); err != nil {
		return fmt.Errorf("handoff: close sender %s: %w", s.path, err)
	}
	return nil
}
