package link

import (
	"bytes"
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// sample is one frame of every type.
func sample() []byte {
	var b []byte
	b = AppendHello(b, Version, 42, "worker-1")
	b = AppendChannel(b, TypeSub, "chat/room")
	b = AppendChannel(b, TypeUnsub, "chat/room")
	b = AppendPub(b, 7, "chat/room", []byte(`{"text":"hi"}`))
	b = AppendPubAck(b, 7, 3, 42, "")
	b = AppendPubAck(b, 8, 0, 0, "no owner")
	b = AppendMsg(b, 3, 42, []byte("chat/room"), []byte(`"x"`))
	b = AppendEmpty(b, TypePing)
	b = AppendEmpty(b, TypePong)
	b = AppendMembers(b, []Member{{"broker-1", "unix:/a"}, {"broker-2", "tcp:10.0.0.2:7000"}})
	b = AppendEmpty(b, TypeReady)
	b = AppendSubRec(b, TypeSubRec, 9, 5, 42, "chat/room")
	b = AppendSubRec(b, TypeHistReq, 10, 0, 100, "chat/room")
	b = AppendRepl(b, 11, 3, 42, "chat/room", []byte(`"x"`))
	b = AppendPres(b, 12, PresJoin, "chat/room", []byte(`{"conn":"c1"}`))
	b = AppendHist(b, 9, 4, 1700000000, []byte(`"y"`))
	b = AppendReply(b, 9, 5, 42, FlagRecovered, nil)
	b = AppendEvent(b, EventJoin, "chat/room", []byte(`{"conn":"c1"}`))
	return b
}

type rec struct {
	Type                 Type
	Version              uint16
	ReqID, Offset, Epoch uint64
	Name, Channel, Data  string
	Err                  string
	Since, Limit         uint64
	Time                 int64
	Op, Flags            uint8
}

func collect(t *testing.T, chunks [][]byte) []rec {
	t.Helper()
	var d Decoder
	var out []rec
	for _, c := range chunks {
		err := d.Feed(c, func(f *Frame) error {
			out = append(out, rec{f.Type, f.Version, f.ReqID, f.Offset, f.Epoch,
				string(f.Name), string(f.Channel), string(f.Data), string(f.Err),
				f.Since, f.Limit, f.Time, f.Op, f.Flags})
			return nil
		})
		if err != nil {
			t.Fatalf("feed: %v", err)
		}
	}
	return out
}

func TestRoundTripAnySplit(t *testing.T) {
	b := sample()
	want := collect(t, [][]byte{b})
	if len(want) != 18 {
		t.Fatalf("decoded %d frames, want 18", len(want))
	}
	wantNew := []rec{
		{Type: TypeSubRec, ReqID: 9, Since: 5, Epoch: 42, Channel: "chat/room"},
		{Type: TypeHistReq, ReqID: 10, Limit: 100, Channel: "chat/room"},
		{Type: TypeRepl, ReqID: 11, Offset: 3, Epoch: 42, Channel: "chat/room", Data: `"x"`},
		{Type: TypePres, ReqID: 12, Op: PresJoin, Channel: "chat/room", Data: `{"conn":"c1"}`},
		{Type: TypeHist, ReqID: 9, Offset: 4, Time: 1700000000, Data: `"y"`},
		{Type: TypeReply, ReqID: 9, Offset: 5, Epoch: 42, Flags: FlagRecovered},
		{Type: TypeEvent, Op: EventJoin, Channel: "chat/room", Data: `{"conn":"c1"}`},
	}
	for i, w := range wantNew {
		if want[11+i] != w {
			t.Fatalf("frame %d decoded as %+v, want %+v", 11+i, want[11+i], w)
		}
	}
	if want[3] != (rec{Type: TypePub, ReqID: 7, Channel: "chat/room", Data: `{"text":"hi"}`}) {
		t.Fatalf("pub decoded as %+v", want[3])
	}
	if want[6] != (rec{Type: TypeMsg, Offset: 3, Epoch: 42, Channel: "chat/room", Data: `"x"`}) {
		t.Fatalf("msg decoded as %+v", want[6])
	}
	if want[5].Err != "no owner" || want[0].Name != "worker-1" || want[0].Epoch != 42 {
		t.Fatalf("hello/puback decoded as %+v %+v", want[0], want[5])
	}
	ms, err := ParseMembers([]byte(want[9].Data))
	if err != nil || len(ms) != 2 || ms[1].Addr != "tcp:10.0.0.2:7000" {
		t.Fatalf("members: %v %+v", err, ms)
	}
	// Every two-way split and byte-by-byte feeding decode the same frames.
	for i := 0; i <= len(b); i++ {
		got := collect(t, [][]byte{b[:i], b[i:]})
		if len(got) != len(want) {
			t.Fatalf("split at %d: %d frames, want %d", i, len(got), len(want))
		}
		for j := range got {
			if got[j] != want[j] {
				t.Fatalf("split at %d: frame %d = %+v, want %+v", i, j, got[j], want[j])
			}
		}
	}
	var bytewise [][]byte
	for i := range b {
		bytewise = append(bytewise, b[i:i+1])
	}
	if got := collect(t, bytewise); len(got) != len(want) {
		t.Fatalf("bytewise: %d frames", len(got))
	}
}

func TestDecoderErrors(t *testing.T) {
	hdr := func(n uint32, typ byte) []byte {
		return []byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n), typ}
	}
	cases := []struct {
		name string
		in   []byte
		want string
	}{
		{"zero length", hdr(0, 1), "length 0"},
		{"too long", hdr(1<<30, 4), "exceeds the limit"},
		{"unknown type", hdr(1, 99), "unknown frame type 99"},
		{"short pub", append(hdr(4, byte(TypePub)), 1, 2, 3), "need at least"},
		{"pub channel past body", append(hdr(11, byte(TypePub)), 0, 0, 0, 0, 0, 0, 0, 1, 0, 9), "runs past the body"},
		{"empty sub", hdr(1, byte(TypeSub)), "empty channel name"},
		{"ping with body", append(hdr(2, byte(TypePing)), 0), "must be empty"},
		{"bad members", append(hdr(3, byte(TypeMembers)), 0, 5), "truncated member name"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := Decoder{MaxFrame: 1 << 20}
			err := d.Feed(c.in, func(*Frame) error { return nil })
			var fe *FrameError
			if !errors.As(err, &fe) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want a FrameError containing %q", err, c.want)
			}
			if err := d.Feed([]byte{0}, func(*Frame) error { return nil }); !errors.Is(err, ErrDecoderFailed) {
				t.Fatalf("after failure: %v", err)
			}
		})
	}
}

// A header that announces a big frame must not allocate it up front.
func TestDecoderNoUpfrontAllocation(t *testing.T) {
	d := Decoder{MaxFrame: 64 << 20}
	in := []byte{0x03, 0xff, 0xff, 0xff, byte(TypePub), 1, 2, 3}
	allocs := testing.AllocsPerRun(1, func() {
		d = Decoder{MaxFrame: 64 << 20}
		_ = d.Feed(in, func(*Frame) error { return nil })
	})
	if cap(d.body) > 64 {
		t.Fatalf("partial buffer cap %d after 3 body bytes", cap(d.body))
	}
	_ = allocs
}

func pipe(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := Listen("unix:" + filepath.Join(t.TempDir(), "l.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		ch <- c
	}()
	client, err = Dial(context.Background(), ListenerAddr(ln))
	if err != nil {
		t.Fatal(err)
	}
	server = <-ch
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

func TestWriterCoalescesAndDelivers(t *testing.T) {
	c, s := pipe(t)
	w := NewWriter(c, WriterConfig{MaxPending: 1 << 20, WriteTimeout: 5 * time.Second})
	runErr := make(chan error, 1)
	go func() { runErr <- w.Run() }()

	const n = 5000
	go func() {
		for i := 0; i < n; i++ {
			for {
				err := w.WritePub(uint64(i), "c", []byte("payload"))
				if err == nil {
					break
				}
				if !errors.Is(err, ErrQueueFull) {
					return
				}
				_ = w.WaitSpace(context.Background(), PubSize("c", []byte("payload")))
			}
		}
		w.Close()
	}()
	var d Decoder
	next := uint64(0)
	buf := make([]byte, 32<<10)
	err := ReadFrames(s, &d, buf, 0, func(f *Frame) error {
		if f.ReqID != next {
			t.Errorf("frame %d out of order (want %d)", f.ReqID, next)
		}
		next++
		if next == n {
			return errStop
		}
		return nil
	})
	if !errors.Is(err, errStop) {
		t.Fatalf("read: %v after %d frames", err, next)
	}
	if err := <-runErr; err != nil {
		t.Fatalf("run: %v", err)
	}
}

var errStop = errors.New("stop")

func TestWriterQueueFullAndTimeout(t *testing.T) {
	c, _ := pipe(t) // the server side never reads
	w := NewWriter(c, WriterConfig{MaxPending: 4096, WriteTimeout: 200 * time.Millisecond})
	runErr := make(chan error, 1)
	go func() { runErr <- w.Run() }()
	big := bytes.Repeat([]byte("x"), 1000)
	full := false
	deadline := time.Now().Add(5 * time.Second)
	for i := 0; !full && time.Now().Before(deadline); i++ {
		switch err := w.WritePub(uint64(i), "c", big); {
		case errors.Is(err, ErrQueueFull):
			full = true
		case err != nil:
			t.Fatalf("write %d: %v", i, err)
		}
	}
	if !full {
		t.Fatal("queue never filled against a peer that does not read")
	}
	// Keep offering frames: the stuck peer trips the write timeout and Run
	// reports it; from then on writes fail with ErrClosed.
	var runE error
	for done := false; !done; {
		select {
		case runE = <-runErr:
			done = true
		case <-time.After(10 * time.Millisecond):
			if time.Now().After(deadline.Add(5 * time.Second)) {
				t.Fatal("writer did not time out")
			}
			_ = w.WritePub(0, "c", big)
		}
	}
	if runE == nil || !strings.Contains(runE.Error(), "writing") {
		t.Fatalf("run: %v", runE)
	}
	if err := w.WritePub(1, "c", nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("write after failure: %v", err)
	}
}

func TestSplitAddr(t *testing.T) {
	for in, want := range map[string]string{
		"unix:/run/b.sock": "unix /run/b.sock",
		"tcp:10.0.0.1:700": "tcp 10.0.0.1:700",
		"127.0.0.1:80":     "tcp 127.0.0.1:80",
	} {
		n, a, err := SplitAddr(in)
		if err != nil || n+" "+a != want {
			t.Errorf("%s: %s %s %v", in, n, a, err)
		}
	}
	for _, bad := range []string{"/run/b.sock", "unix:", ""} {
		if _, _, err := SplitAddr(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}
