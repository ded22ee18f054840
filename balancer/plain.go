package balancer

import (
	"errors"
	"net"
	"syscall"
	"time"
)

// Accept-error pauses: EMFILE and its kin persist until something closes, so
// accepting again at once would spin on the same error. The pause doubles
// from acceptPauseMin to acceptPauseMax and resets after a success.
const (
	acceptPauseMin = 5 * time.Millisecond
	acceptPauseMax = time.Second
)

// acceptLoop accepts on ln until it is closed and gives each connection to
// handle, which must not block for long (it runs on the accept path).
func (c *Child) acceptLoop(ln net.Listener, handle func(net.Conn)) {
	defer c.wg.Done()
	var pause time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			c.stats.add(ctrAcceptErrors, 1)
			if pause == 0 {
				// Once per streak, not once per retry.
				c.log.Warn("accept failed; pausing before retrying", "listener", ln.Addr().String(), "error", err)
			}
			pause = min(max(2*pause, acceptPauseMin), acceptPauseMax)
			t := time.NewTimer(pause)
			select {
			case <-c.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		pause = 0
		handle(conn)
	}
}

// routePlain hands a plain connection to the least-loaded live worker and
// closes the balancer's copy. It reads nothing (no prebuf): the worker sees
// the stream from its first byte and the client's address from the socket.
func (c *Child) routePlain(conn net.Conn) {
	defer conn.Close() // the balancer's copy; the worker holds its own
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return // cannot happen for TCP; nothing to hand over
	}
	var tried []*worker
	for range maxAttempts {
		w := c.pool.pick(kindPlain, tried)
		if w == nil {
			break
		}
		tried = append(tried, w)
		err := w.send(sc, nil)
		if err == nil {
			c.pool.markAlive(w)
			c.stats.addWorker(ctrHanded, w.name, 1)
			return
		}
		c.pool.release(w)
		if isLocalExhaustion(err) {
			// Our own fd table is full (dialling the worker needs one):
			// not the worker's fault, so do not mark it dead.
			c.stats.add(ctrFDExhausted, 1)
			return
		}
		c.pool.markDead(w)
		c.stats.add(ctrHandoffFailures, 1)
		c.stats.addWorker("failures", w.name, 1)
		c.log.Warn("worker handoff failed; marked dead, trying the next", "worker", w.name, "error", err)
	}
	c.stats.add(ctrNoWorker, 1)
}

// maxAttempts bounds the workers tried for one connection; a node never has
// more workers than this is worth trying in the accept path.
const maxAttempts = 64

// ctrFDExhausted counts connections dropped because this process ran out of
// file descriptors while routing them.
const ctrFDExhausted = "fd_exhausted"

func isLocalExhaustion(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ENOBUFS)
}
