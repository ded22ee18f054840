// Package link is the internal wire format between workers and brokers: one
// long-lived stream (unix socket on one host, TCP across hosts) per
// worker×broker pair, carrying length-prefixed binary frames.
//
// Every frame is
//
//	u32 length (big endian) of what follows: the type byte and the body
//	u8  type
//	body (layout per type, below)
//
// Bodies (integers big endian; "rest" = every remaining byte of the frame):
//
//	hello   u16 version, u64 epoch, name rest      (both ways: worker name / broker name+epoch)
//	sub     channel rest                           (worker → broker)
//	unsub   channel rest                           (worker → broker)
//	pub     u64 request id, u16 channel length, channel, data rest   (worker → broker)
//	puback  u64 request id, u64 offset, u64 epoch, error text rest   (broker → worker; empty text = ok)
//	msg     u64 offset, u64 epoch, u16 channel length, channel, data rest (broker → worker)
//	ping    (empty)                                (either way; the peer answers pong)
//	pong    (empty)
//	members repeated: u16 name length, name, u16 address length, address (broker → worker)
//	ready   (empty)                                (worker → broker: every interest of this link is registered)
//	subrec  u64 request id, u64 since, u64 epoch, channel rest            (worker → broker: sub + recovery)
//	histreq u64 request id, u64 since, u64 limit, channel rest            (worker → broker: paged history read)
//	repl    u64 request id, u64 offset, u64 epoch, u16 channel length, channel, data rest (worker → replica broker)
//	pres    u64 request id, u8 op, u16 channel length, channel, data rest (worker → broker: presence, channel list)
//	hist    u64 request id, u64 offset, u64 unix ns, data rest            (broker → worker: one stored message of a reply)
//	reply   u64 request id, u64 offset, u64 epoch, u8 flags, data rest    (broker → worker: ends a request)
//	event   u8 kind, u16 channel length, channel, data rest               (broker → worker: presence join/leave/vacated)
//	behind  (empty)                                (worker → broker: its local delivery is behind; flow control)
//	caughtup (empty)                               (worker → broker: no longer behind)
//
// A request (subrec, histreq, repl, pres) is answered by zero or more hist
// frames with its id and then exactly one reply; replies may come in any
// order relative to pubacks (a durable publish is acknowledged after its
// group commit).
//
// Fixed-width integers keep the encoder and decoder branch-free and let the
// decoder validate a frame from its header alone; the data of pub and msg is
// the raw published value, passed through untouched.
package link

import (
	"encoding/binary"
	"fmt"
)

// Version is the link protocol version sent in hello frames.
const Version uint16 = 1

// HeaderSize is the length prefix plus the type byte.
const HeaderSize = 5

// MaxChannel is the longest channel name a frame can carry (u16 length).
const MaxChannel = 1<<16 - 1

// Overhead is the largest frame size beyond the data of a pub, msg or repl
// frame (repl has the most fixed fields): header, fixed fields and the
// longest channel name. A link's MaxFrame must be at least max_payload +
// Overhead, so that the replica copy of a max-size publish fits too.
const Overhead = HeaderSize + 8 + 8 + 8 + 2 + MaxChannel

// Type is a frame type.
type Type uint8

// Frame types. Values are on the wire: never renumber.
const (
	TypeHello   Type = 1
	TypeSub     Type = 2
	TypeUnsub   Type = 3
	TypePub     Type = 4
	TypePubAck  Type = 5
	TypeMsg     Type = 6
	TypePing    Type = 7
	TypePong    Type = 8
	TypeMembers Type = 9
	TypeReady   Type = 10
	TypeSubRec  Type = 11
	TypeHistReq Type = 12
	TypeRepl    Type = 13
	TypePres    Type = 14
	TypeHist    Type = 15
	TypeReply   Type = 16
	TypeEvent   Type = 17
	// Publisher flow control (docs/brokers.md, "Flow control"): a worker
	// whose local delivery is behind says so, and the broker holds the
	// acks of publishes to the channels that worker is interested in
	// until it sends caughtup (or a bounded hold passes). Empty bodies.
	// A broker older than these kinds drops a link that sends them.
	TypeBehind   Type = 18
	TypeCaughtUp Type = 19
)

// Reply flags.
const (
	FlagRecovered uint8 = 1 << 0 // subrec: the gap was filled
	FlagError     uint8 = 1 << 1 // the request failed; data is the error text
	FlagMore      uint8 = 1 << 2 // histreq: more messages follow the page
	// FlagCounted: the reply to a presence join or leave carries, in its
	// offset, how many other entries the channel holds after the change,
	// counted in the same step (brokers from before it answer 0 without it).
	FlagCounted uint8 = 1 << 3
)

// PresPageMark starts a PresList request's data when the worker reads the
// list in pages: the rest is the cursor (the conn id of the previous page's
// last entry; empty for the first page), and the reply carries FlagMore when
// entries are left. A request without it gets the whole list in one reply
// (what workers before pages asked), or an error answer when that does not
// fit a frame.
const PresPageMark = '>'

// Presence ops (pres frames). Values are on the wire.
const (
	PresJoin     uint8 = 1 // data: JSON entry
	PresLeave    uint8 = 2 // data: conn id
	PresUpdate   uint8 = 3 // data: JSON entry
	PresList     uint8 = 4 // reply data: JSON array of entries (data: empty, or PresPageMark + cursor for a page)
	PresCount    uint8 = 5 // reply offset: the count
	PresUser     uint8 = 6 // channel field carries the user id; reply data: JSON array of channels
	PresChannels uint8 = 7 // channel field "-"; reply data: JSON array of channel infos
	PresHistory  uint8 = 8 // channel field "-"; reply data: JSON array of the history states held (hand-back)
	// Shadow entries: a worker's entry on an internal ("#") channel, also
	// kept by every broker other than the owner, so that whichever broker
	// owns the channel after the owner died can tell when a dead worker's
	// entry was the last (broker/presence.go, "Vacated notices").
	PresShadowJoin  uint8 = 9  // data: JSON entry
	PresShadowLeave uint8 = 10 // data: conn id
)

// Event kinds.
const (
	EventJoin  uint8 = 1
	EventLeave uint8 = 2
	// EventVacated (no data): the channel's last presence entry went with
	// a dead worker link; sent to one other worker, which reports it
	// (webhooks for internal "#" channels; see broker/presence.go).
	EventVacated uint8 = 3
)

func (t Type) String() string {
	switch t {
	case TypeHello:
		return "hello"
	case TypeSub:
		return "sub"
	case TypeUnsub:
		return "unsub"
	case TypePub:
		return "pub"
	case TypePubAck:
		return "puback"
	case TypeMsg:
		return "msg"
	case TypePing:
		return "ping"
	case TypePong:
		return "pong"
	case TypeMembers:
		return "members"
	case TypeReady:
		return "ready"
	case TypeSubRec:
		return "subrec"
	case TypeHistReq:
		return "histreq"
	case TypeRepl:
		return "repl"
	case TypePres:
		return "pres"
	case TypeHist:
		return "hist"
	case TypeReply:
		return "reply"
	case TypeEvent:
		return "event"
	case TypeBehind:
		return "behind"
	case TypeCaughtUp:
		return "caughtup"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Frame is one decoded frame. Its byte slices point into the decoder's
// buffers and are valid only during the callback that receives it; copy what
// you keep. Fields a type does not carry are zero.
type Frame struct {
	Type    Type
	Version uint16 // hello
	ReqID   uint64 // pub, puback
	Offset  uint64 // puback, msg
	Epoch   uint64 // hello (broker), puback, msg
	Name    []byte // hello: the sender's name
	Channel []byte // sub, unsub, pub, msg
	Data    []byte // pub, msg: the payload; members: the raw member list
	Err     []byte // puback: non-empty when the publish failed
	Since   uint64 // subrec, histreq
	Limit   uint64 // histreq
	Time    int64  // hist: unix ns the message was stored
	Op      uint8  // pres: the op; event: the kind
	Flags   uint8  // reply
}

// Sizes of the fixed parts of each body.
const (
	helloFixed  = 2 + 8
	pubFixed    = 8 + 2
	pubAckFixed = 8 + 8 + 8
	msgFixed    = 8 + 8 + 2
	subRecFixed = 8 + 8 + 8
	replFixed   = 8 + 8 + 8 + 2
	presFixed   = 8 + 1 + 2
	histFixed   = 8 + 8 + 8
	replyFixed  = 8 + 8 + 8 + 1
	eventFixed  = 1 + 2
)

func appendHeader(dst []byte, t Type, body int) []byte {
	return append(binary.BigEndian.AppendUint32(dst, uint32(body+1)), byte(t))
}

// HelloSize and friends return the encoded size of a frame, header included,
// so writers can check queue space before encoding.
func HelloSize(name string) int { return HeaderSize + helloFixed + len(name) }

// ChannelSize is the size of a sub or unsub frame.
func ChannelSize(channel string) int { return HeaderSize + len(channel) }

// PubSize is the size of a pub frame.
func PubSize(channel string, data []byte) int {
	return HeaderSize + pubFixed + len(channel) + len(data)
}

// PubAckSize is the size of a puback frame.
func PubAckSize(errText string) int { return HeaderSize + pubAckFixed + len(errText) }

// MsgSize is the size of a msg frame.
func MsgSize(channel string, data []byte) int {
	return HeaderSize + msgFixed + len(channel) + len(data)
}

// AppendHello appends a hello frame.
func AppendHello(dst []byte, version uint16, epoch uint64, name string) []byte {
	dst = appendHeader(dst, TypeHello, helloFixed+len(name))
	dst = binary.BigEndian.AppendUint16(dst, version)
	dst = binary.BigEndian.AppendUint64(dst, epoch)
	return append(dst, name...)
}

// AppendChannel appends a sub or unsub frame (t must be TypeSub or TypeUnsub).
func AppendChannel(dst []byte, t Type, channel string) []byte {
	dst = appendHeader(dst, t, len(channel))
	return append(dst, channel...)
}

// AppendPub appends a pub frame. The channel must be at most MaxChannel bytes.
func AppendPub(dst []byte, reqID uint64, channel string, data []byte) []byte {
	dst = appendHeader(dst, TypePub, pubFixed+len(channel)+len(data))
	dst = binary.BigEndian.AppendUint64(dst, reqID)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(channel)))
	dst = append(dst, channel...)
	return append(dst, data...)
}

// AppendPubAck appends a puback frame; a non-empty errText reports a failure.
func AppendPubAck(dst []byte, reqID, offset, epoch uint64, errText string) []byte {
	dst = appendHeader(dst, TypePubAck, pubAckFixed+len(errText))
	dst = binary.BigEndian.AppendUint64(dst, reqID)
	dst = binary.BigEndian.AppendUint64(dst, offset)
	dst = binary.BigEndian.AppendUint64(dst, epoch)
	return append(dst, errText...)
}

// AppendMsg appends a msg frame. The channel may be given as bytes so a
// broker can encode straight from a decoded pub frame without a string.
func AppendMsg(dst []byte, offset, epoch uint64, channel, data []byte) []byte {
	dst = appendHeader(dst, TypeMsg, msgFixed+len(channel)+len(data))
	dst = binary.BigEndian.AppendUint64(dst, offset)
	dst = binary.BigEndian.AppendUint64(dst, epoch)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(channel)))
	dst = append(dst, channel...)
	return append(dst, data...)
}

// AppendEmpty appends a frame with no body (ping, pong).
func AppendEmpty(dst []byte, t Type) []byte { return appendHeader(dst, t, 0) }

// Member is one broker in a members frame.
type Member struct {
	Name string
	Addr string
}

// AppendMembers appends a members frame. Names and addresses longer than
// MaxChannel bytes are not representable and are skipped.
func AppendMembers(dst []byte, ms []Member) []byte {
	body := 0
	for _, m := range ms {
		if len(m.Name) <= MaxChannel && len(m.Addr) <= MaxChannel {
			body += 4 + len(m.Name) + len(m.Addr)
		}
	}
	dst = appendHeader(dst, TypeMembers, body)
	for _, m := range ms {
		if len(m.Name) > MaxChannel || len(m.Addr) > MaxChannel {
			continue
		}
		dst = binary.BigEndian.AppendUint16(dst, uint16(len(m.Name)))
		dst = append(dst, m.Name...)
		dst = binary.BigEndian.AppendUint16(dst, uint16(len(m.Addr)))
		dst = append(dst, m.Addr...)
	}
	return dst
}

// ParseMembers decodes the Data of a members frame (copying the strings).
func ParseMembers(b []byte) ([]Member, error) {
	var out []Member
	for len(b) > 0 {
		var name, addr []byte
		var ok bool
		if name, b, ok = cutString(b); !ok {
			return nil, fmt.Errorf("link: members frame: truncated name after %d members", len(out))
		}
		if addr, b, ok = cutString(b); !ok {
			return nil, fmt.Errorf("link: members frame: truncated address of %q", name)
		}
		out = append(out, Member{Name: string(name), Addr: string(addr)})
	}
	return out, nil
}

func cutString(b []byte) (s, rest []byte, ok bool) {
	if len(b) < 2 {
		return nil, b, false
	}
	n := int(binary.BigEndian.Uint16(b))
	if len(b) < 2+n {
		return nil, b, false
	}
	return b[2 : 2+n], b[2+n:], true
}

// AppendSubRec appends a subrec frame (TypeSubRec) or, with t TypeHistReq, a
// histreq frame (the third field is then the page limit).
func AppendSubRec(dst []byte, t Type, reqID, since, epochOrLimit uint64, channel string) []byte {
	dst = appendHeader(dst, t, subRecFixed+len(channel))
	dst = binary.BigEndian.AppendUint64(dst, reqID)
	dst = binary.BigEndian.AppendUint64(dst, since)
	dst = binary.BigEndian.AppendUint64(dst, epochOrLimit)
	return append(dst, channel...)
}

// AppendRepl appends a repl frame: a history append for the replica.
func AppendRepl(dst []byte, reqID, offset, epoch uint64, channel string, data []byte) []byte {
	dst = appendHeader(dst, TypeRepl, replFixed+len(channel)+len(data))
	dst = binary.BigEndian.AppendUint64(dst, reqID)
	dst = binary.BigEndian.AppendUint64(dst, offset)
	dst = binary.BigEndian.AppendUint64(dst, epoch)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(channel)))
	dst = append(dst, channel...)
	return append(dst, data...)
}

// AppendPres appends a pres frame.
func AppendPres(dst []byte, reqID uint64, op uint8, channel string, data []byte) []byte {
	dst = appendHeader(dst, TypePres, presFixed+len(channel)+len(data))
	dst = binary.BigEndian.AppendUint64(dst, reqID)
	dst = append(dst, op)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(channel)))
	dst = append(dst, channel...)
	return append(dst, data...)
}

// AppendHist appends a hist frame.
func AppendHist(dst []byte, reqID, offset uint64, unixNano int64, data []byte) []byte {
	dst = appendHeader(dst, TypeHist, histFixed+len(data))
	dst = binary.BigEndian.AppendUint64(dst, reqID)
	dst = binary.BigEndian.AppendUint64(dst, offset)
	dst = binary.BigEndian.AppendUint64(dst, uint64(unixNano))
	return append(dst, data...)
}

// AppendReply appends a reply frame.
func AppendReply(dst []byte, reqID, offset, epoch uint64, flags uint8, data []byte) []byte {
	dst = appendHeader(dst, TypeReply, replyFixed+len(data))
	dst = binary.BigEndian.AppendUint64(dst, reqID)
	dst = binary.BigEndian.AppendUint64(dst, offset)
	dst = binary.BigEndian.AppendUint64(dst, epoch)
	dst = append(dst, flags)
	return append(dst, data...)
}

// AppendEvent appends an event frame.
func AppendEvent(dst []byte, kind uint8, channel string, data []byte) []byte {
	dst = appendHeader(dst, TypeEvent, eventFixed+len(channel)+len(data))
	dst = append(dst, kind)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(channel)))
	dst = append(dst, channel...)
	return append(dst, data...)
}
