package sc

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func readAll(t *testing.T, frame string) ([]Packet, error) {
	t.Helper()
	var r Reader
	r.Reset([]byte(frame))
	var out []Packet
	var p Packet
	for i := 0; r.Next(&p); i++ {
		if i > MaxBatch {
			t.Fatal("reader did not stop")
		}
		out = append(out, p)
	}
	return out, r.Err()
}

func TestReaderClassifies(t *testing.T) {
	tests := []struct {
		name  string
		frame string
		kind  Kind
		event string
		cid   string
		rid   string
		data  string
		err   string
	}{
		{name: "handshake", frame: `{"event":"#handshake","data":{"authToken":null},"cid":1}`, kind: Invoke, event: "#handshake", cid: "1", data: `{"authToken":null}`},
		{name: "transmit", frame: `{"event":"chat","data":{"a":[1,2]}}`, kind: Transmit, event: "chat", data: `{"a":[1,2]}`},
		{name: "string cid is transmit", frame: `{"event":"x","cid":"1"}`, kind: Transmit, event: "x"},
		{name: "response", frame: `{"rid":7,"data":1}`, kind: Response, rid: "7", data: "1"},
		{name: "string rid is raw", frame: `{"rid":"7"}`, kind: Raw},
		{name: "response error", frame: `{"rid":3,"error":{"message":"m"}}`, kind: Response, rid: "3", err: `{"message":"m"}`},
		{name: "non-string event with rid", frame: `{"event":5,"rid":2}`, kind: Response, rid: "2"},
		{name: "no event", frame: `{"data":1}`, kind: Raw, data: "1"},
		{name: "v2 pong", frame: ``, kind: Pong},
		{name: "v1 pong", frame: `#2`, kind: Pong},
		{name: "v1 ping", frame: `#1`, kind: PingV1},
		{name: "plain text", frame: `hello`, kind: Raw},
		{name: "json string", frame: `""`, kind: Raw},
		{name: "escaped key and event", frame: `{"ev\u0065nt":"a\"b\u00e9","cid":2}`, kind: Invoke, event: "a\"bé", cid: "2"},
		{name: "duplicate keys last wins", frame: `{"event":"a","event":"b","cid":1,"cid":"x"}`, kind: Transmit, event: "b"},
		{name: "whitespace", frame: " \n{ \"event\" : \"e\" , \"cid\" : -1.5e3 } ", kind: Invoke, event: "e", cid: "-1.5e3"},
		{name: "data null", frame: `{"event":"e","data":null}`, kind: Transmit, event: "e", data: "null"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ps, err := readAll(t, tc.frame)
			if err != nil {
				t.Fatalf("err = %v", err)
			}
			if len(ps) != 1 {
				t.Fatalf("got %d packets", len(ps))
			}
			p := ps[0]
			if p.Kind != tc.kind || string(p.Event) != tc.event || string(p.CID) != tc.cid ||
				string(p.RID) != tc.rid || string(p.Data) != tc.data || string(p.Error) != tc.err {
				t.Fatalf("got kind=%v event=%q cid=%q rid=%q data=%q err=%q", p.Kind, p.Event, p.CID, p.RID, p.Data, p.Error)
			}
		})
	}
}

func TestReaderBatch(t *testing.T) {
	ps, err := readAll(t, `[{"event":"a","data":1},{"event":"b","data":2,"cid":3}, 5 ,{"rid":1}]`)
	if err != nil {
		t.Fatal(err)
	}
	want := []Kind{Transmit, Invoke, Raw, Response}
	if len(ps) != len(want) {
		t.Fatalf("got %d packets", len(ps))
	}
	for i, k := range want {
		if ps[i].Kind != k {
			t.Errorf("packet %d: kind %v, want %v", i, ps[i].Kind, k)
		}
	}
	if string(ps[1].Data) != "2" || string(ps[1].CID) != "3" {
		t.Errorf("packet 1: %q %q", ps[1].Data, ps[1].CID)
	}
	if ps, err := readAll(t, `[ ]`); err != nil || len(ps) != 0 {
		t.Fatalf("empty batch: %d packets, %v", len(ps), err)
	}
}

func TestReaderRejectsInvalidWhole(t *testing.T) {
	for _, f := range []string{
		`{"event":"a"`, `[{"event":"a"},{"event":]`, `{"event":"a"} x`, `{"a":01}`, `{"a":"\x"}`,
		"{\"a\":\"\x01\"}", "{\"a\":\"\xff\"}", `{"a":tru}`, `[1,]`, `{,}`, `{"a" 1}`, `{"a":-}`, `{"a":1.}`, `{"a":1e}`,
	} {
		ps, err := readAll(t, f)
		if !errors.Is(err, ErrSyntax) {
			t.Errorf("%q: err = %v", f, err)
		}
		if len(ps) != 1 || ps[0].Kind != Raw {
			t.Errorf("%q: want one raw packet, got %v", f, ps)
		}
	}
}

func TestReaderDepthLimit(t *testing.T) {
	deep := `{"event":"e","data":` + strings.Repeat("[", 100000) + strings.Repeat("]", 100000) + `}`
	ps, err := readAll(t, deep)
	if !errors.Is(err, ErrDepth) {
		t.Fatalf("err = %v", err)
	}
	if len(ps) != 1 || ps[0].Kind != Raw {
		t.Fatalf("want one raw packet")
	}
	ok := `{"event":"e","data":` + strings.Repeat("[", MaxDepth-1) + strings.Repeat("]", MaxDepth-1) + `}`
	if _, err := readAll(t, ok); err != nil {
		t.Fatalf("depth %d refused: %v", MaxDepth, err)
	}
}

func TestReaderBatchLimit(t *testing.T) {
	frame := "[" + strings.Repeat(`{"event":"a"},`, MaxBatch) + `{"event":"a"}]`
	ps, err := readAll(t, frame)
	if !errors.Is(err, ErrBatch) || len(ps) != 1 || ps[0].Kind != Raw {
		t.Fatalf("got %d packets, err %v", len(ps), err)
	}
	frame = "[" + strings.Repeat(`{"event":"a"},`, MaxBatch-1) + `{"event":"a"}]`
	if ps, err := readAll(t, frame); err != nil || len(ps) != MaxBatch {
		t.Fatalf("a full batch: %d packets, err %v", len(ps), err)
	}
}

func TestFields(t *testing.T) {
	obj := []byte(` {"channel":"a\/b\u2603","n":{"channel":"inner"},"x":[1,{"y":2}],"channel2":1} `)
	if s, ok := StringField(obj, "channel"); !ok || string(s) != "a/b☃" {
		t.Fatalf("channel = %q %v", s, ok)
	}
	if v, ok := Field(obj, "x"); !ok || string(v) != `[1,{"y":2}]` {
		t.Fatalf("x = %q", v)
	}
	if _, ok := StringField(obj, "channel2"); ok {
		t.Fatal("number accepted as string")
	}
	if _, ok := Field(obj, "y"); ok {
		t.Fatal("nested key found at top level")
	}
	if _, ok := Field([]byte(`"str"`), "a"); ok {
		t.Fatal("field of a string")
	}
	if s, ok := String([]byte(`"\ud83d\ude00\ud800x"`)); !ok || string(s) != "😀\uFFFDx" {
		t.Fatalf("surrogates: %q", s)
	}
}

func TestEncoders(t *testing.T) {
	e := NewError("AuthTokenExpiredError", "jwt expired").WithString("expiry", "2026-01-01T00:00:00.000Z").WithBool("isBadToken", true)
	cases := []struct{ got, want string }{
		{string(AppendResponse(nil, []byte("7"), nil)), `{"rid":7}`},
		{string(AppendResponse(nil, []byte("7"), []byte(`{"a":1}`))), `{"rid":7,"data":{"a":1}}`},
		{string(AppendErrorResponse(nil, []byte("2"), NewError("UnknownProcedureError", `No handler for procedure "x"`))),
			`{"rid":2,"error":{"message":"No handler for procedure \"x\"","name":"UnknownProcedureError"}}`},
		{string(AppendEvent(nil, "#removeAuthToken", nil)), RemoveAuthToken},
		{string(AppendEvent(nil, "e", []byte("1"))), `{"event":"e","data":1}`},
		{string(AppendPublish(nil, "foo", []byte("123"))), `{"event":"#publish","data":{"channel":"foo","data":123}}`},
		{string(AppendKickOut(nil, "foo", "bye")), `{"event":"#kickOut","data":{"channel":"foo","message":"bye"}}`},
		{string(AppendSetAuthToken(nil, "a.b.c")), `{"event":"#setAuthToken","data":{"token":"a.b.c"}}`},
		{string(AppendHandshakeResponse(nil, []byte("1"), Handshake{ID: "abc", PingTimeoutMs: 30000, AuthError: e})),
			`{"rid":1,"data":{"id":"abc","pingTimeout":30000,"isAuthenticated":false,"authError":{"message":"jwt expired","name":"AuthTokenExpiredError","expiry":"2026-01-01T00:00:00.000Z","isBadToken":true}}}`},
		{string(AppendAuthenticateResponse(nil, []byte("9"), true, nil)), `{"rid":9,"data":{"isAuthenticated":true,"authError":null}}`},
		{string(AppendString(nil, "a\"\\\n\x01\u2028\xffé")), `"a\"\\\n\u0001\u2028\ufffdé"`},
	}
	for _, c := range cases {
		if c.got != c.want {
			t.Errorf("got  %s\nwant %s", c.got, c.want)
		}
		if !json.Valid([]byte(c.got)) {
			t.Errorf("invalid JSON: %s", c.got)
		}
	}
}

// TestReaderNoAllocs pins the hot path: scanning a publish frame and
// reading its channel allocate nothing.
func TestReaderNoAllocs(t *testing.T) {
	frame := []byte(`{"event":"#publish","data":{"channel":"chat/room-1","data":{"text":"hello","n":[1,2,3]}},"cid":42}`)
	allocs := testing.AllocsPerRun(100, func() {
		var r Reader
		var p Packet
		r.Reset(frame)
		for r.Next(&p) {
			if ch, ok := StringField(p.Data, "channel"); !ok || len(ch) == 0 {
				t.Fatal("no channel")
			}
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocs per frame", allocs)
	}
}

// BenchmarkReadPublish reads a #publish's channel and data: "fields" with a
// scan per key, "fields2" in one pass (sc.Fields2, as the worker does).
func BenchmarkReadPublish(b *testing.B) {
	frame := []byte(`{"event":"#publish","data":{"channel":"chat/room-1","data":{"text":"hello world, this is a chat message","user":"alice","n":[1,2,3]}},"cid":42}`)
	for _, bc := range []struct {
		name string
		read func(data []byte) (ch, d []byte)
	}{
		{"fields", func(data []byte) ([]byte, []byte) {
			ch, _ := StringField(data, "channel")
			d, _ := Field(data, "data")
			return ch, d
		}},
		{"fields2", func(data []byte) ([]byte, []byte) {
			chRaw, d, _, _ := Fields2(data, "channel", "data")
			ch, _ := String(chRaw)
			return ch, d
		}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			var r Reader
			var p Packet
			for b.Loop() {
				r.Reset(frame)
				for r.Next(&p) {
					if ch, d := bc.read(p.Data); len(ch) == 0 || len(d) == 0 {
						b.Fatal("bad scan")
					}
				}
			}
		})
	}
}

func BenchmarkAppendPublish(b *testing.B) {
	data := []byte(`{"text":"hello world, this is a chat message","user":"alice","n":[1,2,3]}`)
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendPublish(buf[:0], "chat/room-1", data)
	}
	_ = bytes.Clone(buf)
}

// Fields2 finds both keys in one pass, with Field's answers.
func TestFields2(t *testing.T) {
	for _, obj := range []string{
		`{"channel":"a\/b\u2603","data":{"channel":"inner","x":[1,"\"]"]}}`,
		` { "data" : null , "channel" : "c" } `,
		`{"ch\u0061nnel":"esc","channel":"last","data":1,"data":2}`,
		`{"channel":"only"}`,
		`{}`,
		`"str"`,
		`[{"channel":"a"}]`,
	} {
		b := []byte(obj)
		v1, v2, ok1, ok2 := Fields2(b, "channel", "data")
		w1, wok1 := Field(b, "channel")
		w2, wok2 := Field(b, "data")
		if string(v1) != string(w1) || ok1 != wok1 || string(v2) != string(w2) || ok2 != wok2 {
			t.Errorf("%s: Fields2 = %q %q %v %v, Field = %q %q %v %v", obj, v1, v2, ok1, ok2, w1, w2, wok1, wok2)
		}
	}
}

// skipPlain stops at the first byte a string scan must handle, at every
// position of a word.
func TestSkipPlain(t *testing.T) {
	for _, special := range []byte{'"', '\\', 0, 0x1f, 0x80, 0xff} {
		for n := 0; n < 20; n++ {
			b := append(bytes.Repeat([]byte{'a'}, n), special, 'b')
			if got := skipPlain(b, 0); got != n {
				t.Fatalf("special %#x after %d plain bytes: stopped at %d", special, n, got)
			}
		}
	}
	plain := []byte(" ~!#$%&'()*+,-./09:;<=>?@AZ[]^_`az{|}")
	if got := skipPlain(plain, 0); got != len(plain) {
		t.Fatalf("plain ASCII: stopped at %d of %d", got, len(plain))
	}
}
