package api

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
)

// Sentinel errors a Backend or BanStore wraps (with %w) to choose the
// answer's HTTP status and error code.
var (
	// ErrNotFound: the channel, user or history does not exist (404 not_found).
	ErrNotFound = errors.New("not found")
	// ErrUnavailable: the cluster cannot serve the request now, e.g. no
	// broker owns the channel during a ring change (503 unavailable).
	ErrUnavailable = errors.New("unavailable")
	// ErrUnrecoverablePosition: a history query's epoch is not the stream's
	// current one, or its offset fell out of the retained history
	// (409 unrecoverable_position).
	ErrUnrecoverablePosition = errors.New("unrecoverable position")
	// ErrNotSupported: the feature is off for this channel (no history or
	// presence configured) or not built (501 not_supported).
	ErrNotSupported = errors.New("not supported")
	// ErrInvalid: the backend refused an argument, e.g. a token that does not
	// verify (400 bad_request).
	ErrInvalid = errors.New("invalid argument")
)

// Error codes of the API's error answers (documented in docs/api.md).
const (
	CodeBadRequest            = "bad_request"
	CodeUnauthorized          = "unauthorized"
	CodeKeyNotConfigured      = "api_key_not_configured"
	CodeNotFound              = "not_found"
	CodeMethodNotAllowed      = "method_not_allowed"
	CodeUnsupportedMedia      = "unsupported_media_type"
	CodeBodyTooLarge          = "body_too_large"
	CodeUnrecoverablePosition = "unrecoverable_position"
	CodeUnavailable           = "unavailable"
	CodeNotSupported          = "not_supported"
	CodeTimeout               = "timeout"
	CodeInternal              = "internal"
)

// Error is an API error answer: {"error":{"code":…,"message":…,"field":…}}.
type Error struct {
	Status  int    `json:"-"`
	Code    string `json:"code"`
	Message string `json:"message"`
	// Field names the request field at fault, when there is one.
	Field string `json:"field,omitempty"`
}

func (e *Error) Error() string { return e.Code + ": " + e.Message }

func badRequest(field, msg string) *Error {
	return &Error{Status: http.StatusBadRequest, Code: CodeBadRequest, Message: msg, Field: field}
}

// fromBackend maps a backend error to its answer.
func fromBackend(err error) *Error {
	var ae *Error
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.Is(err, ErrNotFound):
		return &Error{Status: http.StatusNotFound, Code: CodeNotFound, Message: err.Error()}
	case errors.Is(err, ErrUnavailable):
		return &Error{Status: http.StatusServiceUnavailable, Code: CodeUnavailable, Message: err.Error()}
	case errors.Is(err, ErrUnrecoverablePosition):
		return &Error{Status: http.StatusConflict, Code: CodeUnrecoverablePosition, Message: err.Error()}
	case errors.Is(err, ErrNotSupported):
		return &Error{Status: http.StatusNotImplemented, Code: CodeNotSupported, Message: err.Error()}
	case errors.Is(err, ErrInvalid):
		return &Error{Status: http.StatusBadRequest, Code: CodeBadRequest, Message: err.Error()}
	case errors.Is(err, context.DeadlineExceeded):
		return &Error{Status: http.StatusGatewayTimeout, Code: CodeTimeout, Message: err.Error()}
	default:
		return &Error{Status: http.StatusInternalServerError, Code: CodeInternal, Message: err.Error()}
	}
}

// writeJSON answers v with status. Encoding errors can only come from the
// connection at this point, so they are not reported further.
func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		b = []byte(`{"error":{"code":"internal","message":"encoding the answer failed"}}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

func writeError(w http.ResponseWriter, e *Error) {
	writeJSON(w, e.Status, struct {
		Error *Error `json:"error"`
	}{e})
}
