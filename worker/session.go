package worker

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"strconv"
	"sync"
	"time"

	"github.com/gobwas/ws"

	"github.com/shoalhq/shoal/auth"
	"github.com/shoalhq/shoal/proto/sc"
)

type sessionState uint8

const (
	stateAwaitHandshake sessionState = iota
	stateOpen
	stateClosing // a close was requested; packets are ignored
	stateClosed  // Engine.Closed ran
)

// Session is one client socket's protocol state. Message calls for one
// session are sequential (the transport guarantees it); the sweeper, broker
// acks and server-side actions (kick out, set token) run concurrently, so
// the mutable state is under mu.
type Session struct {
	e      *Engine
	c      Conn
	id     string
	opened time.Time

	mu       sync.Mutex
	state    sessionState
	lastPong time.Time // last pong (or any message) since the handshake
	nextPing time.Time
	token    *auth.Token
	channels map[string]struct{} // nil until the first subscribe
}

// ID is the session id sent in the handshake response.
func (s *Session) ID() string { return s.id }

// Conn is the session's connection.
func (s *Session) Conn() Conn { return s.c }

// AuthToken is the verified token, or nil.
func (s *Session) AuthToken() *auth.Token {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.token
}

// Channels returns the session's subscriptions.
func (s *Session) Channels() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.channels))
	for ch := range s.channels {
		out = append(out, ch)
	}
	return out
}

// newSessionID returns a 20-character id like the official server's base64id.
func newSessionID() string {
	var b [15]byte
	_, _ = rand.Read(b[:]) // never fails on Linux (getrandom)
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// send frames payload privately and queues it. A full queue applies the
// slow-consumer policy.
func (s *Session) send(payload []byte) {
	frame := s.e.cfg.Frame(make([]byte, 0, len(payload)+14), payload)
	s.sendFrame(frame)
}

func (s *Session) sendFrame(frame []byte) {
	switch err := s.c.WriteFrame(frame); {
	case err == nil:
		s.e.stats.msgsOut.Add(1)
		s.e.stats.bytesOut.Add(int64(len(frame)))
	case errors.Is(err, s.e.cfg.ErrQueueFull):
		s.e.slowConsumer(s)
	}
}

// reply builds a payload in a pooled buffer and sends it.
func (s *Session) reply(build func([]byte) []byte) {
	bp := s.e.bufs.Get().(*[]byte)
	b := build((*bp)[:0])
	s.send(b)
	*bp = b[:0]
	s.e.bufs.Put(bp)
}

func (s *Session) replyError(cid []byte, err *sc.Error) {
	s.reply(func(b []byte) []byte { return sc.AppendErrorResponse(b, cid, err) })
}

func (s *Session) replyOK(cid []byte) {
	s.reply(func(b []byte) []byte { return sc.AppendResponse(b, cid, nil) })
}

func (s *Session) close(code ws.StatusCode, reason string) {
	s.markClosing()
	s.c.Close(code, reason)
}

// heartbeat runs on the sweeper: handshake timeout, ping, pong timeout.
func (s *Session) heartbeat(now time.Time) {
	p := &s.e.proto
	s.mu.Lock()
	var ping bool
	var code ws.StatusCode
	switch s.state {
	case stateAwaitHandshake:
		if now.Sub(s.opened) >= p.HandshakeTimeout.D() {
			code = CodeHandshakeTimeout
			s.state = stateClosing // no further sweeps act on it
		}
	case stateOpen:
		if now.Sub(s.lastPong) >= p.PingTimeout.D() {
			code = CodePongTimeout
			s.state = stateClosing
		} else if !now.Before(s.nextPing) {
			ping = true
			s.nextPing = now.Add(p.PingInterval.D())
		}
	}
	s.mu.Unlock()
	switch {
	case code == CodeHandshakeTimeout:
		s.e.stats.hsTimeouts.Add(1)
		s.close(code, "Did not receive #handshake from client before timeout")
	case code == CodePongTimeout:
		s.e.stats.pingTimeouts.Add(1)
		s.close(code, "Client pong timed out")
	case ping:
		s.sendFrame(s.e.pingFrame)
	}
}

// Message handles one client frame (text or binary: both are read as UTF-8
// JSON, like the official server). payload is valid only during the call.
func (e *Engine) Message(s *Session, payload []byte) {
	e.stats.msgsIn.Add(1)
	e.stats.bytesIn.Add(int64(len(payload)))
	var r sc.Reader
	r.Reset(payload)
	var p sc.Packet
	for r.Next(&p) {
		if !s.packet(&p) {
			return
		}
	}
	if err := r.Err(); err != nil {
		e.stats.invalidFrames.Add(1)
		if e.log.IsDebug() {
			e.log.Debug("invalid frame", "id", s.id, "error", err)
		}
	}
}

// packet handles one packet; false stops processing the frame (the session
// is closing).
func (s *Session) packet(p *sc.Packet) bool {
	e := s.e
	now := e.now()
	s.mu.Lock()
	state := s.state
	if state == stateOpen {
		// Any traffic proves the client alive (v20 resets its pong timer
		// on messages too).
		s.lastPong = now
	}
	s.mu.Unlock()

	switch state {
	case stateClosing, stateClosed:
		return false
	case stateAwaitHandshake:
		switch {
		case p.Kind == sc.Pong:
			// Lenient: a client may answer a ping before its handshake;
			// we never ping that early, so just ignore it.
			return true
		case (p.Kind == sc.Invoke || p.Kind == sc.Transmit) && string(p.Event) == "#handshake":
			if p.Kind != sc.Invoke {
				s.close(CodeBadHandshake, "Handshake request was malformatted")
				return false
			}
			s.handshake(p)
			return true
		}
		e.stats.strictViolations.Add(1)
		s.close(CodeNotHandshaken, "Message received before handshake")
		return false
	}

	switch p.Kind {
	case sc.Pong:
		s.checkExpiry(now)
		return true
	case sc.Transmit, sc.Invoke:
	default:
		// Responses to server invokes (none yet) and raw values (the
		// official server emits those as 'raw' to the app; we have none).
		if p.Kind == sc.Raw {
			e.stats.rawPackets.Add(1)
		}
		return true
	}
	s.checkExpiry(now)
	switch string(p.Event) {
	case "#handshake":
		if p.Kind != sc.Invoke {
			s.close(CodeBadHandshake, "Handshake request was malformatted")
			return false
		}
		s.handshake(p)
	case "#subscribe":
		s.subscribe(p)
	case "#unsubscribe":
		s.unsubscribe(p)
	case "#publish":
		s.publish(p)
	case "#authenticate":
		if p.Kind != sc.Invoke {
			s.close(CodeBadHandshake, "Authenticate request was malformatted")
			return false
		}
		s.authenticate(p)
	case "#removeAuthToken":
		s.mu.Lock()
		s.token = nil
		s.mu.Unlock()
		if p.Kind == sc.Invoke {
			s.replyOK(p.CID)
		}
	default:
		if p.Kind == sc.Transmit {
			// No transmit handlers yet (middleware/hook issue).
			e.stats.transmitsDropped.Add(1)
			return true
		}
		// Never leave an invoke unanswered: the client would time out.
		e.stats.unknownProcedures.Add(1)
		s.replyError(p.CID, sc.NewError("UnknownProcedureError", "No handler for procedure "+string(p.Event)))
	}
	return true
}

func (s *Session) markClosing() {
	s.mu.Lock()
	if s.state < stateClosing {
		s.state = stateClosing
	}
	s.mu.Unlock()
}

// verify checks a raw JSON token value (a string, or anything else, which
// is an invalid format).
func (s *Session) verify(raw []byte) (*auth.Token, *auth.Error) {
	str, ok := sc.String(raw)
	if !ok {
		return nil, auth.InvalidFormat()
	}
	if s.e.cfg.Keys == nil {
		return nil, &auth.Error{Name: "AuthTokenInvalidError", Message: "Server has no auth key configured", IsBadToken: true}
	}
	tok, err := s.e.cfg.Keys.Verify(string(str))
	if err != nil {
		var ae *auth.Error
		if errors.As(err, &ae) {
			return nil, ae
		}
		return nil, &auth.Error{Name: "AuthTokenError", Message: err.Error()}
	}
	return tok, nil
}

// handshake answers #handshake: id, pingTimeout, isAuthenticated and, for a
// token that failed, authError (then #removeAuthToken when the client
// should drop it).
func (s *Session) handshake(p *sc.Packet) {
	e := s.e
	var tok *auth.Token
	var authErr *auth.Error
	if raw, ok := sc.Field(p.Data, "authToken"); ok && !sc.IsNull(raw) {
		tok, authErr = s.verify(raw)
		if authErr != nil {
			e.stats.authFailures.Add(1)
		}
	}
	now := e.now()
	s.mu.Lock()
	if s.state >= stateClosing { // e.g. the handshake timeout fired meanwhile
		s.mu.Unlock()
		return
	}
	s.token = tok
	s.state = stateOpen
	s.lastPong = now
	s.nextPing = now.Add(e.proto.PingInterval.D())
	s.mu.Unlock()
	e.stats.handshakes.Add(1)
	h := sc.Handshake{ID: s.id, PingTimeoutMs: e.proto.PingTimeout.D().Milliseconds(), IsAuthenticated: tok != nil}
	if authErr != nil {
		h.AuthError = authErr.SC()
	}
	s.reply(func(b []byte) []byte { return sc.AppendHandshakeResponse(b, p.CID, h) })
	if authErr != nil && authErr.IsBadToken {
		s.send([]byte(sc.RemoveAuthToken))
	}
}

// authenticate answers #authenticate <token>.
func (s *Session) authenticate(p *sc.Packet) {
	tok, authErr := s.verify(p.Data)
	s.mu.Lock()
	s.token = tok
	s.mu.Unlock()
	if authErr != nil {
		s.e.stats.authFailures.Add(1)
		s.replyError(p.CID, authErr.SC())
		if authErr.IsBadToken {
			s.send([]byte(sc.RemoveAuthToken))
		}
		return
	}
	s.reply(func(b []byte) []byte { return sc.AppendAuthenticateResponse(b, p.CID, true, nil) })
}

// checkExpiry deauthenticates a session whose token expired while it was
// connected (checked on each pong and inbound event, as the official server).
func (s *Session) checkExpiry(now time.Time) {
	s.mu.Lock()
	expired := s.token != nil && s.token.Expired(now)
	if expired {
		s.token = nil
	}
	s.mu.Unlock()
	if expired {
		s.e.stats.deauthExpired.Add(1)
		s.send([]byte(sc.RemoveAuthToken))
	}
}

// SetAuthToken signs claims and sends the token with #setAuthToken; the
// session becomes authenticated with it. (Used by the HTTP API and hooks.)
func (s *Session) SetAuthToken(claims map[string]any) error {
	if s.e.cfg.Keys == nil {
		return errors.New("setting auth token: no auth keys configured")
	}
	signed, err := s.e.cfg.Keys.Sign(claims)
	if err != nil {
		s.close(4002, "Server failed to sign auth token")
		return err
	}
	tok, err := s.e.cfg.Keys.Verify(signed)
	if err != nil {
		return err
	}
	s.mu.Lock()
	if s.state != stateOpen {
		s.mu.Unlock()
		return errors.New("setting auth token: session has not completed the handshake")
	}
	s.token = tok
	s.mu.Unlock()
	s.send(sc.AppendSetAuthToken(nil, signed))
	return nil
}

// Deauthenticate drops the session's token and tells the client to forget it.
func (s *Session) Deauthenticate() {
	s.mu.Lock()
	s.token = nil
	s.mu.Unlock()
	s.send([]byte(sc.RemoveAuthToken))
}

var (
	errSubscribeMalformed   = sc.NewError("InvalidActionError", "Subscribe channel name was malformatted")
	errUnsubscribeMalformed = sc.NewError("InvalidActionError", "Unsubscribe channel name was malformatted")
	errPublishMalformed     = sc.NewError("InvalidActionError", "Publish channel name was malformatted")
	errPublishDisabled      = sc.NewError("InvalidActionError", "Client publish feature is disabled")
	errChannelTooLong       = sc.NewError("InvalidActionError", "Channel name is longer than "+strconv.Itoa(MaxChannelLen)+" bytes")
)

func (s *Session) subscribe(p *sc.Packet) {
	if p.Kind != sc.Invoke {
		return // the official server subscribes only on the invoke form
	}
	ch, ok := sc.StringField(p.Data, "channel")
	if !ok || len(ch) == 0 { // "" cannot be routed to a broker
		s.replyError(p.CID, errSubscribeMalformed)
		return
	}
	if len(ch) > MaxChannelLen {
		s.replyError(p.CID, errChannelTooLong)
		return
	}
	limit := s.e.proto.SocketChannelLimit
	s.mu.Lock()
	if _, dup := s.channels[string(ch)]; dup {
		s.mu.Unlock()
		s.replyOK(p.CID)
		return
	}
	if limit > 0 && len(s.channels) >= limit {
		s.mu.Unlock()
		name := string(ch)
		s.replyError(p.CID, sc.NewError("BrokerError", "Failed to subscribe socket to the "+name+
			" channel - InvalidActionError: Socket "+s.id+" tried to exceed the channel subscription limit of "+strconv.Itoa(limit)))
		return
	}
	if s.state != stateOpen {
		s.mu.Unlock()
		return
	}
	name := string(ch)
	if s.channels == nil {
		s.channels = make(map[string]struct{}, 1)
	}
	s.channels[name] = struct{}{}
	// Added under s.mu so a concurrent Closed/KickOut sees a consistent set.
	if s.e.hub.add(name, s) {
		s.e.stats.subscriptions.Add(1)
	}
	s.mu.Unlock()
	s.replyOK(p.CID)
}

func (s *Session) unsubscribe(p *sc.Packet) {
	ch, ok := sc.String(p.Data)
	if !ok {
		if p.Kind == sc.Invoke {
			s.replyError(p.CID, errUnsubscribeMalformed)
		}
		return
	}
	removed := s.leave(string(ch))
	if p.Kind != sc.Invoke {
		return
	}
	if !removed {
		s.replyError(p.CID, sc.NewError("BrokerError", "Failed to unsubscribe socket from the "+string(ch)+
			" channel - InvalidActionError: Socket "+s.id+" tried to unsubscribe from a channel which it is not subscribed to"))
		return
	}
	s.replyOK(p.CID)
}

// leave drops one subscription; it reports whether there was one.
func (s *Session) leave(channel string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.channels[channel]; !ok {
		return false
	}
	delete(s.channels, channel)
	if s.e.hub.remove(channel, s) {
		s.e.stats.subscriptions.Add(-1)
	}
	return true
}

// KickOut unsubscribes the session from channel and tells the client.
func (s *Session) KickOut(channel, message string) bool {
	if !s.leave(channel) {
		return false
	}
	s.send(sc.AppendKickOut(nil, channel, message))
	return true
}

func (s *Session) publish(p *sc.Packet) {
	e := s.e
	invoke := p.Kind == sc.Invoke
	if !e.proto.ClientPublishAllowed() {
		if invoke {
			s.replyError(p.CID, errPublishDisabled)
		}
		return
	}
	ch, ok := sc.StringField(p.Data, "channel")
	if !ok || len(ch) == 0 || len(ch) > MaxChannelLen {
		if invoke {
			s.replyError(p.CID, errPublishMalformed)
		}
		return
	}
	data, ok := sc.Field(p.Data, "data")
	if !ok {
		data = []byte("null")
	}
	if e.cfg.Broker == nil {
		// No broker tier (tests, single process): deliver locally.
		e.stats.publishesIn.Add(1)
		e.Deliver(string(ch), data, 0)
		if invoke {
			s.replyOK(p.CID)
		}
		return
	}
	var ack, cidCopy []byte
	if invoke {
		// Built now: p aliases the frame, which is gone when done runs.
		var rb [32]byte
		resp := sc.AppendResponse(rb[:0], p.CID, nil)
		ack = e.cfg.Frame(make([]byte, 0, len(resp)+14), resp)
		cidCopy = append([]byte(nil), p.CID...)
	}
	e.stats.publishesIn.Add(1)
	e.cfg.Broker.Publish(string(ch), data, func(_ uint64, err error) {
		if err != nil {
			e.stats.pubErrors.Add(1)
			if invoke {
				s.replyError(cidCopy, sc.NewError("BrokerError", "Failed to publish: "+err.Error()))
			}
			return
		}
		if invoke {
			s.sendFrame(ack)
		}
	})
}
