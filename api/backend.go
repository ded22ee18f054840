package api

import (
	"context"
	"encoding/json"
	"net/netip"
	"time"
)

// Backend is what the API needs of a worker. The worker implements it over
// its Engine (local sessions) and the broker client (channels, history,
// presence). Every method must honour ctx (the API gives each request a
// deadline) and be safe for concurrent use.
//
// Errors: wrap ErrNotFound, ErrUnavailable, ErrUnrecoverablePosition,
// ErrNotSupported or ErrInvalid (with %w) to choose the HTTP status; any
// other error is answered 500 with its message.
//
// Cluster scope: Publish, History, Presence, PresenceStats and Channels are
// cluster-wide by nature (they go to the owning broker). Disconnect,
// Unsubscribe and PushToken must reach the user on whichever worker hosts
// them; see docs/api.md "Cluster-wide user actions" for how this rides on
// pub/sub. The count they return is the number of sessions acted on where
// known (a worker that only forwards the action may return -1: unknown).
type Backend interface {
	// Publish sends data (valid JSON, already checked) to channel through the
	// owning broker and returns the position the broker assigned.
	Publish(ctx context.Context, channel string, data json.RawMessage) (StreamPosition, error)
	// History returns one page of the channel's history (see HistoryQuery).
	History(ctx context.Context, channel string, q HistoryQuery) (HistoryPage, error)
	// Presence lists the clients subscribed to channel (a presence channel).
	Presence(ctx context.Context, channel string) ([]ClientInfo, error)
	// PresenceStats counts clients and distinct users in channel.
	PresenceStats(ctx context.Context, channel string) (PresenceStats, error)
	// Channels lists active channels whose name matches pattern (the config's
	// glob syntax: "*" within one segment, "**" across segments; "" = all),
	// with their subscriber counts.
	Channels(ctx context.Context, pattern string) ([]ChannelInfo, error)
	// Disconnect closes every connection of user with the WebSocket close
	// code and reason.
	Disconnect(ctx context.Context, user string, code int, reason string) (int, error)
	// Unsubscribe removes user's sessions from channel and tells each client
	// with #kickOut carrying reason.
	Unsubscribe(ctx context.Context, user, channel, reason string) (int, error)
	// PushToken sends a token to every session of user with #setAuthToken:
	// either a pre-signed token (verified by the worker's auth keys) or claims
	// that the worker signs (Session.SetAuthToken).
	PushToken(ctx context.Context, user string, t Token) (int, error)
}

// InfoUpdater is an optional Backend capability (the update_info method;
// without it the method answers 501): it replaces the presence info
// (conn_info) of every session of user in the cluster and returns how
// many sessions it reached. info is a JSON value; null goes back to each
// session's own info (its token's "info" claim).
type InfoUpdater interface {
	UpdateInfo(ctx context.Context, user string, info json.RawMessage) (int, error)
}

// UserChanneler is an optional Backend capability (the user_channels
// method; without it the method answers 501): the presence channels where
// user has at least one session, sorted.
type UserChanneler interface {
	UserChannels(ctx context.Context, user string) ([]string, error)
}

// IPDisconnecter is an optional Backend capability, found by type
// assertion: when it is present, banning an IP or CIDR also closes the
// connections that come from it.
type IPDisconnecter interface {
	DisconnectIP(ctx context.Context, prefix netip.Prefix, code int, reason string) (int, error)
}

// StreamPosition is a place in a channel's stream: the broker's epoch (it
// changes when the stream's history is lost and restarted) and offset.
type StreamPosition struct {
	Offset uint64 `json:"offset"`
	Epoch  string `json:"epoch"`
}

// HistoryQuery selects a page of history. With Since nil the page starts
// at the oldest (or, with Reverse, the newest) retained publication. With
// Since set, the page starts just after Since.Offset (before it with
// Reverse); an epoch that is not the stream's current one is answered with
// ErrUnrecoverablePosition. Limit is at least 1 (the API applies its
// default and maximum).
type HistoryQuery struct {
	Since   *StreamPosition
	Limit   int
	Reverse bool
}

// Publication is one message of a channel's history.
type Publication struct {
	Offset uint64          `json:"offset"`
	Data   json.RawMessage `json:"data"`
}

// HistoryPage is one page of history and the stream's current top.
type HistoryPage struct {
	Publications []Publication
	// Top is the stream's latest position (offset of the newest publication
	// and the epoch), so a caller can tell where the stream is.
	Top StreamPosition
}

// ClientInfo is one connection in a channel's presence.
type ClientInfo struct {
	Client   string          `json:"client"` // connection (socket) id
	User     string          `json:"user"`   // token sub; "" when anonymous
	ConnInfo json.RawMessage `json:"conn_info,omitempty"`
	ChanInfo json.RawMessage `json:"chan_info,omitempty"`
}

// PresenceStats counts a channel's presence.
type PresenceStats struct {
	NumClients int `json:"num_clients"`
	NumUsers   int `json:"num_users"`
}

// ChannelInfo is one active channel.
type ChannelInfo struct {
	Channel    string `json:"-"`
	NumClients int    `json:"num_clients"`
}

// Token is what push_token sends: exactly one of Token and Claims is set.
type Token struct {
	Token  string         // a signed JWT, verified before it is sent
	Claims map[string]any // claims the worker signs with its key
}

// Ban bars a user or an address range from connecting.
type Ban struct {
	User   string       `json:"user,omitempty"`
	IP     netip.Prefix `json:"-"`
	Reason string       `json:"reason,omitempty"`
	// Created is when the ban was stored; Expires is zero for a permanent ban.
	Created time.Time `json:"created"`
	Expires time.Time `json:"-"`
}

// BanTarget names what a ban applies to: a user, or an address (a single
// IP is a /32 or /128 prefix).
type BanTarget struct {
	User string
	IP   netip.Prefix
}

// BanStore keeps bans. MemoryBans is the in-process implementation; a
// persistent, cluster-wide one (bbolt on the brokers, or a broker channel
// every worker follows) implements the same interface. The handshake
// middleware consults Banned; the API only writes.
type BanStore interface {
	Ban(ctx context.Context, b Ban) error
	// Unban removes the ban on target and reports whether there was one.
	Unban(ctx context.Context, target BanTarget) (bool, error)
	// Bans lists the bans in force.
	Bans(ctx context.Context) ([]Ban, error)
}
