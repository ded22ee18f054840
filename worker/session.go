package worker

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"

	"github.com/shoalhq/shoal/auth"
	"github.com/shoalhq/shoal/middleware"
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
	lastPong time.Time // last pong (or any message) since the handshake, as the sweeper saw it
	// heard: a message arrived since the last sweep. The sweeper turns it
	// into lastPong, so a message costs no clock read (time.Now per
	// packet was a visible share of a worker's round trip); lastPong is
	// then late by at most one sweep tick, a quarter of the shortest timer.
	heard    bool
	nextPing time.Time
	token    *auth.Token
	channels map[string]struct{} // nil until the first subscribe
	user     string              // the token's sub, as registered in Engine.users

	// Middleware (mw.go). ident is the socket as the chain sees it: an
	// immutable snapshot replaced (under mu) when the auth state changes,
	// so the fan-out goroutines may read it while the session changes it.
	ident    atomic.Pointer[middleware.Socket]
	identTok *auth.Token               // under mu: the token ident reflects
	hookID   bool                      // under mu: ident came from a hook, not a token
	mwOpened bool                      // under mu: chain.Open was called
	done     func(middleware.Decision) // s.decided, bound once

	// Ordering behind a pending (hook) decision; see dispatch.
	qmu     sync.Mutex
	busy    bool // an action is being processed or waits for a decision
	queue   []queuedPacket
	queuedB int
	pendMu  sync.Mutex     // held while a pending action's context is saved
	pend    *pendingAction // the pending action's context; nil when none
	upgrade *UpgradeInfo   // the upgrade request, until the handshake is decided
	// hold keeps the socket's conn_limit places from the check of a
	// handshake or #authenticate until the chain counted the socket (Open,
	// UserChanged); under mu, released in Closed at the latest.
	hold *middleware.Hold

	// Publishes acknowledged locally whose broker acknowledgement has not
	// come back yet (publish_ack: local; see localAck).
	aheadOfBroker atomic.Int32
	aheadBytes    atomic.Int64 // their data bytes

	// Slow-consumer backlog (slow.go).
	backlogged atomic.Bool
	blMu       sync.Mutex
	backlog    []heldPublish
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
		if s.heard {
			s.heard = false
			s.lastPong = now
		}
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
	if s.backlogged.Load() {
		s.flushBacklog()
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
		if !s.dispatch(&p) {
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

// packet handles one packet. ok=false stops processing the frame (the
// session is closing); pending=true means the packet's decision waits for a
// backend hook, whose callback continues the session's actions (dispatch).
func (s *Session) packet(p *sc.Packet) (ok, pending bool) {
	e := s.e
	s.mu.Lock()
	state := s.state
	if state == stateOpen {
		// Any traffic proves the client alive (v20 resets its pong timer
		// on messages too).
		s.heard = true
	}
	// Only a token can expire: without one no clock is read.
	authed := s.token != nil
	s.mu.Unlock()

	switch state {
	case stateClosing, stateClosed:
		return false, false
	case stateAwaitHandshake:
		switch {
		case p.Kind == sc.Pong:
			// Lenient: a client may answer a ping before its handshake;
			// we never ping that early, so just ignore it.
			return true, false
		case (p.Kind == sc.Invoke || p.Kind == sc.Transmit) && string(p.Event) == "#handshake":
			if p.Kind != sc.Invoke {
				s.close(CodeBadHandshake, "Handshake request was malformatted")
				return false, false
			}
			return true, s.handshake(p)
		}
		e.stats.strictViolations.Add(1)
		s.close(CodeNotHandshaken, "Message received before handshake")
		return false, false
	}

	switch p.Kind {
	case sc.Pong:
		if authed {
			s.checkExpiry(e.now())
		}
		return true, false
	case sc.Transmit, sc.Invoke:
	default:
		// Responses to server invokes (none yet) and raw values (the
		// official server emits those as 'raw' to the app; we have none).
		if p.Kind == sc.Raw {
			e.stats.rawPackets.Add(1)
		}
		return true, false
	}
	if authed {
		s.checkExpiry(e.now())
	}
	switch string(p.Event) {
	case "#handshake":
		if p.Kind != sc.Invoke {
			s.close(CodeBadHandshake, "Handshake request was malformatted")
			return false, false
		}
		return true, s.handshake(p)
	case "#subscribe":
		return true, s.subscribe(p)
	case "#unsubscribe":
		s.unsubscribe(p)
	case "#publish":
		return true, s.publish(p)
	case "#authenticate":
		if p.Kind != sc.Invoke {
			s.close(CodeBadHandshake, "Authenticate request was malformatted")
			return false, false
		}
		return true, s.authenticate(p)
	case "#removeAuthToken":
		s.mu.Lock()
		s.token = nil
		if s.hookID {
			s.identTok = staleIdent // a hook's identity goes too
		}
		s.mu.Unlock()
		s.syncIdentity()
		if p.Kind == sc.Invoke {
			s.replyOK(p.CID)
		}
	default:
		return true, s.event(p)
	}
	return true, false
}

// event handles a non-# transmit or invoke: the transmit/invoke middleware
// decides; an invoke allowed by an rpc rule is answered with the backend's
// reply, any other allowed invoke has no handler.
func (s *Session) event(p *sc.Packet) bool {
	act := middleware.Transmit
	if p.Kind == sc.Invoke {
		act = middleware.Invoke
	}
	chain := s.e.chain.Load()
	if !chain.HasRules(act) {
		s.finishEvent(p, middleware.Decision{})
		return false
	}
	s.syncIdentity()
	in := s.e.newInput()
	*in = middleware.Input{Action: act, Socket: s.ident.Load(), Event: string(p.Event), Data: p.Data}
	return s.run(chain, in, p, pendingAction{step: stepEvent})
}

func (s *Session) finishEvent(p *sc.Packet, d middleware.Decision) {
	e := s.e
	if p.Kind == sc.Transmit {
		// No transmit handlers (a hook sees them; nothing answers).
		if d.Verdict == middleware.Allow {
			e.stats.transmitsDropped.Add(1)
		}
		return
	}
	switch {
	case d.Verdict == middleware.Allow && d.Reply != nil:
		s.reply(func(b []byte) []byte { return sc.AppendResponse(b, p.CID, d.Reply) })
	case d.Verdict == middleware.Allow:
		// Never leave an invoke unanswered: the client would time out.
		e.stats.unknownProcedures.Add(1)
		s.replyError(p.CID, sc.NewError("UnknownProcedureError", "No handler for procedure "+string(p.Event)))
	case d.Verdict == middleware.Deny:
		s.replyError(p.CID, blockError(d, "inbound"))
	}
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
	keys := s.e.keys.Load()
	if keys == nil {
		return nil, &auth.Error{Name: "AuthTokenInvalidError", Message: "Server has no auth key configured", IsBadToken: true}
	}
	tok, err := keys.Verify(string(str))
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
// should drop it). With middleware: a verified token first goes through the
// authenticate rules (a deny makes it an authError, the handshake goes on),
// then the handshakeSC rules decide whether the socket may stay at all.
func (s *Session) handshake(p *sc.Packet) bool {
	e := s.e
	var tok *auth.Token
	var authErr *auth.Error
	if raw, ok := sc.Field(p.Data, "authToken"); ok && !sc.IsNull(raw) {
		tok, authErr = s.verify(raw)
		if authErr != nil {
			e.stats.authFailures.Add(1)
		}
	}
	chain := e.chain.Load()
	if tok != nil && chain.HasRules(middleware.Authenticate) {
		in := s.e.newInput()
		*in = middleware.Input{Action: middleware.Authenticate, Socket: s.wouldBe(tok), Token: tok.Raw}
		return s.run(chain, in, p, pendingAction{step: stepHandshakeAuth, tok: tok})
	}
	var scErr *sc.Error
	if authErr != nil {
		scErr = authErr.SC()
	}
	return s.handshakeSC(p, tok, scErr, authErr)
}

// handshakeAuthDecided continues a handshake after the authenticate rules.
func (s *Session) handshakeAuthDecided(p *sc.Packet, tok *auth.Token, d middleware.Decision) bool {
	if d.Verdict != middleware.Allow {
		// The block error becomes the handshake's authError; the socket
		// stays, unauthenticated, and the client keeps its token (no
		// #removeAuthToken), as socketcluster-server does.
		s.e.stats.authFailures.Add(1)
		return s.handshakeSC(p, nil, blockError(d, "authenticate"), nil)
	}
	return s.handshakeSC(p, tok, nil, nil)
}

// handshakeSC runs the handshakeSC rules with the identity the token gives.
// refused is why auth.jwt refused the client's token (nil when it did not,
// or when the authenticate rules refused a verified one).
func (s *Session) handshakeSC(p *sc.Packet, tok *auth.Token, authErr *sc.Error, refused *auth.Error) bool {
	badToken := refused != nil && refused.IsBadToken
	chain := s.e.chain.Load()
	if !chain.HasRules(middleware.HandshakeSC) {
		s.finishHandshake(p, tok, authErr, badToken, middleware.Decision{})
		return false
	}
	in := s.e.newInput()
	*in = middleware.Input{Action: middleware.HandshakeSC, Socket: s.wouldBe(tok)}
	if tok != nil {
		in.Token = tok.Raw
	} else {
		in.BadToken = sentToken(p) // for jwt rules (mw.go)
		in.TokenRefusal = refused
	}
	in.Hold = s.holdFor(chain, middleware.HandshakeSC)
	s.pendMu.Lock()
	if u := s.upgrade; u != nil {
		in.Origin, in.Query, in.Header = u.Origin, u.Query, u.Header
	}
	s.pendMu.Unlock()
	return s.run(chain, in, p, pendingAction{step: stepHandshakeSC, tok: tok, authErr: authErr, badToken: badToken})
}

func (s *Session) finishHandshake(p *sc.Packet, tok *auth.Token, authErr *sc.Error, badToken bool, d middleware.Decision) {
	e := s.e
	s.pendMu.Lock()
	s.upgrade = nil // decided: the request's headers are not needed any more
	s.pendMu.Unlock()
	if d.Verdict != middleware.Allow {
		code := ws.StatusCode(d.CloseCode)
		if code == 0 {
			code = CodeBadHandshake
		}
		reason := "Handshake denied"
		if d.Error != nil {
			reason = d.Error.Message
		}
		if d.Verdict == middleware.Deny {
			s.replyError(p.CID, blockError(d, "handshake"))
		}
		s.close(code, reason)
		return
	}
	var pushToken string
	var override bool
	if d.Identity != nil {
		pushToken = d.Identity.Token
		tok, override = s.adoptIdentity(tok, d.Identity)
	}
	var sub string
	if tok != nil {
		sub = tok.Subject()
	}
	if reason, banned := e.banned(sub, s.remoteIP()); banned {
		s.replyError(p.CID, sc.NewError("BannedError", reason))
		s.close(CodeBanned, reason)
		return
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
	s.syncIdentity()
	if override {
		s.setHookIdentity(d.Identity)
	}
	s.mu.Lock()
	if s.state == stateOpen {
		// Counted for conn_limit once the handshake is accepted; Closed
		// (under mu too) undoes it.
		e.chain.Load().Open(s.ident.Load())
		s.mwOpened = true
	}
	s.dropHoldLocked() // counted now (or closing): the places are not needed
	s.mu.Unlock()
	e.stats.handshakes.Add(1)
	h := sc.Handshake{ID: s.id, PingTimeoutMs: e.proto.PingTimeout.D().Milliseconds(), IsAuthenticated: tok != nil}
	h.AuthError = authErr
	s.reply(func(b []byte) []byte { return sc.AppendHandshakeResponse(b, p.CID, h) })
	if badToken {
		s.send([]byte(sc.RemoveAuthToken))
	}
	if pushToken != "" {
		s.send(sc.AppendSetAuthToken(nil, pushToken))
	}
}

// authenticate answers #authenticate <token>.
func (s *Session) authenticate(p *sc.Packet) bool {
	tok, authErr := s.verify(p.Data)
	if authErr != nil {
		s.finishAuthenticate(p, nil, authErr, middleware.Decision{})
		return false
	}
	chain := s.e.chain.Load()
	if !chain.HasRules(middleware.Authenticate) {
		s.finishAuthenticate(p, tok, nil, middleware.Decision{})
		return false
	}
	in := s.e.newInput()
	*in = middleware.Input{Action: middleware.Authenticate, Socket: s.wouldBe(tok), Token: tok.Raw}
	// conn_limit per_user keeps a place under the new user until the
	// socket is counted under it (finishAuthenticate) or closes.
	in.Hold = s.holdFor(chain, middleware.Authenticate)
	return s.run(chain, in, p, pendingAction{step: stepAuthenticate, tok: tok})
}

// holdFor returns the Hold for a check of action a (the handshake's, which
// the upgrade may have started), or nil when no conn_limit rule checks a.
func (s *Session) holdFor(chain *middleware.Chain, a middleware.Action) *middleware.Hold {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hold == nil && chain.WantsHold(a) {
		s.hold = &middleware.Hold{}
	}
	return s.hold
}

// releaseHold gives back the conn_limit places kept for the action just
// decided (the socket is counted by now, or the action was refused).
func (s *Session) releaseHold() {
	s.mu.Lock()
	s.dropHoldLocked()
	s.mu.Unlock()
}

func (s *Session) dropHoldLocked() {
	s.hold.Release()
	s.hold = nil
}

func (s *Session) finishAuthenticate(p *sc.Packet, tok *auth.Token, authErr *auth.Error, d middleware.Decision) {
	defer s.releaseHold() // after syncIdentity counted the socket under its new user
	if authErr != nil {
		s.mu.Lock()
		s.token = nil
		s.mu.Unlock()
		s.syncIdentity()
		s.e.stats.authFailures.Add(1)
		s.replyError(p.CID, authErr.SC())
		if authErr.IsBadToken {
			s.send([]byte(sc.RemoveAuthToken))
		}
		return
	}
	if d.Verdict != middleware.Allow {
		// A valid token the middleware refused: the official server's
		// {"isAuthenticated":false,"authError":..} (no #removeAuthToken).
		s.mu.Lock()
		s.token = nil
		s.mu.Unlock()
		s.syncIdentity()
		s.e.stats.authFailures.Add(1)
		ae := blockError(d, "authenticate")
		s.reply(func(b []byte) []byte { return sc.AppendAuthenticateResponse(b, p.CID, false, ae) })
		return
	}
	var override bool
	if d.Identity != nil {
		tok, override = s.adoptIdentity(tok, d.Identity)
	}
	s.mu.Lock()
	s.token = tok
	s.mu.Unlock()
	s.syncIdentity()
	if override {
		s.setHookIdentity(d.Identity)
	}
	s.reply(func(b []byte) []byte { return sc.AppendAuthenticateResponse(b, p.CID, true, nil) })
	if d.Identity != nil && d.Identity.Token != "" {
		s.send(sc.AppendSetAuthToken(nil, d.Identity.Token))
	}
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
		s.syncIdentity()
		s.e.stats.deauthExpired.Add(1)
		s.send([]byte(sc.RemoveAuthToken))
	}
}

// SetAuthToken signs claims and sends the token with #setAuthToken; the
// session becomes authenticated with it. (Used by the HTTP API and hooks.)
func (s *Session) SetAuthToken(claims map[string]any) error {
	keys := s.e.keys.Load()
	if keys == nil {
		return errors.New("setting auth token: no auth keys configured")
	}
	signed, err := keys.Sign(claims)
	if err != nil {
		s.close(4002, "Server failed to sign auth token")
		return err
	}
	tok, err := keys.Verify(signed)
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
	s.syncIdentity() // the fan-out (publishOut) sees the new identity at once
	s.send(sc.AppendSetAuthToken(nil, signed))
	return nil
}

// Deauthenticate drops the session's token and tells the client to forget it.
func (s *Session) Deauthenticate() {
	s.mu.Lock()
	s.token = nil
	s.mu.Unlock()
	s.syncIdentity()
	s.send([]byte(sc.RemoveAuthToken))
}

var (
	errSubscribeMalformed   = sc.NewError("InvalidActionError", "Subscribe channel name was malformatted")
	errUnsubscribeMalformed = sc.NewError("InvalidActionError", "Unsubscribe channel name was malformatted")
	errPublishMalformed     = sc.NewError("InvalidActionError", "Publish channel name was malformatted")
	errPublishDisabled      = sc.NewError("InvalidActionError", "Client publish feature is disabled")
	errChannelTooLong       = sc.NewError("InvalidActionError", "Channel name is longer than "+strconv.Itoa(MaxChannelLen)+" bytes")
	// "#" channels are the cluster's internal channels (users.go).
	errInternalSubscribe = sc.NewError("InvalidActionError", "Cannot subscribe to an internal channel (names starting with #)")
	errInternalPublish   = sc.NewError("InvalidActionError", "Cannot publish to an internal channel (names starting with #)")
)

func (s *Session) subscribe(p *sc.Packet) bool {
	if p.Kind != sc.Invoke {
		return false // the official server subscribes only on the invoke form
	}
	ch, ok := sc.StringField(p.Data, "channel")
	if !ok || len(ch) == 0 { // "" cannot be routed to a broker
		s.replyError(p.CID, errSubscribeMalformed)
		return false
	}
	if len(ch) > MaxChannelLen {
		s.replyError(p.CID, errChannelTooLong)
		return false
	}
	if ch[0] == '#' {
		s.replyError(p.CID, errInternalSubscribe)
		return false
	}
	chain := s.e.chain.Load()
	if !chain.HasRules(middleware.Subscribe) {
		s.finishSubscribe(p, string(ch), middleware.Decision{})
		return false
	}
	s.syncIdentity()
	name := string(ch)
	sd, _ := sc.Field(p.Data, "data")
	in := s.e.newInput()
	*in = middleware.Input{Action: middleware.Subscribe, Socket: s.ident.Load(), Channel: name, Data: sd}
	return s.run(chain, in, p, pendingAction{step: stepSubscribe, channel: name})
}

func (s *Session) finishSubscribe(p *sc.Packet, name string, d middleware.Decision) {
	if d.Verdict != middleware.Allow {
		// Drop is answered too: #subscribe has no client timeout.
		s.replyError(p.CID, blockError(d, "inbound"))
		return
	}
	limit := s.e.proto.SocketChannelLimit
	s.mu.Lock()
	if _, dup := s.channels[name]; dup {
		s.mu.Unlock()
		s.replyOK(p.CID)
		return
	}
	if limit > 0 && len(s.channels) >= limit {
		s.mu.Unlock()
		s.replyError(p.CID, sc.NewError("BrokerError", "Failed to subscribe socket to the "+name+
			" channel - InvalidActionError: Socket "+s.id+" tried to exceed the channel subscription limit of "+strconv.Itoa(limit)))
		return
	}
	if s.state != stateOpen {
		s.mu.Unlock()
		return
	}
	if s.channels == nil {
		s.channels = make(map[string]struct{}, 1)
	}
	s.channels[name] = struct{}{}
	if rb := s.e.recoveryBroker(); rb != nil {
		since, epoch, recover := recoverRequest(p.Data)
		if recover || s.e.channelOptions(name).History() {
			// Reserved in s.channels; the socket joins the fan-out when
			// the broker has answered (realtime.go).
			s.mu.Unlock()
			cid := append([]byte(nil), p.CID...)
			s.subscribeRecover(rb, name, cid, since, epoch, recover)
			return
		}
	}
	// Added under s.mu so a concurrent Closed/KickOut sees a consistent set.
	if s.e.hub.add(name, s) {
		s.e.stats.subscriptions.Add(1)
		s.presenceJoinLocked(name)
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
		s.presenceLeave(channel)
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

func (s *Session) publish(p *sc.Packet) bool {
	e := s.e
	invoke := p.Kind == sc.Invoke
	if !e.proto.ClientPublishAllowed() {
		if invoke {
			s.replyError(p.CID, errPublishDisabled)
		}
		return false
	}
	// One pass over the validated data for both fields (sc.Fields2).
	chRaw, data, chOK, dataOK := sc.Fields2(p.Data, "channel", "data")
	var ch []byte
	if chOK {
		ch, chOK = sc.String(chRaw)
	}
	if !chOK || len(ch) == 0 || len(ch) > MaxChannelLen {
		if invoke {
			s.replyError(p.CID, errPublishMalformed)
		}
		return false
	}
	if ch[0] == '#' {
		if invoke {
			s.replyError(p.CID, errInternalPublish)
		}
		return false
	}
	if !dataOK {
		data = []byte("null")
	}
	name := string(ch) // the one allocation of a publish: the broker keeps it
	chain := e.chain.Load()
	if !chain.HasRules(middleware.PublishIn) {
		s.finishPublish(p, name, data, middleware.Decision{})
		return false
	}
	s.syncIdentity()
	// The Input comes from a pool: an allowed publish allocates nothing more here.
	in := s.e.newInput()
	*in = middleware.Input{Action: middleware.PublishIn, Socket: s.ident.Load(), Channel: name, Data: data}
	return s.run(chain, in, p, pendingAction{step: stepPublish, channel: name})
}

func (s *Session) finishPublish(p *sc.Packet, name string, data []byte, d middleware.Decision) {
	e := s.e
	invoke := p.Kind == sc.Invoke
	switch d.Verdict {
	case middleware.Deny:
		if invoke {
			s.replyError(p.CID, blockError(d, "inbound"))
		}
		return
	case middleware.Drop:
		return
	}
	if d.Data != nil {
		data = d.Data
	}
	if e.cfg.Broker == nil {
		// No broker tier (tests, single process): deliver locally.
		e.stats.publishesIn.Add(1)
		e.Deliver(name, data, 0)
		if invoke {
			s.replyOK(p.CID)
		}
		return
	}
	if invoke && e.proto.PublishAckIsLocal() && s.mayAckAhead(len(data)) && !e.channelOptions(name).History() {
		s.publishLocalAck(p.CID, name, data)
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
	e.cfg.Broker.Publish(name, data, func(_ uint64, err error) {
		if err != nil {
			s.publishFailed(cidCopy, err) // cidCopy: nil unless invoke
			return
		}
		if invoke {
			s.sendFrame(ack)
		}
	})
}

// localAck is the broker callback of a client #publish acknowledged
// locally (protocol.publish_ack: local, a channel without history). The
// client's ack goes out once Publish returned without calling done: the
// publish passed the inbound middleware and sits on the owning broker's link,
// which delivers in order. This is what socketcluster-server does: its
// #publish is answered once the in-process broker engine took the message
// (the SCC broker client forwards it to the cluster afterwards and reports
// failures only as 'error' events). A publish refused before it was queued
// (no broker, broker down, queue full, too large) calls done before Publish
// returns and is answered with the error, as with publish_ack: broker.
//
// At most maxAheadOfBroker publishes (and maxAheadBytes of data) of one
// socket are acknowledged ahead of their broker; beyond that a publish
// waits for the broker's ack like with publish_ack: broker. So a publisher with a window of invokes in flight is
// still slowed when brokers hold acks (publisher flow control,
// docs/brokers.md), with this much slack; a window-1 publisher never waits.
//
// Every reply is sent by the session's goroutine. Whoever of the two sides
// (publishLocalAck after Publish returned, done) comes second puts the
// localAck back in its pool.
type localAck struct {
	s     *Session
	state atomic.Int32 // localPending, localAcked or localDone
	err   error        // done's verdict, written before state becomes localDone
	n     int64        // data bytes, counted in Session.aheadBytes
	fn    func(uint64, error)
}

const (
	maxAheadOfBroker = 64
	maxAheadBytes    = 1 << 20 // one publish of any size may go ahead alone
)

// mayAckAhead reports whether a publish of n data bytes may be
// acknowledged ahead of its broker (see localAck).
func (s *Session) mayAckAhead(n int) bool {
	ahead := s.aheadOfBroker.Load()
	return ahead == 0 || (ahead < maxAheadOfBroker && s.aheadBytes.Load()+int64(n) <= maxAheadBytes)
}

const (
	localPending = iota
	localAcked   // the client has its ack; done only counts a failure
	localDone    // done ran before Publish returned: the session replies with err
)

var localAcks sync.Pool // *localAck; New is set in init (it refers to release)

func init() {
	localAcks.New = func() any {
		a := new(localAck)
		a.fn = a.done
		return a
	}
}

func (a *localAck) done(_ uint64, err error) {
	a.err = err
	if a.state.CompareAndSwap(localPending, localDone) {
		return // publishLocalAck reads err and recycles a
	}
	if err != nil {
		// Already acknowledged: counted (pub_errors), as the reference
		// emits an 'error' event the client never sees.
		a.s.e.stats.pubErrors.Add(1)
	}
	a.release()
}

// release ends a's count ahead of the broker and puts it back in the pool.
func (a *localAck) release() {
	a.s.aheadOfBroker.Add(-1)
	a.s.aheadBytes.Add(-a.n)
	a.s, a.err, a.n = nil, nil, 0
	a.state.Store(localPending)
	localAcks.Put(a)
}

func (s *Session) publishLocalAck(cid []byte, name string, data []byte) {
	e := s.e
	a := localAcks.Get().(*localAck)
	a.s, a.n = s, int64(len(data))
	e.stats.publishesIn.Add(1)
	s.aheadOfBroker.Add(1) // before Publish: done may run at once
	s.aheadBytes.Add(a.n)
	e.cfg.Broker.Publish(name, data, a.fn)
	if a.state.CompareAndSwap(localPending, localAcked) {
		s.replyOK(cid) // a belongs to done now
		return
	}
	err := a.err
	a.release()
	if err != nil {
		s.publishFailed(cid, err)
		return
	}
	s.replyOK(cid)
}

// publishFailed counts a publish its broker refused or lost and, for an
// invoke (cid set), answers it with the error.
func (s *Session) publishFailed(cid []byte, err error) {
	s.e.stats.pubErrors.Add(1)
	if cid != nil {
		s.replyError(cid, sc.NewError("BrokerError", "Failed to publish: "+err.Error()))
	}
}
