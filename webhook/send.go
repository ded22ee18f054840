package webhook

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"time"
)

// Header names of every webhook request.
const (
	HeaderSignature = "X-Shoal-Signature"
	HeaderTimestamp = "X-Shoal-Timestamp"
	HeaderDelivery  = "X-Shoal-Delivery"
)

// run is the single sender goroutine: it owns delivery order.
func (s *Sender) run() {
	defer close(s.done)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	closing := false
	for {
		if s.ctx.Err() != nil {
			s.abandon()
			return
		}
		batch, wait := s.next(closing)
		if len(batch) > 0 {
			s.deliver(batch)
			continue
		}
		if closing && wait < 0 {
			return // flushed
		}
		if wait > 0 {
			timer.Reset(wait)
		}
		select {
		case <-s.wake:
		case <-timer.C:
		case <-s.closing:
			closing = true
		case <-s.ctx.Done():
		}
		timer.Stop()
	}
}

// next moves due slots to the ready queue (every slot when flushing) and
// takes up to MaxBatch ready events. wait is how long until the next slot
// is due, or -1 when nothing is pending.
func (s *Sender) next(flush bool) (batch []wireEvent, wait time.Duration) {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	wait = -1
	for el := s.pending.Front(); el != nil; el = s.pending.Front() {
		sl := el.Value.(*slot)
		if !flush && sl.due.After(now) {
			wait = sl.due.Sub(now)
			break
		}
		s.pending.Remove(el)
		delete(s.slots, sl.key)
		if sl.ev.Type == sl.before {
			// The key flapped back to where it was: the backend needs
			// nothing. Both the first event and its reversal are coalesced.
			s.coalesced.Add(1)
			continue
		}
		s.ready = append(s.ready, toWire(sl.ev))
	}
	n := min(len(s.ready), s.opts.MaxBatch)
	if n == 0 {
		return nil, wait
	}
	batch = make([]wireEvent, n)
	copy(batch, s.ready)
	clear(s.ready[:n])
	s.ready = s.ready[n:]
	if len(s.ready) == 0 {
		s.ready = nil // let the backing array go after a burst
	}
	return batch, wait
}

// abandon counts what is still queued as failed (Close's deadline passed).
func (s *Sender) abandon() {
	s.mu.Lock()
	n := len(s.ready) + len(s.slots)
	s.ready = nil
	clear(s.slots)
	s.pending.Init()
	s.mu.Unlock()
	if n > 0 {
		s.failed.Add(int64(n))
		s.abandoned.Add(int64(n))
		s.log.Warn("webhook events abandoned at shutdown", "events", n)
	}
}

// errPermanent marks an answer that retrying cannot fix (a 4xx).
var errPermanent = errors.New("permanent failure")

// deliver posts one batch, retrying with exponential back-off and jitter
// until it succeeds, fails permanently, or runs out of attempts or time.
func (s *Sender) deliver(batch []wireEvent) {
	p := payload{ID: newID(), TimeMs: s.now().UnixMilli(), Source: s.source, Events: batch}
	body, err := json.Marshal(p)
	if err != nil {
		// Only Info could fail (invalid raw JSON): report and drop the batch.
		s.failed.Add(int64(len(batch)))
		s.log.Error("webhook batch not encodable", "error", err)
		return
	}
	start := s.now()
	backoff := s.opts.BackoffMin
	for attempt := 1; ; attempt++ {
		err = s.post(p.ID, body)
		if err == nil {
			s.sent.Add(int64(len(batch)))
			return
		}
		if errors.Is(err, errPermanent) || attempt >= s.opts.MaxAttempts || s.ctx.Err() != nil {
			break
		}
		// Full jitter in [backoff/2, backoff], so many workers retrying
		// after one outage do not hit the backend in step.
		d := backoff/2 + rand.N(backoff/2+1)
		if s.now().Sub(start)+d > s.opts.MaxRetryTime {
			break
		}
		s.log.Debug("webhook delivery failed, retrying", "attempt", attempt, "in", d, "error", err)
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-s.ctx.Done():
			t.Stop()
		}
		s.retries.Add(1)
		backoff = min(backoff*2, s.opts.BackoffMax)
	}
	s.failed.Add(int64(len(batch)))
	s.log.Warn("webhook delivery failed, events dropped", "url", s.url, "events", len(batch), "error", err)
}

// post sends body once, signed with a fresh timestamp.
func (s *Sender) post(id string, body []byte) error {
	ctx, cancel := context.WithTimeout(s.ctx, s.opts.RequestTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("webhook request: %w: %w", err, errPermanent)
	}
	ts := strconv.FormatInt(s.now().Unix(), 10)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "shoal-webhook/1")
	req.Header.Set(HeaderDelivery, id)
	req.Header.Set(HeaderTimestamp, ts)
	if len(s.secret) > 0 {
		req.Header.Set(HeaderSignature, Sign(s.secret, ts, body))
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return fmt.Errorf("webhook post: %w", err)
	}
	// Drain a little so the connection can be reused; the body is not used.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	_ = resp.Body.Close()
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return nil
	case resp.StatusCode == http.StatusRequestTimeout, resp.StatusCode == http.StatusTooManyRequests, resp.StatusCode >= 500:
		return fmt.Errorf("webhook post: backend answered %s", resp.Status)
	default:
		return fmt.Errorf("webhook post: backend answered %s: %w", resp.Status, errPermanent)
	}
}

// Sign returns the X-Shoal-Signature value for body sent at timestamp (the
// X-Shoal-Timestamp value): "v1=" + hex(HMAC-SHA256(secret, timestamp "." body)).
func Sign(secret []byte, timestamp string, body []byte) string {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(timestamp))
	m.Write([]byte{'.'})
	m.Write(body)
	return "v1=" + hex.EncodeToString(m.Sum(nil))
}

// Errors of Verify.
var (
	ErrBadSignature = errors.New("webhook signature does not match")
	ErrStale        = errors.New("webhook timestamp outside the tolerance")
)

// Verify checks a received webhook: the signature must match and the
// timestamp must be within tolerance of now (replay protection; 5 minutes
// is a good tolerance). For Go receivers and tests; docs/api.md shows the
// same check in other languages.
func Verify(secret []byte, timestamp, signature string, body []byte, tolerance time.Duration, now time.Time) error {
	sec, err := strconv.ParseInt(timestamp, 10, 64)
	if err != nil {
		return fmt.Errorf("webhook timestamp %q: %w", timestamp, ErrStale)
	}
	if d := now.Sub(time.Unix(sec, 0)); d > tolerance || d < -tolerance {
		return ErrStale
	}
	if !hmac.Equal([]byte(Sign(secret, timestamp, body)), []byte(signature)) {
		return ErrBadSignature
	}
	return nil
}
