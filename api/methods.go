package api

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"time"
	"unicode/utf8"
)

// Request and answer bodies of each method. Field names follow
// Centrifugo's server API where it has the same method.

type publishRequest struct {
	Channel        string          `json:"channel"`
	Data           json.RawMessage `json:"data"`
	IdempotencyKey string          `json:"idempotency_key"`
}

type publishResult struct {
	Offset uint64 `json:"offset"`
	Epoch  string `json:"epoch"`
	// Replayed is true when the result is the remembered one of an earlier
	// publish with the same idempotency key (nothing was published now).
	Replayed bool `json:"replayed,omitempty"`
}

func (h *Handler) publish(ctx context.Context, _ *http.Request, body []byte) (any, *Error) {
	var req publishRequest
	if e := decode(body, &req); e != nil {
		return nil, e
	}
	if e := checkChannel("channel", req.Channel); e != nil {
		return nil, e
	}
	if e := checkData(req.Data); e != nil {
		return nil, e
	}
	if e := checkIdemKey(req.IdempotencyKey); e != nil {
		return nil, e
	}
	pos, replayed, err := h.publishOnce(ctx, req.Channel, req.Data, req.IdempotencyKey)
	if err != nil {
		return nil, fromBackend(err)
	}
	return publishResult{Offset: pos.Offset, Epoch: pos.Epoch, Replayed: replayed}, nil
}

// publishOnce publishes, through the idempotency cache when key is set.
// The cache key includes the channel, so one key may be reused per channel
// (as broadcast does).
func (h *Handler) publishOnce(ctx context.Context, channel string, data json.RawMessage, key string) (StreamPosition, bool, error) {
	if key == "" {
		pos, err := h.backend.Publish(ctx, channel, data)
		return pos, false, err
	}
	return h.idem.do(ctx, channel+"\x00"+key, func() (StreamPosition, error) {
		return h.backend.Publish(ctx, channel, data)
	})
}

type broadcastRequest struct {
	Channels       []string        `json:"channels"`
	Data           json.RawMessage `json:"data"`
	IdempotencyKey string          `json:"idempotency_key"`
}

type broadcastItem struct {
	Channel string `json:"channel"`
	Offset  uint64 `json:"offset,omitempty"`
	Epoch   string `json:"epoch,omitempty"`
	Error   *Error `json:"error,omitempty"`
}

// broadcast publishes the same data to each channel, one by one in the
// given order. A failure on one channel does not stop the others: each
// answer item carries its own result or error (as Centrifugo does).
func (h *Handler) broadcast(ctx context.Context, _ *http.Request, body []byte) (any, *Error) {
	var req broadcastRequest
	if e := decode(body, &req); e != nil {
		return nil, e
	}
	if len(req.Channels) == 0 {
		return nil, badRequest("channels", `"channels" must list at least one channel`)
	}
	if len(req.Channels) > MaxBroadcastChannels {
		return nil, badRequest("channels", fmt.Sprintf(`"channels" lists %d channels; the most is %d`, len(req.Channels), MaxBroadcastChannels))
	}
	for i, c := range req.Channels {
		if e := checkChannel(fmt.Sprintf("channels[%d]", i), c); e != nil {
			return nil, e
		}
	}
	if e := checkData(req.Data); e != nil {
		return nil, e
	}
	if e := checkIdemKey(req.IdempotencyKey); e != nil {
		return nil, e
	}
	out := make([]broadcastItem, len(req.Channels))
	for i, c := range req.Channels {
		out[i].Channel = c
		pos, _, err := h.publishOnce(ctx, c, req.Data, req.IdempotencyKey)
		if err != nil {
			out[i].Error = fromBackend(err)
			continue
		}
		out[i].Offset, out[i].Epoch = pos.Offset, pos.Epoch
	}
	return map[string]any{"responses": out}, nil
}

type historyRequest struct {
	Channel string          `json:"channel"`
	Since   *StreamPosition `json:"since"`
	Limit   *int            `json:"limit"`
	Reverse bool            `json:"reverse"`
}

type historyResult struct {
	Publications []Publication `json:"publications"`
	Offset       uint64        `json:"offset"` // the stream's top
	Epoch        string        `json:"epoch"`
	// Next is the since to send for the following page; absent when this
	// page was not full (there is nothing more now).
	Next *StreamPosition `json:"next,omitempty"`
}

func (h *Handler) history(ctx context.Context, _ *http.Request, body []byte) (any, *Error) {
	var req historyRequest
	if e := decode(body, &req); e != nil {
		return nil, e
	}
	if e := checkChannel("channel", req.Channel); e != nil {
		return nil, e
	}
	limit := DefaultHistoryLimit
	if req.Limit != nil {
		limit = *req.Limit
		if limit < 1 || limit > MaxHistoryLimit {
			return nil, badRequest("limit", fmt.Sprintf(`"limit" must be between 1 and %d`, MaxHistoryLimit))
		}
	}
	page, err := h.backend.History(ctx, req.Channel, HistoryQuery{Since: req.Since, Limit: limit, Reverse: req.Reverse})
	if err != nil {
		return nil, fromBackend(err)
	}
	pubs := page.Publications
	if pubs == nil {
		pubs = []Publication{}
	}
	res := historyResult{Publications: pubs, Offset: page.Top.Offset, Epoch: page.Top.Epoch}
	if len(pubs) >= limit {
		res.Next = &StreamPosition{Offset: pubs[len(pubs)-1].Offset, Epoch: page.Top.Epoch}
	}
	return res, nil
}

type channelRequest struct {
	Channel string `json:"channel"`
}

func (h *Handler) presence(ctx context.Context, _ *http.Request, body []byte) (any, *Error) {
	var req channelRequest
	if e := decode(body, &req); e != nil {
		return nil, e
	}
	if e := checkChannel("channel", req.Channel); e != nil {
		return nil, e
	}
	clients, err := h.backend.Presence(ctx, req.Channel)
	if err != nil {
		return nil, fromBackend(err)
	}
	m := make(map[string]ClientInfo, len(clients))
	for _, c := range clients {
		m[c.Client] = c
	}
	return map[string]any{"presence": m}, nil
}

func (h *Handler) presenceStats(ctx context.Context, _ *http.Request, body []byte) (any, *Error) {
	var req channelRequest
	if e := decode(body, &req); e != nil {
		return nil, e
	}
	if e := checkChannel("channel", req.Channel); e != nil {
		return nil, e
	}
	st, err := h.backend.PresenceStats(ctx, req.Channel)
	if err != nil {
		return nil, fromBackend(err)
	}
	return st, nil
}

type channelsRequest struct {
	Pattern string `json:"pattern"`
}

func (h *Handler) channels(ctx context.Context, _ *http.Request, body []byte) (any, *Error) {
	var req channelsRequest
	// An empty body is allowed here: it lists every channel.
	if len(strings.TrimSpace(string(body))) > 0 {
		if e := decode(body, &req); e != nil {
			return nil, e
		}
	}
	if len(req.Pattern) > MaxChannelLen {
		return nil, badRequest("pattern", fmt.Sprintf(`"pattern" is longer than %d bytes`, MaxChannelLen))
	}
	list, err := h.backend.Channels(ctx, req.Pattern)
	if err != nil {
		return nil, fromBackend(err)
	}
	m := make(map[string]ChannelInfo, len(list))
	for _, c := range list {
		m[c.Channel] = c
	}
	return map[string]any{"channels": m}, nil
}

type disconnectRequest struct {
	User   string `json:"user"`
	Code   *int   `json:"code"`
	Reason string `json:"reason"`
}

func (h *Handler) disconnect(ctx context.Context, _ *http.Request, body []byte) (any, *Error) {
	var req disconnectRequest
	if e := decode(body, &req); e != nil {
		return nil, e
	}
	if e := checkUser(req.User); e != nil {
		return nil, e
	}
	code := DefaultDisconnectCode
	if req.Code != nil {
		code = *req.Code
		if code != 1000 && (code < 4000 || code > 4999) {
			return nil, badRequest("code", `"code" must be 1000 or an application close code 4000–4999`)
		}
	}
	if e := checkReason(req.Reason); e != nil {
		return nil, e
	}
	reason := req.Reason
	if reason == "" {
		reason = "Disconnected by the server"
	}
	n, err := h.backend.Disconnect(ctx, req.User, code, reason)
	if err != nil {
		return nil, fromBackend(err)
	}
	return map[string]int{"disconnected": n}, nil
}

type unsubscribeRequest struct {
	User    string `json:"user"`
	Channel string `json:"channel"`
	Reason  string `json:"reason"`
}

func (h *Handler) unsubscribe(ctx context.Context, _ *http.Request, body []byte) (any, *Error) {
	var req unsubscribeRequest
	if e := decode(body, &req); e != nil {
		return nil, e
	}
	if e := checkUser(req.User); e != nil {
		return nil, e
	}
	if e := checkChannel("channel", req.Channel); e != nil {
		return nil, e
	}
	if e := checkReason(req.Reason); e != nil {
		return nil, e
	}
	n, err := h.backend.Unsubscribe(ctx, req.User, req.Channel, req.Reason)
	if err != nil {
		return nil, fromBackend(err)
	}
	return map[string]int{"unsubscribed": n}, nil
}

type pushTokenRequest struct {
	User   string         `json:"user"`
	Token  string         `json:"token"`
	Claims map[string]any `json:"claims"`
}

func (h *Handler) pushToken(ctx context.Context, _ *http.Request, body []byte) (any, *Error) {
	var req pushTokenRequest
	if e := decode(body, &req); e != nil {
		return nil, e
	}
	if e := checkUser(req.User); e != nil {
		return nil, e
	}
	if (req.Token == "") == (req.Claims == nil) {
		return nil, badRequest("token", `send exactly one of "token" (a signed JWT) and "claims" (an object the server signs)`)
	}
	if sub, ok := req.Claims["sub"]; ok && sub != req.User {
		// A token for another user would silently move the session to them.
		return nil, badRequest("claims", `"claims.sub" must equal "user" (or be omitted: it is set to "user")`)
	}
	if req.Claims != nil {
		req.Claims["sub"] = req.User
	}
	n, err := h.backend.PushToken(ctx, req.User, Token{Token: req.Token, Claims: req.Claims})
	if err != nil {
		return nil, fromBackend(err)
	}
	return map[string]int{"sessions": n}, nil
}

// MaxInfoLen bounds update_info's info: presence lists carry it for every
// session of the user.
const MaxInfoLen = 4096

type updateInfoRequest struct {
	User string          `json:"user"`
	Info json.RawMessage `json:"info"`
}

// updateInfo replaces the presence info (conn_info) of every session of a
// user, wherever it is connected.
func (h *Handler) updateInfo(ctx context.Context, _ *http.Request, body []byte) (any, *Error) {
	var req updateInfoRequest
	if e := decode(body, &req); e != nil {
		return nil, e
	}
	if e := checkUser(req.User); e != nil {
		return nil, e
	}
	if len(req.Info) == 0 {
		return nil, badRequest("info", `"info" is required (any JSON value; null goes back to the token's "info" claim)`)
	}
	if len(req.Info) > MaxInfoLen {
		return nil, badRequest("info", fmt.Sprintf(`"info" is longer than %d bytes`, MaxInfoLen))
	}
	iu, ok := h.backend.(InfoUpdater)
	if !ok {
		return nil, &Error{Status: http.StatusNotImplemented, Code: CodeNotSupported, Message: "update_info is not available on this server"}
	}
	n, err := iu.UpdateInfo(ctx, req.User, req.Info)
	if err != nil {
		return nil, fromBackend(err)
	}
	return map[string]int{"sessions": n}, nil
}

type userRequest struct {
	User string `json:"user"`
}

// userChannels lists the presence channels where a user has a session.
func (h *Handler) userChannels(ctx context.Context, _ *http.Request, body []byte) (any, *Error) {
	var req userRequest
	if e := decode(body, &req); e != nil {
		return nil, e
	}
	if e := checkUser(req.User); e != nil {
		return nil, e
	}
	uc, ok := h.backend.(UserChanneler)
	if !ok {
		return nil, &Error{Status: http.StatusNotImplemented, Code: CodeNotSupported, Message: "user_channels is not available on this server"}
	}
	chans, err := uc.UserChannels(ctx, req.User)
	if err != nil {
		return nil, fromBackend(err)
	}
	if chans == nil {
		chans = []string{}
	}
	return map[string]any{"channels": chans}, nil
}

type banRequest struct {
	User     string `json:"user"`
	IP       string `json:"ip"`
	Duration string `json:"duration"`
	Reason   string `json:"reason"`
}

// banJSON is a ban as the API shows it.
type banJSON struct {
	User    string `json:"user,omitempty"`
	IP      string `json:"ip,omitempty"`
	Reason  string `json:"reason,omitempty"`
	Created string `json:"created"`
	Expires string `json:"expires,omitempty"` // absent: permanent
}

func toBanJSON(b Ban) banJSON {
	j := banJSON{User: b.User, Reason: b.Reason, Created: b.Created.UTC().Format(time.RFC3339)}
	if b.IP.IsValid() {
		j.IP = b.IP.String()
	}
	if !b.Expires.IsZero() {
		j.Expires = b.Expires.UTC().Format(time.RFC3339)
	}
	return j
}

func (h *Handler) ban(ctx context.Context, _ *http.Request, body []byte) (any, *Error) {
	if h.bans == nil {
		return nil, &Error{Status: http.StatusNotImplemented, Code: CodeNotSupported, Message: "bans are not available on this server"}
	}
	var req banRequest
	if e := decode(body, &req); e != nil {
		return nil, e
	}
	target, e := banTarget(req.User, req.IP)
	if e != nil {
		return nil, e
	}
	if e := checkReason(req.Reason); e != nil {
		return nil, e
	}
	now := h.now()
	b := Ban{User: target.User, IP: target.IP, Reason: req.Reason, Created: now}
	if req.Duration != "" {
		d, err := time.ParseDuration(req.Duration)
		if err != nil || d <= 0 {
			return nil, badRequest("duration", `"duration" must be a positive Go duration such as "90s", "10m" or "24h" (omit it for a permanent ban)`)
		}
		b.Expires = now.Add(d)
	}
	if err := h.bans.Ban(ctx, b); err != nil {
		return nil, fromBackend(fmt.Errorf("storing the ban: %w", err))
	}
	// A ban also ends the connections it covers, so a banned user does not
	// stay connected until they happen to reconnect.
	reason := req.Reason
	if reason == "" {
		reason = "Banned"
	}
	n := 0
	var err error
	switch {
	case b.User != "":
		n, err = h.backend.Disconnect(ctx, b.User, DefaultDisconnectCode, reason)
	default:
		if d, ok := h.backend.(IPDisconnecter); ok {
			n, err = d.DisconnectIP(ctx, b.IP, DefaultDisconnectCode, reason)
		}
	}
	if err != nil {
		// The ban is stored; only the immediate disconnect failed.
		h.log.Warn("ban stored but disconnecting failed", "user", b.User, "ip", b.IP, "error", err)
	}
	return map[string]any{"ban": toBanJSON(b), "disconnected": n}, nil
}

func (h *Handler) unban(ctx context.Context, _ *http.Request, body []byte) (any, *Error) {
	if h.bans == nil {
		return nil, &Error{Status: http.StatusNotImplemented, Code: CodeNotSupported, Message: "bans are not available on this server"}
	}
	var req struct {
		User string `json:"user"`
		IP   string `json:"ip"`
	}
	if e := decode(body, &req); e != nil {
		return nil, e
	}
	target, e := banTarget(req.User, req.IP)
	if e != nil {
		return nil, e
	}
	ok, err := h.bans.Unban(ctx, target)
	if err != nil {
		return nil, fromBackend(fmt.Errorf("removing the ban: %w", err))
	}
	return map[string]bool{"removed": ok}, nil
}

func (h *Handler) listBans(ctx context.Context, _ *http.Request, body []byte) (any, *Error) {
	if h.bans == nil {
		return nil, &Error{Status: http.StatusNotImplemented, Code: CodeNotSupported, Message: "bans are not available on this server"}
	}
	if len(strings.TrimSpace(string(body))) > 0 {
		if e := decode(body, &struct{}{}); e != nil {
			return nil, e
		}
	}
	list, err := h.bans.Bans(ctx)
	if err != nil {
		return nil, fromBackend(fmt.Errorf("listing bans: %w", err))
	}
	out := make([]banJSON, len(list))
	for i, b := range list {
		out[i] = toBanJSON(b)
	}
	return map[string]any{"bans": out}, nil
}

// banTarget parses exactly one of user and ip (an address or a CIDR).
func banTarget(user, ip string) (BanTarget, *Error) {
	if (user == "") == (ip == "") {
		return BanTarget{}, badRequest("user", `send exactly one of "user" and "ip"`)
	}
	if user != "" {
		if e := checkUser(user); e != nil {
			return BanTarget{}, e
		}
		return BanTarget{User: user}, nil
	}
	if p, err := netip.ParsePrefix(ip); err == nil {
		return BanTarget{IP: p.Masked()}, nil
	}
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return BanTarget{}, badRequest("ip", `"ip" must be an IP address or a CIDR such as 203.0.113.0/24`)
	}
	a = a.Unmap()
	return BanTarget{IP: netip.PrefixFrom(a, a.BitLen())}, nil
}

func checkChannel(field, c string) *Error {
	switch {
	case c == "":
		return badRequest(field, fmt.Sprintf("%q is required", field))
	case len(c) > MaxChannelLen:
		return badRequest(field, fmt.Sprintf("%q is longer than %d bytes", field, MaxChannelLen))
	case !utf8.ValidString(c):
		return badRequest(field, fmt.Sprintf("%q is not valid UTF-8", field))
	}
	return nil
}

func checkData(d json.RawMessage) *Error {
	if len(d) == 0 {
		return badRequest("data", `"data" is required (any JSON value)`)
	}
	return nil
}

func checkUser(u string) *Error {
	switch {
	case u == "":
		return badRequest("user", `"user" is required`)
	case len(u) > 256:
		return badRequest("user", `"user" is longer than 256 bytes`)
	}
	return nil
}

func checkReason(r string) *Error {
	// A WebSocket close frame carries at most 123 bytes of reason.
	if len(r) > 123 {
		return badRequest("reason", `"reason" is longer than 123 bytes (the WebSocket close frame's limit)`)
	}
	return nil
}

func checkIdemKey(k string) *Error {
	if len(k) > MaxIdempotencyKeyLen {
		return badRequest("idempotency_key", fmt.Sprintf(`"idempotency_key" is longer than %d bytes`, MaxIdempotencyKeyLen))
	}
	return nil
}
