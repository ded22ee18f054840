package balancer

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/shoalhq/shoal/proxyproto"
)

const (
	// proxyDialTimeout bounds connecting to a worker's proxy socket and
	// writing the PROXY header; a live worker does both at once.
	proxyDialTimeout = time.Second
	// halfCloseLinger: after the client finished sending, how long the
	// worker may take to finish its answer before the proxy closes both.
	halfCloseLinger = 5 * time.Second
	// copyBufSize: one TLS record's worth of plaintext.
	copyBufSize = 16 << 10
)

// copyBufs are lent to a direction only while it moves data (copyIdleFree).
var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// startTLS runs on the TLS accept loop: it starts the connection's own
// goroutine at once, so a slow handshake never holds up the next accept.
// The connection counts as held (Stats.Connections, the fd cap) from here,
// handshake included, until it is closed.
func (c *Child) startTLS(conn net.Conn) {
	if limit := c.maxProxied(); c.stats.active.Load() >= limit {
		// Two fds per proxied connection: past this point the process
		// would run out of them and start failing at random places.
		c.stats.add(ctrOverLimit, 1)
		_ = conn.Close()
		return
	}
	c.stats.active.Add(1)
	c.stats.tlsAccepted.Add(1)
	c.wg.Add(1)
	go c.serveTLS(conn)
}

// ctrOverLimit counts TLS connections refused because the balancer holds as
// many proxied connections as its fd limit allows.
const ctrOverLimit = "over_limit"

// maxProxied is how many proxied connections fit in this process's file
// limit: two fds each, minus a reserve for listeners, handoff sockets and
// the process itself.
func (c *Child) maxProxied() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.proxyLimit
}

func fdLimitProxies() int64 { return fdLimitProxiesPer(2) }

// fdLimitProxiesPer is the proxied connections that fit when each costs
// perConn fds.
func fdLimitProxiesPer(perConn int64) int64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 19_800 / perConn
	}
	const reserve = 200
	n := (int64(rl.Cur) - reserve) / perConn
	return max(n, 1)
}

// serveTLS terminates one TLS connection and proxies it to a worker. The
// handshake runs here, on the connection's own goroutine; the established
// connection then moves to an event loop (evproxy.go) and this goroutine
// ends. Without event loops it falls back to a goroutine pair (pipe).
func (c *Child) serveTLS(raw net.Conn) {
	defer c.wg.Done()
	// done ends the connection's accounting, exactly once: here, or on the
	// event loop that took the connection over.
	var once sync.Once
	var picked *worker // set before done can run elsewhere (loop.add synchronises)
	done := func() {
		once.Do(func() {
			c.stats.active.Add(-1)
			if picked != nil {
				c.pool.release(picked) // a closed proxied connection no longer weighs on it
			}
		})
	}
	handedOver := false
	defer func() {
		if !handedOver {
			done()
		}
	}()
	if !c.track(raw) {
		_ = raw.Close()
		return
	}
	defer c.untrack(raw)
	defer raw.Close() // after a hand-over to a loop this is a no-op (already closed)

	c.mu.Lock()
	conf := c.tlsConf
	c.mu.Unlock()
	loop := c.nextLoop()
	var ec *evConn
	var tconn *tls.Conn
	if tcp, ok := raw.(*net.TCPConn); ok && loop != nil {
		ec = &evConn{tcp: tcp, fd: -1}
		tconn = tls.Server(ec, conf)
	} else {
		tconn = tls.Server(raw, conf)
	}
	hctx, cancel := context.WithTimeout(c.ctx, c.handshakeTimeout())
	err := tconn.HandshakeContext(hctx)
	cancel()
	if err != nil {
		c.stats.add(ctrTLSHandshakeFail, 1)
		return
	}
	// What the handshake grew is not needed any more, whichever way the
	// connection is proxied (tlsmem.go).
	releaseHandshakeBufs(tconn)

	var up *net.UnixConn
	if c.local != nil {
		up = c.localProxy(raw.RemoteAddr(), raw.LocalAddr())
	} else {
		var w *worker
		up, w = c.dialWorker(raw.RemoteAddr(), raw.LocalAddr())
		if up != nil {
			picked = w
			c.stats.addWorker(ctrProxied, w.name, 1)
		}
	}
	if up == nil {
		_ = tconn.Close()
		return
	}
	if ec != nil {
		handedOver = true
		c.handToLoop(loop, tconn, ec, up, done)
		return
	}
	if !c.track(up) {
		_ = up.Close()
		return
	}
	defer c.untrack(up)
	c.pipe(raw, tconn, up)
}

// handToLoop moves an established proxied connection onto loop. On any
// failure it closes both sides and calls done.
func (c *Child) handToLoop(loop *evLoop, tconn *tls.Conn, ec *evConn, up *net.UnixConn, done func()) {
	wfd, err := dupConn(up)
	_ = up.Close()
	if err == nil {
		err = ec.detach()
		if err != nil {
			_ = syscall.Close(wfd)
		}
	}
	if err != nil {
		c.log.Warn("moving a proxied connection to its event loop failed", "error", err)
		_ = tconn.Close()
		done()
		return
	}
	if !loop.add(&evProxy{tc: tconn, ec: ec, wfd: wfd, done: done}) {
		// Stopping: the loop will not take it.
		_ = tconn.Close()
		_ = syscall.Close(wfd)
		done()
	}
}

// dialWorker connects to the least-loaded worker's proxy socket and sends
// the PROXY header for src → dst. A worker that fails is marked dead and the
// next is tried. It returns nil if no worker could take the connection.
func (c *Child) dialWorker(src, dst net.Addr) (*net.UnixConn, *worker) {
	hdr := proxyproto.Encode(src, dst)
	var triedBuf [4]*worker
	tried := triedBuf[:0]
	for range maxAttempts {
		w := c.pool.pick(kindTLS, tried)
		if w == nil {
			break
		}
		tried = append(tried, w)
		up, err := dialProxy(c.ctx, w.proxyPath, hdr)
		if err == nil {
			c.pool.markAlive(w)
			return up, w
		}
		c.pool.release(w)
		if isLocalExhaustion(err) {
			c.stats.add(ctrFDExhausted, 1)
			return nil, nil
		}
		if c.ctx.Err() != nil {
			return nil, nil // stopping; not the worker's fault
		}
		c.pool.markDead(w)
		c.stats.add(ctrProxyFailures, 1)
		c.stats.addWorker("failures", w.name, 1)
		c.log.Warn("worker proxy socket failed; marked dead, trying the next", "worker", w.name, "error", err)
	}
	c.stats.add(ctrNoWorker, 1)
	return nil, nil
}

func dialProxy(ctx context.Context, path string, hdr []byte) (*net.UnixConn, error) {
	d := net.Dialer{Timeout: proxyDialTimeout}
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("dial proxy socket %s: %w", path, err)
	}
	up := conn.(*net.UnixConn)
	err = up.SetWriteDeadline(time.Now().Add(proxyDialTimeout))
	if err == nil {
		_, err = up.Write(hdr)
	}
	if err != nil {
		_ = up.Close()
		return nil, fmt.Errorf("send PROXY header to %s: %w", path, err)
	}
	return up, nil
}

// pipe copies both ways until one side is done, then closes both. Each write
// has a deadline (worker.write_timeout), so a client or worker that stops
// reading cannot pin the connection's goroutines forever. Between bursts
// neither direction holds a copy buffer (see copyIdleFree).
func (c *Child) pipe(raw net.Conn, client *tls.Conn, up *net.UnixConn) {
	c.mu.Lock()
	wt, linger := c.cfg.Worker.WriteTimeout.D(), c.linger
	c.mu.Unlock()
	if wt <= 0 {
		wt = 10 * time.Second
	}
	closeBoth := func() {
		_ = up.Close()
		_ = client.Close() // sends close_notify, bounded by crypto/tls
	}
	done := make(chan struct{})
	go func() { // worker → client
		defer close(done)
		_ = copyIdleFree(client, up, up, wt, &c.stats.bytesOut)
		closeBoth()
	}()
	// client → worker
	if err := copyIdleFree(up, client, raw, wt, &c.stats.bytesIn); err == nil {
		// The client finished sending (close_notify or FIN at a record
		// boundary): pass the EOF on and give the worker a bounded time to
		// finish its answer.
		_ = up.CloseWrite()
		t := time.AfterFunc(linger, closeBoth)
		defer t.Stop()
	} else {
		closeBoth()
	}
	<-done
}

// copyIdleFree copies src to dst until src ends (nil on a clean EOF). It
// waits for src's socket (sock) to become readable without holding a
// buffer, then takes a pooled one, moves what is there, and gives it back,
// so an idle proxied connection costs no copy buffer. src may buffer data
// of its own (crypto/tls decrypts whole records and may hold more), so after
// each burst it is drained with an already-expired read deadline: that
// returns what src holds without touching the socket, and a timeout once it
// holds nothing (crypto/tls keeps timeouts non-fatal, partial records
// included).
func copyIdleFree(dst net.Conn, src net.Conn, sock net.Conn, wt time.Duration, moved *atomic.Int64) error {
	sc, ok := sock.(syscall.Conn)
	if !ok {
		return copyWithDeadline(dst, src, wt, moved)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return copyWithDeadline(dst, src, wt, moved)
	}
	var peek [1]byte
	ready := func(fd uintptr) bool {
		_, _, err := syscall.Recvfrom(int(fd), peek[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		// Readable, EOF or a real error: the Read that follows reports it.
		return err != syscall.EAGAIN && err != syscall.EINTR
	}
	// Start with a drain: the TLS handshake may already have pulled the
	// client's first records off the socket (TLS 1.3 clients send their
	// request right behind Finished), so the socket need not turn readable.
	blocking := false
	for {
		if blocking {
			if err := rc.Read(ready); err != nil {
				return err // closed by the other direction or by Stop
			}
		}
		bp := copyBufs.Get().(*[]byte)
		err := burst(dst, src, *bp, wt, blocking, moved)
		copyBufs.Put(bp)
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		blocking = true
	}
}

// expired is a read deadline in the past: a Read with it returns only what
// src already holds.
var expired = time.Unix(1, 0)

// burst moves what is there: one blocking read if block (the socket is
// known to be readable), then a drain of src's own buffer with an expired
// deadline. nil means "nothing more for now, wait again".
func burst(dst, src net.Conn, buf []byte, wt time.Duration, block bool, moved *atomic.Int64) error {
	if !block {
		if err := src.SetReadDeadline(expired); err != nil {
			return err
		}
	}
	for i := 0; ; i++ {
		n, rerr := src.Read(buf)
		if n > 0 {
			moved.Add(int64(n))
			if err := dst.SetWriteDeadline(time.Now().Add(wt)); err != nil {
				return err
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				return err
			}
		}
		if rerr != nil {
			if (i > 0 || !block) && errors.Is(rerr, os.ErrDeadlineExceeded) {
				return src.SetReadDeadline(time.Time{}) // drained
			}
			return rerr
		}
		if i == 0 && block {
			if err := src.SetReadDeadline(expired); err != nil {
				return err
			}
		}
	}
}

// copyWithDeadline copies src to dst until EOF (nil) or an error, with a
// write deadline on each write. Fallback for conns without a raw socket.
func copyWithDeadline(dst net.Conn, src io.Reader, wt time.Duration, moved *atomic.Int64) error {
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	buf := *bp
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			moved.Add(int64(n))
			if err := dst.SetWriteDeadline(time.Now().Add(wt)); err != nil {
				return err
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				return err
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return nil
			}
			return rerr
		}
	}
}
