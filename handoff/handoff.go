// Package handoff passes accepted client connections from the balancer to a
// worker as file descriptors (SCM_RIGHTS) over a unix socket, together with
// any bytes the balancer already read from the connection ("prebuf").
//
// Wire format: the socket is SOCK_SEQPACKET, so every Send is exactly one
// message and the kernel never splits or merges them (no short writes, no
// framing to get wrong). A message is
//
//	byte 0      version (1)
//	bytes 1..n  prebuf (0..MaxPrebuf bytes)
//	ancillary   SCM_RIGHTS with exactly one fd
//
// The version byte also keeps every message non-empty: a zero-length read on
// a SEQPACKET socket means the peer has gone.
//
// One Listener accepts any number of senders (one per balancer process).
package handoff

import (
	"errors"
	"fmt"
	"net"
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

const version byte = 1

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
	msg, err := s.frame(prebuf)
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
	if fd < 0 {
		return fmt.Errorf("handoff: send to %s: bad fd %d", s.path, fd)
	}
	msg, err := s.frame(prebuf)
	if err != nil {
		return err
	}
	return s.sendFD(fd, msg)
}

// frame builds one message: the version byte, then prebuf.
func (s *Sender) frame(prebuf []byte) ([]byte, error) {
	if len(prebuf) > MaxPrebuf {
		return nil, fmt.Errorf("handoff: send %d bytes to %s: %w", len(prebuf), s.path, ErrPrebufTooLarge)
	}
	msg := make([]byte, 1+len(prebuf))
	msg[0] = version
	copy(msg[1:], prebuf)
	return msg, nil
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
