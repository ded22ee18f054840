package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"

	"github.com/shoalhq/shoal/client"
)

// rawSC is a SocketCluster socket spoken by hand, for the recovery wire
// format (the #subscribe data, the ack's data, #recovery) where the Go
// client would hide it.
type rawSC struct {
	t    *testing.T
	conn net.Conn
	in   chan []byte // every non-ping message, in order
	wg   sync.WaitGroup
	cid  int
}

func dialRaw(t *testing.T, public, token string) *rawSC {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, _, _, err := ws.Dial(ctx, "ws://"+public+"/socketcluster/")
	if err != nil {
		t.Fatalf("WebSocket through the balancer: %v", err)
	}
	r := &rawSC{t: t, conn: conn, in: make(chan []byte, 1024)}
	_ = conn.SetDeadline(time.Now().Add(40 * time.Second)) // bounds every read and write
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		defer close(r.in)
		for i := 0; i < 100000; i++ {
			msg, _, err := wsutil.ReadServerData(conn)
			if err != nil {
				return
			}
			if len(msg) == 0 { // v2 ping
				_ = wsutil.WriteClientText(conn, nil)
				continue
			}
			r.in <- msg
		}
	}()
	t.Cleanup(r.close)
	hs := r.invoke("#handshake", map[string]any{"authToken": token})
	if !strings.Contains(string(hs), `"isAuthenticated":true`) {
		t.Fatalf("handshake: %s", hs)
	}
	return r
}

func (r *rawSC) close() {
	_ = r.conn.Close()
	r.wg.Wait()
}

// next returns the next message, failing after 5 s.
func (r *rawSC) next(what string) []byte {
	r.t.Helper()
	select {
	case m, ok := <-r.in:
		if !ok {
			r.t.Fatalf("%s: connection closed", what)
		}
		return m
	case <-time.After(5 * time.Second):
		r.t.Fatalf("%s: nothing within 5 s", what)
		return nil
	}
}

// invoke sends an invoke and returns its response's whole packet; other
// messages before it fail the test (callers invoke when the socket is quiet).
func (r *rawSC) invoke(event string, data any) []byte {
	r.t.Helper()
	r.cid++
	b, err := json.Marshal(map[string]any{"event": event, "data": data, "cid": r.cid})
	if err != nil {
		r.t.Fatal(err)
	}
	if err := wsutil.WriteClientText(r.conn, b); err != nil {
		r.t.Fatal(err)
	}
	m := r.next(event + " response")
	if !strings.Contains(string(m), fmt.Sprintf(`"rid":%d`, r.cid)) {
		r.t.Fatalf("%s: expected the response, got %s", event, m)
	}
	return m
}

type pubPacket struct {
	Event string `json:"event"`
	Data  struct {
		Channel   string          `json:"channel"`
		Data      json.RawMessage `json:"data"`
		Offset    uint64          `json:"offset"`
		Epoch     string          `json:"epoch"`
		Recovered bool            `json:"recovered"`
	} `json:"data"`
}

// nextPacket returns the next #publish or #recovery; #presence events
// (join_leave is on for chat/**, the socket sees its own join) are skipped.
func (r *rawSC) nextPacket(what string) pubPacket {
	r.t.Helper()
	for i := 0; i < 100; i++ {
		m := r.next(what)
		var p pubPacket
		if err := json.Unmarshal(m, &p); err != nil {
			r.t.Fatalf("%s: %s: %v", what, m, err)
		}
		if p.Event != "#presence" {
			return p
		}
	}
	r.t.Fatalf("%s: only #presence events", what)
	return pubPacket{}
}

func apiPublish(t *testing.T, public, channel string, n int) uint64 {
	t.Helper()
	var pos struct {
		Offset uint64 `json:"offset"`
	}
	if st := callAPI(t, public, "publish", map[string]any{"channel": channel, "data": map[string]any{"n": n}}, &pos); st != http.StatusOK {
		t.Fatalf("publish %d: %d", n, st)
	}
	return pos.Offset
}

// TestRecoveryAfterDisconnect: a socket reads a history channel, goes away
// for 5 s while the API publishes, and a new socket that subscribes with
// the last position gets exactly the gap, in order, then the live stream
// with no duplicate at the seam; a position of another epoch is refused.
func TestRecoveryAfterDisconnect(t *testing.T) {
	c := startRealtimeCluster(t, "")
	const ch = "chat/recover"
	tok := userToken(t, "rita")

	a := dialRaw(t, c.public, tok)
	ack := a.invoke("#subscribe", map[string]any{"channel": ch})
	if !strings.Contains(string(ack), `"recovered":false`) || !strings.Contains(string(ack), `"epoch"`) {
		t.Fatalf("subscribe ack without the channel's position: %s", ack)
	}
	var lastOff uint64
	var lastEpoch string
	for i := 1; i <= 3; i++ {
		off := apiPublish(t, c.public, ch, i)
		p := a.nextPacket(fmt.Sprintf("publish %d", i))
		if p.Event != "#publish" || p.Data.Offset != off || p.Data.Epoch == "" || string(p.Data.Data) != fmt.Sprintf(`{"n":%d}`, i) {
			t.Fatalf("publish %d: got %+v; want offset %d with an epoch", i, p, off)
		}
		lastOff, lastEpoch = p.Data.Offset, p.Data.Epoch
	}
	a.close()

	// 5 s away: one publish per second meanwhile (pacing, not synchronisation).
	gap := map[uint64]int{}
	tick := time.NewTicker(time.Second)
	for i := 4; i <= 8; i++ {
		<-tick.C
		gap[apiPublish(t, c.public, ch, i)] = i
	}
	tick.Stop()

	b := dialRaw(t, c.public, tok)
	ack = b.invoke("#subscribe", map[string]any{"channel": ch, "data": map[string]any{"recover": map[string]any{"offset": lastOff, "epoch": lastEpoch}}})
	if !strings.Contains(string(ack), `"recovered":true`) {
		t.Fatalf("recovering subscribe: %s", ack)
	}
	if p := b.nextPacket("#recovery"); p.Event != "#recovery" || !p.Data.Recovered || p.Data.Channel != ch {
		t.Fatalf("want #recovery recovered=true first, got %+v", p)
	}
	for want := lastOff + 1; want <= lastOff+5; want++ {
		p := b.nextPacket(fmt.Sprintf("missed message at %d", want))
		if p.Event != "#publish" || p.Data.Offset != want || string(p.Data.Data) != fmt.Sprintf(`{"n":%d}`, gap[want]) {
			t.Fatalf("missed message %d: got %+v", want, p)
		}
	}
	// The seam: the next message is the next live publish, nothing repeated.
	off := apiPublish(t, c.public, ch, 9)
	if p := b.nextPacket("live after recovery"); p.Data.Offset != off || off != lastOff+6 {
		t.Fatalf("live message after recovery: %+v; want offset %d", p, lastOff+6)
	}

	// A position of an unknown epoch cannot be recovered, and says so.
	d := dialRaw(t, c.public, tok)
	ack = d.invoke("#subscribe", map[string]any{"channel": ch, "data": map[string]any{"recover": map[string]any{"offset": 1, "epoch": "nosuchepoch"}}})
	if !strings.Contains(string(ack), `"recovered":false`) {
		t.Fatalf("recovery from a foreign epoch: %s", ack)
	}
	if p := d.nextPacket("#recovery"); p.Event != "#recovery" || p.Data.Recovered {
		t.Fatalf("want #recovery recovered=false, got %+v", p)
	}
	off = apiPublish(t, c.public, ch, 10)
	if p := d.nextPacket("live after failed recovery"); p.Data.Offset != off {
		t.Fatalf("live message after a failed recovery: %+v; want offset %d", p, off)
	}
}

// TestGoClientRecoversAfterDisconnect: the Go client's automatic recovery
// across a 5 s outage. The API disconnects the user (wherever it is); the
// client's first reconnect comes 5 s later (ReconnectDelay), and the API
// publishes meanwhile. The resubscription carries the client's position:
// it receives exactly the missed messages, then the live stream.
//
// (A ban of 5 s would make a better outage, but the client currently starts
// an extra reconnect loop on every refused attempt; see the report.)
func TestGoClientRecoversAfterDisconnect(t *testing.T) {
	c := startRealtimeCluster(t, "")
	const ch = "chat/auto"
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	cl, err := client.Dial(ctx, "ws://"+c.public+"/socketcluster/", client.Options{
		AuthToken: userToken(t, "rob"), Reconnect: true, ReconnectDelay: 5 * time.Second,
		OnClose: func(err error) { t.Logf("%s connection lost: %v", time.Now().Format("15:04:05.000"), err) },
		OnRecover: func(ch string, r client.Recovery) {
			t.Logf("%s recovery of %s: %+v", time.Now().Format("15:04:05.000"), ch, r)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	sub, err := cl.Subscribe(ctx, ch, 64)
	if err != nil {
		t.Fatal(err)
	}
	first := apiPublish(t, c.public, ch, 1)
	if m := recvMsg(t, sub, "first message"); m.Offset != first {
		t.Fatalf("first message at %d, want %d", m.Offset, first)
	}

	off, ep := sub.Position()
	t.Logf("position before the disconnect: %d %q", off, ep)
	var res struct {
		Disconnected int `json:"disconnected"`
	}
	if st := callAPI(t, c.public, "disconnect", map[string]any{"user": "rob", "code": 4000, "reason": "come back later"}, &res); st != http.StatusOK || res.Disconnected != 1 {
		t.Fatalf("disconnect: %d %+v", st, res)
	}
	gone := time.Now()
	var missed []uint64
	for i := 2; i <= 6; i++ {
		missed = append(missed, apiPublish(t, c.public, ch, i))
	}
	for i, want := range missed {
		m := recvMsg2(t, sub, 15*time.Second, fmt.Sprintf("missed message %d", i+2))
		if m.Offset != want || string(m.Data) != fmt.Sprintf(`{"n":%d}`, i+2) {
			t.Fatalf("missed message %d: offset %d data %s, want offset %d", i+2, m.Offset, m.Data, want)
		}
	}
	out := time.Since(gone)
	// The client records the outcome when the resubscription's ack is
	// processed, which may come just after the messages reach C.
	waitFor(t, 5*time.Second, "the client's recovery outcome", func() bool {
		rec := sub.LastRecovery()
		return rec.Attempted && rec.Recovered
	})
	if out < 4*time.Second {
		t.Fatalf("back after %s: the client was not kept out", out)
	}
	live := apiPublish(t, c.public, ch, 7)
	if m := recvMsg(t, sub, "live message"); m.Offset != live {
		t.Fatalf("live message at %d, want %d (duplicate or gap at the seam)", m.Offset, live)
	}
	t.Logf("client kept out %s, recovered %d messages", out.Round(100*time.Millisecond), len(missed))
}

func recvMsg2(t *testing.T, sub *client.Subscription, d time.Duration, what string) client.Message {
	t.Helper()
	select {
	case m := <-sub.C:
		return m
	case <-time.After(d):
		t.Fatalf("%s: no message within %s", what, d)
		return client.Message{}
	}
}
