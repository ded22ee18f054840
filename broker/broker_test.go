package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"go.uber.org/goleak"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/proto/link"
)

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(runHelperBroker())
	}
	goleak.VerifyTestMain(m)
}

func shortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "shoal-br")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// syncBuffer is a log sink tests can read while the broker writes.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startChild(t *testing.T, cfg []byte) (*Child, string, *syncBuffer) {
	t.Helper()
	if cfg == nil {
		cfg = []byte(`{"cluster":{"gossip":""}}`) // no ring unless a test asks
	}
	logs := &syncBuffer{}
	c := New(hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Debug}))
	// Start sets the process's GOMAXPROCS (broker.gomaxprocs): give the
	// test process its own back afterwards.
	procs := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(procs) })
	res, err := c.Start(context.Background(), control.StartParams{Role: control.RoleBroker, Name: "broker-1", RunDir: shortDir(t), Config: cfg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Stop(context.Background()) })
	addr := res.Addrs[control.AddrLink]
	if !strings.HasPrefix(addr, "unix:") || !strings.HasSuffix(addr, "/broker-1.link.sock") {
		t.Fatalf("link address %q", addr)
	}
	return c, addr, logs
}

// TestStartTakesGoMaxProcsFromConfig: a broker process runs with the Go
// scheduler threads of broker.gomaxprocs, one when the config does not say.
func TestStartTakesGoMaxProcsFromConfig(t *testing.T) {
	for _, c := range []struct {
		cfg  string
		want int
	}{
		{`{"cluster":{"gossip":""},"broker":{"gomaxprocs":3}}`, 3},
		{`{"cluster":{"gossip":""}}`, 1},
	} {
		t.Run(c.cfg, func(t *testing.T) {
			runtime.GOMAXPROCS(5) // neither value: Start must set it
			_, _, logs := startChild(t, []byte(c.cfg))
			if got := runtime.GOMAXPROCS(0); got != c.want {
				t.Fatalf("GOMAXPROCS %d after Start, want %d", got, c.want)
			}
			if want := "gomaxprocs=" + strconv.Itoa(c.want); !strings.Contains(logs.String(), want) {
				t.Fatalf("start log does not say %s:\n%s", want, logs)
			}
		})
	}
}

// rawLink is a worker link driven frame by frame.
type rawLink struct {
	conn net.Conn
	dec  link.Decoder
	buf  []byte
	got  []link.Frame
}

func dialRaw(t *testing.T, addr string) *rawLink {
	t.Helper()
	conn, err := link.Dial(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &rawLink{conn: conn, buf: make([]byte, 4096)}
}

func (r *rawLink) send(t *testing.T, b []byte) {
	t.Helper()
	if _, err := r.conn.Write(b); err != nil {
		t.Fatal(err)
	}
}

// next reads the next frame (copying it) or returns the read error.
func (r *rawLink) next(t *testing.T) (link.Frame, error) {
	t.Helper()
	_ = r.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	for len(r.got) == 0 {
		n, err := r.conn.Read(r.buf)
		if n > 0 {
			if ferr := r.dec.Feed(r.buf[:n], func(f *link.Frame) error {
				c := *f
				c.Name = append([]byte(nil), f.Name...)
				c.Channel = append([]byte(nil), f.Channel...)
				c.Data = append([]byte(nil), f.Data...)
				c.Err = append([]byte(nil), f.Err...)
				r.got = append(r.got, c)
				return nil
			}); ferr != nil {
				t.Fatal(ferr)
			}
		}
		if err != nil && len(r.got) == 0 {
			return link.Frame{}, err
		}
	}
	f := r.got[0]
	r.got = r.got[1:]
	return f, nil
}

// closedByPeer: EOF, or a reset when the broker closed with our bytes unread.
func closedByPeer(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestRawProtocol(t *testing.T) {
	c, addr, _ := startChild(t, nil)
	w := dialRaw(t, addr)
	w.send(t, link.AppendHello(nil, link.Version, 0, "worker-1"))
	f, err := w.next(t)
	if err != nil || f.Type != link.TypeHello || string(f.Name) != "broker-1" || f.Epoch == 0 {
		t.Fatalf("hello answer %+v %v", f, err)
	}
	epoch := f.Epoch
	// Interest, then two publishes (batched in one write): msg, ack, msg, ack.
	var b []byte
	b = link.AppendChannel(b, link.TypeSub, "c")
	b = link.AppendPub(b, 1, "c", []byte(`"a"`))
	b = link.AppendPub(b, 2, "c", []byte(`"b"`))
	b = link.AppendEmpty(b, link.TypePing)
	w.send(t, b)
	want := []struct {
		typ    link.Type
		offset uint64
		data   string
	}{{link.TypeMsg, 1, `"a"`}, {link.TypePubAck, 1, ""}, {link.TypeMsg, 2, `"b"`}, {link.TypePubAck, 2, ""}, {link.TypePong, 0, ""}}
	for i, x := range want {
		f, err := w.next(t)
		if err != nil || f.Type != x.typ || f.Offset != x.offset || string(f.Data) != x.data {
			t.Fatalf("frame %d: %+v %v, want %+v", i, f, err, x)
		}
		if f.Type == link.TypeMsg && (string(f.Channel) != "c" || f.Epoch < epoch) {
			t.Fatalf("msg %+v", f)
		}
	}
	st, _ := c.Stats(context.Background())
	if st.Counters["publishes"] != 2 || st.Counters["deliveries"] != 2 || st.Counters["channels"] != 1 || st.Counters["links"] != 1 {
		t.Fatalf("stats %v", st.Counters)
	}
}

func TestMalformedFrameClosesOnlyThatLink(t *testing.T) {
	c, addr, logs := startChild(t, nil)
	good := dialRaw(t, addr)
	good.send(t, link.AppendHello(nil, link.Version, 0, "good"))
	if _, err := good.next(t); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name  string
		frame []byte
		log   string
	}{
		{"unknown type", []byte{0, 0, 0, 1, 200}, "unknown frame type 200"},
		{"oversized", []byte{0x7f, 0, 0, 0, byte(link.TypePub)}, "exceeds the limit"},
		{"pub channel past body", append([]byte{0, 0, 0, 11, byte(link.TypePub)}, 0, 0, 0, 0, 0, 0, 0, 1, 0, 9), "runs past the body"},
		{"msg from a worker", link.AppendMsg(nil, 1, 1, []byte("c"), nil), "unexpected msg frame"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w := dialRaw(t, addr)
			w.send(t, link.AppendHello(nil, link.Version, 0, "bad-"+tc.name))
			if _, err := w.next(t); err != nil {
				t.Fatal(err)
			}
			w.send(t, tc.frame)
			if _, err := w.next(t); !closedByPeer(err) {
				t.Fatalf("after a malformed frame: %v, want the link closed", err)
			}
			waitFor(t, "the error logged", func() bool { return strings.Contains(logs.String(), tc.log) })
		})
	}
	t.Run("no hello", func(t *testing.T) {
		w := dialRaw(t, addr)
		w.send(t, link.AppendChannel(nil, link.TypeSub, "c"))
		if _, err := w.next(t); !closedByPeer(err) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("wrong version", func(t *testing.T) {
		w := dialRaw(t, addr)
		w.send(t, link.AppendHello(nil, link.Version+1, 0, "future"))
		if _, err := w.next(t); !closedByPeer(err) {
			t.Fatalf("got %v", err)
		}
	})
	// The good link still works.
	good.send(t, link.AppendPub(nil, 9, "x", nil))
	if f, err := good.next(t); err != nil || f.Type != link.TypePubAck || f.ReqID != 9 {
		t.Fatalf("good link after the bad ones: %+v %v", f, err)
	}
	if got := c.Server().Stats().BadFrames; got < 6 {
		t.Fatalf("bad frames counted %d", got)
	}
}

func TestMaxFrameFollowsMaxPayload(t *testing.T) {
	cfg := configs.Default()
	cfg.Protocol.MaxPayload = 1024
	cfg.Cluster.Gossip = ""
	b, _ := json.Marshal(cfg)
	_, addr, logs := startChild(t, b)
	w := dialRaw(t, addr)
	w.send(t, link.AppendHello(nil, link.Version, 0, "w"))
	if _, err := w.next(t); err != nil {
		t.Fatal(err)
	}
	w.send(t, link.AppendPub(nil, 1, "c", make([]byte, 1024))) // max_payload fits
	if f, err := w.next(t); err != nil || f.Type != link.TypePubAck {
		t.Fatalf("max-size publish: %+v %v", f, err)
	}
	w.send(t, link.AppendPub(nil, 2, "c", make([]byte, 1024+link.Overhead)))
	if _, err := w.next(t); !closedByPeer(err) {
		t.Fatalf("oversized publish: %v", err)
	}
	waitFor(t, "logged", func() bool { return strings.Contains(logs.String(), "exceeds the limit") })
}

func TestDeadLinkLosesInterestAndDrainCloses(t *testing.T) {
	c, addr, _ := startChild(t, nil)
	w := dialRaw(t, addr)
	w.send(t, link.AppendHello(nil, link.Version, 0, "w"))
	w.send(t, link.AppendChannel(nil, link.TypeSub, "c"))
	srv := c.Server()
	waitFor(t, "interest", func() bool { return srv.Interest("c") == 1 })
	w.conn.Close()
	waitFor(t, "interest dropped", func() bool { return srv.Interest("c") == 0 && srv.Stats().Links == 0 })

	w2 := dialRaw(t, addr)
	w2.send(t, link.AppendHello(nil, link.Version, 0, "w2"))
	if _, err := w2.next(t); err != nil {
		t.Fatal(err)
	}
	if err := c.Drain(context.Background(), time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := w2.next(t); !closedByPeer(err) {
		t.Fatalf("after drain: %v", err)
	}
	if h, _ := c.Health(context.Background()); h.State != control.StateDraining {
		t.Fatalf("health %+v", h)
	}
	if _, err := link.Dial(context.Background(), addr); err == nil {
		t.Fatal("still accepting after drain")
	}
}

func TestSlowWorkerIsDropped(t *testing.T) {
	srv := NewServer(ServerConfig{Name: "b", MaxPending: 64 << 10, WriteTimeout: 5 * time.Second})
	defer srv.Close(context.Background())
	ln, err := link.Listen("unix:" + shortDir(t) + "/s.sock")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(ln); err != nil {
		t.Fatal(err)
	}
	addr := link.ListenerAddr(ln)
	slow := dialRaw(t, addr) // never reads after hello
	slow.send(t, link.AppendHello(nil, link.Version, 0, "slow"))
	slow.send(t, link.AppendChannel(nil, link.TypeSub, "c"))
	pub := dialRaw(t, addr)
	pub.send(t, link.AppendHello(nil, link.Version, 0, "pub"))
	if _, err := pub.next(t); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "interest", func() bool { return srv.Interest("c") == 1 })
	data := make([]byte, 8<<10)
	for i := uint64(1); srv.Stats().SlowLinks == 0; i++ {
		if i > 10000 {
			t.Fatal("slow worker never dropped")
		}
		pub.send(t, link.AppendPub(nil, i, "c", data))
		if f, err := pub.next(t); err != nil || f.Type != link.TypePubAck {
			t.Fatalf("publisher: %+v %v", f, err)
		}
	}
	waitFor(t, "slow link gone", func() bool { return srv.Interest("c") == 0 })
}

func TestWarmUpWaitsForTheTopologysWorkers(t *testing.T) {
	logs := &syncBuffer{}
	c := New(hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Debug}))
	topo := control.Topology{Peers: []control.Peer{
		{Name: "worker-1", Role: control.RoleWorker, State: control.StateReady},
		{Name: "worker-2", Role: control.RoleWorker, State: control.StateReady},
		{Name: "worker-3", Role: control.RoleWorker, State: control.StateDead}, // not waited for
	}}
	res, err := c.Start(context.Background(), control.StartParams{Name: "broker-1", RunDir: shortDir(t), Config: []byte(`{"cluster":{"gossip":""}}`), Topology: topo})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Stop(context.Background()) })
	addr := res.Addrs[control.AddrLink]
	hello := func(name string) *rawLink {
		w := dialRaw(t, addr)
		w.send(t, append(link.AppendHello(nil, link.Version, 0, name), link.AppendEmpty(nil, link.TypeReady)...))
		if f, err := w.next(t); err != nil || f.Type != link.TypeHello {
			t.Fatalf("hello: %+v %v", f, err)
		}
		return w
	}
	w1 := hello("worker-1")
	w1.send(t, link.AppendPub(nil, 1, "c", []byte("x")))
	if f, err := w1.next(t); err != nil || f.Type != link.TypePubAck || !strings.Contains(string(f.Err), "starting") {
		t.Fatalf("publish before worker-2 is back: %+v %v", f, err)
	}
	w2 := hello("worker-2")
	// A pong proves the broker has handled worker-2's ready (same link, in order).
	w2.send(t, link.AppendEmpty(nil, link.TypePing))
	if f, err := w2.next(t); err != nil || f.Type != link.TypePong {
		t.Fatalf("ping: %+v %v", f, err)
	}
	w1.send(t, link.AppendPub(nil, 2, "c", []byte("x")))
	if f, err := w1.next(t); err != nil || f.Type != link.TypePubAck || len(f.Err) != 0 || f.Offset != 1 {
		t.Fatalf("publish once every worker is back: %+v %v", f, err)
	}
	if st, _ := c.Stats(context.Background()); st.Counters["refused"] != 1 {
		t.Fatalf("stats %v", st.Counters)
	}
}

func TestWarmUpEndsAtTheLatestAfterWarmUpMax(t *testing.T) {
	srv := NewServer(ServerConfig{Name: "b", WarmUpMax: 150 * time.Millisecond})
	defer srv.Close(context.Background())
	srv.ExpectWorkers([]string{"never-comes"})
	ln, err := link.Listen("unix:" + shortDir(t) + "/s.sock")
	if err != nil {
		t.Fatal(err)
	}
	_ = srv.Serve(ln)
	w := dialRaw(t, link.ListenerAddr(ln))
	w.send(t, link.AppendHello(nil, link.Version, 0, "w"))
	if _, err := w.next(t); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for id := uint64(1); ; id++ {
		w.send(t, link.AppendPub(nil, id, "c", nil))
		f, err := w.next(t)
		if err != nil {
			t.Fatal(err)
		}
		if len(f.Err) == 0 {
			break
		}
		if time.Since(start) > 5*time.Second {
			t.Fatal("warm-up never ended")
		}
		time.Sleep(5 * time.Millisecond) // poll interval
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("warm-up lasted %v", d)
	}
}

// A presence list is read in pages of at most the budget (at least one
// entry each), in conn id order from after the cursor, with the channel's
// whole count; a request without the page mark (a worker from before pages)
// gets the whole list, or an error answer when it does not fit a frame.
func TestPresencePages(t *testing.T) {
	srv := NewServer(ServerConfig{Name: "b"})
	defer srv.Close(context.Background())
	sh := srv.shard([]byte("room"))
	sh.mu.Lock()
	st := srv.chanLocked(sh, []byte("room"))
	st.pres = map[string]*presEntry{}
	for i := range 10 {
		c := fmt.Sprintf("c%02d", i)
		st.pres[c] = &presEntry{raw: []byte(`{"conn":"` + c + `"}`)}
	}
	sh.mu.Unlock()

	var got []string
	after, pages := "", 0
	for {
		data, n, more := srv.presPage("room", after, 40)
		if n != 10 {
			t.Fatalf("count %d, want 10", n)
		}
		if len(data) > 40 {
			t.Fatalf("page of %d bytes over a 40-byte budget: %s", len(data), data)
		}
		var list []struct{ Conn string }
		if err := json.Unmarshal(data, &list); err != nil || len(list) == 0 {
			t.Fatalf("page %s: %v", data, err)
		}
		for _, e := range list {
			got = append(got, e.Conn)
		}
		pages++
		if !more {
			break
		}
		after = list[len(list)-1].Conn
		if pages > 20 {
			t.Fatal("more than 20 pages for 10 entries")
		}
	}
	if pages < 5 || strings.Join(got, ",") != "c00,c01,c02,c03,c04,c05,c06,c07,c08,c09" {
		t.Fatalf("%d pages, entries %v", pages, got)
	}
	if data, n, more := srv.presPage("room", "", 1); more != true || n != 10 || string(data) != `[{"conn":"c00"}]` {
		t.Fatalf("a budget below one entry gives %s %d %v, want the first entry alone", data, n, more)
	}
	if data, _, more := srv.presPage("room", "", math.MaxInt); more || strings.Count(string(data), "conn") != 10 {
		t.Fatalf("whole list: %s more=%v", data, more)
	}
}
