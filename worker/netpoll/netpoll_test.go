package netpoll

import (
	"testing"
)

func TestEcho(t *testing.T) {
	ts := startServer(t, Config{})
	c := ts.dial(t)
	for _, msg := range []string{"hello", "", string(make([]byte, 300)), string(make([]byte, 70000))} {
		c.send(t, msg)
		if got := c.read(t); got != msg {
			t.Fatalf("echo of %d bytes: got %d bytes", len(msg), len(got))
		}
	}
}
