package link

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// DefaultMaxFrame fits the default max_payload (1 MiB) plus Overhead.
const DefaultMaxFrame = 1<<20 + Overhead

// FrameError is a malformed frame: what was wrong, in which frame, and the
// first bytes of it. A link that returns one must be closed: the stream has
// lost its framing.
type FrameError struct {
	Type    Type   // 0 when the header itself was bad
	Reason  string // what was wrong
	Snippet []byte // up to 16 bytes from the start of the frame
}

func (e *FrameError) Error() string {
	if e.Type == 0 {
		return fmt.Sprintf("link: bad frame header: %s (bytes % x)", e.Reason, e.Snippet)
	}
	return fmt.Sprintf("link: bad %s frame: %s (bytes % x)", e.Type, e.Reason, e.Snippet)
}

// ErrDecoderFailed is returned by Feed after a FrameError: the decoder does
// not resynchronise.
var ErrDecoderFailed = errors.New("link: decoder already failed on a malformed frame")

// Decoder turns a byte stream into frames. It is resumable: Feed takes bytes
// in whatever chunks the socket returns and keeps a partial frame between
// calls. A frame wholly inside one chunk is decoded in place (no copy); a
// frame split across chunks is gathered in a buffer that grows only as its
// bytes arrive, so a header that announces a huge frame costs nothing until
// the bytes exist, and never more than MaxFrame.
type Decoder struct {
	MaxFrame int // largest accepted length (type byte + body); 0 = DefaultMaxFrame

	hdr    [HeaderSize]byte
	nhdr   int    // header bytes gathered so far
	need   int    // body bytes (after the type byte) of the current frame
	body   []byte // partial body gathered so far
	inBody bool
	failed bool
}

func (d *Decoder) maxFrame() int {
	if d.MaxFrame <= 0 {
		return DefaultMaxFrame
	}
	return d.MaxFrame
}

// Feed decodes every complete frame in p, calling fn for each in order. A
// non-nil error from fn stops decoding and is returned as is; a malformed
// frame returns a *FrameError and the decoder refuses further input.
func (d *Decoder) Feed(p []byte, fn func(*Frame) error) error {
	if d.failed {
		return ErrDecoderFailed
	}
	var f Frame
	for len(p) > 0 {
		if !d.inBody {
			// Fast path: a whole header (and maybe the whole frame) in p.
			if d.nhdr == 0 && len(p) >= HeaderSize {
				copy(d.hdr[:], p[:HeaderSize])
				p = p[HeaderSize:]
				d.nhdr = HeaderSize
			} else {
				n := copy(d.hdr[d.nhdr:], p)
				d.nhdr += n
				p = p[n:]
				if d.nhdr < HeaderSize {
					return nil
				}
			}
			if err := d.startFrame(); err != nil {
				return err
			}
			if d.need <= len(p) && len(d.body) == 0 {
				body := p[:d.need]
				p = p[d.need:]
				if err := d.emit(&f, body, fn); err != nil {
					return err
				}
				continue
			}
		}
		take := min(d.need-len(d.body), len(p))
		d.body = append(d.body, p[:take]...)
		p = p[take:]
		if len(d.body) < d.need {
			return nil
		}
		body := d.body
		d.body = d.body[:0]
		if err := d.emit(&f, body, fn); err != nil {
			return err
		}
		// A buffer grown for one rare huge frame is not kept for the life
		// of the link.
		if cap(d.body) > 1<<20 {
			d.body = nil
		}
	}
	return nil
}

// startFrame validates the header just gathered.
func (d *Decoder) startFrame() error {
	n := int(binary.BigEndian.Uint32(d.hdr[:4]))
	t := Type(d.hdr[4])
	if n < 1 {
		return d.fail(&FrameError{Reason: "length 0 (must include the type byte)", Snippet: snip(d.hdr[:], nil)})
	}
	if n > d.maxFrame() {
		return d.fail(&FrameError{Type: t, Reason: fmt.Sprintf("length %d exceeds the limit %d", n, d.maxFrame()), Snippet: snip(d.hdr[:], nil)})
	}
	if t < TypeHello || t > TypeCaughtUp {
		return d.fail(&FrameError{Reason: fmt.Sprintf("unknown frame type %d", uint8(t)), Snippet: snip(d.hdr[:], nil)})
	}
	d.need = n - 1
	d.inBody = true
	return nil
}

func (d *Decoder) emit(f *Frame, body []byte, fn func(*Frame) error) error {
	d.inBody = false
	d.nhdr = 0
	*f = Frame{Type: Type(d.hdr[4])}
	if reason := parseBody(f, body); reason != "" {
		return d.fail(&FrameError{Type: f.Type, Reason: reason, Snippet: snip(d.hdr[:], body)})
	}
	return fn(f)
}

func (d *Decoder) fail(err *FrameError) error {
	d.failed = true
	d.body = nil
	return err
}

func snip(hdr, body []byte) []byte {
	out := make([]byte, 0, 16)
	out = append(out, hdr...)
	return append(out, body[:min(len(body), 16-len(hdr))]...)
}

// parseBody fills f from body and returns what was wrong, or "".
func parseBody(f *Frame, b []byte) string {
	be := binary.BigEndian
	switch f.Type {
	case TypeHello:
		if len(b) < helloFixed {
			return fmt.Sprintf("body %d bytes, need at least %d", len(b), helloFixed)
		}
		f.Version = be.Uint16(b)
		f.Epoch = be.Uint64(b[2:])
		f.Name = b[helloFixed:]
		if len(f.Name) > MaxChannel {
			return fmt.Sprintf("name of %d bytes exceeds %d", len(f.Name), MaxChannel)
		}
	case TypeSub, TypeUnsub:
		if len(b) == 0 {
			return "empty channel name"
		}
		if len(b) > MaxChannel {
			return fmt.Sprintf("channel name of %d bytes exceeds %d", len(b), MaxChannel)
		}
		f.Channel = b
	case TypePub:
		if len(b) < pubFixed {
			return fmt.Sprintf("body %d bytes, need at least %d", len(b), pubFixed)
		}
		f.ReqID = be.Uint64(b)
		cl := int(be.Uint16(b[8:]))
		if cl == 0 {
			return "empty channel name"
		}
		if pubFixed+cl > len(b) {
			return fmt.Sprintf("channel length %d runs past the body (%d bytes)", cl, len(b))
		}
		f.Channel = b[pubFixed : pubFixed+cl]
		f.Data = b[pubFixed+cl:]
	case TypePubAck:
		if len(b) < pubAckFixed {
			return fmt.Sprintf("body %d bytes, need at least %d", len(b), pubAckFixed)
		}
		f.ReqID = be.Uint64(b)
		f.Offset = be.Uint64(b[8:])
		f.Epoch = be.Uint64(b[16:])
		f.Err = b[pubAckFixed:]
	case TypeMsg:
		if len(b) < msgFixed {
			return fmt.Sprintf("body %d bytes, need at least %d", len(b), msgFixed)
		}
		f.Offset = be.Uint64(b)
		f.Epoch = be.Uint64(b[8:])
		cl := int(be.Uint16(b[16:]))
		if cl == 0 {
			return "empty channel name"
		}
		if msgFixed+cl > len(b) {
			return fmt.Sprintf("channel length %d runs past the body (%d bytes)", cl, len(b))
		}
		f.Channel = b[msgFixed : msgFixed+cl]
		f.Data = b[msgFixed+cl:]
	case TypeSubRec, TypeHistReq:
		if len(b) < subRecFixed+1 {
			return fmt.Sprintf("body %d bytes, need at least %d", len(b), subRecFixed+1)
		}
		f.ReqID = be.Uint64(b)
		f.Since = be.Uint64(b[8:])
		if f.Type == TypeSubRec {
			f.Epoch = be.Uint64(b[16:])
		} else {
			f.Limit = be.Uint64(b[16:])
		}
		f.Channel = b[subRecFixed:]
		if len(f.Channel) > MaxChannel {
			return fmt.Sprintf("channel name of %d bytes exceeds %d", len(f.Channel), MaxChannel)
		}
	case TypeRepl:
		if len(b) < replFixed {
			return fmt.Sprintf("body %d bytes, need at least %d", len(b), replFixed)
		}
		f.ReqID = be.Uint64(b)
		f.Offset = be.Uint64(b[8:])
		f.Epoch = be.Uint64(b[16:])
		cl := int(be.Uint16(b[24:]))
		if cl == 0 {
			return "empty channel name"
		}
		if replFixed+cl > len(b) {
			return fmt.Sprintf("channel length %d runs past the body (%d bytes)", cl, len(b))
		}
		f.Channel = b[replFixed : replFixed+cl]
		f.Data = b[replFixed+cl:]
	case TypePres:
		if len(b) < presFixed {
			return fmt.Sprintf("body %d bytes, need at least %d", len(b), presFixed)
		}
		f.ReqID = be.Uint64(b)
		f.Op = b[8]
		cl := int(be.Uint16(b[9:]))
		if presFixed+cl > len(b) {
			return fmt.Sprintf("channel length %d runs past the body (%d bytes)", cl, len(b))
		}
		f.Channel = b[presFixed : presFixed+cl]
		f.Data = b[presFixed+cl:]
	case TypeHist:
		if len(b) < histFixed {
			return fmt.Sprintf("body %d bytes, need at least %d", len(b), histFixed)
		}
		f.ReqID = be.Uint64(b)
		f.Offset = be.Uint64(b[8:])
		f.Time = int64(be.Uint64(b[16:]))
		f.Data = b[histFixed:]
	case TypeReply:
		if len(b) < replyFixed {
			return fmt.Sprintf("body %d bytes, need at least %d", len(b), replyFixed)
		}
		f.ReqID = be.Uint64(b)
		f.Offset = be.Uint64(b[8:])
		f.Epoch = be.Uint64(b[16:])
		f.Flags = b[24]
		f.Data = b[replyFixed:]
	case TypeEvent:
		if len(b) < eventFixed {
			return fmt.Sprintf("body %d bytes, need at least %d", len(b), eventFixed)
		}
		f.Op = b[0]
		cl := int(be.Uint16(b[1:]))
		if cl == 0 {
			return "empty channel name"
		}
		if eventFixed+cl > len(b) {
			return fmt.Sprintf("channel length %d runs past the body (%d bytes)", cl, len(b))
		}
		f.Channel = b[eventFixed : eventFixed+cl]
		f.Data = b[eventFixed+cl:]
	case TypePing, TypePong, TypeReady, TypeBehind, TypeCaughtUp:
		if len(b) != 0 {
			return fmt.Sprintf("body of %d bytes, must be empty", len(b))
		}
	case TypeMembers:
		// Validated here so a consumer's ParseMembers cannot fail later.
		rest := b
		for len(rest) > 0 {
			var ok bool
			if _, rest, ok = cutString(rest); !ok {
				return "truncated member name"
			}
			if _, rest, ok = cutString(rest); !ok {
				return "truncated member address"
			}
		}
		f.Data = b
	}
	return ""
}

// ReadFrames reads conn until it fails, feeding d; buf is the read buffer
// (its size bounds each read). With idle > 0 a peer that sends nothing for
// that long fails the read (both sides ping well within it). It returns
// io.EOF on a clean close, the *FrameError of a malformed frame, or fn's
// error.
func ReadFrames(conn net.Conn, d *Decoder, buf []byte, idle time.Duration, fn func(*Frame) error) error {
	for {
		if idle > 0 {
			if err := conn.SetReadDeadline(time.Now().Add(idle)); err != nil {
				return fmt.Errorf("link: setting read deadline: %w", err)
			}
		}
		n, err := conn.Read(buf)
		if n > 0 {
			if ferr := d.Feed(buf[:n], fn); ferr != nil {
				return ferr
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return io.EOF
			}
			return fmt.Errorf("link: reading: %w", err)
		}
	}
}
