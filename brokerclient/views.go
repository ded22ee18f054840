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
// The client instead keeps the latest view of each up link and counts
// votes: a member is in the set when at least half of the *other*
// reporting brokers list it (same name and address). A broker does not
// vote on itself: its own view always lists it, and a broker cut off by a
// partition keeps its link (and its stale view) until the link times out,
// which must not keep it in. Half, not a strict majority: with one other
// voter, a view that lags behind a join does not remove the newcomer. So a
// join takes effect once half of the others have heard of it, a departure
// once more than half of the others noticed it (a dead broker's own link
// goes down and its report with it). A member with no other voter (the
// only reporting broker) is in if its own view lists it.

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

// publishViewLocked calls OnMembers with the voted view when it differs
// from the last one given. Under viewsMu so that reports from different
// links reach OnMembers one at a time and in the order they were combined.
func (c *Client) publishViewLocked() {
	if len(c.views) == 0 || c.opts.OnMembers == nil || c.isClosed.Load() {
		return
	}
	reports := make([]report, 0, len(c.views))
	for b, eps := range c.views {
		reports = append(reports, report{by: b.ep.Name, eps: eps})
	}
	set := votedView(reports)
	// lastView is nil until the first call (votedView never returns nil).
	if c.lastView != nil && slices.Equal(set, c.lastView) {
		return
	}
	c.lastView = set
	c.opts.OnMembers(slices.Clone(set))
}

// report is one broker's view of the ring.
type report struct {
	by  string // the reporting broker's name
	eps []Endpoint
}

// votedView returns the endpoints listed by at least half of the reports
// of brokers other than the endpoint itself (by its own report alone if
// there is no other), sorted by name.
func votedView(reports []report) []Endpoint {
	cand := map[Endpoint]bool{}
	for _, r := range reports {
		for _, ep := range r.eps {
			cand[ep] = true
		}
	}
	set := []Endpoint{}
	for ep := range cand {
		voters, yes, self := 0, 0, false
		for _, r := range reports {
			listed := slices.Contains(r.eps, ep)
			if r.by == ep.Name {
				self = self || listed
				continue
			}
			voters++
			if listed {
				yes++
			}
		}
		if (voters == 0 && self) || (voters > 0 && 2*yes >= voters) {
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
