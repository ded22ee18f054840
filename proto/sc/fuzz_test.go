package sc

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"testing"
	"unicode/utf8"
)

var fuzzSeeds = []string{
	`{"event":"#handshake","data":{"authToken":null},"cid":1}`,
	`{"event":"#subscribe","data":{"channel":"bar","waitForAuth":true,"data":{"z":1}},"cid":15}`,
	`{"event":"#unsubscribe","data":"foo"}`,
	`{"event":"#publish","data":{"channel":"foo","data":{"hello":"world"}}}`,
	`[{"event":"a","data":1},{"event":"b","data":2}]`,
	`{"rid":7,"error":{"message":"m","name":"n"}}`,
	`{"ev\u0065nt":"\ud83d\ude00","cid":1e2}`,
	`{"event":"x","cid":"1"}`,
	`[[[[[[[[[[]]]]]]]]]]`,
	``, `#1`, `#2`, `""`, `hello`, `{`, `[{"event":]`, "{\"a\":\"\xff\"}",
}

func decodeStd(b []byte) (any, error) {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		return nil, err
	}
	return v, nil
}

// FuzzReader: no input panics or loops; on valid JSON the scanner agrees
// with encoding/json about validity, packet kinds, names and payloads.
func FuzzReader(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, frame []byte) {
		var r Reader
		r.Reset(frame)
		var ps []Packet
		var p Packet
		for r.Next(&p) {
			if len(ps) > MaxBatch {
				t.Fatal("reader yields more than MaxBatch packets")
			}
			ps = append(ps, p)
			// The helpers must survive whatever data holds.
			_, _ = StringField(p.Data, "channel")
			_, _ = String(p.Data)
		}

		mine := Valid(frame)
		stdValid := json.Valid(frame) && utf8.Valid(frame)
		if mine == nil && !json.Valid(frame) {
			t.Fatalf("accepted invalid JSON %q", frame)
		}
		if !stdValid || errors.Is(mine, ErrDepth) {
			return
		}
		if mine != nil {
			t.Fatalf("refused valid JSON %q: %v", frame, mine)
		}
		v, err := decodeStd(frame)
		if err != nil {
			t.Fatalf("encoding/json: %v", err)
		}
		var elems []any
		switch x := v.(type) {
		case []any:
			elems = x
		case map[string]any:
			elems = []any{x}
		default:
			if len(ps) != 1 || ps[0].Kind != Raw {
				t.Fatalf("scalar frame %q: got %d packets", frame, len(ps))
			}
			return
		}
		if len(elems) > MaxBatch {
			return
		}
		if len(ps) != len(elems) {
			t.Fatalf("%q: %d packets, encoding/json sees %d", frame, len(ps), len(elems))
		}
		for i, e := range elems {
			checkPacket(t, ps[i], e)
		}
	})
}

func checkPacket(t *testing.T, p Packet, e any) {
	t.Helper()
	want := Raw
	m, isObj := e.(map[string]any)
	if isObj {
		ev, evOK := m["event"].(string)
		_, cidNum := m["cid"].(json.Number)
		_, ridNum := m["rid"].(json.Number)
		switch {
		case evOK && cidNum:
			want = Invoke
		case evOK:
			want = Transmit
		case ridNum:
			want = Response
		}
		if evOK && string(p.Event) != ev {
			t.Fatalf("event %q, encoding/json %q", p.Event, ev)
		}
		for key, got := range map[string][]byte{"data": p.Data, "error": p.Error} {
			sv, present := m[key]
			if present != (got != nil) {
				t.Fatalf("%s present=%v, encoding/json %v", key, got != nil, present)
			}
			if present {
				gv, err := decodeStd(got)
				if err != nil || !reflect.DeepEqual(gv, sv) {
					t.Fatalf("%s %q differs from encoding/json's %#v", key, got, sv)
				}
			}
		}
	}
	if p.Kind != want {
		t.Fatalf("kind %v, encoding/json says %v for %q", p.Kind, want, p.Raw)
	}
}

// FuzzString: string unescaping matches encoding/json.
func FuzzString(f *testing.F) {
	for _, s := range []string{`"a"`, `"\u00e9\n\/"`, `"\ud83d\ude00"`, `"\ud800"`, `"\udc00\ud800\udc00"`, `"x`, `"\u12"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		got, ok := String(raw)
		var want string
		err := json.Unmarshal(raw, &want)
		if !utf8.Valid(raw) {
			return
		}
		if ok != (err == nil) {
			t.Fatalf("%q: ok=%v, encoding/json err=%v", raw, ok, err)
		}
		if ok && string(got) != want {
			t.Fatalf("%q: got %q, encoding/json %q", raw, got, want)
		}
	})
}

// FuzzEncode: every encoder emits valid JSON that reads back to its input.
func FuzzEncode(f *testing.F) {
	f.Add("chat/room", `{"a":1}`, "msg")
	f.Add("\xff\u2028\"\\", `null`, "\x00")
	f.Fuzz(func(t *testing.T, channel, data, msg string) {
		if Valid([]byte(data)) != nil {
			data = "null"
		}
		frame := AppendPublish(nil, channel, []byte(data))
		var pub struct {
			Event string
			Data  struct {
				Channel string
				Data    json.RawMessage
			}
		}
		if err := json.Unmarshal(frame, &pub); err != nil {
			t.Fatalf("publish frame %q: %v", frame, err)
		}
		if pub.Event != "#publish" || pub.Data.Channel != string([]rune(channel)) {
			t.Fatalf("publish frame %q read back as %+v", frame, pub)
		}
		var r Reader
		var p Packet
		r.Reset(frame)
		if !r.Next(&p) || p.Kind != Transmit || r.Err() != nil {
			t.Fatalf("own frame %q not a transmit: %v", frame, r.Err())
		}
		if ch, ok := StringField(p.Data, "channel"); !ok || string(ch) != string([]rune(channel)) {
			t.Fatalf("channel %q read back as %q", channel, ch)
		}
		e := NewError(msg, channel).WithString(msg, data)
		if b := AppendErrorResponse(nil, []byte("1"), e); !json.Valid(b) {
			t.Fatalf("error response %q invalid", b)
		}
		if b := AppendKickOut(nil, channel, msg); !json.Valid(b) {
			t.Fatalf("kickOut %q invalid", b)
		}
	})
}

// FuzzField: looking a key up in an object agrees with encoding/json.
func FuzzField(f *testing.F) {
	f.Add([]byte(`{"channel":"a","data":{"channel":"b"}}`), "channel")
	f.Add([]byte(`{"ch\u0061nnel":1,"channel":[2]}`), "channel")
	f.Add([]byte(`[{"channel":"a"}]`), "channel")
	f.Fuzz(func(t *testing.T, obj []byte, key string) {
		got, ok := Field(obj, key)
		if !utf8.Valid(obj) || !json.Valid(obj) || Valid(obj) != nil {
			return
		}
		v, err := decodeStd(obj)
		if err != nil {
			t.Fatal(err)
		}
		m, isObj := v.(map[string]any)
		want, present := m[key]
		if !isObj {
			present = false
		}
		if ok != present {
			t.Fatalf("Field(%q, %q) ok=%v, encoding/json present=%v", obj, key, ok, present)
		}
		if ok {
			gv, err := decodeStd(got)
			if err != nil || !reflect.DeepEqual(gv, want) {
				t.Fatalf("Field(%q, %q) = %q, encoding/json %#v", obj, key, got, want)
			}
		}
	})
}

// Fields2 on a validated value answers as two Field calls.
func FuzzFields2(f *testing.F) {
	f.Add([]byte(`{"channel":"a","data":{"channel":"b"}}`))
	f.Add([]byte(`{"ch\u0061nnel":1,"channel":[2],"data":"x\"y"}`))
	f.Add([]byte(`[{"channel":"a"}]`))
	f.Fuzz(func(t *testing.T, obj []byte) {
		if Valid(obj) != nil {
			return // Fields2 is only for validated values
		}
		v1, v2, ok1, ok2 := Fields2(obj, "channel", "data")
		w1, wok1 := Field(obj, "channel")
		w2, wok2 := Field(obj, "data")
		if string(v1) != string(w1) || ok1 != wok1 || string(v2) != string(w2) || ok2 != wok2 {
			t.Fatalf("%q: Fields2 = %q %q %v %v, Field = %q %q %v %v", obj, v1, v2, ok1, ok2, w1, w2, wok1, wok2)
		}
	})
}
