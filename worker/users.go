package worker

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/gobwas/ws"

	"github.com/shoalhq/shoal/auth"
	"github.com/shoalhq/shoal/proto/sc"
)

// Cluster-wide user actions (docs/api.md, "Cluster-wide user actions").
//
// Every worker keeps worker-level broker interest in the internal channel
// "#user/<id>" for each user (token sub) it hosts, while it hosts them, and
// in "#reply/<worker name>" and "#bans" for its whole life. The HTTP API's
// worker publishes a control message to "#user/<id>"; the broker delivers
// it once to every worker hosting the user, which applies it to its local
// sessions and publishes how many it touched to the asker's reply channel.
// Clients can neither subscribe nor publish to "#" channels.

// Internal channel names.
const (
	userChannelPrefix  = "#user/"
	replyChannelPrefix = "#reply/"
	bansChannel        = "#bans"
)

// replyWindow is how long a cluster-wide user action collects the counts
// of the workers that applied it. The workers hosting the user are not
// known in advance, so the window is fixed; replies come in a few ms.
const replyWindow = 250 * time.Millisecond

// ctrlMsg is a message on an internal channel.
type ctrlMsg struct {
	Op      string    `json:"op"`               // disconnect | kick | token | ban | unban | disconnect_ip | sync
	ID      string    `json:"id,omitempty"`     // request id, for the reply
	Reply   string    `json:"reply,omitempty"`  // reply channel ("" = no reply wanted)
	From    string    `json:"from,omitempty"`   // worker that sent it
	Code    int       `json:"code,omitempty"`   // close code (disconnect)
	Reason  string    `json:"reason,omitempty"` // close reason / kick message
	Channel string    `json:"channel,omitempty"`
	Token   string    `json:"token,omitempty"` // signed token (token)
	Prefix  string    `json:"prefix,omitempty"`
	Bans    []wireBan `json:"bans,omitempty"`
	N       int       `json:"n"` // a reply's count
	// Info is the presence info of an "info" op (null: back to the
	// token's "info" claim).
	Info json.RawMessage `json:"info,omitempty"`
	// A "snapshot" of the ban log (bans.go): the offset it folds up to,
	// and its part of a snapshot split over several messages.
	Base  uint64 `json:"base,omitempty"`
	Part  int    `json:"part,omitempty"`
	Parts int    `json:"parts,omitempty"`
}

// users maps user ids (token sub) to this worker's sessions of them.
type users struct {
	mu sync.Mutex
	m  map[string]map[*Session]struct{}

	rmu     sync.Mutex
	replies map[string]chan int // request id → counts from workers
	// counts: request id → per-channel socket counts from workers (the
	// API's channel list, apibackend.go); under rmu.
	counts map[string]chan []int

	// info: presence info set by the API's update_info for users hosted
	// here (realtime.go); under mu, dropped with the user's last session.
	info map[string]json.RawMessage
}

// setUser moves s from user old to user new in the registry. Called under
// s.mu (lock order Session.mu → users.mu → broker), so the moves of one
// session are applied in order.
func (e *Engine) setUser(s *Session, old, new string) {
	if old == new {
		return
	}
	u := &e.users
	u.mu.Lock()
	defer u.mu.Unlock()
	if old != "" {
		if set := u.m[old]; set != nil {
			delete(set, s)
			if len(set) == 0 {
				delete(u.m, old)
				delete(u.info, old)
				if e.cfg.Broker != nil {
					e.cfg.Broker.Unsubscribe(userChannelPrefix + old)
				}
				e.clusterEvent(clusterEvent{user: true, key: old})
			}
		}
	}
	if new != "" {
		set := u.m[new]
		if set == nil {
			set = make(map[*Session]struct{}, 1)
			u.m[new] = set
			if e.cfg.Broker != nil {
				e.cfg.Broker.Subscribe(userChannelPrefix + new)
			}
			e.clusterEvent(clusterEvent{user: true, key: new, up: true})
		}
		set[s] = struct{}{}
	}
}

// userSessions returns this worker's sessions of user.
func (e *Engine) userSessions(user string) []*Session {
	u := &e.users
	u.mu.Lock()
	defer u.mu.Unlock()
	out := make([]*Session, 0, len(u.m[user]))
	for s := range u.m[user] {
		out = append(out, s)
	}
	return out
}

// Users is the number of distinct users with a session on this worker.
func (e *Engine) Users() int {
	e.users.mu.Lock()
	defer e.users.mu.Unlock()
	return len(e.users.m)
}

// occupied is the hub's callback: channel webhooks (clusterevents.go).
func (e *Engine) occupied(channel string, occupied bool) {
	e.clusterEvent(clusterEvent{key: channel, up: occupied})
}

// StartControl registers the worker's permanent internal interests (its
// reply channel and the ban channel) and asks the other workers for the
// bans they hold, so a restarted worker enforces them too.
func (e *Engine) StartControl() {
	if e.cfg.Broker == nil {
		return
	}
	e.cfg.Broker.Subscribe(replyChannelPrefix + e.cfg.Name)
	e.cfg.Broker.Subscribe(bansChannel)
	e.startBans()
}

func (e *Engine) publishControl(channel string, c ctrlMsg) {
	b, err := json.Marshal(c)
	if err != nil { // cannot happen: plain fields
		e.log.Error("encoding control message", "error", err)
		return
	}
	e.cfg.Broker.Publish(channel, b, func(_ uint64, err error) {
		if err != nil {
			e.log.Warn("publishing control message", "channel", channel, "op", c.Op, "error", err)
		}
	})
}

// deliverControl handles a message on an internal channel (Deliver).
func (e *Engine) deliverControl(channel string, data []byte) {
	var c ctrlMsg
	if err := json.Unmarshal(data, &c); err != nil {
		e.log.Warn("malformed control message", "channel", channel, "error", err)
		return
	}
	switch {
	case strings.HasPrefix(channel, replyChannelPrefix) && (c.Op == opCounts || c.Op == opCountsReply):
		e.countControl(c.Op, data)
		return
	case strings.HasPrefix(channel, replyChannelPrefix):
		e.users.rmu.Lock()
		ch := e.users.replies[c.ID]
		e.users.rmu.Unlock()
		if ch != nil {
			select {
			case ch <- c.N:
			default: // more replies than the buffer: the window is over anyway
			}
		}
		return
	case channel == bansChannel:
		e.applyBanControl(c)
		return
	case strings.HasPrefix(channel, userChannelPrefix):
		n := e.applyUserControl(channel[len(userChannelPrefix):], c)
		if c.Reply != "" && c.ID != "" {
			e.publishControl(c.Reply, ctrlMsg{Op: "reply", ID: c.ID, N: n})
		}
	}
}

// applyUserControl applies a cluster-wide user action to the local
// sessions of user and returns how many it affected.
func (e *Engine) applyUserControl(user string, c ctrlMsg) int {
	n := 0
	var tok *auth.Token
	if c.Op == "token" {
		keys := e.keys.Load()
		if keys == nil {
			e.log.Warn("pushed token ignored: no auth keys configured")
			return 0
		}
		t, err := keys.Verify(c.Token)
		if err != nil {
			e.log.Warn("pushed token ignored: it does not verify here", "error", err)
			return 0
		}
		tok = t
	}
	if c.Op == "info" {
		e.setUserInfo(user, c.Info)
	}
	for _, s := range e.userSessions(user) {
		switch c.Op {
		case "disconnect":
			s.close(ws.StatusCode(c.Code), c.Reason)
			n++
		case "kick":
			if s.KickOut(c.Channel, c.Reason) {
				n++
			}
		case "token":
			if s.setSignedToken(c.Token, tok) {
				n++
			}
		case "info":
			s.refreshPresence()
			n++
		}
	}
	return n
}

// userAction publishes c to the user's channel and sums the counts the
// workers report within replyWindow (or until ctx ends).
func (e *Engine) userAction(ctx context.Context, user string, c ctrlMsg) (int, error) {
	if e.cfg.Broker == nil {
		return e.applyUserControl(user, c), nil
	}
	return e.collect(ctx, userChannelPrefix+user, c)
}

// newRequestID returns a random id matching a control request to its replies.
func newRequestID() string {
	var id [12]byte
	_, _ = rand.Read(id[:]) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(id[:])
}

// collect publishes c on channel asking for replies and sums them.
func (e *Engine) collect(ctx context.Context, channel string, c ctrlMsg) (int, error) {
	c.ID = newRequestID()
	c.Reply = replyChannelPrefix + e.cfg.Name
	c.From = e.cfg.Name
	ch := make(chan int, 256)
	e.users.rmu.Lock()
	if e.users.replies == nil {
		e.users.replies = make(map[string]chan int)
	}
	e.users.replies[c.ID] = ch
	e.users.rmu.Unlock()
	defer func() {
		e.users.rmu.Lock()
		delete(e.users.replies, c.ID)
		e.users.rmu.Unlock()
	}()
	b, err := json.Marshal(c)
	if err != nil {
		return 0, fmt.Errorf("encoding %s: %w", c.Op, err)
	}
	pubErr := make(chan error, 1)
	e.cfg.Broker.Publish(channel, b, func(_ uint64, err error) { pubErr <- err })
	select {
	case err := <-pubErr:
		if err != nil {
			return 0, fmt.Errorf("publishing %s to %s: %w", c.Op, channel, err)
		}
	case <-ctx.Done():
		return 0, fmt.Errorf("publishing %s to %s: %w", c.Op, channel, ctx.Err())
	}
	t := time.NewTimer(replyWindow)
	defer t.Stop()
	n := 0
	for {
		select {
		case k := <-ch:
			n += k
		case <-t.C:
			return n, nil
		case <-ctx.Done():
			return n, nil
		}
	}
}

// DisconnectUser closes every session of user in the cluster.
func (e *Engine) DisconnectUser(ctx context.Context, user string, code int, reason string) (int, error) {
	return e.userAction(ctx, user, ctrlMsg{Op: "disconnect", Code: code, Reason: reason})
}

// KickUser removes every session of user in the cluster from channel.
func (e *Engine) KickUser(ctx context.Context, user, channel, reason string) (int, error) {
	return e.userAction(ctx, user, ctrlMsg{Op: "kick", Channel: channel, Reason: reason})
}

// UpdateInfo replaces the presence info of every session of user in the
// cluster (null: back to each token's "info" claim).
func (e *Engine) UpdateInfo(ctx context.Context, user string, info json.RawMessage) (int, error) {
	return e.userAction(ctx, user, ctrlMsg{Op: "info", Info: info})
}

// PushToken sends a signed token to every session of user in the cluster.
func (e *Engine) PushToken(ctx context.Context, user, signed string) (int, error) {
	return e.userAction(ctx, user, ctrlMsg{Op: "token", Token: signed})
}

// DisconnectIP closes every session in the cluster whose address is in prefix.
func (e *Engine) DisconnectIP(ctx context.Context, prefix netip.Prefix, code int, reason string) (int, error) {
	c := ctrlMsg{Op: "disconnect_ip", Prefix: prefix.String(), Code: code, Reason: reason}
	if e.cfg.Broker == nil {
		return e.disconnectLocal(func(s *Session) bool { return prefix.Contains(s.remoteIP()) }, code, reason), nil
	}
	return e.collect(ctx, bansChannel, c)
}

// disconnectLocal closes the local sessions match selects.
func (e *Engine) disconnectLocal(match func(*Session) bool, code int, reason string) int {
	var victims []*Session
	for i := range e.sessions {
		sh := &e.sessions[i]
		sh.mu.RLock()
		for _, s := range sh.m {
			if match(s) {
				victims = append(victims, s)
			}
		}
		sh.mu.RUnlock()
	}
	for _, s := range victims {
		s.close(ws.StatusCode(code), reason)
	}
	return len(victims)
}

// remoteIP is the client's address (from the PROXY header on the TLS path).
func (s *Session) remoteIP() netip.Addr {
	return addrIP(s.c.RemoteAddr()).Unmap()
}

// setSignedToken makes tok (the verified form of signed) the session's
// token and sends it with #setAuthToken; false if the session is not open.
func (s *Session) setSignedToken(signed string, tok *auth.Token) bool {
	s.mu.Lock()
	if s.state != stateOpen {
		s.mu.Unlock()
		return false
	}
	s.token = tok
	s.mu.Unlock()
	s.syncIdentity()
	s.send(sc.AppendSetAuthToken(nil, signed))
	return true
}
