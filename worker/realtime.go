package worker

import (
	"encoding/json"
	"slices"
	"strconv"

	"github.com/shoalhq/shoal/api"
	"github.com/shoalhq/shoal/broker/chanopts"
	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/proto/sc"
)

// History, recovery and presence on the worker side (docs/history.md,
// "What the worker does with it").
//
// Wire shapes (all additions the official client ignores):
//
//	#publish on a history channel: {"event":"#publish","data":{"channel":C,"data":D,"offset":N,"epoch":"E"}}
//	#subscribe ack on a history channel: {"rid":R,"data":{"recovered":B,"epoch":"E","offset":N}}
//	after a subscribe that carried data.recover: {"event":"#recovery","data":{"channel":C,"recovered":B,"epoch":"E","offset":N}}
//	join/leave (join_leave rules): {"event":"#presence","data":{"channel":C,"join":ENTRY}} or "leave"

// RecoveryBroker is what recovery and presence need of the broker client
// beyond Broker; *brokerclient.Client implements it. An EngineConfig.Broker
// without it (test fakes) gets plain subscriptions and no presence.
type RecoveryBroker interface {
	SubscribeRecover(channel string, since uint64, epoch string, done func(brokerclient.RecoverResult, error))
	PresenceJoin(channel string, e brokerclient.PresenceEntry) error
	PresenceLeave(channel, conn string)
}

var _ RecoveryBroker = (*brokerclient.Client)(nil)

// recoveryBroker returns the broker's recovery capability, or nil.
func (e *Engine) recoveryBroker() RecoveryBroker {
	rb, _ := e.cfg.Broker.(RecoveryBroker)
	return rb
}

// channelOptions are the channel's history/presence options (first
// matching `channels:` rule). Lookup does not allocate.
func (e *Engine) channelOptions(channel string) chanopts.Options {
	return e.rules.Load().Lookup(channel)
}

// appendPublishPos appends a #publish carrying the broker's position: the
// plain sc.AppendPublish with its data object reopened for offset and epoch.
// The epoch is formatted into the frame directly (base 36, as
// brokerclient.FormatEpoch), so nothing is allocated per message.
func appendPublishPos(dst []byte, channel string, data []byte, offset, epoch uint64) []byte {
	dst = sc.AppendPublish(dst, channel, data)
	dst = dst[:len(dst)-len("}}")]
	dst = append(dst, `,"offset":`...)
	dst = strconv.AppendUint(dst, offset, 10)
	dst = append(dst, `,"epoch":"`...)
	dst = strconv.AppendUint(dst, epoch, 36)
	return append(dst, `"}}`...)
}

// appendPosition appends {"recovered":B,"epoch":"E","offset":N}.
func appendPosition(dst []byte, channel string, res brokerclient.RecoverResult) []byte {
	dst = append(dst, '{')
	if channel != "" {
		dst = append(dst, `"channel":`...)
		dst = sc.AppendString(dst, channel)
		dst = append(dst, ',')
	}
	dst = append(dst, `"recovered":`...)
	dst = strconv.AppendBool(dst, res.Recovered)
	dst = append(dst, `,"epoch":`...)
	dst = sc.AppendString(dst, res.Epoch)
	dst = append(dst, `,"offset":`...)
	dst = strconv.AppendUint(dst, res.Offset, 10)
	return append(dst, '}')
}

// recoverRequest reads data.recover {"offset":N,"epoch":"E"} from a
// #subscribe's data; ok is false when the subscribe carries none.
func recoverRequest(subData []byte) (offset uint64, epoch string, ok bool) {
	sd, found := sc.Field(subData, "data")
	if !found {
		return 0, "", false
	}
	rec, found := sc.Field(sd, "recover")
	if !found || sc.IsNull(rec) {
		return 0, "", false
	}
	if raw, found := sc.Field(rec, "offset"); found {
		// A malformed offset is 0: the broker answers recovered=false.
		offset, _ = strconv.ParseUint(string(raw), 10, 64)
	}
	if ep, found := sc.StringField(rec, "epoch"); found {
		epoch = string(ep)
	}
	return offset, epoch, true
}

// subscribeRecover registers the socket's subscription through the
// broker's recovery path: the ack carries the channel's position; for a
// subscribe with data.recover the socket then gets #recovery, the missed
// messages in order, and only then joins the local fan-out. done runs on
// the broker link's reader goroutine before any later publication of the
// channel is delivered, which is what makes the seam exact. The channel is
// already reserved in s.channels by the caller.
func (s *Session) subscribeRecover(rb RecoveryBroker, name string, cid []byte, since uint64, epoch string, recover bool) {
	e := s.e
	rb.SubscribeRecover(name, since, epoch, func(res brokerclient.RecoverResult, err error) {
		if err != nil {
			// The interest stays registered (re-sent when the owner's link
			// comes up): the socket gets live messages, without recovery.
			e.log.Warn("recovery subscribe failed", "channel", name, "error", err)
			res = brokerclient.RecoverResult{}
		}
		pos := appendPosition(nil, "", res)
		s.reply(func(b []byte) []byte { return sc.AppendResponse(b, cid, pos) })
		if recover {
			ev := appendPosition(nil, name, res)
			s.reply(func(b []byte) []byte { return sc.AppendEvent(b, "#recovery", ev) })
			if res.Recovered {
				ep := brokerclient.ParseEpoch(res.Epoch)
				for _, m := range res.Messages {
					s.reply(func(b []byte) []byte { return appendPublishPos(b, name, m.Data, m.Offset, ep) })
				}
			}
		}
		s.mu.Lock()
		_, still := s.channels[name]
		added := false
		if still && s.state == stateOpen {
			added = e.hub.add(name, s)
			if added {
				e.stats.subscriptions.Add(1)
				s.presenceJoinLocked(name)
			}
		}
		s.mu.Unlock()
		if added {
			return
		}
		// Closed or unsubscribed meanwhile: drop the worker-level interest
		// SubscribeRecover registered unless another socket holds it.
		e.hub.release(name)
	})
}

// presenceJoinLocked announces the session on a presence channel. Called
// under s.mu together with the hub add, so a concurrent close (which marks
// the session closed under s.mu, then leaves) always leaves after the join:
// no entry outlives its socket.
func (s *Session) presenceJoinLocked(channel string) {
	rb := s.e.recoveryBroker()
	if rb == nil || !s.e.channelOptions(channel).Presence {
		return
	}
	ent := brokerclient.PresenceEntry{Conn: s.id, User: s.user, Worker: s.e.cfg.Name, Info: s.presenceInfoLocked()}
	if err := rb.PresenceJoin(channel, ent); err != nil {
		s.e.log.Warn("presence join failed", "channel", channel, "error", err)
	}
}

// maxPresenceInfo bounds a presence entry's info: every presence list
// carries it for every client. It is the API's update_info bound, so the
// token's claim and the API's info have one limit.
const maxPresenceInfo = api.MaxInfoLen

// presenceInfoLocked is the info of the session's presence entries (the
// API's conn_info): what the server API's update_info set for its user, or
// else the token's "info" claim (as in Centrifugo's connection token); nil
// without either, or when it is larger than maxPresenceInfo. Under s.mu.
func (s *Session) presenceInfoLocked() json.RawMessage {
	if s.user != "" {
		if info := s.e.userInfo(s.user); info != nil {
			return info
		}
	}
	if s.token == nil {
		return nil
	}
	v, ok := s.token.Claims["info"]
	if !ok || v == nil {
		return nil
	}
	b, err := json.Marshal(v)
	if err != nil || len(b) > maxPresenceInfo {
		s.e.log.Debug("token info claim not used for presence", "bytes", len(b), "error", err)
		return nil
	}
	return b
}

// setUserInfo records (or, with null/empty, forgets) the API's presence
// info for user's sessions on this worker.
func (e *Engine) setUserInfo(user string, info json.RawMessage) {
	u := &e.users
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(info) == 0 || string(info) == "null" {
		delete(u.info, user)
		return
	}
	if _, hosted := u.m[user]; !hosted {
		return
	}
	if u.info == nil {
		u.info = map[string]json.RawMessage{}
	}
	u.info[user] = slices.Clone(info)
}

func (e *Engine) userInfo(user string) json.RawMessage {
	e.users.mu.Lock()
	defer e.users.mu.Unlock()
	return e.users.info[user]
}

// presenceUpdater is the broker client's PresenceUpdate.
type presenceUpdater interface {
	PresenceUpdate(channel string, e brokerclient.PresenceEntry) error
}

// refreshPresence re-announces the session's presence entries with its
// current info (update_info). Only channels where it is in the local
// fan-out have an entry (the join happens with the hub add, under s.mu).
func (s *Session) refreshPresence() {
	pu, ok := s.e.cfg.Broker.(presenceUpdater)
	if !ok {
		return
	}
	var arr [64]*Session
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state != stateOpen {
		return
	}
	info := s.presenceInfoLocked()
	for ch := range s.channels {
		if !s.e.channelOptions(ch).Presence || !slices.Contains(s.e.hub.subscribers(arr[:0], ch), s) {
			continue
		}
		ent := brokerclient.PresenceEntry{Conn: s.id, User: s.user, Worker: s.e.cfg.Name, Info: info}
		if err := pu.PresenceUpdate(ch, ent); err != nil {
			s.e.log.Warn("presence update failed", "channel", ch, "error", err)
		}
	}
}

// presenceLeave withdraws the session from a presence channel. A channel
// whose presence option a reload turned off since the join is left too
// when the link drops (the broker removes a link's entries).
func (s *Session) presenceLeave(channel string) {
	rb := s.e.recoveryBroker()
	if rb == nil || !s.e.channelOptions(channel).Presence {
		return
	}
	rb.PresenceLeave(channel, s.id)
}

// JoinLeave is the broker client's OnJoinLeave: the entry goes to the
// channel's local subscribers as a #presence event, framed once.
func (e *Engine) JoinLeave(channel string, join bool, entry []byte) {
	if e.hub.Subscribers(channel) == 0 {
		return
	}
	key := `,"leave":`
	if join {
		key = `,"join":`
	}
	payload := make([]byte, 0, 64+len(channel)+len(entry))
	payload = append(payload, `{"event":"#presence","data":{"channel":`...)
	payload = sc.AppendString(payload, channel)
	payload = append(payload, key...)
	payload = append(payload, entry...)
	payload = append(payload, "}}"...)
	frame := e.cfg.Frame(make([]byte, 0, len(payload)+14), payload)
	n := e.hub.fanout(channel, frame, e.policyFor(channel), e.overflow)
	e.stats.msgsOut.Add(int64(n))
}

// Resync is the broker client's OnResync: the worker's own link to a
// history channel's owner dropped and came back. When the gap could not be
// filled, every local socket of the channel missed messages: they are
// kicked out of it (#kickOut), so a recovering client resubscribes with
// its own position and learns recovered=false instead of silently missing
// messages.
func (e *Engine) Resync(channel string, res brokerclient.RecoverResult, err error) {
	if err == nil && res.Recovered {
		return
	}
	var arr [64]*Session
	subs := e.hub.subscribers(arr[:0], channel)
	e.log.Warn("worker-level recovery failed; kicking the channel's sockets so they recover themselves",
		"channel", channel, "sockets", len(subs), "error", err)
	for _, s := range subs {
		s.KickOut(channel, "Missed messages could not be recovered; subscribe again")
	}
}
