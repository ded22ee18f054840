// Package client is a Go client for the SocketCluster protocol (v2, or v1 on
// request) as Shoal and socketcluster-server speak it: handshake, ping/pong,
// invoke/transmit, pub/sub, auth tokens, and automatic reconnect with
// resubscription. Tests and Go applications use it; `shoal bench` has its own
// cheaper client for load.
//
// Recovery (docs/history.md): on channels with history, Shoal adds "offset"
// and "epoch" to each #publish. The client remembers each subscription's
// last position and, when it resubscribes after a reconnect, asks for what
// it missed ({"recover":{"offset":N,"epoch":"E"}} in the #subscribe data).
// The server answers in the ack whether the gap was filled; the missed
// messages follow as ordinary publications. Subscription.LastRecovery and
// Options.OnRecover tell the application when it was not.
//
// One goroutine reads each connection; writes are serialised by a mutex.
// Convenience over speed: encoding/json is fine here.
package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
)

// Options tune a Client; zero values take the defaults of socketcluster-client.
type Options struct {
	AuthToken       string        // signed JWT sent in #handshake
	AckTimeout      time.Duration // invokes time out after this (default 10 s)
	ProtocolVersion int           // 2 (default) or 1
	Reconnect       bool          // redial and resubscribe after a lost connection
	ReconnectDelay  time.Duration // first delay (default 100 ms), doubling up to 5 s
	Header          http.Header   // extra upgrade headers (e.g. Origin)
	LocalAddr       string        // source IP to dial from, e.g. "127.0.0.2"
	// OnEvent receives server transmits other than #publish (e.g. #kickOut,
	// #setAuthToken, #removeAuthToken, app events). Called from the reader.
	OnEvent func(event string, data json.RawMessage)
	// OnClose is told every time the connection is lost (with the close code).
	OnClose func(err error)
	// OnRecover is told the outcome of every resubscription that asked for
	// recovery (from the connect goroutine).
	OnRecover func(channel string, r Recovery)
}

// Recovery is the outcome of a resubscription with recovery.
type Recovery struct {
	Attempted bool   // the client had a position to recover from
	Recovered bool   // the server filled the gap: the missed messages follow on C
	Epoch     string // the channel's epoch now
	Offset    uint64 // the channel's last offset when the server answered
}

// Message is one publication received on a subscribed channel.
type Message struct {
	Channel string
	Data    json.RawMessage
	Offset  uint64 // 0 on channels without history
	Epoch   string
}

// Error is an error object sent by the server ({"name","message",...}).
type Error struct {
	Name    string
	Message string
	Raw     json.RawMessage
}

func (e *Error) Error() string { return e.Name + ": " + e.Message }

// CloseError reports how the connection ended.
type CloseError struct {
	Code   ws.StatusCode
	Reason string
}

func (e *CloseError) Error() string { return fmt.Sprintf("connection closed: %d %s", e.Code, e.Reason) }

// ErrClosed is returned by calls on a Client that was closed by Close.
var ErrClosed = errors.New("client closed")

// ErrTimeout is returned when an invoke gets no response within AckTimeout.
var ErrTimeout = errors.New("invoke timed out")

// Handshake is the server's answer to #handshake.
type Handshake struct {
	ID              string          `json:"id"`
	PingTimeout     int             `json:"pingTimeout"`
	IsAuthenticated bool            `json:"isAuthenticated"`
	AuthError       json.RawMessage `json:"authError,omitempty"`
}

type response struct {
	data json.RawMessage
	err  error
}

// Client is a SocketCluster connection that can reconnect itself.
type Client struct {
	url  string
	opts Options

	mu      sync.Mutex
	conn    net.Conn
	cid     int64
	pending map[int64]chan response
	// onAck runs on the reader, under mu, when the response to a pending
	// call arrives: before any later frame is read. Resubscriptions use it
	// so that a subscription's recovery outcome is set before the first
	// live message after the ack reaches C.
	onAck     map[int64]func(data json.RawMessage)
	subs      map[string]*Subscription
	handshake Handshake
	token     string
	closed    bool
	// reconnecting is true while a reconnect loop runs: at most one does.
	reconnecting bool
	connected    chan struct{} // closed while a handshaken connection exists
	done         chan struct{} // closed by Close
	wg           sync.WaitGroup
}

// Subscription delivers a channel's messages. C is buffered; a consumer that
// does not keep up loses messages (counted in Dropped) rather than stalling
// the connection.
type Subscription struct {
	Channel string
	C       chan Message
	c       *Client
	dropped int64
	// Position (under c.mu): the last offset seen and its epoch.
	offset   uint64
	epoch    string
	recovery Recovery
}

// Position returns the last offset and epoch seen on the channel ("" epoch:
// none yet, or the channel keeps no history).
func (s *Subscription) Position() (uint64, string) {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.offset, s.epoch
}

// LastRecovery returns the outcome of the last resubscription.
func (s *Subscription) LastRecovery() Recovery {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.recovery
}

// subscribeAck is the data of a #subscribe ack from Shoal (absent on other
// servers).
type subscribeAck struct {
	Recovered bool   `json:"recovered"`
	Epoch     string `json:"epoch"`
	Offset    uint64 `json:"offset"`
}

// noteAck records the channel's position from a #subscribe ack. Without
// recovery the position jumps to the server's: what came before is lost to
// this subscription anyway. Called with c.mu held.
func (s *Subscription) noteAck(a subscribeAck) {
	if a.Epoch == "" {
		return
	}
	if a.Recovered {
		// The missed messages follow (or were already read): keep the
		// offset, take the (possibly new, linked) epoch.
		s.epoch = a.Epoch
		return
	}
	if s.epoch != a.Epoch || s.offset < a.Offset {
		s.epoch, s.offset = a.Epoch, a.Offset
	}
}

// Dropped counts messages lost because C was full.
func (s *Subscription) Dropped() int64 {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.dropped
}

// Dial connects, completes the handshake and starts the reader.
func Dial(ctx context.Context, url string, opts Options) (*Client, error) {
	if opts.AckTimeout <= 0 {
		opts.AckTimeout = 10 * time.Second
	}
	if opts.ProtocolVersion == 0 {
		opts.ProtocolVersion = 2
	}
	if opts.ReconnectDelay <= 0 {
		opts.ReconnectDelay = 100 * time.Millisecond
	}
	c := &Client{
		url: url, opts: opts, token: opts.AuthToken,
		pending: map[int64]chan response{}, onAck: map[int64]func(json.RawMessage){}, subs: map[string]*Subscription{},
		connected: make(chan struct{}), done: make(chan struct{}),
	}
	if err := c.connect(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Client) dial(ctx context.Context) (net.Conn, error) {
	d := ws.Dialer{Header: ws.HandshakeHeaderHTTP(c.opts.Header)}
	if c.opts.LocalAddr != "" {
		nd := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(c.opts.LocalAddr)}}
		d.NetDial = nd.DialContext
	}
	conn, br, _, err := d.Dial(ctx, c.url)
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", c.url, err)
	}
	if br != nil {
		ws.PutReader(br) // the server sends nothing before our handshake
	}
	return conn, nil
}

// connect dials and handshakes once, then runs the reader.
func (c *Client) connect(ctx context.Context) error {
	conn, err := c.dial(ctx)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.conn = conn
	c.mu.Unlock()
	readerDone := make(chan struct{})
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer close(readerDone)
		c.readLoop(conn)
	}()
	// abort drops this connection without triggering a reconnect from the
	// reader (the caller reports the error; reconnectLoop retries).
	abort := func(err error) error {
		c.mu.Lock()
		if c.conn == conn {
			c.conn = nil
		}
		c.mu.Unlock()
		conn.Close()
		<-readerDone
		return err
	}
	var tok any
	if c.token != "" {
		tok = c.token
	}
	raw, err := c.invokeOn(ctx, conn, "#handshake", map[string]any{"authToken": tok})
	if err != nil {
		return abort(fmt.Errorf("handshake: %w", err))
	}
	var hs Handshake
	if err := json.Unmarshal(raw, &hs); err != nil {
		return abort(fmt.Errorf("handshake reply %s: %w", raw, err))
	}
	if hs.PingTimeout <= 0 {
		return abort(fmt.Errorf("handshake reply has no pingTimeout: %s", raw))
	}
	type resub struct {
		ch     string
		offset uint64
		epoch  string
	}
	c.mu.Lock()
	c.handshake = hs
	chans := make([]resub, 0, len(c.subs))
	for ch, sub := range c.subs {
		chans = append(chans, resub{ch, sub.offset, sub.epoch})
	}
	c.mu.Unlock()
	// Resubscribe after a reconnect (like socketcluster-client's pending
	// channels), asking for the missed messages where there is a position.
	for _, r := range chans {
		req := map[string]any{"channel": r.ch}
		if r.epoch != "" {
			req["data"] = map[string]any{"recover": map[string]any{"offset": r.offset, "epoch": r.epoch}}
		}
		var rec Recovery
		// Applied by the reader as the ack is read (c.mu held), so that
		// LastRecovery and the position are right before any message that
		// follows the ack is put on C.
		apply := func(raw json.RawMessage) {
			var a subscribeAck
			_ = json.Unmarshal(raw, &a) // absent or foreign: no position
			rec = Recovery{Attempted: r.epoch != "", Recovered: a.Recovered && r.epoch != "", Epoch: a.Epoch, Offset: a.Offset}
			if sub := c.subs[r.ch]; sub != nil {
				sub.noteAck(a)
				sub.recovery = rec
			}
		}
		if _, err := c.invokeHook(ctx, conn, "#subscribe", req, apply); err != nil {
			return abort(fmt.Errorf("resubscribing %s: %w", r.ch, err))
		}
		// rec was set by the reader before it delivered the response.
		if rec.Attempted && c.opts.OnRecover != nil {
			c.opts.OnRecover(r.ch, rec)
		}
	}
	c.mu.Lock()
	select {
	case <-c.connected:
	default:
		close(c.connected)
	}
	c.mu.Unlock()
	return nil
}

// Handshake returns the last handshake reply.
func (c *Client) Handshake() Handshake {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.handshake
}

// ID is the socket id the server gave in the handshake.
func (c *Client) ID() string { return c.Handshake().ID }

func (c *Client) readLoop(conn net.Conn) {
	var closeErr error = &CloseError{Code: 1006, Reason: "connection lost"}
	for {
		msg, op, err := wsutil.ReadServerData(conn)
		if err != nil {
			var ce wsutil.ClosedError
			if errors.As(err, &ce) {
				closeErr = &CloseError{Code: ce.Code, Reason: ce.Reason}
			}
			break
		}
		if op != ws.OpText {
			continue
		}
		c.handleFrame(conn, msg)
	}
	conn.Close()
	c.lost(conn, closeErr)
}

func (c *Client) handleFrame(conn net.Conn, msg []byte) {
	s := string(msg)
	if (c.opts.ProtocolVersion == 2 && s == "") || (c.opts.ProtocolVersion == 1 && s == "#1") {
		pong := ""
		if c.opts.ProtocolVersion == 1 {
			pong = "#2"
		}
		c.writeText(conn, []byte(pong))
		return
	}
	if len(msg) > 0 && msg[0] == '[' {
		var batch []json.RawMessage
		if json.Unmarshal(msg, &batch) == nil {
			for _, p := range batch {
				c.handlePacket(p)
			}
		}
		return
	}
	c.handlePacket(msg)
}

type packet struct {
	Event *string         `json:"event"`
	Data  json.RawMessage `json:"data"`
	CID   *int64          `json:"cid"`
	RID   *int64          `json:"rid"`
	Error json.RawMessage `json:"error"`
}

func (c *Client) handlePacket(raw []byte) {
	var p packet
	if json.Unmarshal(raw, &p) != nil {
		return
	}
	switch {
	case p.RID != nil:
		c.mu.Lock()
		ch := c.pending[*p.RID]
		delete(c.pending, *p.RID)
		if hook := c.onAck[*p.RID]; hook != nil {
			delete(c.onAck, *p.RID)
			if len(p.Error) == 0 || string(p.Error) == "null" {
				hook(p.Data)
			}
		}
		c.mu.Unlock()
		if ch == nil {
			return
		}
		if len(p.Error) > 0 && string(p.Error) != "null" {
			ch <- response{err: decodeError(p.Error)}
		} else {
			ch <- response{data: p.Data}
		}
	case p.Event != nil && *p.Event == "#publish":
		var pub struct {
			Channel string          `json:"channel"`
			Data    json.RawMessage `json:"data"`
			Offset  uint64          `json:"offset"`
			Epoch   string          `json:"epoch"`
		}
		if json.Unmarshal(p.Data, &pub) != nil {
			return
		}
		c.mu.Lock()
		sub := c.subs[pub.Channel]
		if sub != nil {
			// A message seen twice (a server that does not close the
			// recovery seam exactly) is dropped here. Only within one
			// epoch: a new epoch may restart its offsets.
			dup := pub.Offset != 0 && pub.Epoch == sub.epoch && pub.Offset <= sub.offset
			if pub.Offset != 0 && !dup {
				sub.offset, sub.epoch = pub.Offset, pub.Epoch
			}
			if !dup {
				select {
				case sub.C <- Message{Channel: pub.Channel, Data: pub.Data, Offset: pub.Offset, Epoch: pub.Epoch}:
				default:
					sub.dropped++
				}
			}
		}
		c.mu.Unlock()
	case p.Event != nil:
		switch *p.Event {
		case "#setAuthToken":
			var t struct {
				Token string `json:"token"`
			}
			if json.Unmarshal(p.Data, &t) == nil {
				c.mu.Lock()
				c.token = t.Token
				c.mu.Unlock()
			}
		case "#removeAuthToken":
			c.mu.Lock()
			c.token = ""
			c.mu.Unlock()
		case "#kickOut":
			var k struct {
				Channel string `json:"channel"`
			}
			if json.Unmarshal(p.Data, &k) == nil {
				c.mu.Lock()
				if s := c.subs[k.Channel]; s != nil {
					delete(c.subs, k.Channel)
				}
				c.mu.Unlock()
			}
		}
		if c.opts.OnEvent != nil {
			c.opts.OnEvent(*p.Event, p.Data)
		}
	}
}

func decodeError(raw json.RawMessage) error {
	var e struct {
		Name    string `json:"name"`
		Message string `json:"message"`
	}
	if json.Unmarshal(raw, &e) != nil {
		return &Error{Name: "Error", Message: string(raw), Raw: raw}
	}
	return &Error{Name: e.Name, Message: e.Message, Raw: raw}
}

// lost fails pending calls and, if asked to, reconnects in the background.
func (c *Client) lost(conn net.Conn, err error) {
	c.mu.Lock()
	if c.conn != conn {
		c.mu.Unlock()
		return
	}
	c.conn = nil
	for id, ch := range c.pending {
		ch <- response{err: err}
		delete(c.pending, id)
	}
	clear(c.onAck)
	select {
	case <-c.connected:
		c.connected = make(chan struct{})
	default:
	}
	closed := c.closed
	c.mu.Unlock()
	if c.opts.OnClose != nil {
		c.opts.OnClose(err)
	}
	if closed || !c.opts.Reconnect {
		return
	}
	c.mu.Lock()
	if c.reconnecting {
		// A connection made by the running loop failed (e.g. refused at
		// the handshake): that loop retries; a second one would double
		// the attempts at every failure.
		c.mu.Unlock()
		return
	}
	c.reconnecting = true
	c.mu.Unlock()
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.reconnectLoop()
	}()
}

func (c *Client) reconnectLoop() {
	delay := c.opts.ReconnectDelay
	for {
		select {
		case <-c.done:
			c.mu.Lock()
			c.reconnecting = false
			c.mu.Unlock()
			return
		case <-time.After(delay):
		}
		ctx, cancel := context.WithTimeout(context.Background(), c.opts.AckTimeout)
		err := c.connect(ctx)
		cancel()
		if err == nil {
			c.mu.Lock()
			up := c.conn != nil
			if up {
				c.reconnecting = false
			}
			c.mu.Unlock()
			if up {
				return
			}
			// Lost again before this loop let go: lost() left it to us.
			delay = c.opts.ReconnectDelay
			continue
		}
		delay = min(delay*2, 5*time.Second)
	}
}

// WaitConnected blocks until a handshaken connection exists.
func (c *Client) WaitConnected(ctx context.Context) error {
	for {
		c.mu.Lock()
		ch, closed := c.connected, c.closed
		c.mu.Unlock()
		if closed {
			return ErrClosed
		}
		select {
		case <-ch:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
			// c.connected may have been replaced by a reconnect; look again.
		}
	}
}

func (c *Client) writeText(conn net.Conn, b []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed && c.conn == nil {
		return ErrClosed
	}
	conn.SetWriteDeadline(time.Now().Add(c.opts.AckTimeout))
	return wsutil.WriteClientText(conn, b)
}

func (c *Client) current() (net.Conn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	if c.conn == nil {
		return nil, &CloseError{Code: 1006, Reason: "not connected"}
	}
	return c.conn, nil
}

// Invoke sends an RPC and waits for its response.
func (c *Client) Invoke(ctx context.Context, event string, data any) (json.RawMessage, error) {
	conn, err := c.current()
	if err != nil {
		return nil, err
	}
	return c.invokeOn(ctx, conn, event, data)
}

func (c *Client) invokeOn(ctx context.Context, conn net.Conn, event string, data any) (json.RawMessage, error) {
	return c.invokeHook(ctx, conn, event, data, nil)
}

// invokeHook is invokeOn with a hook the reader runs (under c.mu) when the
// successful response arrives; see Client.onAck.
func (c *Client) invokeHook(ctx context.Context, conn net.Conn, event string, data any, hook func(json.RawMessage)) (json.RawMessage, error) {
	ch := make(chan response, 1)
	c.mu.Lock()
	c.cid++
	id := c.cid
	c.pending[id] = ch
	if hook != nil {
		c.onAck[id] = hook
	}
	c.mu.Unlock()
	frame, err := json.Marshal(struct {
		Event string `json:"event"`
		Data  any    `json:"data"`
		CID   int64  `json:"cid"`
	}{event, data, id})
	if err != nil {
		return nil, err
	}
	if err := c.writeText(conn, frame); err != nil {
		c.mu.Lock()
		delete(c.pending, id)
		delete(c.onAck, id)
		c.mu.Unlock()
		return nil, err
	}
	t := time.NewTimer(c.opts.AckTimeout)
	defer t.Stop()
	select {
	case r := <-ch:
		return r.data, r.err
	case <-t.C:
	case <-ctx.Done():
	}
	c.mu.Lock()
	delete(c.pending, id)
	delete(c.onAck, id)
	c.mu.Unlock()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return nil, fmt.Errorf("%s: %w", event, ErrTimeout)
}

// Transmit sends a fire-and-forget event.
func (c *Client) Transmit(event string, data any) error {
	conn, err := c.current()
	if err != nil {
		return err
	}
	frame, err := json.Marshal(struct {
		Event string `json:"event"`
		Data  any    `json:"data,omitempty"`
	}{event, data})
	if err != nil {
		return err
	}
	return c.writeText(conn, frame)
}

// WriteRaw sends a text frame as is (for tests of malformed input).
func (c *Client) WriteRaw(frame []byte) error {
	conn, err := c.current()
	if err != nil {
		return err
	}
	return c.writeText(conn, frame)
}

// Subscribe subscribes to a channel; buf sizes the delivery channel (default 1024).
func (c *Client) Subscribe(ctx context.Context, channel string, buf int) (*Subscription, error) {
	if buf <= 0 {
		buf = 1024
	}
	sub := &Subscription{Channel: channel, C: make(chan Message, buf), c: c}
	c.mu.Lock()
	if old := c.subs[channel]; old != nil {
		c.mu.Unlock()
		return old, nil
	}
	c.subs[channel] = sub
	c.mu.Unlock()
	raw, err := c.Invoke(ctx, "#subscribe", map[string]any{"channel": channel})
	if err != nil {
		c.mu.Lock()
		delete(c.subs, channel)
		c.mu.Unlock()
		return nil, err
	}
	// The ack's position lets a reconnect recover even when no message
	// arrived before the connection was lost.
	var a subscribeAck
	if json.Unmarshal(raw, &a) == nil {
		c.mu.Lock()
		sub.noteAck(a)
		c.mu.Unlock()
	}
	return sub, nil
}

// Unsubscribe stops a subscription (a transmit with the bare channel name, as the official client does).
func (c *Client) Unsubscribe(channel string) error {
	c.mu.Lock()
	delete(c.subs, channel)
	c.mu.Unlock()
	return c.Transmit("#unsubscribe", channel)
}

// Publish publishes and waits for the server's ack.
func (c *Client) Publish(ctx context.Context, channel string, data any) error {
	_, err := c.Invoke(ctx, "#publish", map[string]any{"channel": channel, "data": data})
	return err
}

// TransmitPublish publishes without waiting for an ack.
func (c *Client) TransmitPublish(channel string, data any) error {
	return c.Transmit("#publish", map[string]any{"channel": channel, "data": data})
}

// Authenticate sends #authenticate with a token.
func (c *Client) Authenticate(ctx context.Context, token string) (json.RawMessage, error) {
	raw, err := c.Invoke(ctx, "#authenticate", token)
	if err == nil {
		c.mu.Lock()
		c.token = token
		c.mu.Unlock()
	}
	return raw, err
}

// Token is the auth token the client holds (set by #setAuthToken, cleared by #removeAuthToken).
func (c *Client) Token() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.token
}

// Close ends the connection with 1000 and stops reconnecting.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	close(c.done)
	conn := c.conn
	c.mu.Unlock()
	if conn != nil {
		conn.SetWriteDeadline(time.Now().Add(time.Second))
		wsutil.WriteClientMessage(conn, ws.OpClose, ws.NewCloseFrameBody(ws.StatusNormalClosure, ""))
		conn.Close()
	}
	c.wg.Wait()
	return nil
}
