package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"time"

	"github.com/shoalhq/shoal/api"
	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/middleware"
)

// APIBackend is the worker's api.Backend: channel operations go to the
// brokers (cluster-wide by nature), user actions ride the internal
// "#user/<id>" channels (users.go) so they reach the user on any worker.
type APIBackend struct {
	e  *Engine
	bc *brokerclient.Client
}

var (
	_ api.Backend        = (*APIBackend)(nil)
	_ api.IPDisconnecter = (*APIBackend)(nil)
	_ api.InfoUpdater    = (*APIBackend)(nil)
	_ api.UserChanneler  = (*APIBackend)(nil)
)

// NewAPIBackend returns the backend of e's worker over its broker client.
func NewAPIBackend(e *Engine, bc *brokerclient.Client) *APIBackend {
	return &APIBackend{e: e, bc: bc}
}

// brokerErr maps a broker client error onto the API's error classes.
func brokerErr(what string, err error) error {
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return fmt.Errorf("%s: %w", what, err)
	case errors.Is(err, brokerclient.ErrNoBrokers), errors.Is(err, brokerclient.ErrBrokerDown),
		errors.Is(err, brokerclient.ErrLinkLost), errors.Is(err, brokerclient.ErrTimeout):
		return fmt.Errorf("%s: %w: %w", what, api.ErrUnavailable, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

func internal(channel string) error {
	if len(channel) > 0 && channel[0] == '#' {
		return fmt.Errorf("channel %q: %w: names starting with # are internal", channel, api.ErrInvalid)
	}
	return nil
}

// Publish publishes through the owning broker; the acknowledgement carries
// the offset and the epoch (PublishPos). A channel without history reports
// no epoch (its offsets are not kept, so there is no stream to resume).
func (b *APIBackend) Publish(ctx context.Context, channel string, data json.RawMessage) (api.StreamPosition, error) {
	if err := internal(channel); err != nil {
		return api.StreamPosition{}, err
	}
	type res struct {
		off, epoch uint64
		err        error
	}
	ch := make(chan res, 1)
	b.bc.PublishPos(channel, data, func(off, epoch uint64, err error) { ch <- res{off, epoch, err} })
	var r res
	select {
	case r = <-ch:
	case <-ctx.Done():
		return api.StreamPosition{}, brokerErr("publishing to "+channel, ctx.Err())
	}
	if r.err != nil {
		return api.StreamPosition{}, brokerErr("publishing to "+channel, r.err)
	}
	pos := api.StreamPosition{Offset: r.off}
	if b.e.channelOptions(channel).History() {
		pos.Epoch = brokerclient.FormatEpoch(r.epoch)
	}
	return pos, nil
}

// History reads a page from the channel's owner.
func (b *APIBackend) History(ctx context.Context, channel string, q api.HistoryQuery) (api.HistoryPage, error) {
	if err := internal(channel); err != nil {
		return api.HistoryPage{}, err
	}
	if !b.e.channelOptions(channel).History() {
		return api.HistoryPage{}, fmt.Errorf("channel %q: %w: no history configured for it", channel, api.ErrNotSupported)
	}
	var since uint64
	if q.Since != nil {
		since = q.Since.Offset
	}
	from, limit := since, q.Limit
	if q.Reverse {
		// The whole retained range, then its tail before since (history is
		// bounded by the channel's history.size).
		from, limit = 0, 0
	}
	page, err := b.bc.History(ctx, channel, from, limit)
	if err != nil {
		return api.HistoryPage{}, brokerErr("reading history of "+channel, err)
	}
	if q.Since != nil {
		if q.Since.Epoch != page.Epoch {
			return api.HistoryPage{}, fmt.Errorf("history of %q: epoch %q is not the stream's %q: %w", channel, q.Since.Epoch, page.Epoch, api.ErrUnrecoverablePosition)
		}
		if !q.Reverse && since < page.Offset && len(page.Messages) > 0 && page.Messages[0].Offset > since+1 {
			return api.HistoryPage{}, fmt.Errorf("history of %q: offset %d fell out of the retained history: %w", channel, since, api.ErrUnrecoverablePosition)
		}
	}
	msgs := page.Messages
	if q.Reverse {
		if q.Since != nil {
			// Before Since: drop it and what follows.
			k := sort.Search(len(msgs), func(i int) bool { return msgs[i].Offset >= since })
			msgs = msgs[:k]
		}
		if len(msgs) > q.Limit {
			msgs = msgs[len(msgs)-q.Limit:]
		}
		rev := make([]brokerclient.Message, len(msgs))
		for i, m := range msgs {
			rev[len(msgs)-1-i] = m
		}
		msgs = rev
	}
	out := api.HistoryPage{Top: api.StreamPosition{Offset: page.Offset, Epoch: page.Epoch}}
	out.Publications = make([]api.Publication, 0, len(msgs))
	for _, m := range msgs {
		out.Publications = append(out.Publications, api.Publication{Offset: m.Offset, Data: json.RawMessage(m.Data)})
	}
	return out, nil
}

func (b *APIBackend) presenceChannel(channel string) error {
	if err := internal(channel); err != nil {
		return err
	}
	if !b.e.channelOptions(channel).Presence {
		return fmt.Errorf("channel %q: %w: presence is not configured for it", channel, api.ErrNotSupported)
	}
	return nil
}

// Presence lists the channel's presence entries (its owner's).
func (b *APIBackend) Presence(ctx context.Context, channel string) ([]api.ClientInfo, error) {
	if err := b.presenceChannel(channel); err != nil {
		return nil, err
	}
	entries, err := b.bc.Presence(ctx, channel)
	if err != nil {
		return nil, brokerErr("reading presence of "+channel, err)
	}
	out := make([]api.ClientInfo, 0, len(entries))
	for _, e := range entries {
		out = append(out, api.ClientInfo{Client: e.Conn, User: e.User, ConnInfo: e.Info})
	}
	return out, nil
}

// PresenceStats counts the channel's clients and distinct users.
func (b *APIBackend) PresenceStats(ctx context.Context, channel string) (api.PresenceStats, error) {
	if err := b.presenceChannel(channel); err != nil {
		return api.PresenceStats{}, err
	}
	entries, err := b.bc.Presence(ctx, channel)
	if err != nil {
		return api.PresenceStats{}, brokerErr("reading presence of "+channel, err)
	}
	users := make(map[string]struct{}, len(entries))
	for _, e := range entries {
		if e.User != "" {
			users[e.User] = struct{}{}
		}
	}
	return api.PresenceStats{NumClients: len(entries), NumUsers: len(users)}, nil
}

// Channels lists the active channels with the number of subscribed
// sockets. The brokers know which workers have subscribers on each channel
// (not how many sockets); each of those workers is asked for its local
// counts over its "#reply/<name>" channel (socketCounts) and the answers
// are summed. A worker that does not answer within countWindow counts as
// one socket (a lower bound), or the channel's presence count when that is
// larger. Channels left with no socket are not listed.
func (b *APIBackend) Channels(ctx context.Context, pattern string) ([]api.ChannelInfo, error) {
	var pat middleware.ChannelPattern
	if pattern != "" {
		p, err := middleware.CompileChannelPattern(pattern)
		if err != nil {
			return nil, fmt.Errorf("pattern %q: %w: %w", pattern, api.ErrInvalid, err)
		}
		pat = p
	}
	list, err := b.bc.Channels(ctx)
	if err != nil {
		return nil, brokerErr("listing channels", err)
	}
	active := list[:0]
	byWorker := map[string][]string{}
	for _, c := range list {
		if internal(c.Channel) != nil || c.Workers == 0 {
			continue
		}
		if pattern != "" && !pat.Match(c.Channel) {
			continue
		}
		active = append(active, c)
		for _, w := range c.WorkerNames {
			if w != "" {
				byWorker[w] = append(byWorker[w], c.Channel)
			}
		}
	}
	counts, silent := b.e.socketCounts(ctx, byWorker)
	out := make([]api.ChannelInfo, 0, len(active))
	for _, c := range active {
		n := counts[c.Channel] + silent[c.Channel]
		if silent[c.Channel] > 0 && b.e.channelOptions(c.Channel).Presence {
			n = max(n, c.Presence)
		}
		if n > 0 {
			out = append(out, api.ChannelInfo{Channel: c.Channel, NumClients: n})
		}
	}
	return out, nil
}

// Socket counts (the API's channel list): control messages on the
// workers' reply channels, answered by countControl.
const (
	opCounts      = "counts"       // {"op","id","reply","channels":[...]}: count these channels' local sockets
	opCountsReply = "counts_reply" // {"op","id","counts":[...]}: in the request's order
	// countsChunk bounds the channels of one request, so a request and its
	// answer stay far below a link frame's size whatever the channel count.
	countsChunk = 1000
	// countWindow bounds the wait for the workers' answers; they come in a
	// few ms (one broker round trip each way).
	countWindow = time.Second
)

type countMsg struct {
	Op       string   `json:"op"`
	ID       string   `json:"id"`
	Reply    string   `json:"reply,omitempty"`
	Channels []string `json:"channels,omitempty"`
	Counts   []int    `json:"counts"`
}

// countControl handles a counts request (answers it) or answer (hands it to
// the waiting socketCounts) that arrived on this worker's reply channel.
func (e *Engine) countControl(op string, data []byte) {
	var m countMsg
	if err := json.Unmarshal(data, &m); err != nil || m.ID == "" {
		e.log.Warn("malformed counts message", "error", err)
		return
	}
	if op == opCounts {
		if m.Reply == "" {
			return
		}
		counts := make([]int, len(m.Channels))
		for i, ch := range m.Channels {
			counts[i] = e.hub.Subscribers(ch)
		}
		b, err := json.Marshal(countMsg{Op: opCountsReply, ID: m.ID, Counts: counts})
		if err != nil { // cannot happen: plain fields
			return
		}
		e.cfg.Broker.Publish(m.Reply, b, func(_ uint64, err error) {
			if err != nil {
				e.log.Warn("answering a socket count request", "error", err)
			}
		})
		return
	}
	e.users.rmu.Lock()
	ch := e.users.counts[m.ID]
	e.users.rmu.Unlock()
	if ch != nil {
		select {
		case ch <- m.Counts:
		default: // a second answer (duplicate worker name): the first counts
		}
	}
}

// socketCounts asks each worker of byWorker (name → channels where it has
// subscribers) for its local socket counts and sums them per channel.
// silent counts, per channel, the workers whose answer did not arrive
// within countWindow (or before ctx ended); this worker counts its own
// sockets directly.
func (e *Engine) socketCounts(ctx context.Context, byWorker map[string][]string) (counts, silent map[string]int) {
	counts, silent = map[string]int{}, map[string]int{}
	type req struct {
		worker string
		chans  []string
		id     string
		reply  chan []int
	}
	var reqs []*req
	for w, chans := range byWorker {
		if w == e.cfg.Name {
			for _, ch := range chans {
				counts[ch] += e.hub.Subscribers(ch)
			}
			continue
		}
		if e.cfg.Broker == nil {
			for _, ch := range chans {
				silent[ch]++
			}
			continue
		}
		for len(chans) > 0 {
			n := min(len(chans), countsChunk)
			reqs = append(reqs, &req{worker: w, chans: chans[:n], id: newRequestID(), reply: make(chan []int, 1)})
			chans = chans[n:]
		}
	}
	if len(reqs) == 0 {
		return counts, silent
	}
	e.users.rmu.Lock()
	if e.users.counts == nil {
		e.users.counts = map[string]chan []int{}
	}
	for _, r := range reqs {
		e.users.counts[r.id] = r.reply
	}
	e.users.rmu.Unlock()
	defer func() {
		e.users.rmu.Lock()
		for _, r := range reqs {
			delete(e.users.counts, r.id)
		}
		e.users.rmu.Unlock()
	}()
	for _, r := range reqs {
		b, err := json.Marshal(countMsg{Op: opCounts, ID: r.id, Reply: replyChannelPrefix + e.cfg.Name, Channels: r.chans})
		if err != nil {
			continue
		}
		e.cfg.Broker.Publish(replyChannelPrefix+r.worker, b, func(_ uint64, err error) {
			if err != nil {
				e.log.Debug("asking a worker for socket counts", "worker", r.worker, "error", err)
			}
		})
	}
	wait, cancel := context.WithTimeout(ctx, countWindow)
	defer cancel()
	for _, r := range reqs {
		var got []int
		select {
		case got = <-r.reply:
		case <-wait.Done():
			select { // the window is over: take only what already arrived
			case got = <-r.reply:
			default:
			}
		}
		if len(got) != len(r.chans) {
			for _, ch := range r.chans {
				silent[ch]++
			}
			continue
		}
		for i, ch := range r.chans {
			counts[ch] += got[i]
		}
	}
	return counts, silent
}

// Disconnect closes the user's sessions on every worker.
func (b *APIBackend) Disconnect(ctx context.Context, user string, code int, reason string) (int, error) {
	return b.e.DisconnectUser(ctx, user, code, reason)
}

// Unsubscribe kicks the user's sessions out of channel on every worker.
func (b *APIBackend) Unsubscribe(ctx context.Context, user, channel, reason string) (int, error) {
	if err := internal(channel); err != nil {
		return 0, err
	}
	return b.e.KickUser(ctx, user, channel, reason)
}

// PushToken signs claims here (or verifies a given token) and sends the
// signed token to the user's sessions on every worker.
func (b *APIBackend) PushToken(ctx context.Context, user string, t api.Token) (int, error) {
	keys := b.e.keys.Load()
	if keys == nil || !keys.Enabled() {
		return 0, fmt.Errorf("push_token: %w: no auth key configured (auth.jwt)", api.ErrNotSupported)
	}
	signed := t.Token
	if signed == "" {
		claims := make(map[string]any, len(t.Claims)+1)
		for k, v := range t.Claims {
			claims[k] = v
		}
		if _, ok := claims["sub"]; !ok {
			claims["sub"] = user
		}
		s, err := keys.Sign(claims)
		if err != nil {
			return 0, fmt.Errorf("push_token: signing: %w", err)
		}
		signed = s
	}
	tok, err := keys.Verify(signed)
	if err != nil {
		return 0, fmt.Errorf("push_token: %w: %w", api.ErrInvalid, err)
	}
	if tok.Subject() != user {
		return 0, fmt.Errorf("push_token: %w: the token's sub %q is not the user %q", api.ErrInvalid, tok.Subject(), user)
	}
	return b.e.PushToken(ctx, user, signed)
}

// UpdateInfo replaces the presence info of user's sessions on every worker.
func (b *APIBackend) UpdateInfo(ctx context.Context, user string, info json.RawMessage) (int, error) {
	return b.e.UpdateInfo(ctx, user, info)
}

// UserChannels lists the presence channels where user has a session (the
// brokers' presence entries; internal channels left out).
func (b *APIBackend) UserChannels(ctx context.Context, user string) ([]string, error) {
	chans, err := b.bc.UserChannels(ctx, user)
	if err != nil {
		return nil, brokerErr("listing the channels of user "+user, err)
	}
	out := chans[:0]
	for _, ch := range chans {
		if internal(ch) == nil {
			out = append(out, ch)
		}
	}
	return out, nil
}

// DisconnectIP closes the sessions from prefix on every worker.
func (b *APIBackend) DisconnectIP(ctx context.Context, prefix netip.Prefix, code int, reason string) (int, error) {
	return b.e.DisconnectIP(ctx, prefix, code, reason)
}
