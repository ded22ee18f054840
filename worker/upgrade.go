package worker

import (
	"context"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/shoalhq/shoal/middleware"
)

// CheckUpgrade runs the handshakeWS rules (cidr, origins, conn_limit per_ip,
// rate handshakes_per_ip, a hook with actions: [handshakeWS]) for an HTTP
// upgrade request. status 0 accepts; any other status refuses the upgrade
// with that HTTP status and reason (the rule's error message).
//
// It is meant for netpoll's upgrade hook, which runs synchronously on a pool
// goroutine: a hook rule blocks that goroutine for at most its own
// `timeout`, and the whole check is cut off after limit (the handshake
// timeout) in any case, so a slow backend costs one pool goroutine for a
// bounded time and answers 503 (BackendError) rather than hanging. Put a
// `rate: {handshakes_per_ip: ...}` rule before a hook so a flood cannot keep
// every pool goroutine waiting.
//
// info is what the session keeps of the request for the handshakeSC rules
// (origin, query, headers for a hook's forward_headers); it is nil when no
// handshakeSC rule exists, so an idle connection keeps no request headers.
func (e *Engine) CheckUpgrade(remote net.Addr, origin string, header http.Header, requestURI string, limit time.Duration) (info *UpgradeInfo, status int, reason string) {
	chain := e.chain.Load()
	var query string
	if i := strings.IndexByte(requestURI, '?'); i >= 0 {
		query = requestURI[i+1:]
	}
	if chain.HasRules(middleware.HandshakeSC) {
		info = &UpgradeInfo{Origin: origin, Query: query, Header: header}
	}
	if !chain.HasRules(middleware.HandshakeWS) {
		return info, 0, ""
	}
	// conn_limit per_ip keeps a place for the socket in hold until its
	// handshake is decided (Session.hold), so concurrent upgrades from one
	// address count each other.
	var hold *middleware.Hold
	if chain.WantsHold(middleware.HandshakeWS) {
		hold = &middleware.Hold{}
	}
	in := middleware.Input{Action: middleware.HandshakeWS, RemoteIP: addrIP(remote), Origin: origin, Header: header, Query: query, Hold: hold}
	ctx := context.Background()
	if limit > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, limit)
		defer cancel()
	}
	d := chain.Decide(ctx, &in)
	if d.Verdict == middleware.Allow {
		if hold != nil && hold.Kept() {
			if info == nil {
				info = &UpgradeInfo{}
			}
			info.hold = hold
		}
		return info, 0, ""
	}
	hold.Release()
	e.stats.mwDenied.Add(1)
	status = d.HTTPStatus
	if status == 0 {
		status = http.StatusForbidden
	}
	if d.Error != nil {
		reason = d.Error.Message
	}
	return nil, status, reason
}

// UpgradeInfo is the part of the upgrade request the handshakeSC rules see,
// and the conn_limit places the handshakeWS rules keep for the socket.
type UpgradeInfo struct {
	Origin string
	Query  string
	Header http.Header
	hold   *middleware.Hold
}

// Release gives back the conn_limit places of an upgrade that never became
// a session (netpoll calls it when the connection ends before OnOpen).
func (u *UpgradeInfo) Release() { u.hold.Release() }

// SetUpgrade gives the session its upgrade request (call before the first
// message); it is dropped once the handshake was decided. The session takes
// over its conn_limit places.
func (s *Session) SetUpgrade(info *UpgradeInfo) {
	s.pendMu.Lock()
	s.upgrade = info
	s.pendMu.Unlock()
	if info.hold != nil {
		s.mu.Lock()
		s.hold = info.hold
		s.mu.Unlock()
	}
}
