package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"sort"

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

// Channels lists the active channels. Only presence channels have an exact
// client count at the brokers (their presence entries); for the others the
// brokers know how many workers have subscribers, which is reported as a
// lower bound of the clients (see docs/api.md).
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
	out := make([]api.ChannelInfo, 0, len(list))
	for _, c := range list {
		if internal(c.Channel) != nil || c.Workers == 0 {
			continue
		}
		if pattern != "" && !pat.Match(c.Channel) {
			continue
		}
		n := c.Workers
		if b.e.channelOptions(c.Channel).Presence {
			n = c.Presence
		}
		out = append(out, api.ChannelInfo{Channel: c.Channel, NumClients: n})
	}
	return out, nil
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

// DisconnectIP closes the sessions from prefix on every worker.
func (b *APIBackend) DisconnectIP(ctx context.Context, prefix netip.Prefix, code int, reason string) (int, error) {
	return b.e.DisconnectIP(ctx, prefix, code, reason)
}
