package bench

// The bench client's wire layer: WebSocket frames built and parsed by hand
// over a byte slice, and a JSON scanner that finds only the few top-level
// fields the bench needs (event, rid, error, data, channel). Nothing here
// allocates: the receive path of thousands of connections runs through it,
// and a load tool that spends its CPU on encoding/json measures itself
// instead of the server.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"strconv"
)

// WebSocket opcodes (RFC 6455 §5.2).
const (
	opContinuation = 0x0
	opText         = 0x1
	opBinary       = 0x2
	opClose        = 0x8
	opPing         = 0x9
	opPong         = 0xA
)

// maxFrame bounds a single inbound frame; the bench never expects more than
// a handshake reply or a publish of a few KiB, so anything larger is a bug
// or a hostile peer and closes the connection.
const maxFrame = 16 << 20

var (
	errFrameTooBig = errors.New("bench: inbound frame larger than 16 MiB")
	errBadFrame    = errors.New("bench: malformed WebSocket frame")
)

// appendClientFrame appends one final, masked client frame. RFC 6455 requires
// client frames to be masked; the key is random per frame as the RFC asks,
// which costs one XOR pass over payloads that are at most a few KiB.
func appendClientFrame(dst []byte, op byte, payload []byte) []byte {
	n := len(payload)
	dst = append(dst, 0x80|op)
	switch {
	case n < 126:
		dst = append(dst, 0x80|byte(n))
	case n <= 0xFFFF:
		dst = append(dst, 0x80|126, byte(n>>8), byte(n))
	default:
		dst = append(dst, 0x80|127)
		dst = binary.BigEndian.AppendUint64(dst, uint64(n))
	}
	var key [4]byte
	binary.LittleEndian.PutUint32(key[:], rand.Uint32())
	dst = append(dst, key[:]...)
	start := len(dst)
	dst = append(dst, payload...)
	for i := range n {
		dst[start+i] ^= key[i&3]
	}
	return dst
}

// frame is one parsed inbound frame; payload aliases the read buffer.
type frame struct {
	fin     bool
	op      byte
	payload []byte
}

// parseFrame parses the frame at the start of b. It returns the number of
// bytes the frame occupies, or 0 when b does not yet hold a whole frame.
// A masked frame (servers must not mask, but tolerance is cheap) is unmasked
// in place.
func parseFrame(b []byte) (f frame, n int, err error) {
	if len(b) < 2 {
		return f, 0, nil
	}
	f.fin = b[0]&0x80 != 0
	if b[0]&0x70 != 0 {
		return f, 0, errBadFrame // RSV bits: no extension was negotiated
	}
	f.op = b[0] & 0x0F
	masked := b[1]&0x80 != 0
	length := uint64(b[1] & 0x7F)
	hdr := 2
	switch length {
	case 126:
		if len(b) < 4 {
			return f, 0, nil
		}
		length = uint64(binary.BigEndian.Uint16(b[2:]))
		hdr = 4
	case 127:
		if len(b) < 10 {
			return f, 0, nil
		}
		length = binary.BigEndian.Uint64(b[2:])
		hdr = 10
	}
	if length > maxFrame {
		return f, 0, errFrameTooBig
	}
	var key []byte
	if masked {
		if len(b) < hdr+4 {
			return f, 0, nil
		}
		key = b[hdr : hdr+4]
		hdr += 4
	}
	total := hdr + int(length)
	if len(b) < total {
		return f, 0, nil
	}
	f.payload = b[hdr:total]
	if masked {
		for i := range f.payload {
			f.payload[i] ^= key[i&3]
		}
	}
	return f, total, nil
}

// skipSpace returns the index of the first non-space byte at or after i.
func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipValue returns the index just past the JSON value that starts at b[i]
// (leading space skipped), or -1 if the value is malformed or truncated. It
// validates only as much structure as it needs to find the value's end.
func skipValue(b []byte, i int) int {
	i = skipSpace(b, i)
	if i >= len(b) {
		return -1
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				i = skipString(b, i)
				if i < 0 {
					return -1
				}
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
			i++
		}
		return -1
	default: // number, true, false, null
		start := i
		for i < len(b) {
			switch b[i] {
			case ',', '}', ']', ' ', '\t', '\n', '\r':
				if i == start {
					return -1 // no value at all: callers must not loop on it
				}
				return i
			}
			i++
		}
		return i
	}
}

// skipString returns the index just past the string starting at b[i] == '"'.
// It jumps from quote to quote with bytes.IndexByte (vectorised), since the
// payload strings are the longest thing the receive path crosses; a quote
// preceded by an odd run of backslashes is escaped and skipped.
func skipString(b []byte, i int) int {
	i++
	for {
		j := bytes.IndexByte(b[i:], '"')
		if j < 0 {
			return -1
		}
		j += i
		k := j - 1
		for k >= i && b[k] == '\\' {
			k--
		}
		if (j-1-k)%2 == 0 {
			return j + 1
		}
		i = j + 1
	}
}

// field returns the raw value of the top-level key in the JSON object obj.
// Keys are compared byte for byte without unescaping, which is exact for the
// protocol's own keys (none of them needs escaping).
func field(obj []byte, key string) ([]byte, bool) {
	i := skipSpace(obj, 0)
	if i >= len(obj) || obj[i] != '{' {
		return nil, false
	}
	i++
	for {
		i = skipSpace(obj, i)
		if i >= len(obj) || obj[i] == '}' {
			return nil, false
		}
		if obj[i] != '"' {
			return nil, false
		}
		end := skipString(obj, i)
		if end < 0 {
			return nil, false
		}
		k := obj[i+1 : end-1]
		i = skipSpace(obj, end)
		if i >= len(obj) || obj[i] != ':' {
			return nil, false
		}
		vs := skipSpace(obj, i+1)
		ve := skipValue(obj, vs)
		if ve < 0 {
			return nil, false
		}
		if string(k) == key { // compiles to a comparison, no allocation
			return obj[vs:ve], true
		}
		i = skipSpace(obj, ve)
		if i < len(obj) && obj[i] == ',' {
			i++
		}
	}
}

// parseUint parses a non-negative decimal integer that fills all of b.
func parseUint(b []byte) (uint64, bool) {
	if len(b) == 0 || len(b) > 19 {
		return 0, false
	}
	var v uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + uint64(c-'0')
	}
	return v, true
}

// The payload the bench publishes is one JSON string,
//
//	"<publisher>.<seq>.<unix-nanos>.<padding>"
//
// padded with 'x' so the whole JSON value is exactly the requested size. A
// subscriber reads publisher and seq for loss and order accounting and the
// timestamp for latency, without decoding JSON.

// minPayload is the smallest payload size that always fits the header.
const minPayload = 48

// appendPayload appends the JSON string value of size bytes (at least the
// header's length) for one publish.
func appendPayload(dst []byte, pub, seq uint64, nanos int64, size int) []byte {
	start := len(dst)
	dst = append(dst, '"')
	dst = strconv.AppendUint(dst, pub, 10)
	dst = append(dst, '.')
	dst = strconv.AppendUint(dst, seq, 10)
	dst = append(dst, '.')
	dst = strconv.AppendInt(dst, nanos, 10)
	dst = append(dst, '.')
	for len(dst)-start < size-1 {
		dst = append(dst, 'x')
	}
	return append(dst, '"')
}

// parsePayload reads the header of a bench payload (the raw JSON value).
func parsePayload(v []byte) (pub, seq uint64, nanos int64, ok bool) {
	if len(v) < 2 || v[0] != '"' {
		return 0, 0, 0, false
	}
	var parts [3]uint64
	i := 1
	for p := range parts {
		j := i
		for j < len(v) && v[j] != '.' && v[j] != '"' {
			j++
		}
		n, good := parseUint(v[i:j])
		if !good || j >= len(v) {
			return 0, 0, 0, false
		}
		parts[p] = n
		i = j + 1
	}
	return parts[0], parts[1], int64(parts[2]), true
}

// appendInvoke appends the JSON of an SC invoke {"event":E,"data":D,"cid":N};
// data is raw JSON.
func appendInvoke(dst []byte, event string, data []byte, cid uint64) []byte {
	dst = append(dst, `{"event":"`...)
	dst = append(dst, event...)
	dst = append(dst, `","data":`...)
	dst = append(dst, data...)
	dst = append(dst, `,"cid":`...)
	dst = strconv.AppendUint(dst, cid, 10)
	return append(dst, '}')
}

// appendTransmit appends the JSON of an SC transmit {"event":E,"data":D}.
func appendTransmit(dst []byte, event string, data []byte) []byte {
	dst = append(dst, `{"event":"`...)
	dst = append(dst, event...)
	dst = append(dst, `","data":`...)
	dst = append(dst, data...)
	return append(dst, '}')
}

// appendPublishData appends {"channel":"C","data":<payload>} for #publish.
// Channel names are generated by the bench and never need escaping.
func appendPublishData(dst []byte, channel string, pub, seq uint64, nanos int64, size int) []byte {
	dst = append(dst, `{"channel":"`...)
	dst = append(dst, channel...)
	dst = append(dst, `","data":`...)
	dst = appendPayload(dst, pub, seq, nanos, size)
	return append(dst, '}')
}

// packets calls fn for every SC packet in a text message: the message itself
// if it is an object, or each element if it is a batch (a JSON array). fn is
// only called, never stored, so a closure passed here stays on the stack.
func packets(msg []byte, fn func(pkt []byte)) {
	i := skipSpace(msg, 0)
	if i >= len(msg) {
		return
	}
	if msg[i] == '{' {
		fn(msg[i:])
		return
	}
	if msg[i] != '[' {
		return
	}
	i++
	for {
		i = skipSpace(msg, i)
		if i >= len(msg) || msg[i] == ']' {
			return
		}
		e := skipValue(msg, i)
		if e < 0 {
			return
		}
		fn(msg[i:e])
		i = skipSpace(msg, e)
		if i < len(msg) && msg[i] == ',' {
			i++
		}
	}
}
