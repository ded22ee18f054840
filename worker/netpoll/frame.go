package netpoll

import (
	"encoding/binary"
	"unicode/utf8"

	"github.com/gobwas/ws"
)

// Frame header bits (RFC 6455 §5.2).
const (
	bitFin   = 0x80
	bitsRsv  = 0x70
	maskOp   = 0x0f
	bitMask  = 0x80
	maskLen7 = 0x7f

	// maxHeaderLen is the longest client frame header: 2 + 8 (length) + 4 (mask key).
	maxHeaderLen = 14
	// maxControlPayload is the RFC limit for ping, pong and close payloads.
	maxControlPayload = 125
)

// AppendTextFrame appends an unmasked, final server text frame carrying payload
// to dst and returns the extended slice. Build a frame once and hand the same
// bytes to WriteFrame on every connection that should receive it.
func AppendTextFrame(dst, payload []byte) []byte {
	return appendFrame(dst, ws.OpText, payload)
}

// AppendBinaryFrame is AppendTextFrame for a binary frame. SocketCluster clients
// ignore binary frames, so the worker should not need it; it exists for other
// protocols and for tests.
func AppendBinaryFrame(dst, payload []byte) []byte {
	return appendFrame(dst, ws.OpBinary, payload)
}

// appendFrame appends a final, unmasked frame header and payload.
func appendFrame(dst []byte, op ws.OpCode, payload []byte) []byte {
	n := len(payload)
	switch {
	case n <= 125:
		dst = append(dst, bitFin|byte(op), byte(n))
	case n <= 0xffff:
		dst = append(dst, bitFin|byte(op), 126, byte(n>>8), byte(n))
	default:
		dst = append(dst, bitFin|byte(op), 127)
		dst = binary.BigEndian.AppendUint64(dst, uint64(n))
	}
	return append(dst, payload...)
}

// frameSize is the encoded length of a server frame carrying n payload bytes.
func frameSize(n int) int {
	switch {
	case n <= 125:
		return 2 + n
	case n <= 0xffff:
		return 4 + n
	default:
		return 10 + n
	}
}

// closeFrame builds a close frame. A zero code builds one with an empty body
// (the echo of a peer close that carried no status). The reason is cut so that
// the body stays within the 125 bytes a control frame may carry, without
// splitting a UTF-8 sequence.
func closeFrame(code ws.StatusCode, reason string) []byte {
	if code == 0 {
		return []byte{bitFin | byte(ws.OpClose), 0}
	}
	if len(reason) > maxControlPayload-2 {
		cut := maxControlPayload - 2
		for cut > 0 && !utf8.RuneStart(reason[cut]) {
			cut--
		}
		reason = reason[:cut]
	}
	b := make([]byte, 0, 4+len(reason))
	b = append(b, bitFin|byte(ws.OpClose), byte(2+len(reason)), byte(code>>8), byte(code))
	return append(b, reason...)
}

// frameHeader is a parsed client frame header.
type frameHeader struct {
	fin    bool
	op     ws.OpCode
	length int64
	mask   [4]byte
	size   int // header length in bytes
}

// protoError is a protocol violation: the connection is closed with code.
type protoError struct {
	code   ws.StatusCode
	reason string
}

func (e *protoError) Error() string { return e.reason }

var (
	errReserved     = &protoError{ws.StatusProtocolError, "reserved bits set"}
	errOpcode       = &protoError{ws.StatusProtocolError, "reserved opcode"}
	errUnmasked     = &protoError{ws.StatusProtocolError, "client frame not masked"}
	errControlLen   = &protoError{ws.StatusProtocolError, "control frame too long"}
	errControlFrag  = &protoError{ws.StatusProtocolError, "fragmented control frame"}
	errLength       = &protoError{ws.StatusProtocolError, "invalid payload length"}
	errContinuation = &protoError{ws.StatusProtocolError, "continuation without a started message"}
	errInterleaved  = &protoError{ws.StatusProtocolError, "new message before the previous one ended"}
	errCloseBody    = &protoError{ws.StatusProtocolError, "invalid close frame body"}
	errCloseCode    = &protoError{ws.StatusProtocolError, "invalid close code"}
	errTooBig       = &protoError{ws.StatusMessageTooBig, "message too big"}
	errInvalidUTF8  = &protoError{ws.StatusInvalidFramePayloadData, "invalid UTF-8 in text message"}
	errCloseUTF8    = &protoError{ws.StatusInvalidFramePayloadData, "invalid UTF-8 in close reason"}
)

// parseHeader parses a client frame header from the start of b. It returns
// ok=false when b does not hold the whole header yet. It rejects what a server
// must reject from the header alone: reserved bits (no extension is ever
// negotiated), reserved opcodes, unmasked frames, and malformed control frames.
func parseHeader(b []byte) (h frameHeader, ok bool, err error) {
	if len(b) < 2 {
		return h, false, nil
	}
	b0, b1 := b[0], b[1]
	if b0&bitsRsv != 0 {
		return h, false, errReserved
	}
	h.fin = b0&bitFin != 0
	h.op = ws.OpCode(b0 & maskOp)
	switch h.op {
	case ws.OpContinuation, ws.OpText, ws.OpBinary:
	case ws.OpClose, ws.OpPing, ws.OpPong:
		if !h.fin {
			return h, false, errControlFrag
		}
		if b1&maskLen7 > maxControlPayload {
			return h, false, errControlLen
		}
	default:
		return h, false, errOpcode
	}
	if b1&bitMask == 0 {
		return h, false, errUnmasked
	}
	h.size = 2 + 4
	switch l := b1 & maskLen7; l {
	case 126:
		h.size += 2
		if len(b) < h.size {
			return h, false, nil
		}
		h.length = int64(binary.BigEndian.Uint16(b[2:4]))
	case 127:
		h.size += 8
		if len(b) < h.size {
			return h, false, nil
		}
		u := binary.BigEndian.Uint64(b[2:10])
		if u>>63 != 0 {
			return h, false, errLength
		}
		h.length = int64(u)
	default:
		if len(b) < h.size {
			return h, false, nil
		}
		h.length = int64(l)
	}
	copy(h.mask[:], b[h.size-4:h.size])
	return h, true, nil
}

// parseCloseBody validates a close frame body and returns its code (1005,
// "no status received", for an empty body) and reason.
func parseCloseBody(p []byte) (ws.StatusCode, string, error) {
	switch len(p) {
	case 0:
		return ws.StatusNoStatusRcvd, "", nil
	case 1:
		return 0, "", errCloseBody
	}
	code := ws.StatusCode(binary.BigEndian.Uint16(p))
	if !validCloseCode(code) {
		return 0, "", errCloseCode
	}
	if !utf8.Valid(p[2:]) {
		return 0, "", errCloseUTF8
	}
	return code, string(p[2:]), nil
}

// validCloseCode reports whether a peer may send code in a close frame
// (RFC 6455 §7.4: 1004-1006 and 1015 are reserved for local use, 1012-1014
// are registered by IANA, 3000-4999 belong to libraries and applications).
func validCloseCode(code ws.StatusCode) bool {
	switch {
	case code >= 1000 && code <= 1003, code >= 1007 && code <= 1014:
		return true
	case code >= 3000 && code <= 4999:
		return true
	}
	return false
}
