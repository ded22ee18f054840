package bench

import (
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestAcceptKey(t *testing.T) {
	// The example of RFC 6455 §1.3.
	if got := acceptKey("dGhlIHNhbXBsZSBub25jZQ=="); got != "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" {
		t.Fatalf("acceptKey = %q", got)
	}
	ok := "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nsec-websocket-accept:  s3pPLMBiTxaQ9kYGzzhZRbK+xOo= \r\n\r\n"
	if err := checkUpgrade([]byte(ok), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="); err != nil {
		t.Errorf("valid response refused: %v", err)
	}
	for _, bad := range []string{
		"HTTP/1.1 400 Bad Request\r\n\r\n",
		"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: nope\r\n\r\n",
		"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
	} {
		if err := checkUpgrade([]byte(bad), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
}

// TestOpeningFailures: a refused port, a server that never answers the
// upgrade, and one that answers garbage all end as counted failures with a
// reason, within the timeout, and leave nothing behind.
func TestOpeningFailures(t *testing.T) {
	// A port with nothing listening.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedURL := "ws://" + ln.Addr().String() + "/socketcluster/"
	ln.Close()

	silent := listenAndServe(t, func(c net.Conn) { _, _ = io.Copy(io.Discard, c) }) // reads, never answers
	garbage := listenAndServe(t, func(c net.Conn) {
		buf := make([]byte, 1024)
		_, _ = c.Read(buf)
		_, _ = c.Write([]byte("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
	})

	for _, c := range []struct{ url, want string }{
		{closedURL, "connection refused"},
		{silent, "timed out waiting for the upgrade response"},
		{garbage, "upgrade refused"},
	} {
		start := time.Now()
		r := run(t, Options{Scenario: "conns", URLs: []string{c.url}, Conns: 5, Timeout: 300 * time.Millisecond, Hold: time.Millisecond})
		if f := metric(t, r, "failed"); f != 5 || metric(t, r, "connected") != 0 {
			t.Errorf("%s: %v failed, want 5", c.url, f)
		}
		if len(r.Notes) == 0 || !strings.Contains(strings.Join(r.Notes, " "), c.want) {
			t.Errorf("%s: notes %q do not say %q", c.url, r.Notes, c.want)
		}
		// 300 ms timeouts; the bound is loose because this machine's two
		// cores are shared and -race slows everything: it catches a hang,
		// not a slow run.
		if d := time.Since(start); d > 15*time.Second {
			t.Errorf("%s: took %v", c.url, d)
		}
	}
}

// listenAndServe runs handle for each connection on a 127.0.0.1 port until
// the test ends.
func listenAndServe(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return "ws://" + ln.Addr().String() + "/socketcluster/"
}
