package sc

import "fmt"

// Kind classifies a packet the way socketcluster-client and -server do.
type Kind uint8

const (
	// Raw is anything that is not a packet: a JSON value that is neither an
	// event nor a response, or a frame that is not JSON at all.
	Raw Kind = iota
	// Transmit is an event without a numeric cid (fire and forget). A string
	// cid makes a transmit too.
	Transmit
	// Invoke is an event with a numeric cid: it expects a response.
	Invoke
	// Response answers a server invoke: numeric rid.
	Response
	// Pong is a heartbeat answer: the empty frame (v2) or "#2" (v1).
	Pong
	// PingV1 is "#1", which only a server sends; a client sending it is odd
	// but harmless.
	PingV1
)

func (k Kind) String() string {
	switch k {
	case Transmit:
		return "transmit"
	case Invoke:
		return "invoke"
	case Response:
		return "response"
	case Pong:
		return "pong"
	case PingV1:
		return "ping"
	}
	return "raw"
}

// Packet is one packet of a frame. Every slice aliases the frame (except an
// Event name that needed unescaping), so a Packet is valid only as long as
// the frame's bytes are.
type Packet struct {
	Kind  Kind
	Event []byte // the unescaped event name (Transmit, Invoke)
	CID   []byte // Invoke: the cid as the JSON number text, echoed verbatim as rid
	RID   []byte // Response: the rid number text
	Data  []byte // raw JSON of "data"; nil when absent
	Error []byte // raw JSON of "error"; nil when absent
	Raw   []byte // the packet's own JSON text (or the whole frame)
}

// Reader yields the packets of one frame in order. The zero value is not
// ready: call Reset. A Reader holds no heap memory, so it can live on the
// stack of a message handler.
type Reader struct {
	frame []byte
	s     scanner
	span  [2]int // the single packet's value, found while validating
	batch bool
	done  bool
	count int
	err   error
}

// Reset starts reading frame. The whole frame is validated first: an
// invalid frame yields a single Raw packet and Err reports why.
func (r *Reader) Reset(frame []byte) {
	*r = Reader{frame: frame, s: scanner{b: frame}}
	if len(frame) == 0 || string(frame) == "#1" || string(frame) == "#2" {
		return
	}
	v := scanner{b: frame}
	v.ws()
	if v.i >= len(frame) || (frame[v.i] != '{' && frame[v.i] != '[') {
		// sc-formatter hands such text to the app as a plain string.
		return
	}
	if _, _, err := v.value(); err != nil {
		r.err = err
		return
	}
	end := v.i
	if v.ws(); v.i != len(frame) {
		r.err = v.fail(ErrSyntax, "trailing data after value")
		return
	}
	r.s.ws()
	r.span = [2]int{r.s.i, end}
	if frame[r.s.i] == '[' {
		// All or nothing, like a parse error: an oversized batch is
		// refused before any of its packets runs.
		if n := countElements(frame, r.s.i); n > MaxBatch {
			r.err = fmt.Errorf("%w: %d packets (limit %d)", ErrBatch, n, MaxBatch)
			return
		}
		r.batch = true
		r.s.i++
		r.s.depth = 1
		r.s.ws()
		if r.s.i < len(frame) && frame[r.s.i] == ']' {
			r.done = true
		}
	}
}

// countElements counts the elements of the validated array at b[i],
// stopping early once past MaxBatch.
func countElements(b []byte, i int) int {
	n := 0
	s := scanner{b: b, i: i + 1}
	for n <= MaxBatch {
		s.ws()
		if s.i >= len(b) || b[s.i] == ']' {
			return n
		}
		s.i = skipValid(b, s.i)
		n++
		s.ws()
		if s.i < len(b) && b[s.i] == ',' {
			s.i++
		}
	}
	return n
}

// Err is why the frame was refused: not valid JSON, too deep, or a batch of
// more than MaxBatch packets (ErrBatch). A refused frame yields one Raw
// packet. Heartbeats and plain text are not errors: they are frames of kind
// Pong, PingV1 or Raw.
func (r *Reader) Err() error { return r.err }

// Batch reports whether the frame is a JSON array of packets.
func (r *Reader) Batch() bool { return r.batch }

// Next fills p with the next packet and reports whether there was one.
func (r *Reader) Next(p *Packet) bool {
	if r.done {
		return false
	}
	if !r.batch {
		r.done = true
		*p = Packet{Raw: r.frame}
		switch {
		case len(r.frame) == 0 || string(r.frame) == "#2":
			p.Kind = Pong
		case string(r.frame) == "#1":
			p.Kind = PingV1
		case r.err == nil:
			parsePacket(r.frame[r.span[0]:r.span[1]], p)
		}
		return true
	}
	if r.count >= MaxBatch { // counted in Reset; stay safe
		r.done = true
		return false
	}
	r.s.ws()
	start := r.s.i
	if start >= len(r.frame) { // cannot happen on a validated frame; stay safe
		r.done = true
		return false
	}
	end := skipValid(r.frame, start)
	r.s.i = end
	r.count++
	if more, err := r.s.next(']'); err != nil || !more {
		r.done = true
		if err != nil {
			r.err = err
		}
	}
	parsePacket(r.frame[start:end], p)
	return true
}

// parsePacket classifies one validated JSON value.
func parsePacket(b []byte, p *Packet) {
	*p = Packet{Raw: b}
	if len(b) == 0 || b[0] != '{' {
		return
	}
	var (
		event    []byte
		evString bool
		cid, rid []byte
	)
	s := scanner{b: b, i: 1, depth: 1}
	s.ws()
	if s.i < len(b) && b[s.i] == '}' {
		return
	}
	for {
		s.ws()
		ks, ke, kesc, err := s.str()
		if err != nil {
			return
		}
		key := b[ks:ke]
		if kesc {
			key = unescape(nil, key)
		}
		if s.colon() != nil {
			return
		}
		s.ws()
		// The frame was validated as a whole: skip without re-checking.
		vs := s.i
		s.i = skipValid(b, s.i)
		val := b[vs:s.i]
		// Later duplicates win, as with JSON.parse.
		switch string(key) {
		case "event":
			evString = val[0] == '"'
			event = val
		case "cid":
			cid = val
		case "rid":
			rid = val
		case "data":
			p.Data = val
		case "error":
			p.Error = val
		}
		more, err := s.next('}')
		if err != nil || !more {
			break
		}
	}
	switch {
	case evString:
		name, _ := String(event)
		p.Event = name
		if isNumber(cid) {
			p.Kind, p.CID = Invoke, cid
		} else {
			p.Kind = Transmit
		}
	case isNumber(rid):
		p.Kind, p.RID = Response, rid
	}
}

func isNumber(v []byte) bool {
	return len(v) > 0 && (v[0] == '-' || (v[0] >= '0' && v[0] <= '9'))
}

// String returns the contents of a JSON string value (raw, with quotes and
// optional surrounding whitespace), unescaped. It aliases raw unless escapes had to be decoded. ok is false
// when raw is not a valid JSON string.
func String(raw []byte) (s []byte, ok bool) {
	sc := scanner{b: raw}
	sc.ws()
	if sc.i >= len(raw) || raw[sc.i] != '"' {
		return nil, false
	}
	start, end, esc, err := sc.str()
	if err != nil {
		return nil, false
	}
	if sc.ws(); sc.i != len(raw) {
		return nil, false
	}
	if !esc {
		return raw[start:end], true
	}
	return unescape(make([]byte, 0, end-start), raw[start:end]), true
}

// Field returns the raw JSON value of key in the JSON object obj (the last
// one if the key repeats). ok is false when obj is not an object or lacks
// the key.
func Field(obj []byte, key string) (val []byte, ok bool) {
	s := scanner{b: obj}
	s.ws()
	if s.i >= len(obj) || obj[s.i] != '{' {
		return nil, false
	}
	s.i++
	s.depth = 1
	s.ws()
	if s.i < len(obj) && obj[s.i] == '}' {
		return nil, false
	}
	for {
		s.ws()
		if s.i >= len(obj) || obj[s.i] != '"' {
			return nil, false
		}
		ks, ke, kesc, err := s.str()
		if err != nil || s.colon() != nil {
			return nil, false
		}
		vs, ve, err := s.value()
		if err != nil {
			return nil, false
		}
		k := obj[ks:ke]
		if kesc {
			k = unescape(nil, k)
		}
		if string(k) == key {
			val, ok = obj[vs:ve], true
		}
		more, err := s.next('}')
		if err != nil {
			return nil, false
		}
		if !more {
			return val, ok
		}
	}
}

// Fields2 is Field for two keys in one pass over obj, which must be a value
// of a frame the Reader validated (Packet.Data): values are skipped without
// being checked again. A #publish reads "channel" and "data" with it, where
// two Field calls validated its payload twice more.
func Fields2(obj []byte, key1, key2 string) (val1, val2 []byte, ok1, ok2 bool) {
	s := scanner{b: obj}
	s.ws()
	if s.i >= len(obj) || obj[s.i] != '{' {
		return nil, nil, false, false
	}
	s.i++
	s.depth = 1
	s.ws()
	if s.i < len(obj) && obj[s.i] == '}' {
		return nil, nil, false, false
	}
	for {
		s.ws()
		if s.i >= len(obj) || obj[s.i] != '"' {
			return nil, nil, false, false
		}
		ks, ke, kesc, err := s.str()
		if err != nil || s.colon() != nil {
			return nil, nil, false, false
		}
		s.ws()
		vs := s.i
		s.i = skipValid(obj, s.i)
		k := obj[ks:ke]
		if kesc {
			k = unescape(nil, k)
		}
		// Later duplicates win, as with JSON.parse.
		switch string(k) {
		case key1:
			val1, ok1 = obj[vs:s.i], true
		case key2:
			val2, ok2 = obj[vs:s.i], true
		}
		more, err := s.next('}')
		if err != nil {
			return nil, nil, false, false
		}
		if !more {
			return val1, val2, ok1, ok2
		}
	}
}

// StringField returns the unescaped string value of key in obj; ok is false
// when the key is missing or its value is not a string.
func StringField(obj []byte, key string) (s []byte, ok bool) {
	v, ok := Field(obj, key)
	if !ok {
		return nil, false
	}
	return String(v)
}

// IsTrue reports whether raw is the JSON literal true.
func IsTrue(raw []byte) bool { return string(raw) == "true" }

// IsNull reports whether raw is absent or the JSON literal null.
func IsNull(raw []byte) bool { return len(raw) == 0 || string(raw) == "null" }

// skipValid returns the end of the JSON value starting at b[i], which must
// be part of an already validated text: it only matches brackets and skips
// strings, which is much cheaper than validating again.
func skipValid(b []byte, i int) int {
	if i >= len(b) {
		return len(b)
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
		return len(b)
	}
	for i < len(b) { // number or literal
		switch b[i] {
		case ',', '}', ']', ' ', '\t', '\n', '\r':
			return i
		}
		i++
	}
	return i
}

// skipString returns the index after the closing quote of the string at b[i].
func skipString(b []byte, i int) int {
	for i++; i < len(b); {
		i = skipPlain(b, i)
		if i >= len(b) {
			break
		}
		switch b[i] {
		case '"':
			return i + 1
		case '\\':
			i += 2
		default:
			i++
		}
	}
	return len(b)
}
