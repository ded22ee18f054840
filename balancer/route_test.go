package balancer

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/shoalhq/shoal/handoff"
)

// acceptOne waits (bounded) for one handed-over fd on l and closes it.
func acceptOne(t *testing.T, l *handoff.Listener) {
	t.Helper()
	got := make(chan error, 1)
	go func() {
		fd, _, err := l.Accept()
		if err == nil {
			_ = syscall.Close(fd)
		}
		got <- err
	}()
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("accept: %v", err)
		}
	case <-time.After(5 * time.Second):
		_ = l.Close() // ends the Accept above
		<-got
		t.Fatal("no fd arrived within 5 s")
	}
}

// A worker restarted at the same socket path leaves the balancer's cached
// handoff connection dead; the next send redials and reaches the new
// process instead of failing (and marking the worker dead).
func TestSendRedialsReplacedWorker(t *testing.T) {
	path := filepath.Join(t.TempDir(), "worker-1.sock")
	r, wp, err := os.Pipe() // any fd can be handed over
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer wp.Close()
	fd := int(r.Fd())

	l1, err := handoff.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	w := &worker{name: "worker-1", handoffPath: path}
	defer w.closeSender()
	if err := w.send(fd, handoff.Meta{}, nil); err != nil {
		t.Fatalf("first send: %v", err)
	}
	acceptOne(t, l1)
	if err := l1.Close(); err != nil { // the old process goes away...
		t.Fatal(err)
	}
	l2, err := handoff.Listen(path) // ...and its replacement takes the path
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	if err := w.send(fd, handoff.Meta{}, nil); err != nil {
		t.Fatalf("send after the worker was replaced: %v", err)
	}
	acceptOne(t, l2)

	// With nobody at the path, the retry fails too and the error says so.
	if err := l2.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.send(fd, handoff.Meta{}, nil); err == nil {
		t.Fatal("send to a closed worker succeeded")
	}
	w.smu.Lock()
	left := w.sender
	w.smu.Unlock()
	if left != nil {
		t.Fatal("a failed send kept its sender")
	}
}
