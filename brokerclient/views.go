package brokerclient

import (
	"slices"
	"strings"
)

// Ring views. Every linked broker reports its own view of the ring (a
// members frame after hello and after each ring change), and those views
// disagree while gossip converges: a broker that has not yet heard of a
// joining member reports the ring without it. Handing each report to
// OnMembers as it came made the last reporter win, so a lagging broker
// could remove a live member from the worker's set for a moment, moving
// its channels away and back, failing its in-flight publishes and
// replicas (seen as TestRingHandBackAfterSIGKILL's replicated 34 of 50).
//
// The client instead keeps the latest view of each up link and reports
// the members that at least half of the reporting links list (same name
// and address). Half, not a strict majority: a broker that has just joined
// can report a view holding little more than itself (the others' link
// addresses travel in gossip metadata and arrive a moment later), and with
// two reporters a strict majority would let that view remove everyone
// else. So a join takes effect once half of the brokers have heard of it,
// and a departure once more than half have noticed it (a dead broker's own
// link goes down and its report with it; with the default two brokers the
// survivor's view alone decides, as before). With one reporter, its view
// is the set.

// noteView records the view b reported and reports the combined view if
// it changed.
func (c *Client) noteView(b *bconn, eps []Endpoint) {
	slices.SortFunc(eps, func(x, y Endpoint) int { return strings.Compare(x.Name, y.Name) })
	c.viewsMu.Lock()
	defer c.viewsMu.Unlock()
	if c.views == nil {
		c.views = map[*bconn][]Endpoint{}
	}
	c.views[b] = eps
	c.publishViewLocked()
}

// dropView forgets b's view (its link went down or it left the set).
func (c *Client) dropView(b *bconn) {
	c.viewsMu.Lock()
	defer c.viewsMu.Unlock()
	if _, ok := c.views[b]; !ok {
		return
	}
	delete(c.views, b)
	c.publishViewLocked()
}

// publishViewLocked calls OnMembers with the majority view when it differs
// from the last one given. Under viewsMu so that reports from different
// links reach OnMembers one at a time and in the order they were combined.
func (c *Client) publishViewLocked() {
	if len(c.views) == 0 || c.opts.OnMembers == nil || c.isClosed.Load() {
		return
	}
	set := majorityView(c.views)
	if c.viewSent && slices.Equal(set, c.lastView) {
		return
	}
	c.lastView, c.viewSent = set, true
	c.opts.OnMembers(slices.Clone(set))
}

// majorityView returns the endpoints listed by at least half of views,
// sorted by name.
func majorityView[K comparable](views map[K][]Endpoint) []Endpoint {
	count := map[Endpoint]int{}
	for _, v := range views {
		for _, ep := range v {
			count[ep]++
		}
	}
	set := []Endpoint{}
	for ep, n := range count {
		if 2*n >= len(views) {
			set = append(set, ep)
		}
	}
	slices.SortFunc(set, func(x, y Endpoint) int {
		if d := strings.Compare(x.Name, y.Name); d != 0 {
			return d
		}
		return strings.Compare(x.Addr, y.Addr)
	})
	return set
}
