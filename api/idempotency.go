package api

import (
	"container/list"
	"context"
	"sync"
	"time"
)

// idemCache remembers publish results by idempotency key for a window, so a
// retried publish returns the first result instead of publishing twice.
// It lives in one worker's memory: two requests with the same key that the
// balancer sends to different workers both publish (see docs/api.md).
//
// Entries are kept in creation order; since they all live for the same
// window, the front is also the first to expire. The cache holds at most
// max completed entries (oldest evicted first); in-flight entries are not
// evicted, and there are at most as many as concurrent requests.
type idemCache struct {
	mu     sync.Mutex
	window time.Duration
	max    int
	now    func() time.Time
	m      map[string]*list.Element // of *idemEntry
	order  list.List
}

type idemEntry struct {
	key     string
	created time.Time
	done    chan struct{} // closed when res/err are set
	res     StreamPosition
	err     error
}

func newIdemCache(window time.Duration, max int, now func() time.Time) *idemCache {
	return &idemCache{window: window, max: max, now: now, m: make(map[string]*list.Element)}
}

// do returns the remembered result for key or runs publish once. A caller
// that finds the same key in flight waits for that result (or its own ctx).
// Failed publishes are forgotten, so a retry publishes again; replayed
// reports whether the result came from the cache.
func (c *idemCache) do(ctx context.Context, key string, publish func() (StreamPosition, error)) (res StreamPosition, replayed bool, err error) {
	c.mu.Lock()
	c.expireLocked()
	if el, ok := c.m[key]; ok {
		e := el.Value.(*idemEntry)
		c.mu.Unlock()
		select {
		case <-e.done:
			return e.res, true, e.err
		case <-ctx.Done():
			return StreamPosition{}, false, ctx.Err()
		}
	}
	e := &idemEntry{key: key, created: c.now(), done: make(chan struct{})}
	c.m[key] = c.order.PushBack(e)
	c.evictLocked()
	c.mu.Unlock()

	e.res, e.err = publish()
	c.mu.Lock()
	if e.err != nil {
		if el, ok := c.m[key]; ok && el.Value == e {
			c.order.Remove(el)
			delete(c.m, key)
		}
	}
	close(e.done)
	c.mu.Unlock()
	return e.res, false, e.err
}

func (c *idemCache) expireLocked() {
	now := c.now()
	for el := c.order.Front(); el != nil; {
		e := el.Value.(*idemEntry)
		if now.Sub(e.created) < c.window {
			return
		}
		next := el.Next()
		if isDone(e) {
			c.order.Remove(el)
			delete(c.m, e.key)
		}
		el = next
	}
}

// evictLocked drops the oldest completed entries beyond max. The walk is
// bounded by the list's length.
func (c *idemCache) evictLocked() {
	for el := c.order.Front(); el != nil && len(c.m) > c.max; {
		next := el.Next()
		if e := el.Value.(*idemEntry); isDone(e) {
			c.order.Remove(el)
			delete(c.m, e.key)
		}
		el = next
	}
}

func (c *idemCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}

func isDone(e *idemEntry) bool {
	select {
	case <-e.done:
		return true
	default:
		return false
	}
}
