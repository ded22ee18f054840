package link

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// securePair connects a client and a server over loopback TCP and secures
// both ends (nil Secure: that end stays plain and speaks link frames).
func securePair(t *testing.T, cs, ss *Secure) (client, server net.Conn, cerr, serr error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	done := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- res{nil, err}
			return
		}
		if ss == nil {
			// A plain broker reads link frames: the TLS hello is not one.
			var dec Decoder
			buf := make([]byte, 4096)
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			err := ReadFrames(c, &dec, buf, 5*time.Second, func(*Frame) error { return nil })
			c.Close()
			done <- res{nil, err}
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		sc, err := ss.Server(ctx, c)
		done <- res{sc, err}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if cs == nil {
		// A plain worker sends its hello and waits for the broker's.
		_, _ = c.Write(AppendHello(nil, Version, 0, "worker-1"))
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, cerr = io.ReadFull(c, make([]byte, 1))
		c.Close()
	} else {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		client, cerr = cs.Client(ctx, c)
	}
	r := <-done
	return client, r.c, cerr, r.err
}

func mustSecure(t *testing.T, secret string) *Secure {
	t.Helper()
	s, err := NewSecure([]byte(secret))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Same secret: the link carries frames both ways over TLS.
func TestSecureLinkSameSecret(t *testing.T) {
	const secret = "correct horse battery staple"
	c, s, cerr, serr := securePair(t, mustSecure(t, secret), mustSecure(t, secret))
	if cerr != nil || serr != nil {
		t.Fatalf("client %v, server %v", cerr, serr)
	}
	defer c.Close()
	defer s.Close()
	want := sample()
	go func() { _, _ = c.Write(want) }()
	got := make([]byte, len(want))
	if _, err := io.ReadFull(s, got); err != nil || string(got) != string(want) {
		t.Fatalf("frames over the secured link: %v", err)
	}
	if tc, ok := c.(*tls.Conn); !ok || tc.ConnectionState().Version != tls.VersionTLS13 {
		t.Fatalf("the client end is %T, want TLS 1.3", c)
	}
}

// A different secret, or a secret on one side only, never yields a link,
// and each side says why.
func TestSecureLinkRefusesOtherSecrets(t *testing.T) {
	a := mustSecure(t, "correct horse battery staple")
	b := mustSecure(t, "another cluster's secret value")

	_, _, cerr, serr := securePair(t, a, b)
	if !errors.Is(serr, ErrNotAuthenticated) {
		t.Fatalf("broker with another secret: %v, want ErrNotAuthenticated", serr)
	}
	if !errors.Is(cerr, ErrNotAuthenticated) {
		t.Fatalf("worker with another secret: %v, want ErrNotAuthenticated", cerr)
	}

	// Worker without a secret against a broker with one.
	_, _, _, serr = securePair(t, nil, a)
	if serr == nil || !strings.Contains(serr.Error(), "cluster secret") {
		t.Fatalf("broker facing a plain worker: %v", serr)
	}

	// Worker with a secret against a plain broker.
	_, _, cerr, serr = securePair(t, a, nil)
	if cerr == nil || !strings.Contains(cerr.Error(), "cluster secret") {
		t.Fatalf("worker facing a plain broker: %v", cerr)
	}
	if serr == nil {
		t.Fatal("the plain broker took a TLS hello as link frames")
	}
}

// While the secret changes, every node accepts both and proves with the
// one it lists first: a worker still on the old secret and a broker that
// moved to the new one (and the other way round) keep their links. A node
// that dropped a secret no longer accepts a peer that proves with it.
func TestSecureLinkSecretChange(t *testing.T) {
	oldS, newS := []byte("the old cluster secret"), []byte("the new cluster secret")
	both := func(first, second []byte) *Secure {
		s, err := NewSecure(first, second)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	for _, tc := range []struct {
		name           string
		worker, broker *Secure
		ok             bool
	}{
		{"old worker, broker accepting new and old", mustSecure(t, string(oldS)), both(newS, oldS), true},
		{"worker moved to new, broker still on old accepting new", both(newS, oldS), both(oldS, newS), true},
		{"worker on new only, broker on old only", mustSecure(t, string(newS)), mustSecure(t, string(oldS)), false},
		{"worker still proving with old, broker dropped it", both(oldS, newS), mustSecure(t, string(newS)), false},
	} {
		c, s, cerr, serr := securePair(t, tc.worker, tc.broker)
		if tc.ok {
			if cerr != nil || serr != nil {
				t.Fatalf("%s: client %v, server %v", tc.name, cerr, serr)
			}
			c.Close()
			s.Close()
		} else if !errors.Is(serr, ErrNotAuthenticated) || !errors.Is(cerr, ErrNotAuthenticated) {
			t.Fatalf("%s: client %v, server %v; want both refused", tc.name, cerr, serr)
		}
	}
}

func TestSecureNeedsALongSecret(t *testing.T) {
	if _, err := NewSecure([]byte("short")); err == nil || !strings.Contains(err.Error(), "at least 16") {
		t.Fatalf("5-byte secret: %v", err)
	}
}

// BenchmarkLinkTransfer: msg frames (100-byte payloads, written in batches
// of 64 as the link writer coalesces them) through loopback TCP, read and
// decoded by ReadFrames; plain against secured with the cluster secret.
// ns/op is per frame, both ends included.
func BenchmarkLinkTransfer(b *testing.B) {
	for _, mode := range []string{"plain", "tls"} {
		b.Run(mode, func(b *testing.B) {
			var sec *Secure
			if mode == "tls" {
				var err error
				if sec, err = NewSecure([]byte("benchmark cluster secret")); err != nil {
					b.Fatal(err)
				}
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			accepted := make(chan net.Conn, 1)
			go func() {
				c, err := ln.Accept()
				if err == nil && sec != nil {
					c, err = sec.Server(context.Background(), c)
				}
				if err != nil {
					accepted <- nil
					return
				}
				accepted <- c
			}()
			w, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			if sec != nil {
				if w, err = sec.Client(context.Background(), w); err != nil {
					b.Fatal(err)
				}
			}
			defer w.Close()
			r := <-accepted
			if r == nil {
				b.Fatal("accept failed")
			}
			defer r.Close()
			payload := []byte(`"` + strings.Repeat("x", 98) + `"`)
			const batch = 64
			var buf []byte
			for i := range batch {
				buf = AppendMsg(buf, uint64(i), 1, []byte("chat/room"), payload)
			}
			b.SetBytes(int64(len(buf) / batch))
			done := make(chan int)
			go func() {
				var dec Decoder
				rb := make([]byte, 64<<10)
				n := 0
				_ = ReadFrames(r, &dec, rb, time.Minute, func(*Frame) error {
					n++
					if n >= b.N {
						return io.EOF
					}
					return nil
				})
				done <- n
			}()
			b.ResetTimer()
			for sent := 0; sent < b.N; sent += batch {
				if _, err := w.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			if n := <-done; n < b.N {
				b.Fatalf("read %d of %d frames", n, b.N)
			}
		})
	}
}
