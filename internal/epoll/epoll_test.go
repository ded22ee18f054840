package epoll

import (
	"errors"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Wait parks until a registered fd is ready, returns its event, and gives
// up at the deadline without events.
func TestWaitEventsAndDeadline(t *testing.T) {
	e, err := New(8)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(efd)}
	if err := unix.EpollCtl(e.FD(), unix.EPOLL_CTL_ADD, efd, &ev); err != nil {
		t.Fatal(err)
	}

	if err := e.SetDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if evs, err := e.Wait(); !errors.Is(err, os.ErrDeadlineExceeded) || len(evs) != 0 {
		t.Fatalf("nothing ready: %v events, %v", len(evs), err)
	}
	if d := time.Since(start); d < 40*time.Millisecond {
		t.Fatalf("returned after %v, before the deadline", d)
	}

	_ = e.SetDeadline(time.Time{})
	go func() {
		time.Sleep(20 * time.Millisecond)
		_, _ = unix.Write(efd, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	}()
	evs, err := e.Wait()
	if err != nil || len(evs) != 1 || evs[0].Fd != int32(efd) || evs[0].Events&unix.EPOLLIN == 0 {
		t.Fatalf("after a write: %+v, %v", evs, err)
	}
}
