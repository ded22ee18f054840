package balancer

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"
)

// TestTLSBuffersReleased checks that this Go release still has the
// crypto/tls fields tlsmem.go releases (if not, idle proxied connections
// silently keep ~3.5 KB more each), and that a connection gives its buffers
// back exactly when it holds nothing: after the handshake, after a read that
// emptied it, and not while part of a record is still unread.
func TestTLSBuffersReleased(t *testing.T) {
	if !tlsBufs.ok {
		t.Fatal("crypto/tls's Conn no longer has rawInput, input and hand as this package expects: update tlsmem.go")
	}
	dir := t.TempDir()
	cert, _, _, err := loadOrCreateDevCert(dir, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	srv := tls.Server(a, &tls.Config{Certificates: []tls.Certificate{cert}})
	cli := tls.Client(b, &tls.Config{InsecureSkipVerify: true}) //nolint:gosec // test peer of a throwaway certificate
	errc := make(chan error, 1)
	go func() { errc <- cli.Handshake() }()
	if err := srv.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	raw := func() *bytes.Buffer { return tlsField[bytes.Buffer](srv, tlsBufs.rawInput) }
	hand := tlsField[bytes.Buffer](srv, tlsBufs.hand)
	if hand.Cap() == 0 || raw().Cap() == 0 {
		t.Fatalf("after the handshake: hand cap %d, rawInput cap %d; want both grown (wrong fields?)", hand.Cap(), raw().Cap())
	}
	releaseHandshakeBufs(srv)
	if hand.Cap() != 0 || raw().Cap() != 0 {
		t.Fatalf("released: hand cap %d, rawInput cap %d; want 0", hand.Cap(), raw().Cap())
	}

	// Two records' worth: the first read takes 100 bytes of the first
	// record, leaving the rest of it decrypted in crypto/tls.
	msg := bytes.Repeat([]byte("0123456789abcdef"), 1500) // 24,000 bytes
	go func() { _, err := cli.Write(msg); errc <- err }()
	l := &evLoop{}
	got := make([]byte, 0, len(msg))
	buf := make([]byte, 100)
	l.lendInBuf(srv)
	if raw().Cap() != evInBufSize {
		t.Fatalf("lent buffer: cap %d, want %d", raw().Cap(), evInBufSize)
	}
	n, err := srv.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	got = append(got, buf[:n]...)
	l.reclaimInBuf(srv)
	if raw().Cap() == 0 || len(l.inBufs) != 0 {
		t.Fatalf("reclaimed while unread plaintext remained: rawInput cap %d, loop buffers %d", raw().Cap(), len(l.inBufs))
	}
	buf = make([]byte, 32<<10)
	for len(got) < len(msg) {
		l.lendInBuf(srv)
		n, err := srv.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, buf[:n]...)
		l.reclaimInBuf(srv)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatal("plaintext differs from what the client sent")
	}
	if raw().Cap() != 0 || len(l.inBufs) != 1 {
		t.Fatalf("after the last read: rawInput cap %d, loop buffers %d; want 0 and 1", raw().Cap(), len(l.inBufs))
	}

	// The buffer goes to the next reader, and a clean close still reads as EOF.
	go func() { errc <- cli.Close() }()
	l.lendInBuf(srv)
	if len(l.inBufs) != 0 {
		t.Fatal("the loop's buffer was not lent")
	}
	if _, err := srv.Read(buf); err != io.EOF {
		t.Fatalf("read after close_notify: %v, want EOF", err)
	}
	<-errc
}
