package bench

// Connections of the bench client. ws:// connections are opened by the
// pollers themselves (connect.go) and live as bare non-blocking descriptors
// in an epoll poller: an idle connection costs no goroutine and no buffer,
// only the conn struct (about 200 bytes) and the kernel's socket buffers. A
// connection keeps a slice only while it holds half a frame or unsent bytes.
// wss:// connections are dialled synchronously here (TLS state lives in
// user space) and then read by one goroutine each.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gobwas/ws"
	"golang.org/x/sys/unix"

	"github.com/shoalhq/shoal/internal/epoll"
)

var (
	errClosed      = errors.New("bench: connection closed")
	errBackpressed = errors.New("bench: send buffer full")
)

// maxOut bounds the bytes a connection queues when the socket does not take
// them at once. Only publishers ever queue; beyond this they wait, so a slow
// server slows the publishers instead of growing the tool's memory.
const maxOut = 1 << 20

// conn is one established SC connection owned by a poller.
type conn struct {
	fd int
	p  *poller
	tc net.Conn // wss:// only: the TLS connection, read by its own goroutine
	op *opening // non-nil until the connection is open (connect.go)

	// Touched only by the poller goroutine.
	partial []byte   // bytes of an incomplete inbound frame, nil when none
	frag    []byte   // data of a fragmented message being reassembled
	last    []uint32 // per publisher: highest seq+1 seen (subscribers only)
	channel string   // the channel this connection subscribed to, if any
	pub     *publisher
	// rx is when the bytes being parsed were read (unix ns; 0 = unknown,
	// e.g. bytes left from the synchronous phase). Every frame of one read
	// was in the socket by then, so it is their receipt time: a clock read
	// per message would add the parsing of the frames before it in the same
	// read to its latency, and cost a vDSO call per delivery (~18% of the
	// receive path's CPU in BenchmarkReceivePublish).
	rx int64

	mu     sync.Mutex // guards out, closed and the fd against reuse after close
	out    []byte     // bytes the socket would not take yet
	closed bool
	// gone is closed, readable without the lock by the poller: once a
	// callback (churn) closes a conn in the middle of a read, the poller must
	// stop touching its fd number, which a new socket may already reuse.
	gone atomic.Bool
}

// write sends b now, or queues what the socket does not take; safe from any
// goroutine. It never blocks: the poller flushes the queue on EPOLLOUT.
func (c *conn) write(b []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errClosed
	}
	if c.tc != nil {
		// TLS keeps its state in user space, so the write is a blocking one,
		// bounded by a deadline; only publishers write at volume.
		_ = c.tc.SetWriteDeadline(time.Now().Add(10 * time.Second))
		_, err := c.tc.Write(b)
		return err
	}
	if len(c.out) > 0 {
		if len(c.out)+len(b) > maxOut {
			return errBackpressed
		}
		c.out = append(c.out, b...)
		return nil
	}
	for len(b) > 0 {
		n, err := unix.Write(c.fd, b)
		if n > 0 {
			b = b[n:]
		}
		switch {
		case err == nil:
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			c.out = append(c.out, b...)
			return nil
		default:
			return err
		}
	}
	return nil
}

// flush writes queued bytes; called by the poller on EPOLLOUT.
func (c *conn) flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(c.out) > 0 && !c.closed {
		n, err := unix.Write(c.fd, c.out)
		if n > 0 {
			c.out = c.out[n:]
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			break
		}
	}
	if len(c.out) == 0 {
		c.out = nil // release the queue's memory once drained
	}
}

// closeFD closes the socket once; the lock keeps writers from writing to a
// descriptor number the kernel may already have given to a new socket.
func (c *conn) closeFD() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.closed = true
	c.gone.Store(true)
	c.out = nil
	if c.tc != nil {
		c.tc.Close()
	} else {
		unix.Close(c.fd)
	}
	return true
}

// writeControl sends a small control or heartbeat frame from the poller.
func (c *conn) writeControl(op byte, payload []byte) {
	var buf [64]byte
	if len(payload) > 50 {
		payload = payload[:50] // ping payloads are at most 125; ours stay short
	}
	_ = c.write(appendClientFrame(buf[:0], op, payload))
}

// dialOpts is what every dial of an agent shares.
type dialOpts struct {
	urls    []string
	sources []net.IP
	timeout time.Duration
	token   string // sent in #handshake when set
	tls     *tls.Config
}

// sess is a connection during its synchronous phase.
type sess struct {
	nc  net.Conn
	buf []byte // inbound bytes not yet parsed: buf[:n]
	n   int
	cid uint64
	out []byte
}

// dial opens connection number i: TCP from source address i mod len(sources)
// to URL i mod len(urls), WebSocket upgrade, then #handshake, waiting for its
// reply. The caller owns the returned session.
func dial(ctx context.Context, o *dialOpts, i int) (*sess, error) {
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	url := o.urls[i%len(o.urls)]
	// KeepAlive -1: TCP keepalive probes are useless on loopback and cost a
	// setsockopt per dial.
	nd := net.Dialer{Timeout: o.timeout, KeepAlive: -1, Control: bindNoPort}
	if len(o.sources) > 0 {
		nd.LocalAddr = &net.TCPAddr{IP: o.sources[i%len(o.sources)]}
	}
	wd := ws.Dialer{
		Timeout:   o.timeout,
		TLSConfig: o.tls,
		NetDial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return nd.DialContext(ctx, network, addr)
		},
	}
	nc, br, _, err := wd.Dial(ctx, url)
	if err != nil {
		return nil, err
	}
	s := &sess{nc: nc, buf: make([]byte, 4096), cid: 1}
	if br != nil {
		// The server may have sent bytes right behind its 101 response.
		s.n, _ = br.Read(s.buf[:min(br.Buffered(), len(s.buf))])
		ws.PutReader(br)
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = nc.SetDeadline(dl)
	}
	tok := []byte("null")
	if o.token != "" {
		tok = strconv.AppendQuote(nil, o.token)
	}
	data := append(append([]byte(`{"authToken":`), tok...), '}')
	if err := s.invoke("#handshake", data); err != nil {
		nc.Close()
		return nil, fmt.Errorf("#handshake: %w", err)
	}
	return s, nil
}

// bindNoPort sets IP_BIND_ADDRESS_NO_PORT so that binding a source address
// does not reserve an ephemeral port by itself: the port is chosen at
// connect time per destination, which lets one source address carry more
// than 28k connections across several server ports and reuse TIME_WAIT
// ports on loopback.
func bindNoPort(network, address string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
	})
	if err != nil {
		return err
	}
	return serr
}

// invoke sends an SC invoke and reads until its response arrives, answering
// pings meanwhile. A response carrying "error" is returned as an error.
func (s *sess) invoke(event string, data []byte) error {
	cid := s.cid
	s.cid++
	s.out = appendClientFrame(s.out[:0], opText, appendInvoke(nil, event, data, cid))
	if _, err := s.nc.Write(s.out); err != nil {
		return err
	}
	for {
		off := 0
		for {
			f, n, err := parseFrame(s.buf[off:s.n])
			if err != nil {
				return err
			}
			if n == 0 {
				break
			}
			off += n
			done, err := s.onFrame(f, cid)
			if err != nil || done {
				s.n = copy(s.buf, s.buf[off:s.n])
				return err
			}
		}
		s.n = copy(s.buf, s.buf[off:s.n])
		if s.n == len(s.buf) {
			s.buf = append(s.buf, make([]byte, len(s.buf))...)
		}
		n, err := s.nc.Read(s.buf[s.n:])
		s.n += n
		if err != nil && n == 0 {
			return err
		}
	}
}

// onFrame handles one frame of the synchronous phase; done reports that the
// response to cid was seen.
func (s *sess) onFrame(f frame, cid uint64) (done bool, err error) {
	switch f.op {
	case opPing:
		_, err = s.nc.Write(appendClientFrame(nil, opPong, f.payload))
		return false, err
	case opClose:
		code := 0
		if len(f.payload) >= 2 {
			code = int(f.payload[0])<<8 | int(f.payload[1])
		}
		return false, fmt.Errorf("server closed the connection (code %d %q)", code, f.payload[min(2, len(f.payload)):])
	case opText, opBinary:
	default:
		return false, nil
	}
	if len(f.payload) == 0 { // v2 heartbeat
		_, err = s.nc.Write(appendClientFrame(nil, opText, nil))
		return false, err
	}
	if string(f.payload) == "#1" { // v1 heartbeat
		_, err = s.nc.Write(appendClientFrame(nil, opText, []byte("#2")))
		return false, err
	}
	packets(f.payload, func(pkt []byte) {
		rid, ok := field(pkt, "rid")
		if !ok {
			return
		}
		if n, ok := parseUint(rid); !ok || n != cid {
			return
		}
		done = true
		if e, ok := field(pkt, "error"); ok && string(e) != "null" {
			err = fmt.Errorf("error response: %s", e)
		}
	})
	return done, err
}

// subscribe sends #subscribe for channel and waits for the server's reply.
func (s *sess) subscribe(channel string) error {
	d := append([]byte(`{"channel":`), strconv.Quote(channel)...)
	return s.invoke("#subscribe", append(d, '}'))
}

// poller owns a set of connections and one epoll instance; one goroutine
// waits on it and does all reading and protocol replies for its conns.
type poller struct {
	a   *agent
	ep  *epoll.Instance // waited for in Go's runtime netpoller (see run)
	buf []byte
	st  pollStats

	mu      sync.Mutex
	conns   map[int]*conn  // fd → conn; only the poller deletes, under mu
	tls     map[*conn]bool // wss:// conns, each read by its own goroutine
	pending map[*conn]bool // conns still opening, swept for their deadline
	tlsWG   sync.WaitGroup
}

// pollStats are written by one poller goroutine and read by the reporter.
type pollStats struct {
	delivered, windowDelivered, orderViolations, badPayload, closed atomic.Uint64
	acked, pubErrors                                                atomic.Uint64
	latency, ack                                                    Hist
}

func newPoller(a *agent) (*poller, error) {
	ep, err := epoll.New(256)
	if err != nil {
		return nil, err
	}
	return &poller{a: a, ep: ep, buf: make([]byte, 256<<10), conns: make(map[int]*conn), tls: make(map[*conn]bool), pending: make(map[*conn]bool)}, nil
}

// addTLS starts the reader of a wss:// connection. TLS state lives in user
// space, so these cannot be handed to epoll as bare descriptors: each costs
// a goroutine and a 2 KiB read buffer in the bench (docs/bench.md says so).
func (p *poller) addTLS(c *conn, rest []byte) {
	c.p = p
	c.partial = rest
	p.mu.Lock()
	p.tls[c] = true
	p.mu.Unlock()
	p.tlsWG.Add(1)
	go func() {
		defer p.tlsWG.Done()
		_ = c.tc.SetReadDeadline(time.Time{})
		buf := make([]byte, 2048)
		if len(c.partial) > 0 && !p.consume(c, nil) {
			return
		}
		for {
			n, err := c.tc.Read(buf)
			if n > 0 {
				c.rx = time.Now().UnixNano()
			}
			if n > 0 && !p.consume(c, buf[:n]) {
				return
			}
			if err != nil {
				p.drop(c)
				return
			}
		}
	}()
}

// run waits for events until stop is closed. It waits for the epoll fd in
// Go's runtime netpoller rather than in a blocking epoll_wait: a goroutine
// blocked in a system call holds a thread, and the scheduler's hand-offs
// around it (sysmon retaking the P every 20 µs, futex wake-ups) cost the
// tool CPU that would show up as load-generator time per connection. The
// 100 ms read deadline bounds how long stopping takes and paces the sweep.
func (p *poller) run(stop <-chan struct{}) {
	lastSweep := time.Now()
	for {
		select {
		case <-stop:
			return
		default:
		}
		_ = p.ep.SetDeadline(time.Now().Add(100 * time.Millisecond))
		events, err := p.ep.Wait()
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			return
		}
		if now := time.Now(); now.Sub(lastSweep) >= 100*time.Millisecond {
			p.sweep(now)
			lastSweep = now
		}
		for _, ev := range events {
			p.mu.Lock()
			c := p.conns[int(ev.Fd)]
			p.mu.Unlock()
			if c == nil {
				continue
			}
			if c.op != nil && c.op.state == stConnecting {
				// Any event ends connect(): success or an error in SO_ERROR.
				p.onWritable(c)
				if c.op == nil {
					continue // failed
				}
			} else if ev.Events&unix.EPOLLOUT != 0 {
				c.flush()
			}
			// Bytes left over from the synchronous phase are parsed on the
			// first event of any kind (registration reports EPOLLOUT at once).
			if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 || len(c.partial) > 0 {
				p.read(c)
			}
		}
	}
}

// read drains the socket and handles every complete frame.
func (p *poller) read(c *conn) {
	if len(c.partial) > 0 {
		// Bytes carried over from the synchronous phase or an earlier read.
		if !p.consume(c, nil) {
			return
		}
	}
	for !c.gone.Load() {
		n, err := unix.Read(c.fd, p.buf)
		if n > 0 {
			c.rx = time.Now().UnixNano()
			if !p.consume(c, p.buf[:n]) || c.gone.Load() {
				return
			}
			if n < len(p.buf) {
				return // a short read drained the socket; ET fires on new data
			}
			continue
		}
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			return
		}
		p.drop(c) // EOF or error: the server closed or reset
		return
	}
}

// drop forgets a connection the server closed (or that broke the protocol).
func (p *poller) drop(c *conn) {
	if c.op != nil {
		msg := "connection closed by the server while " + stateName(c.op.state)
		if c.op.closeMsg != "" {
			msg += " (" + c.op.closeMsg + ")"
		}
		p.fail(c, errors.New(msg))
		return
	}
	p.forget(c)
	if c.closeFD() && !p.a.stopping.Load() {
		p.st.closed.Add(1)
	}
	c.partial, c.frag = nil, nil
}

// consume parses data (appended to any partial frame) and handles each
// complete frame; it returns false if the connection was dropped.
func (p *poller) consume(c *conn, data []byte) bool {
	if c.op != nil && c.op.state == stUpgrade {
		var ok bool
		if data, ok = p.onUpgradeData(c, data); !ok {
			return false
		}
		if c.op != nil && c.op.state == stUpgrade {
			return true // the response head is not complete yet
		}
	}
	if len(c.partial) > 0 {
		c.partial = append(c.partial, data...)
		data = c.partial
	}
	off := 0
	for {
		f, n, err := parseFrame(data[off:])
		if err != nil {
			p.drop(c)
			return false
		}
		if n == 0 {
			break
		}
		off += n
		if !p.onFrame(c, f) {
			p.drop(c)
			return false
		}
		if c.gone.Load() {
			return false // closed by a callback (churn): drop the rest
		}
	}
	rest := data[off:]
	switch {
	case len(rest) == 0:
		c.partial = nil
	case len(c.partial) > 0:
		c.partial = c.partial[:copy(c.partial, rest)]
	default:
		c.partial = append(make([]byte, 0, len(rest)+4096), rest...)
	}
	return true
}

// onFrame handles one frame; false means the connection must be dropped.
func (p *poller) onFrame(c *conn, f frame) bool {
	switch f.op {
	case opPing:
		c.writeControl(opPong, f.payload)
		return true
	case opPong:
		return true
	case opClose:
		if c.op != nil && len(f.payload) >= 2 {
			c.op.closeMsg = fmt.Sprintf("close %d %q", int(f.payload[0])<<8|int(f.payload[1]), f.payload[2:])
		}
		c.writeControl(opClose, f.payload[:min(2, len(f.payload))])
		return false
	case opContinuation:
		c.frag = append(c.frag, f.payload...)
		if !f.fin {
			return true
		}
		msg := c.frag
		c.frag = nil
		p.onMessage(c, msg)
		return true
	case opText, opBinary:
		if !f.fin {
			c.frag = append(c.frag[:0], f.payload...)
			return true
		}
		p.onMessage(c, f.payload)
		return true
	}
	return false // unknown opcode: a protocol error
}

// onMessage handles one SC text message.
func (p *poller) onMessage(c *conn, msg []byte) {
	if len(msg) == 0 { // v2 heartbeat: answer with the same empty frame
		c.writeControl(opText, nil)
		return
	}
	if len(msg) == 2 && msg[0] == '#' && msg[1] == '1' { // v1 heartbeat
		c.writeControl(opText, []byte("#2"))
		return
	}
	packets(msg, func(pkt []byte) { p.onPacket(c, pkt) })
}

// onPacket handles one SC packet: a #publish delivery or an invoke response.
func (p *poller) onPacket(c *conn, pkt []byte) {
	if payload, ok := publishPayload(pkt); ok {
		p.deliver(c, payload)
		return
	}
	if ev, ok := field(pkt, "event"); ok {
		if string(ev) != `"#publish"` {
			return
		}
		data, ok := field(pkt, "data")
		if !ok {
			p.st.badPayload.Add(1)
			return
		}
		payload, ok := field(data, "data")
		if !ok {
			p.st.badPayload.Add(1)
			return
		}
		p.deliver(c, payload)
		return
	}
	if c.pub == nil && c.op == nil {
		return
	}
	rid, ok := field(pkt, "rid")
	if !ok {
		return
	}
	n, ok := parseUint(rid)
	if !ok {
		return
	}
	e, isErr := field(pkt, "error")
	isErr = isErr && string(e) != "null"
	if c.op != nil {
		if n == c.op.cid {
			if !isErr {
				e = nil
			}
			p.onReply(c, e)
		}
		return
	}
	c.pub.ack(p, n, isErr)
}

// publishHead is how a #publish delivery starts when written by Shoal
// (sc.AppendPublish) or socketcluster-server: keys in this order, no spaces.
const publishHead = `{"event":"#publish","data":{"channel":"`

// publishPayload is the receive path's fast path: the payload of a #publish
// packet of exactly the shape {"event":"#publish","data":{"channel":S,
// "data":V}} with V a string, found by skipping two strings instead of
// scanning the object three times with field (~60% of the receive path's
// CPU). Anything else (other key order, spaces, other events) reports
// false and takes the general path, so both give the same payload.
func publishPayload(pkt []byte) ([]byte, bool) {
	if len(pkt) < len(publishHead) || string(pkt[:len(publishHead)]) != publishHead {
		return nil, false
	}
	i := skipString(pkt, len(publishHead)-1)
	const mid = `,"data":"`
	if i < 0 || len(pkt)-i < len(mid) || string(pkt[i:i+len(mid)]) != mid {
		return nil, false
	}
	vs := i + len(mid) - 1
	ve := skipString(pkt, vs)
	if ve < 0 || string(pkt[ve:]) != "}}" {
		return nil, false
	}
	return pkt[vs:ve], true
}

// deliver accounts one #publish received by a subscriber.
func (p *poller) deliver(c *conn, payload []byte) {
	now := c.rx
	if now == 0 {
		now = time.Now().UnixNano()
	}
	pub, seq, sent, ok := parsePayload(payload)
	if !ok {
		p.st.badPayload.Add(1)
		return
	}
	p.st.delivered.Add(1)
	if p.a.measuring.Load() {
		p.st.windowDelivered.Add(1)
	}
	p.st.latency.Record(time.Duration(now - sent))
	np := p.a.spec.Publishers
	if pub >= uint64(np) {
		p.st.badPayload.Add(1)
		return
	}
	if c.last == nil {
		c.last = make([]uint32, np)
	}
	// Seqs of one publisher reach one subscriber in increasing order with
	// gaps (the publisher rotates over channels); a seq at or below the last
	// one seen is a duplicate or a reordering.
	if uint32(seq+1) <= c.last[pub] {
		p.st.orderViolations.Add(1)
		return
	}
	c.last[pub] = uint32(seq + 1)
}

// closeAll closes every connection of the poller (after run has returned).
func (p *poller) closeAll() {
	p.mu.Lock()
	conns := p.conns
	p.conns = make(map[int]*conn)
	tlsConns := p.tls
	p.tls = make(map[*conn]bool)
	p.mu.Unlock()
	for _, c := range conns {
		c.closeFD()
	}
	for c := range tlsConns {
		c.closeFD() // unblocks its reader
	}
	p.tlsWG.Wait()
	p.ep.Close()
}
