package netpoll

import (
	"runtime/debug"
	"unicode/utf8"

	"github.com/gobwas/ws"
	"golang.org/x/sys/unix"
)

// maxReadRounds bounds the reads of one read task, so a connection that keeps
// sending cannot hold a pool goroutine: after it, the fd is re-armed and the
// kernel reports it again at once, behind the others.
const maxReadRounds = 8

// readTask reads what the socket has, runs the Handler, and re-arms the fd.
// Only one runs per connection at a time (Conn.reading).
func (c *Conn) readTask(sc *scratch) {
	s := c.srv
	if s.stall(c) {
		return
	}
	for round := 0; round < maxReadRounds; round++ {
		c.endBatch(sc)
		if c.deliverOnClose() {
			continue
		}
		c.mu.Lock()
		ph := c.phase
		c.batching = ph < phaseDead
		c.mu.Unlock()
		if ph >= phaseDead {
			break
		}
		if ph == phaseHandshake && len(c.stash) > 0 && round == 0 {
			// Bytes the balancer read before the handoff (prebuf), or a
			// request that arrived whole with a previous read.
			if c.handshakeInput() {
				continue
			}
		}
		buf := sc.buf
		direct := false
		if ph == phaseOpen && c.need > 0 && c.need-len(c.stash) >= len(buf)/2 {
			// A big frame is arriving: read straight into its stash.
			buf = c.stash[len(c.stash):c.need]
			direct = true
		}
		n, err := unix.Read(int(c.fd), buf)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			break
		}
		if err != nil || n == 0 {
			c.mu.Lock()
			if n == 0 && err == nil && c.phase == phaseDraining {
				c.phase = phaseDead // the clean end of a close handshake
			} else {
				reason := "connection closed without a close frame"
				if err != nil {
					reason = "read: " + err.Error()
				}
				c.abortLocked(ws.StatusAbnormalClosure, reason)
			}
			c.unlockAndRun() // nothing to push or finish while reading, but keep the rule
			continue
		}
		s.stats.bytesIn.Add(uint64(n))
		switch {
		case ph == phaseHandshake:
			c.stash = append(c.stash, buf[:n]...)
			c.handshakeInput()
		case c.opened:
			// Open, or closing: then frames are still parsed, to find
			// the peer's close frame, but nothing is delivered.
			c.discard = ph != phaseOpen
			if direct {
				c.stash = c.stash[:len(c.stash)+n]
				if len(c.stash) == c.need {
					frame := c.stash
					c.stash, c.need = nil, 0
					c.framesRest(frame)
				}
			} else {
				c.input(buf[:n])
			}
		default:
			// An HTTP error reply was sent: input is discarded until the
			// peer hangs up.
		}
		if n < len(buf) {
			// The socket is most likely empty; re-arming checks readiness,
			// so if it is not, the kernel reports it again.
			break
		}
	}
	c.endBatch(sc)
	for c.deliverOnClose() {
	}
	c.mu.Lock()
	c.reading = false
	c.armLocked()
	c.unlockAndRun()
}

// endBatch ends the read task's batch and writes what it queued (and what
// other goroutines queued meanwhile) with one flush, on this goroutine.
func (c *Conn) endBatch(sc *scratch) {
	c.mu.Lock()
	c.batching = false
	deferred := c.flushDeferred
	c.flushDeferred = false
	c.mu.Unlock()
	if deferred {
		c.flush(sc) // c.flushing was set for it
	}
}

// deliverOnClose calls OnClose if the connection was opened, is closing and
// has not reported it yet. It runs only in the read task, so OnClose never
// overlaps OnMessage.
func (c *Conn) deliverOnClose() bool {
	c.mu.Lock()
	if !c.opened || c.onCloseDone || c.phase < phaseClosing {
		c.mu.Unlock()
		return false
	}
	c.onCloseDone = true
	code, reason := c.closeCode, c.closeReason
	// Nothing more will be delivered: free a partly received message now.
	c.frag, c.fragging = nil, false
	c.mu.Unlock()
	c.callClose(code, reason)
	return true
}

// input consumes bytes read into the pool buffer while the connection is
// open. A frame that does not end in p is copied into c.stash.
func (c *Conn) input(p []byte) {
	if c.skip > 0 {
		// The rest of a frame refused for its size: its payload cannot be
		// parsed as frames, and reading it (instead of resetting the
		// connection with it unread) lets the peer receive our 1009 and
		// answer with its own close frame.
		n := min(c.skip, int64(len(p)))
		c.skip -= n
		p = p[n:]
		if len(p) == 0 {
			return
		}
	}
	if len(c.stash) > 0 {
		if c.need == 0 {
			// The header was incomplete: complete it first.
			old := len(c.stash)
			k := min(len(p), maxHeaderLen-old)
			c.stash = append(c.stash, p[:k]...)
			h, ok, err := parseHeader(c.stash)
			if err != nil {
				c.fail(err)
				return
			}
			if !ok {
				return // all of p went into the stash
			}
			if err := c.checkSize(h); err != nil {
				seen := int64(len(c.stash)) // this frame's bytes so far
				c.fail(err)
				c.skip = int64(h.size) + h.length - seen
				c.input(p[k:])
				return
			}
			c.need = h.size + int(h.length)
			used := min(k, c.need-old)
			c.stash = c.stash[:old+used]
			p = p[used:]
			if cap(c.stash) < c.need {
				grown := make([]byte, len(c.stash), c.need)
				copy(grown, c.stash)
				c.stash = grown
			}
		}
		take := min(c.need-len(c.stash), len(p))
		c.stash = append(c.stash, p[:take]...)
		p = p[take:]
		if len(c.stash) < c.need {
			return
		}
		frame := c.stash
		c.stash, c.need = nil, 0
		if c.framesRest(frame) == nil && c.peerClosedOrFailed() {
			return
		}
	}
	if len(p) == 0 {
		return
	}
	rest := c.framesRest(p)
	if len(rest) == 0 {
		return
	}
	// Keep the incomplete frame, sized for the whole frame when its
	// header says how big it is (checkSize bounded that already).
	size := maxHeaderLen
	if h, ok, _ := parseHeader(rest); ok {
		c.need = h.size + int(h.length)
		size = c.need
	}
	c.stash = make([]byte, len(rest), max(size, len(rest)))
	copy(c.stash, rest)
}

// framesRest handles every complete frame at the start of p and returns the
// bytes of the incomplete frame that follows, if any. It returns nil when it
// stopped at a close frame or a protocol error.
func (c *Conn) framesRest(p []byte) []byte {
	for len(p) > 0 {
		h, ok, err := parseHeader(p)
		if err != nil {
			c.fail(err)
			return nil
		}
		if !ok {
			return p
		}
		if err := c.checkSize(h); err != nil {
			c.fail(err)
			// Skip the refused frame; what follows (the peer's close frame)
			// is still parsed, in discard mode.
			if total := int64(h.size) + h.length; total <= int64(len(p)) {
				p = p[total:]
				continue
			} else {
				c.skip = total - int64(len(p))
			}
			return nil
		}
		total := h.size + int(h.length)
		if len(p) < total {
			return p
		}
		payload := p[h.size:total]
		ws.Cipher(payload, h.mask, 0)
		if !c.frame(h, payload) {
			return nil
		}
		p = p[total:]
	}
	return nil
}

// checkSize rejects a data frame that would take the message over MaxPayload,
// before any of its payload is buffered.
func (c *Conn) checkSize(h frameHeader) error {
	if h.op.IsControl() {
		return nil
	}
	if int64(len(c.frag))+h.length > c.srv.cfg.MaxPayload {
		return errTooBig
	}
	return nil
}

// frame handles one complete, unmasked frame; it reports whether the
// connection is still open.
func (c *Conn) frame(h frameHeader, payload []byte) bool {
	if c.discard {
		if h.op == ws.OpClose {
			c.peerHungUp()
			return false
		}
		return true
	}
	switch h.op {
	case ws.OpPing:
		c.writeControl(appendFrame(make([]byte, 0, 2+len(payload)), ws.OpPong, payload))
		return true
	case ws.OpPong:
		return true
	case ws.OpClose:
		code, reason, err := parseCloseBody(payload)
		if err != nil {
			c.fail(err)
			return false
		}
		echo := closeFrame(0, "")
		if code != ws.StatusNoStatusRcvd {
			echo = closeFrame(code, "")
		}
		c.mu.Lock()
		c.peerClosed = true
		c.beginCloseLocked(code, reason, echo)
		c.unlockAndRun()
		c.discard = true
		return false
	case ws.OpText, ws.OpBinary:
		if c.fragging {
			c.fail(errInterleaved)
			return false
		}
		if !h.fin {
			c.fragging, c.fragOp = true, h.op
			c.frag = append(make([]byte, 0, len(payload)), payload...)
			return true
		}
		if h.op == ws.OpText && !utf8.Valid(payload) {
			c.fail(errInvalidUTF8)
			return false
		}
		return c.deliver(payload)
	default: // continuation
		if !c.fragging {
			c.fail(errContinuation)
			return false
		}
		c.frag = append(c.frag, payload...)
		if !h.fin {
			return true
		}
		msg, op := c.frag, c.fragOp
		c.frag, c.fragging = nil, false
		if op == ws.OpText && !utf8.Valid(msg) {
			c.fail(errInvalidUTF8)
			return false
		}
		return c.deliver(msg)
	}
}

// deliver hands a data message to the Handler. If the handler closed the
// connection, the frames after it are only parsed, not delivered.
func (c *Conn) deliver(msg []byte) bool {
	c.srv.stats.msgsIn.Add(1)
	c.callMessage(msg)
	if !c.isOpen() {
		c.discard = true
	}
	return true
}

// peerHungUp records that the peer's side of the close handshake is done
// (its close frame came, or its input cannot be parsed any more); once our
// own close frame is out, the fd is closed.
func (c *Conn) peerHungUp() {
	c.mu.Lock()
	c.peerClosed = true
	if c.phase == phaseDraining {
		c.phase = phaseDead
	}
	c.unlockAndRun()
}

// peerClosedOrFailed reports whether input processing must stop.
func (c *Conn) peerClosedOrFailed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.peerClosed || c.phase >= phaseDead
}

func (c *Conn) isOpen() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.phase == phaseOpen
}

// writeControl queues a control frame (pong) if the connection is open. A
// peer that pings without reading finds its pongs dropped at the queue bounds.
func (c *Conn) writeControl(frame []byte) {
	cfg := &c.srv.cfg
	c.mu.Lock()
	if queued := c.queuedLocked(); c.phase == phaseOpen &&
		c.outBytes+len(frame) <= cfg.SendQueueBytes && queued < cfg.SendQueueMsgs {
		c.enqueueLocked(frame)
		c.pendFlush = c.pendFlush || c.scheduleFlushLocked()
	}
	c.unlockAndRun()
}

// fail closes the connection for a protocol violation. While closing, bad
// input means the peer's close frame will not be found: stop waiting for it.
func (c *Conn) fail(err error) {
	// The rest of the stream cannot be framed reliably: drop what is buffered.
	c.stash, c.need = nil, 0
	if c.discard {
		c.peerHungUp()
		return
	}
	c.discard = true
	code, reason := ws.StatusProtocolError, err.Error()
	if pe, ok := err.(*protoError); ok {
		code = pe.code
	}
	c.srv.stats.protoErrors.Add(1)
	c.mu.Lock()
	c.beginCloseLocked(code, reason, closeFrame(code, reason))
	c.unlockAndRun()
}

// Handler calls recover a panic: it is logged with its stack and the
// connection is closed with 1011, so a bug hit by one client's input does
// not take the worker's other connections down.
func (c *Conn) callOpen() {
	defer c.recoverHandler("OnOpen")
	c.srv.cfg.Handler.OnOpen(c)
}

func (c *Conn) callMessage(msg []byte) {
	defer c.recoverHandler("OnMessage")
	c.srv.cfg.Handler.OnMessage(c, msg)
}

func (c *Conn) callClose(code ws.StatusCode, reason string) {
	defer c.recoverHandler("OnClose")
	c.srv.cfg.Handler.OnClose(c, code, reason)
}

func (c *Conn) recoverHandler(callback string) {
	if r := recover(); r != nil {
		c.srv.stats.panics.Add(1)
		c.srv.log.Error("handler panicked; closing the connection", "callback", callback, "conn", c.id,
			"panic", r, "stack", string(debug.Stack()))
		c.Close(ws.StatusInternalServerError, "internal error")
	}
}
