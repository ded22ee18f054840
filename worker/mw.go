package worker

import (
	"net"
	"net/netip"

	"github.com/shoalhq/shoal/auth"
	"github.com/shoalhq/shoal/middleware"
	"github.com/shoalhq/shoal/proto/sc"
)

// Middleware in the session.
//
// Every inbound action that has rules goes through Chain.Run with the
// session's reused Input (no allocation when a synchronous rule allows).
// When a backend hook must decide, Run returns pending and calls s.decided
// later from the hook's goroutine. The socket's actions stay in order: while
// a decision is pending (busy), later packets are copied into a bounded
// per-session queue and processed by the goroutine that completes the
// decision. A client that floods past maxQueuedActions / maxQueuedBytes while
// it waits is closed with CodeMiddlewareBacklog (4101).

const (
	maxQueuedActions = 256
	maxQueuedBytes   = 1 << 20
)

// staleIdent is never a session's token: setting identTok to it makes the
// next syncIdentity rebuild the identity.
var staleIdent = &auth.Token{}

type step uint8

const (
	stepEvent step = iota + 1
	stepSubscribe
	stepPublish
	stepAuthenticate
	stepHandshakeAuth
	stepHandshakeSC
)

// pendingAction is what a pending decision's continuation needs. Only one
// action of a session is pending at a time (the rest wait in the queue).
type pendingAction struct {
	step     step
	p        sc.Packet // Event, CID and Data copied out of the frame
	channel  string
	tok      *auth.Token
	authErr  *sc.Error
	badToken bool
}

type queuedPacket struct {
	p   sc.Packet
	buf []byte
}

// copyPacket copies the parts of p the handlers read into one buffer.
func copyPacket(p *sc.Packet) (sc.Packet, []byte) {
	buf := make([]byte, 0, len(p.Event)+len(p.CID)+len(p.Data))
	buf = append(buf, p.Event...)
	buf = append(buf, p.CID...)
	buf = append(buf, p.Data...)
	ne, nc := len(p.Event), len(p.CID)
	cp := sc.Packet{Kind: p.Kind, Event: buf[:ne:ne], CID: buf[ne : ne+nc : ne+nc]}
	if p.Data != nil {
		cp.Data = buf[ne+nc:]
	}
	return cp, buf
}

// initMiddleware gives a new session its identity for the chain.
func (s *Session) initMiddleware(remote net.Addr) {
	sock := &middleware.Socket{ID: s.id, RemoteIP: addrIP(remote)}
	// UserChanged on a socket that was never opened only creates the
	// chain's per-socket state. Doing it now, before any other goroutine
	// sees the session, keeps that lazy creation from racing between the
	// read path and the fan-out (publishOut) or Closed.
	s.e.chain.Load().UserChanged(sock)
	s.ident.Store(sock)
	s.done = s.decided
}

// addrIP is the client's IP address, or the zero Addr.
func addrIP(a net.Addr) netip.Addr {
	switch v := a.(type) {
	case nil:
		return netip.Addr{}
	case *net.TCPAddr:
		ip, _ := netip.AddrFromSlice(v.IP)
		return ip.Unmap()
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// identityFrom fills the auth fields of a copy of base from tok.
func identityFrom(base *middleware.Socket, tok *auth.Token) *middleware.Socket {
	n := *base // shares the chain's per-socket state, as it must
	if tok != nil {
		n.Authenticated, n.Claims, n.UserID = true, tok.Claims, tok.Subject()
	} else {
		n.Authenticated, n.Claims, n.UserID = false, nil, ""
	}
	return &n
}

// wouldBe is the socket as it would be with tok (handshakeSC and
// authenticate see the identity the token would give).
func (s *Session) wouldBe(tok *auth.Token) *middleware.Socket {
	return identityFrom(s.ident.Load(), tok)
}

// syncIdentity makes ident reflect the session's token after a change of
// auth state (handshake, #authenticate, #removeAuthToken, expiry,
// SetAuthToken), and moves the conn_limit per-user count. Cheap when nothing
// changed: one pointer comparison.
func (s *Session) syncIdentity() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.token == s.identTok {
		return
	}
	n := identityFrom(s.ident.Load(), s.token)
	s.identTok, s.hookID = s.token, false
	if s.state < stateClosed {
		// The user registry follows the token's sub (users.go).
		var user string
		if s.token != nil {
			user = s.token.Subject()
		}
		s.e.setUser(s, s.user, user)
		s.user = user
	}
	s.ident.Store(n)
	if s.mwOpened && s.state < stateClosed {
		s.e.chain.Load().UserChanged(n)
	}
}

// adoptIdentity takes the identity a connect/authenticate hook returned. A
// token it gives that our keys verify becomes the session's token; else
// its user and claims override the identity the chain sees (override).
func (s *Session) adoptIdentity(tok *auth.Token, id *middleware.Identity) (*auth.Token, bool) {
	if id.Token != "" {
		if keys := s.e.keys.Load(); keys != nil {
			if t, err := keys.Verify(id.Token); err == nil {
				return t, false
			}
		}
		s.e.log.Warn("middleware hook returned a token the worker cannot verify; using its user and claims", "id", s.id)
	}
	return tok, id.UserID != "" || id.Claims != nil
}

// setHookIdentity makes the chain see the hook's user and claims.
func (s *Session) setHookIdentity(id *middleware.Identity) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := *s.ident.Load()
	n.Authenticated, n.Claims, n.UserID = true, id.Claims, id.UserID
	if n.UserID == "" {
		n.UserID, _ = id.Claims["sub"].(string)
	}
	s.identTok, s.hookID = s.token, true
	s.ident.Store(&n)
	if s.mwOpened && s.state < stateClosed {
		s.e.chain.Load().UserChanged(&n)
	}
}

// blockError is the error object for a deny (the rule's, or
// socketcluster-server's silent-block error when a rule gave none).
func blockError(d middleware.Decision, stage string) *sc.Error {
	if d.Error != nil {
		return d.Error
	}
	return sc.NewError("SilentMiddlewareBlockedError", "The action was blocked by "+stage+" middleware").
		WithString("type", stage)
}

// run puts in (from newInput) to the chain and returns it to the pool. It
// finishes the action at once, or saves what the continuation needs and
// reports pending.
func (s *Session) run(chain *middleware.Chain, in *middleware.Input, p *sc.Packet, pa pendingAction) bool {
	// pendMu is held across Run so a callback that fires before Run
	// returns waits until the context below is saved.
	s.pendMu.Lock()
	d, pending := chain.Run(in, s.done)
	if pending {
		// A copy, so that pa itself does not escape (the allowed path
		// stays free of allocation).
		saved := pa
		saved.p, _ = copyPacket(p)
		s.pend = &saved
	}
	s.pendMu.Unlock()
	// Run copied what a pending decision keeps.
	*in = middleware.Input{}
	s.e.inputs.Put(in)
	if pending {
		return true
	}
	return s.continueWith(p, pa, d)
}

// newInput returns a cleared Input from the engine's pool. Pooled rather
// than one per session: an Input is ~170 bytes and only needed during Run.
func (e *Engine) newInput() *middleware.Input {
	return e.inputs.Get().(*middleware.Input)
}

// continueWith applies a decision to its action; it reports whether the
// action went pending again (a handshake's authenticate step, then its
// handshakeSC step).
func (s *Session) continueWith(p *sc.Packet, pa pendingAction, d middleware.Decision) bool {
	switch d.Verdict {
	case middleware.Deny:
		s.e.stats.mwDenied.Add(1)
	case middleware.Drop:
		s.e.stats.mwDropped.Add(1)
	}
	switch pa.step {
	case stepEvent:
		s.finishEvent(p, d)
	case stepSubscribe:
		s.finishSubscribe(p, pa.channel, d)
	case stepPublish:
		data, ok := sc.Field(p.Data, "data")
		if !ok {
			data = []byte("null")
		}
		s.finishPublish(p, pa.channel, data, d)
	case stepAuthenticate:
		s.finishAuthenticate(p, pa.tok, nil, d)
	case stepHandshakeAuth:
		return s.handshakeAuthDecided(p, pa.tok, d)
	case stepHandshakeSC:
		s.finishHandshake(p, pa.tok, pa.authErr, pa.badToken, d)
	}
	return false
}

// decided is the chain's callback for a pending decision (another
// goroutine): finish that action, then the actions queued behind it.
func (s *Session) decided(d middleware.Decision) {
	s.pendMu.Lock()
	pa := s.pend
	s.pend = nil
	s.pendMu.Unlock()
	if pa == nil {
		return // cannot happen: Run calls back only after returning pending
	}
	p := pa.p
	if s.continueWith(&p, *pa, d) {
		s.e.stats.mwPending.Add(1)
		return
	}
	s.resume()
}

// dispatch handles p now, or queues it behind a pending decision. false
// stops processing the frame.
func (s *Session) dispatch(p *sc.Packet) bool {
	s.qmu.Lock()
	if s.busy {
		if len(s.queue) >= maxQueuedActions || s.queuedB+len(p.Data) > maxQueuedBytes {
			s.queue, s.queuedB = nil, 0
			s.qmu.Unlock()
			s.e.stats.mwBacklog.Add(1)
			s.e.log.Warn("closing socket: too many actions waiting for a middleware decision",
				"id", s.id, "remote", addrString(s.c.RemoteAddr()), "max", maxQueuedActions)
			s.close(CodeMiddlewareBacklog, "Too many actions waiting for middleware")
			return false
		}
		cp, buf := copyPacket(p)
		s.queue = append(s.queue, queuedPacket{p: cp, buf: buf})
		s.queuedB += len(buf)
		s.qmu.Unlock()
		return true
	}
	s.busy = true
	s.qmu.Unlock()
	ok, pending := s.packet(p)
	if pending {
		// The decision's callback owns the session's actions now.
		s.e.stats.mwPending.Add(1)
		return ok
	}
	s.qmu.Lock()
	s.busy = false
	s.qmu.Unlock()
	return ok
}

// resume processes queued packets in order until the queue is empty or one
// goes pending again. Each round takes one packet off a queue that holds at
// most maxQueuedActions.
func (s *Session) resume() {
	for {
		s.qmu.Lock()
		if len(s.queue) == 0 {
			s.queue, s.queuedB = nil, 0
			s.busy = false
			s.qmu.Unlock()
			return
		}
		q := s.queue[0]
		s.queue[0] = queuedPacket{}
		s.queue = s.queue[1:]
		s.queuedB -= len(q.buf)
		s.qmu.Unlock()
		ok, pending := s.packet(&q.p)
		if pending {
			s.e.stats.mwPending.Add(1)
			return
		}
		if !ok {
			s.qmu.Lock()
			s.queue, s.queuedB, s.busy = nil, 0, false
			s.qmu.Unlock()
			return
		}
	}
}

// dropQueued forgets queued actions and held publishes (session closed).
func (s *Session) dropQueued() {
	s.qmu.Lock()
	s.queue, s.queuedB = nil, 0
	s.qmu.Unlock()
	s.blMu.Lock()
	s.backlog = nil
	s.backlogged.Store(false)
	s.blMu.Unlock()
}

// isClosed reports whether the session ended (or is ending).
func (s *Session) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state >= stateClosing
}

// sentToken is the token string a #handshake carried ("" when none, or not
// a string).
func sentToken(p *sc.Packet) string {
	raw, ok := sc.Field(p.Data, "authToken")
	if !ok || sc.IsNull(raw) {
		return ""
	}
	str, ok := sc.String(raw)
	if !ok {
		return ""
	}
	return string(str)
}
