// Package middleware is Shoal's configured rule engine: the `middleware:`
// section of the config compiled once into an immutable Chain that the worker
// asks, per action, whether to let it through.
//
// The model is socketcluster-server's (see the protocol reference, §7): three
// stages (handshake, inbound, outbound), each an ordered list of rules; the
// first rule that decides wins. A rule either passes (the next rule runs),
// allows (the chain stops, the action goes ahead), denies (the client gets an
// error object, or for handshakes an HTTP status or a close code) or drops
// (nothing is sent to the client). docs/middleware.md lists every rule.
//
// The worker owns sockets and the wire; this package owns decisions. It never
// writes to a connection.
package middleware

import (
	"net/http"
	"net/netip"

	"github.com/shoalhq/shoal/auth"
	"github.com/shoalhq/shoal/proto/sc"
)

// Action is what a client (or, for PublishOut, a broker) asks the worker to do.
type Action uint8

// The actions, named as socketcluster-server names its middleware actions.
const (
	HandshakeWS  Action = iota // HTTP upgrade: remote IP, Origin, headers, query
	HandshakeSC                // #handshake, after the token (if any) was verified
	Transmit                   // non-# transmit: Event, Data
	Invoke                     // non-# invoke: Event is the procedure, Data
	Subscribe                  // #subscribe: Channel, Data = the subscribe data field
	PublishIn                  // #publish from the client: Channel, Data
	Authenticate               // a verified token arriving by #handshake or #authenticate
	PublishOut                 // a publish about to be sent to Socket: Channel, Data
	numActions
)

var actionNames = [numActions]string{
	"handshakeWS", "handshakeSC", "transmit", "invoke", "subscribe", "publishIn", "authenticate", "publishOut",
}

func (a Action) String() string {
	if a < numActions {
		return actionNames[a]
	}
	return "unknown"
}

// Stage is a middleware stage: the config lists rules per stage.
type Stage uint8

// The stages.
const (
	StageHandshake Stage = iota
	StageInbound
	StageOutbound
	numStages
)

var stageNames = [numStages]string{"handshake", "inbound", "outbound"}

func (s Stage) String() string {
	if s < numStages {
		return stageNames[s]
	}
	return "unknown"
}

// Stage returns the stage an action belongs to.
func (a Action) Stage() Stage {
	switch a {
	case HandshakeWS, HandshakeSC:
		return StageHandshake
	case PublishOut:
		return StageOutbound
	}
	return StageInbound
}

var stageActions = [numStages][]Action{
	StageHandshake: {HandshakeWS, HandshakeSC},
	StageInbound:   {Transmit, Invoke, Subscribe, PublishIn, Authenticate},
	StageOutbound:  {PublishOut},
}

// Socket is the identity of one client connection, filled by the worker.
//
// Claims is read by rules (and, for hooks, by another goroutine): after the
// Socket is shown to the chain, replace the map on a change of auth state
// rather than mutating it. Keep one Socket per connection and pass its
// pointer: copies share the chain's per-socket state (buckets, counts).
type Socket struct {
	ID            string
	RemoteIP      netip.Addr
	Authenticated bool
	Claims        map[string]any // verified token claims (nil when unauthenticated)
	UserID        string         // the `sub` claim; "" when unauthenticated

	// state is the chain's per-socket memory (buckets, what Open counted).
	state *socketState
}

// Input is one action put to the chain. The worker may reuse one Input per
// socket (that keeps an allowed decision free of allocation); the chain
// copies what it keeps when a decision goes asynchronous.
type Input struct {
	Action  Action
	Socket  *Socket // nil only for HandshakeWS; there RemoteIP below is used
	Channel string  // Subscribe, PublishIn, PublishOut
	Event   string  // Transmit event name, or the Invoke procedure
	Data    []byte  // raw JSON of the action's data; nil when absent

	// Handshake fields (HandshakeWS; the worker may keep them for HandshakeSC).
	RemoteIP netip.Addr  // HandshakeWS: the client address (PROXY-v2 aware)
	Origin   string      // Origin header, "" when absent
	Header   http.Header // request headers, optional
	Query    string      // raw URL query, optional

	// Token is the signed token (HandshakeSC, Authenticate), passed to hooks.
	Token string
	// BadToken (HandshakeSC) is a token the client sent that auth.jwt
	// refused: jwt rules tell "no token" from "a bad one" with it. Hooks
	// do not get it.
	BadToken string
	// TokenRefusal is why auth.jwt refused BadToken, when the caller
	// already verified it (the worker): jwt rules name the reason without
	// verifying the token a second time. Nil: they verify it themselves.
	TokenRefusal *auth.Error
	// Hold (HandshakeWS, HandshakeSC, Authenticate), when set, receives the
	// places the conn_limit rules keep for this socket until it is counted:
	// the caller releases it once Chain.Open (or, for Authenticate,
	// Chain.UserChanged) counted the socket, or when the action was refused
	// or the socket went away. Nil: the check counts open sockets only.
	Hold *Hold
}

// ip returns the client address of the input.
func (in *Input) ip() netip.Addr {
	if in.Socket != nil && in.Socket.RemoteIP.IsValid() {
		return in.Socket.RemoteIP
	}
	return in.RemoteIP
}

// Verdict is the outcome of a decision.
type Verdict uint8

const (
	// Allow: the action goes ahead (with Decision.Data if set).
	Allow Verdict = iota
	// Deny: the client receives Decision.Error as the protocol says for
	// the action (see docs/middleware.md, "Wire effect").
	Deny
	// Drop: nothing is sent; the action is discarded silently. For
	// Subscribe the chain turns Drop into Deny, because the client has no
	// timeout on #subscribe and would wait forever.
	Drop
)

func (v Verdict) String() string {
	switch v {
	case Allow:
		return "allow"
	case Deny:
		return "deny"
	case Drop:
		return "drop"
	}
	return "unknown"
}

// Decision is the chain's answer for one Input. The zero Decision is Allow.
type Decision struct {
	Verdict Verdict
	// Rule names the rule that denied, dropped, or decided an allow
	// ("inbound[1].channels"); "" when every rule passed.
	Rule string
	// Error is the object the client receives on Deny (also set on Drop,
	// for logging). For HandshakeSC it carries statusCode = CloseCode.
	Error *sc.Error
	// HTTPStatus is the status to refuse the upgrade with (HandshakeWS Deny).
	HTTPStatus int
	// CloseCode is the WebSocket close code after a HandshakeSC Deny
	// (default 4008).
	CloseCode int
	// Data, when non-nil, replaces the action's data (a hook rewrote it).
	Data []byte
	// Reply, when non-nil, answers an Invoke: send {"rid":N,"data":Reply}
	// (raw JSON) instead of handling the procedure.
	Reply []byte
	// Identity, when non-nil, is the identity a connect/authenticate hook
	// gave the socket; the worker adopts it (and pushes Token with
	// #setAuthToken when set).
	Identity *Identity
}

// Identity is what a backend hook may set for a socket.
type Identity struct {
	UserID string
	Claims map[string]any
	Token  string // a signed token to push to the client with #setAuthToken
}
