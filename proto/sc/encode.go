package sc

import (
	"strconv"
	"unicode/utf8"
)

// Heartbeat payloads. Protocol v2 pings with an empty text frame; v1 with
// "#1" (answered "#2").
var (
	PingV2Payload = []byte{}
	PingV1Payload = []byte("#1")
	PongV1Payload = []byte("#2")
)

// PingPayload returns the ping text for a protocol version.
func PingPayload(version int) []byte {
	if version == 1 {
		return PingV1Payload
	}
	return PingV2Payload
}

// Error is an error as SocketCluster puts it on the wire (sc-errors'
// dehydrateError): {"message":..,"name":..,...extras}.
type Error struct {
	Name    string
	Message string
	Extra   []Extra // further own properties, in order (statusCode, isBadToken, expiry…)
}

// Extra is one additional property of an Error; Value is raw JSON.
type Extra struct {
	Key   string
	Value []byte
}

func (e *Error) Error() string { return e.Name + ": " + e.Message }

// With returns a copy of e with one more property (raw JSON value).
func (e *Error) With(key string, raw []byte) *Error {
	c := *e
	c.Extra = append(append([]Extra(nil), e.Extra...), Extra{Key: key, Value: raw})
	return &c
}

// WithString, WithBool and WithInt add typed properties.
func (e *Error) WithString(key, v string) *Error { return e.With(key, AppendString(nil, v)) }
func (e *Error) WithBool(key string, v bool) *Error {
	return e.With(key, strconv.AppendBool(nil, v))
}
func (e *Error) WithInt(key string, v int64) *Error {
	return e.With(key, strconv.AppendInt(nil, v, 10))
}

// NewError builds an Error.
func NewError(name, message string) *Error { return &Error{Name: name, Message: message} }

// AppendJSON appends the error object.
func (e *Error) AppendJSON(dst []byte) []byte {
	dst = append(dst, `{"message":`...)
	dst = AppendString(dst, e.Message)
	dst = append(dst, `,"name":`...)
	dst = AppendString(dst, e.Name)
	for _, x := range e.Extra {
		if x.Key == "message" || x.Key == "name" || len(x.Value) == 0 {
			continue
		}
		dst = append(dst, ',')
		dst = AppendString(dst, x.Key)
		dst = append(dst, ':')
		dst = append(dst, x.Value...)
	}
	return append(dst, '}')
}

// AppendResponse appends {"rid":R} or {"rid":R,"data":D}; data nil means
// absent. rid is the JSON number text of the cid being answered.
func AppendResponse(dst, rid, data []byte) []byte {
	dst = append(dst, `{"rid":`...)
	dst = append(dst, rid...)
	if data != nil {
		dst = append(dst, `,"data":`...)
		dst = append(dst, data...)
	}
	return append(dst, '}')
}

// AppendErrorResponse appends {"rid":R,"error":{...}}.
func AppendErrorResponse(dst, rid []byte, e *Error) []byte {
	dst = append(dst, `{"rid":`...)
	dst = append(dst, rid...)
	dst = append(dst, `,"error":`...)
	dst = e.AppendJSON(dst)
	return append(dst, '}')
}

// AppendEvent appends a transmit {"event":E,"data":D}; data nil omits the
// key, as the official encoder does for undefined.
func AppendEvent(dst []byte, event string, data []byte) []byte {
	dst = append(dst, `{"event":`...)
	dst = AppendString(dst, event)
	if data != nil {
		dst = append(dst, `,"data":`...)
		dst = append(dst, data...)
	}
	return append(dst, '}')
}

// AppendPublish appends the server → client publish transmit. It carries
// no cid: with one the client routes it to a procedure and drops it.
func AppendPublish(dst []byte, channel string, data []byte) []byte {
	dst = append(dst, `{"event":"#publish","data":{"channel":`...)
	dst = AppendString(dst, channel)
	dst = append(dst, `,"data":`...)
	if data == nil {
		data = []byte("null")
	}
	dst = append(dst, data...)
	return append(dst, "}}"...)
}

// AppendKickOut appends {"event":"#kickOut","data":{"channel":C,"message":M}}.
func AppendKickOut(dst []byte, channel, message string) []byte {
	dst = append(dst, `{"event":"#kickOut","data":{"channel":`...)
	dst = AppendString(dst, channel)
	dst = append(dst, `,"message":`...)
	dst = AppendString(dst, message)
	return append(dst, "}}"...)
}

// AppendSetAuthToken appends {"event":"#setAuthToken","data":{"token":T}}.
func AppendSetAuthToken(dst []byte, token string) []byte {
	dst = append(dst, `{"event":"#setAuthToken","data":{"token":`...)
	dst = AppendString(dst, token)
	return append(dst, "}}"...)
}

// RemoveAuthToken is the complete #removeAuthToken transmit.
const RemoveAuthToken = `{"event":"#removeAuthToken"}`

// AppendRemoveAuthToken appends {"event":"#removeAuthToken"}.
func AppendRemoveAuthToken(dst []byte) []byte { return append(dst, RemoveAuthToken...) }

// Handshake is the data of a successful #handshake response.
type Handshake struct {
	ID              string
	PingTimeoutMs   int64 // mandatory: without it the client reconnect-loops
	IsAuthenticated bool
	AuthError       *Error // only when the client sent a token that failed
}

// AppendHandshakeResponse appends {"rid":R,"data":{"id","pingTimeout","isAuthenticated"[,"authError"]}}.
func AppendHandshakeResponse(dst, rid []byte, h Handshake) []byte {
	dst = append(dst, `{"rid":`...)
	dst = append(dst, rid...)
	dst = append(dst, `,"data":{"id":`...)
	dst = AppendString(dst, h.ID)
	dst = append(dst, `,"pingTimeout":`...)
	dst = strconv.AppendInt(dst, h.PingTimeoutMs, 10)
	dst = append(dst, `,"isAuthenticated":`...)
	dst = strconv.AppendBool(dst, h.IsAuthenticated)
	if h.AuthError != nil {
		dst = append(dst, `,"authError":`...)
		dst = h.AuthError.AppendJSON(dst)
	}
	return append(dst, "}}"...)
}

// AppendAuthenticateResponse appends the #authenticate answer
// {"rid":R,"data":{"isAuthenticated":B,"authError":E|null}}.
func AppendAuthenticateResponse(dst, rid []byte, ok bool, authErr *Error) []byte {
	dst = append(dst, `{"rid":`...)
	dst = append(dst, rid...)
	dst = append(dst, `,"data":{"isAuthenticated":`...)
	dst = strconv.AppendBool(dst, ok)
	dst = append(dst, `,"authError":`...)
	if authErr == nil {
		dst = append(dst, "null"...)
	} else {
		dst = authErr.AppendJSON(dst)
	}
	return append(dst, "}}"...)
}

const hexDigits = "0123456789abcdef"

// AppendString appends s as a JSON string. Invalid UTF-8 becomes U+FFFD;
// U+2028/U+2029 are escaped so the text is also valid JavaScript.
func AppendString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}
