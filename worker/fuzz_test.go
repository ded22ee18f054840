package worker

import (
	"testing"
	"time"

	"github.com/gobwas/ws"
)

// FuzzSessionFrames feeds arbitrary frames to a handshaken session and to
// one that is not: nothing may panic, and a closed session must leave no
// subscription behind.
func FuzzSessionFrames(f *testing.F) {
	for _, seed := range [][2]string{
		{`{"event":"#subscribe","data":{"channel":"a"},"cid":1}`, `{"event":"#publish","data":{"channel":"a","data":1},"cid":2}`},
		{`[{"event":"#subscribe","data":{"channel":"b"},"cid":1},{"event":"#unsubscribe","data":"b"}]`, `#2`},
		{`{"event":"#authenticate","data":"x.y.z","cid":3}`, `{"event":"#removeAuthToken"}`},
		{`{"event":"#handshake","data":{"authToken":5},"cid":1}`, ``},
		{`[[[[[[`, `{"event":"rpc","cid":1e3}`},
	} {
		f.Add([]byte(seed[0]), []byte(seed[1]))
	}
	env := newEnv(f, nil)
	f.Fuzz(func(t *testing.T, a, b []byte) {
		for _, handshaken := range []bool{false, true} {
			c := &fakeConn{e: env.e}
			c.s = env.e.Open(c)
			if handshaken {
				env.send(c, `{"event":"#handshake","data":{"authToken":null},"cid":1}`)
			}
			env.e.Message(c.s, a)
			env.e.Message(c.s, b)
			env.e.Closed(c.s, ws.StatusNormalClosure, "")
			for _, ch := range []string{"a", "b"} {
				if env.e.Hub().Subscribers(ch) != 0 {
					t.Fatalf("closed session still subscribed to %q", ch)
				}
			}
		}
	})
	// Sessions closed by the engine close asynchronously (fakeConn.Close).
	deadline := time.Now().Add(5 * time.Second)
	for env.e.Len() > 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
}
