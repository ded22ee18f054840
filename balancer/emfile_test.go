package balancer

import (
	"bufio"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The accept loop survives running out of file descriptors: it pauses
// (without spinning) and serves the waiting connection once fds free up.
func TestAcceptSurvivesEMFILE(t *testing.T) {
	dir := t.TempDir()
	w1 := startFakeWorker(t, dir, "worker-1")
	b := startBalancer(t, testConfig(t, false), topology(1, w1.peer(101, 0)))
	raddr, err := net.ResolveTCPAddr("tcp", b.public)
	if err != nil {
		t.Fatal(err)
	}
	// The client's socket is made while fds are still available.
	cfd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	clientOwned := true
	defer func() {
		if clientOwned {
			syscall.Close(cfd)
		}
	}()

	var orig syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
		t.Fatal(err)
	}
	restored := false
	var fillers []int
	restore := func() {
		for _, fd := range fillers {
			syscall.Close(fd)
		}
		fillers = nil
		if !restored {
			if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
				t.Errorf("restore RLIMIT_NOFILE: %v", err)
			}
			restored = true
		}
	}
	defer restore()

	// Lower the limit to just above the highest fd in use and fill every
	// hole below it: no new fd can be had, so accept(2) fails with EMFILE.
	// An fd closed late by an earlier connection opens a new hole, so the
	// holes are filled again on every poll below.
	limit := uint64(maxFD(t) + 1)
	low := orig
	low.Cur = limit
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	fill := func() {
		for range limit { // bounded: there are at most `limit` free slots
			fd, err := syscall.Open(os.DevNull, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
			if err != nil {
				return
			}
			fillers = append(fillers, fd)
		}
	}
	fill()
	if err := syscall.Connect(cfd, &syscall.SockaddrInet4{Port: raddr.Port, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "accept errors", func() bool {
		fill()
		return b.counter(t, ctrAcceptErrors) >= 2
	})
	// No spinning: with the pause doubling from 5 ms, a few hundred ms of
	// EMFILE are a handful of attempts, not thousands.
	start, n0 := time.Now(), b.counter(t, ctrAcceptErrors)
	waitFor(t, 5*time.Second, "300ms to pass", func() bool {
		fill()
		return time.Since(start) >= 300*time.Millisecond
	})
	if d := b.counter(t, ctrAcceptErrors) - n0; d > 20 {
		t.Fatalf("%d accept attempts in 300ms: the loop spins", d)
	}
	restore()

	// The connection that waited in the backlog is served now.
	f := os.NewFile(uintptr(cfd), "client")
	clientOwned = false
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "HTTP/1.1 200") {
		t.Fatalf("after EMFILE: %q, %v", line, err)
	}
}

func maxFD(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	m := 0
	for _, e := range ents {
		var n int
		for _, ch := range e.Name() {
			n = n*10 + int(ch-'0')
		}
		m = max(m, n)
	}
	return m
}
