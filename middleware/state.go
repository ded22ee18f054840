package middleware

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"net/http"
	"net/netip"
	"sync"
	"time"
)

// bucket is a token bucket. The zero bucket is "not started": its first take
// fills it to burst, so a new key starts with its whole burst.
type bucket struct {
	tokens  float64
	last    int64 // nanos of the last refill
	started bool
}

// refill returns tokens after (now-last) at perSec, capped at burst.
func refill(tokens float64, last, now int64, perSec, burst float64) float64 {
	if now > last {
		tokens += float64(now-last) * perSec / 1e9
	}
	if tokens > burst {
		tokens = burst
	}
	return tokens
}

func (b *bucket) take(now int64, perSec, burst float64) bool {
	if !b.started {
		b.started, b.tokens, b.last = true, burst, now
	} else {
		b.tokens = refill(b.tokens, b.last, now, perSec, burst)
		if now > b.last {
			b.last = now
		}
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// limit is a rate and burst, with the time an empty bucket takes to fill.
type limit struct {
	perSec    float64
	burst     float64
	fullAfter int64 // nanos; a bucket idle this long is full, i.e. as good as absent
}

func newLimit(perSec, burst float64) limit {
	return limit{perSec: perSec, burst: burst, fullAfter: int64(burst / perSec * 1e9)}
}

// store holds one rate rule's buckets for one scope (IP or user). Memory is
// bounded two ways: buckets idle long enough to be full again are deleted
// (that loses nothing, a new bucket starts full), swept at most every
// sweepEvery; and at most max keys are kept. When the map is full of
// busy keys, new keys share one overflow bucket, so a flood from many
// addresses is limited as one instead of growing memory or passing free.
type store[K comparable] struct {
	lim limit
	max int

	mu         sync.Mutex
	m          map[K]bucket
	lastSweep  int64
	sweepEvery int64
	overflow   bucket
}

func newStore[K comparable](lim limit, maxKeys int) *store[K] {
	every := min(max(lim.fullAfter/2, int64(time.Second)), int64(time.Minute))
	return &store[K]{lim: lim, max: maxKeys, m: make(map[K]bucket), sweepEvery: every}
}

func (s *store[K]) take(k K, now int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if now-s.lastSweep >= s.sweepEvery {
		s.sweep(now)
	}
	b, ok := s.m[k]
	if !ok && len(s.m) >= s.max {
		s.sweep(now)
		if len(s.m) >= s.max {
			return s.overflow.take(now, s.lim.perSec, s.lim.burst)
		}
	}
	allowed := b.take(now, s.lim.perSec, s.lim.burst)
	s.m[k] = b
	return allowed
}

func (s *store[K]) sweep(now int64) {
	s.lastSweep = now
	for k, b := range s.m {
		if now-b.last >= s.lim.fullAfter {
			delete(s.m, k)
		}
	}
}

func (s *store[K]) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}

// socketState is the chain's memory for one socket: its per-socket buckets
// (for the chain that made them; a reload starts them afresh) and what Open
// counted, so Close undoes exactly that.
type socketState struct {
	mu      sync.Mutex
	chain   *Chain
	buckets []bucket

	opened      bool
	countedIP   netip.Addr
	countedUser string

	// The ConnCounter keys this socket joined (conn_limit scope: cluster),
	// and the counter that holds them; under mu.
	cIP, cUser string
	cBy        ConnCounter
}

// shared is the state a chain hands to its successor on reload.
type shared struct {
	base   time.Time      // origin of the rate-limit clock
	conns  *connCounts    // the same counts for every generation
	stores map[string]any // this chain's per-IP / per-user stores by fingerprint
	// counter is the cluster-wide registry (conn_limit scope: cluster),
	// the same for every generation.
	counter *counterBox
	client  *http.Client // hook client, handed on so reloads reuse connections
	// plugins are the go-plugin processes, handed on so a reload keeps them.
	plugins *pluginSet
}

func newShared(prev *shared, now time.Time) *shared {
	if prev == nil {
		return &shared{base: now, conns: newConnCounts(), stores: map[string]any{},
			plugins: &pluginSet{m: map[string]*pluginHost{}}, counter: &counterBox{}}
	}
	return &shared{base: prev.base, conns: prev.conns, stores: map[string]any{}, plugins: prev.plugins, counter: prev.counter}
}

// connCounts counts open sockets per IP and per user on this worker, and
// the places Holds keep for sockets whose handshake is under way.
type connCounts struct {
	mu       sync.Mutex
	ip       map[netip.Addr]int
	user     map[string]int
	pendIP   map[netip.Addr]int
	pendUser map[string]int
}

func newConnCounts() *connCounts {
	return &connCounts{ip: map[netip.Addr]int{}, user: map[string]int{},
		pendIP: map[netip.Addr]int{}, pendUser: map[string]int{}}
}

// Hold keeps a conn_limit place for one socket from the check that admitted
// it until it opens. Without it, every handshake of one address (or user)
// checked before the first of them opened would see the same count and
// pass: a burst of simultaneous connects could take any number of sockets
// past the limit. The caller puts an empty Hold in the Input (handshakeWS,
// handshakeSC, authenticate; Chain.WantsHold), the conn_limit rules fill
// it, and the caller calls Release once the socket is counted (Chain.Open,
// Chain.UserChanged) or gone. The zero value is ready; a Hold is for one
// socket.
type Hold struct {
	mu   sync.Mutex // guards cc and the fields below (taken before cc.mu)
	cc   *connCounts
	ip   netip.Addr // a pending place under ip
	user string     // a pending place under user
	done bool       // released: takes no place any more

	// Places in the cluster registry (scope: cluster with a ConnReserver),
	// joined under id, a reservation id of this Hold's own.
	id     string
	places []clusterPlace
}

// clusterPlace is one key a Hold joined in a ConnCounter.
type clusterPlace struct {
	by  ConnCounter
	key string
}

// reserve joins the Hold under key in the cluster registry and returns how
// many other entries key held in that same step. The join is queued under
// h.mu, so a Release, which leaves under h.mu too, is always sent after
// it; the round trip is waited for without the lock. A second rule checking
// the same key counts the place already kept as its own.
func (h *Hold) reserve(ctx context.Context, cr ConnReserver, cc ConnCounter, key string) (int, error) {
	h.mu.Lock()
	if h.done {
		h.mu.Unlock()
		return cc.Count(ctx, key) // the socket is gone; keep nothing
	}
	for _, p := range h.places {
		if p.key == key {
			h.mu.Unlock()
			n, err := cc.Count(ctx, key)
			return max(n-1, 0), err
		}
	}
	if h.id == "" {
		var b [9]byte
		_, _ = rand.Read(b[:])
		h.id = "hold/" + base64.RawURLEncoding.EncodeToString(b[:])
	}
	wait, err := cr.Reserve(key, h.id)
	if err != nil {
		h.mu.Unlock()
		return 0, err
	}
	h.places = append(h.places, clusterPlace{by: cc, key: key})
	h.mu.Unlock()
	return wait(ctx)
}

// Release gives back the places the Hold keeps; later checks with it keep
// none. Safe on nil, and more than once.
func (h *Hold) Release() {
	if h == nil {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.done = true
	for _, p := range h.places {
		p.by.Leave(p.key, h.id)
	}
	h.places = nil
	if h.cc == nil {
		return
	}
	h.cc.mu.Lock()
	if h.ip.IsValid() {
		dec(h.cc.pendIP, h.ip)
		h.ip = netip.Addr{}
	}
	if h.user != "" {
		dec(h.cc.pendUser, h.user)
		h.user = ""
	}
	h.cc.mu.Unlock()
}

// Kept reports whether the Hold keeps a place (the caller may drop an
// empty one).
func (h *Hold) Kept() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.ip.IsValid() || h.user != "" || len(h.places) > 0
}

// admitIP reports whether another socket from a fits under limit, counting
// the open sockets and the places held for handshakes under way. Admitted,
// it keeps a place in h (when h is not nil and keeps none for a yet).
func (cc *connCounts) admitIP(a netip.Addr, limit int, h *Hold) bool {
	var slot *netip.Addr
	if h != nil {
		h.mu.Lock()
		defer h.mu.Unlock()
		slot = &h.ip
	}
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return admit(cc, cc.ip, cc.pendIP, a, limit, false, h, slot)
}

// admitUser is admitIP for s.UserID. A socket re-authenticating as its own
// user is counted already: it does not count itself and keeps no place.
func (cc *connCounts) admitUser(s *Socket, limit int, h *Hold) bool {
	var slot *string
	if h != nil {
		h.mu.Lock()
		defer h.mu.Unlock()
		slot = &h.user
	}
	cc.mu.Lock()
	defer cc.mu.Unlock()
	st := s.state
	counted := st != nil && st.opened && st.countedUser == s.UserID
	return admit(cc, cc.user, cc.pendUser, s.UserID, limit, counted, h, slot)
}

// admit is admitIP and admitUser for key k of one kind, under h.mu and
// cc.mu: open and pend are that kind's counts, slot is h's place of that
// kind (nil without h, the zero K when empty), counted says the socket is
// among open already. A place an earlier conn_limit rule of the chain kept
// in h is the socket's own and not counted against it.
func admit[K comparable](cc *connCounts, open, pend map[K]int, k K, limit int, counted bool, h *Hold, slot *K) bool {
	var none K
	n := open[k] + pend[k]
	if counted {
		n--
	}
	mine := slot != nil && *slot == k
	if mine {
		n--
	}
	if n >= limit {
		return false
	}
	if slot != nil && !mine && !counted && !h.done && *slot == none && (h.cc == nil || h.cc == cc) {
		h.cc, *slot = cc, k
		pend[k]++
	}
	return true
}

func dec[K comparable](m map[K]int, k K) {
	if n := m[k] - 1; n > 0 {
		m[k] = n
	} else {
		delete(m, k)
	}
}

// Open counts a socket that completed its handshake (for conn_limit). Call
// it once per socket, after the HandshakeSC decision allowed it, and Close
// when it ends. Counts are per worker and survive reloads.
func (c *Chain) Open(s *Socket) {
	st := s.stateFor()
	cc := c.shared.conns
	cc.mu.Lock()
	if st.opened {
		cc.mu.Unlock()
		return
	}
	st.opened = true
	st.countedIP = s.RemoteIP.Unmap()
	cc.ip[st.countedIP]++
	if s.UserID != "" {
		st.countedUser = s.UserID
		cc.user[s.UserID]++
	}
	cc.mu.Unlock()
	c.syncCluster(s, st, true)
}

// UserChanged moves the socket's per-user count to s.UserID; call it after
// the socket's auth state changed (#authenticate, #removeAuthToken, a
// hook's identity).
func (c *Chain) UserChanged(s *Socket) {
	st := s.stateFor()
	cc := c.shared.conns
	cc.mu.Lock()
	if !st.opened {
		cc.mu.Unlock()
		return
	}
	if st.countedUser != s.UserID {
		if st.countedUser != "" {
			dec(cc.user, st.countedUser)
		}
		st.countedUser = s.UserID
		if s.UserID != "" {
			cc.user[s.UserID]++
		}
	}
	cc.mu.Unlock()
	c.syncCluster(s, st, true)
}

// Close undoes Open. Safe to call for a socket never opened, and twice.
func (c *Chain) Close(s *Socket) {
	st := s.state
	if st == nil {
		return
	}
	cc := c.shared.conns
	cc.mu.Lock()
	if !st.opened {
		cc.mu.Unlock()
		return
	}
	st.opened = false
	dec(cc.ip, st.countedIP)
	if st.countedUser != "" {
		dec(cc.user, st.countedUser)
		st.countedUser = ""
	}
	cc.mu.Unlock()
	c.syncCluster(s, st, false)
}

// stateFor returns the socket's state, making it on first use. The worker
// calls the chain for one socket from one goroutine at a time, which is what
// makes the lazy creation safe.
func (s *Socket) stateFor() *socketState {
	if s.state == nil {
		s.state = &socketState{}
	}
	return s.state
}

// socketBucket takes a token from the socket's bucket in slot for lim.
func (c *Chain) socketBucket(s *Socket, slot int, lim limit, now int64) bool {
	st := s.stateFor()
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.chain != c {
		// First use, or the chain was swapped: per-socket buckets start
		// full under the new rules.
		st.chain = c
		st.buckets = make([]bucket, c.socketSlots)
	}
	return st.buckets[slot].take(now, lim.perSec, lim.burst)
}

// syncCluster makes the socket's ConnCounter entries match the chain's
// cluster-scoped conn_limit rules: joined under its IP and user while open,
// left when closed or when the user changed. Called after cc.mu is
// released (Join and Leave talk to the broker client); the worker calls
// Open, UserChanged and Close of one socket one at a time, which keeps them
// in order.
func (c *Chain) syncCluster(s *Socket, st *socketState, open bool) {
	counter := c.shared.counter.get()
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.cBy == nil && (counter == nil || !open || (!c.clusterIP && !c.clusterUser)) {
		return // nothing joined, nothing to join
	}
	var wantIP, wantUser string
	if open && counter != nil {
		if c.clusterIP && s.RemoteIP.IsValid() {
			wantIP = ConnKeyIP(s.RemoteIP)
		}
		if c.clusterUser && s.UserID != "" {
			wantUser = ConnKeyUser(s.UserID)
		}
	}
	if st.cIP != "" && st.cIP != wantIP {
		st.cBy.Leave(st.cIP, s.ID)
		st.cIP = ""
	}
	if st.cUser != "" && st.cUser != wantUser {
		st.cBy.Leave(st.cUser, s.ID)
		st.cUser = ""
	}
	if wantIP != "" && st.cIP == "" {
		counter.Join(wantIP, s.ID)
		st.cIP = wantIP
	}
	if wantUser != "" && st.cUser == "" {
		counter.Join(wantUser, s.ID)
		st.cUser = wantUser
	}
	if st.cIP == "" && st.cUser == "" {
		st.cBy = nil
	} else if counter != nil {
		st.cBy = counter
	}
}
