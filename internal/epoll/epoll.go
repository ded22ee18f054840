// Package epoll is an epoll instance whose readiness is waited for in Go's
// runtime netpoller rather than in a blocking epoll_wait.
//
// A goroutine blocked in a system call keeps a thread, and its P until
// sysmon retakes it (20 µs to 10 ms later); every wake-up then costs
// hand-offs between threads (futex calls, sysmon's polling). An epoll fd is
// itself pollable, so the runtime can watch it like a socket: Wait parks the
// goroutine until the fd is readable and then collects the events without
// blocking. The worker's netpoll server and the bench tool's pollers both
// wait this way.
package epoll

import (
	"fmt"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Instance is an epoll instance. Its FD may be given to epoll_ctl from any
// goroutine; Wait is for one goroutine at a time.
type Instance struct {
	fd     int
	f      *os.File        // fd, registered in the runtime netpoller
	rc     syscall.RawConn // of f
	events []unix.EpollEvent
	n      int
	err    error
	wait   func(uintptr) bool // made once: a closure per Wait would allocate
}

// New creates an epoll instance that returns at most max events per Wait.
func New(max int) (*Instance, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll: create: %w", err)
	}
	// Non-blocking before os.NewFile, so that the runtime poller takes it.
	if err := unix.SetNonblock(fd, true); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("epoll: non-blocking: %w", err)
	}
	e := &Instance{fd: fd, f: os.NewFile(uintptr(fd), "epoll"), events: make([]unix.EpollEvent, max)}
	if e.rc, err = e.f.SyscallConn(); err != nil {
		_ = e.f.Close()
		return nil, fmt.Errorf("epoll: raw conn: %w", err)
	}
	e.wait = func(fd uintptr) bool {
		e.n, e.err = unix.EpollWait(int(fd), e.events, 0)
		if e.err == unix.EINTR {
			e.n, e.err = 0, nil
		}
		return e.n > 0 || e.err != nil
	}
	return e, nil
}

// FD is the epoll descriptor, for epoll_ctl.
func (e *Instance) FD() int { return e.fd }

// Wait blocks until events are ready, the deadline set with SetDeadline
// passes (os.ErrDeadlineExceeded, no events), or the instance is closed.
// The events are valid until the next Wait.
func (e *Instance) Wait() ([]unix.EpollEvent, error) {
	e.n, e.err = 0, nil
	err := e.rc.Read(e.wait)
	if err == nil {
		err = e.err
	}
	return e.events[:e.n], err
}

// SetDeadline bounds the next Waits (zero: none).
func (e *Instance) SetDeadline(t time.Time) error { return e.f.SetReadDeadline(t) }

// Close closes the epoll descriptor.
func (e *Instance) Close() error { return e.f.Close() }
