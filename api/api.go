// Package api is Shoal's server HTTP API: the JSON endpoints a backend uses
// to publish, read history and presence, list channels, disconnect, kick,
// push tokens and ban. It is an http.Handler the worker mounts under
// Prefix on the public port; everything it does goes through the Backend
// and BanStore interfaces the worker provides.
//
// The API is not on the per-message hot path, so it uses encoding/json.
// docs/api.md and docs/openapi.yaml describe the endpoints.
package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/configs"
)

// Prefix is where the worker mounts the handler: POST Prefix + "publish"...
const Prefix = "/api/v1/"

// Defaults for Config's zero fields.
const (
	DefaultMaxBody            = 1 << 20
	DefaultTimeout            = 10 * time.Second
	DefaultIdempotencyWindow  = 5 * time.Minute
	DefaultIdempotencyEntries = 10000
	DefaultHistoryLimit       = 100
	MaxHistoryLimit           = 1000
	MaxBroadcastChannels      = 1000
	MaxChannelLen             = 1024 // as worker.MaxChannelLen
	MaxIdempotencyKeyLen      = 256
	// DefaultDisconnectCode is the close code of an API disconnect or ban
	// (app range 4000–4999, so clients see it as a server decision).
	DefaultDisconnectCode = 4403
)

// Config configures a Handler. Zero fields take the defaults above.
type Config struct {
	// API is the config's api section; KeyEnv names the environment variable
	// that holds the key (default SHOAL_API_KEY).
	API configs.API
	// Getenv reads the environment (tests); default os.Getenv.
	Getenv func(string) string
	// MaxBody bounds a request body in bytes; larger bodies get 413.
	MaxBody int64
	// Timeout bounds each backend call.
	Timeout time.Duration
	// IdempotencyWindow is how long a publish result is remembered under its
	// idempotency key; IdempotencyEntries bounds the cache (oldest first out).
	IdempotencyWindow  time.Duration
	IdempotencyEntries int
	// Bans stores bans; nil: ban, unban and bans answer 501.
	Bans   BanStore
	Logger hclog.Logger
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
}

// Handler serves the API. Create it with New.
type Handler struct {
	backend Backend
	bans    BanStore
	keyEnv  string
	key     atomic.Pointer[string]
	maxBody int64
	timeout time.Duration
	log     hclog.Logger
	now     func() time.Time
	idem    *idemCache
	methods map[string]method
}

type method func(ctx context.Context, r *http.Request, body []byte) (any, *Error)

var _ http.Handler = (*Handler)(nil)

// New reads the API key from the environment variable cfg.API.KeyEnv and
// builds the handler. A missing key is not an error: the API then answers
// 503 with instructions, so the rest of the worker still runs.
func New(cfg Config, b Backend) (*Handler, error) {
	if b == nil {
		return nil, errors.New("api: a Backend is required")
	}
	if cfg.API.KeyEnv == "" {
		cfg.API.KeyEnv = configs.Default().API.KeyEnv
	}
	if cfg.Getenv == nil {
		cfg.Getenv = os.Getenv
	}
	if cfg.MaxBody <= 0 {
		cfg.MaxBody = DefaultMaxBody
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.IdempotencyWindow <= 0 {
		cfg.IdempotencyWindow = DefaultIdempotencyWindow
	}
	if cfg.IdempotencyEntries <= 0 {
		cfg.IdempotencyEntries = DefaultIdempotencyEntries
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	h := &Handler{
		backend: b,
		bans:    cfg.Bans,
		keyEnv:  cfg.API.KeyEnv,
		maxBody: cfg.MaxBody,
		timeout: cfg.Timeout,
		log:     cfg.Logger,
		now:     cfg.Now,
		idem:    newIdemCache(cfg.IdempotencyWindow, cfg.IdempotencyEntries, cfg.Now),
	}
	h.SetKey(cfg.Getenv(cfg.API.KeyEnv))
	if h.key.Load() == nil {
		cfg.Logger.Warn("server API disabled: no API key", "env", cfg.API.KeyEnv)
	}
	h.methods = map[string]method{
		"publish":        h.publish,
		"broadcast":      h.broadcast,
		"history":        h.history,
		"presence":       h.presence,
		"presence_stats": h.presenceStats,
		"channels":       h.channels,
		"disconnect":     h.disconnect,
		"unsubscribe":    h.unsubscribe,
		"kick":           h.unsubscribe, // SocketCluster's word for the same action
		"push_token":     h.pushToken,
		"update_info":    h.updateInfo,
		"user_channels":  h.userChannels,
		"ban":            h.ban,
		"unban":          h.unban,
		"bans":           h.listBans,
	}
	return h, nil
}

// SetKey replaces the API key (config reload); "" disables the API.
func (h *Handler) SetKey(key string) {
	key = strings.TrimSpace(key)
	if key == "" {
		h.key.Store(nil)
		return
	}
	h.key.Store(&key)
}

// ServeHTTP dispatches POST <Prefix><method>. It accepts paths with or
// without Prefix, so the worker may mount it with or without StripPrefix.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	name := strings.TrimPrefix(r.URL.Path, Prefix)
	if name == r.URL.Path {
		name = strings.TrimPrefix(name, "/")
	}
	// Auth before anything else, so an unauthenticated caller learns nothing
	// about methods or bodies.
	if e := h.authorize(r); e != nil {
		if e.Status == http.StatusUnauthorized {
			w.Header().Set("WWW-Authenticate", "apikey")
		}
		writeError(w, e)
		return
	}
	m, ok := h.methods[name]
	if !ok {
		writeError(w, &Error{Status: http.StatusNotFound, Code: CodeNotFound,
			Message: fmt.Sprintf("no API method %q (see docs/api.md)", name)})
		return
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writeError(w, &Error{Status: http.StatusMethodNotAllowed, Code: CodeMethodNotAllowed,
			Message: "API methods are called with POST and a JSON body"})
		return
	}
	if ct := r.Header.Get("Content-Type"); ct != "" {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
			writeError(w, &Error{Status: http.StatusUnsupportedMediaType, Code: CodeUnsupportedMedia,
				Message: "Content-Type must be application/json"})
			return
		}
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, h.maxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeError(w, &Error{Status: http.StatusRequestEntityTooLarge, Code: CodeBodyTooLarge,
				Message: fmt.Sprintf("request body is larger than %d bytes", mbe.Limit)})
			return
		}
		writeError(w, badRequest("", "reading the request body: "+err.Error()))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), h.timeout)
	defer cancel()
	res, e := m(ctx, r, body)
	if e == nil && audited[name] {
		// Actions that change who may be connected are logged, with the
		// caller's address, so an operator can tell who did what.
		// push_token's body carries a token or claims: never log those.
		logged := truncate(body, 512)
		if name == "push_token" {
			logged = "(not logged: carries a token)"
		}
		h.log.Info("api action", "method", name, "remote", r.RemoteAddr, "body", logged)
	}
	if e != nil {
		if e.Status >= 500 {
			h.log.Warn("api call failed", "method", name, "code", e.Code, "error", e.Message)
		}
		writeError(w, e)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// audited are the methods logged on success.
var audited = map[string]bool{
	"disconnect": true, "unsubscribe": true, "kick": true, "push_token": true, "ban": true, "unban": true,
	"update_info": true,
}

func truncate(b []byte, n int) string {
	if len(b) <= n {
		return string(b)
	}
	return string(b[:n]) + "…"
}

// decode parses body into v strictly: unknown fields, trailing data and
// type mismatches are 400s that name the field.
func decode(body []byte, v any) *Error {
	if len(bytes.TrimSpace(body)) == 0 {
		return badRequest("", "request body is empty: send a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &se):
			return badRequest("", fmt.Sprintf("malformed JSON at byte %d: %v", se.Offset, se))
		case errors.As(err, &te):
			if te.Field == "" {
				return badRequest("", fmt.Sprintf("the body must be a JSON object, not %s", te.Value))
			}
			return badRequest(te.Field, fmt.Sprintf("field %q: expected %s, got %s", te.Field, jsonKind(te.Type.Kind().String()), te.Value))
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			f := strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
			return badRequest(f, fmt.Sprintf("unknown field %q", f))
		case errors.Is(err, io.ErrUnexpectedEOF):
			return badRequest("", "malformed JSON: unexpected end of body")
		default:
			return badRequest("", "malformed JSON: "+err.Error())
		}
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return badRequest("", "trailing data after the JSON object")
	}
	return nil
}

// jsonKind names a Go kind the way a JSON caller thinks of it.
func jsonKind(k string) string {
	switch {
	case strings.HasPrefix(k, "int"), strings.HasPrefix(k, "uint"):
		return "an integer"
	case strings.HasPrefix(k, "float"):
		return "a number"
	case k == "string":
		return "a string"
	case k == "bool":
		return "true or false"
	case k == "slice", k == "array":
		return "an array"
	case k == "map", k == "struct", k == "ptr":
		return "an object"
	}
	return k
}
