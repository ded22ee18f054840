package api

import (
	"crypto/sha256"
	"crypto/subtle"
	"net/http"
	"strings"
)

// constantTimeEqual compares keys in time independent of where they differ.
// Both sides are hashed first so the compare also hides the key's length.
// It is a variable only so a test can prove every check goes through it.
var constantTimeEqual = func(a, b []byte) bool {
	ha, hb := sha256.Sum256(a), sha256.Sum256(b)
	return subtle.ConstantTimeCompare(ha[:], hb[:]) == 1
}

// authorize checks the request's API key. The key may come in
// "Authorization: apikey <key>" or "X-API-Key: <key>"; when both are sent,
// both must be right, so a proxy that adds one cannot mask a wrong other.
func (h *Handler) authorize(r *http.Request) *Error {
	key := h.key.Load()
	if key == nil || len(*key) == 0 {
		return &Error{Status: http.StatusServiceUnavailable, Code: CodeKeyNotConfigured,
			Message: "the server API is disabled: no API key is configured; set the environment variable " +
				h.keyEnv + " (named by api.key_env) for the shoal process and restart it"}
	}
	var got []string
	if a := r.Header.Get("Authorization"); a != "" {
		scheme, cred, ok := strings.Cut(strings.TrimSpace(a), " ")
		if !ok || !strings.EqualFold(scheme, "apikey") {
			return &Error{Status: http.StatusUnauthorized, Code: CodeUnauthorized,
				Message: `Authorization header must be "apikey <key>"`}
		}
		got = append(got, strings.TrimSpace(cred))
	}
	if x := r.Header.Get("X-API-Key"); x != "" {
		got = append(got, x)
	}
	if len(got) == 0 {
		return &Error{Status: http.StatusUnauthorized, Code: CodeUnauthorized,
			Message: `missing API key: send "Authorization: apikey <key>" or "X-API-Key: <key>"`}
	}
	ok := true
	for _, g := range got {
		// No early exit: every presented key is compared.
		ok = constantTimeEqual([]byte(g), []byte(*key)) && ok
	}
	if !ok {
		return &Error{Status: http.StatusUnauthorized, Code: CodeUnauthorized, Message: "invalid API key"}
	}
	return nil
}
