package brokerclient

import (
	"slices"
	"strings"
	"sync"

	"github.com/shoalhq/shoal/proto/control"
)

// Membership combines the worker's two views of the broker set and feeds the
// result to SetBrokers (still the client's single entry point):
//
//   - the supervisor's topology: only this node's brokers, but it learns of a
//     local broker's death at once (the process exits);
//   - the ring's reports (Options.OnMembers): every node's brokers, but a
//     crash takes the failure detector's ~0.6 s to show.
//
// Until the first ring report the set is the topology's ready brokers. From
// then on it is the ring's list minus any broker whose link address the
// topology knows as not ready (dead, restarting, draining), so a local
// broker's channels move as soon as the supervisor sees it go, and the
// ring's slower verdict only matters for other nodes.
//
// Trade-off (docs/brokers.md): the shortest publish gap, but a restarted
// broker's channels move away and back, and a move has a short window in
// which a publisher's worker has moved and a subscriber's has not. Following
// the ring alone keeps channels in place across a quick restart (publishes
// fail instead, and the broker's warm-up loses nothing).
type Membership struct {
	c *Client

	mu       sync.Mutex
	topo     []Endpoint      // ready brokers from the topology
	notReady map[string]bool // link addresses the topology says are not ready
	ring     []Endpoint
	ringSeen bool
	last     []Endpoint // what SetBrokers was last given
	applied  bool
}

// NewMembership returns a Membership feeding c.
func NewMembership(c *Client) *Membership {
	return &Membership{c: c, notReady: map[string]bool{}}
}

// FromTopology takes a topology pushed by the supervisor.
func (m *Membership) FromTopology(t control.Topology) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.topo = m.topo[:0]
	clear(m.notReady)
	for _, p := range t.ByRole(control.RoleBroker) {
		addr := p.Addrs[control.AddrLink]
		if addr == "" {
			continue
		}
		if p.State == control.StateReady {
			m.topo = append(m.topo, Endpoint{Name: p.Name, Addr: addr})
		} else {
			m.notReady[addr] = true
		}
	}
	m.applyLocked()
}

// FromRing takes a ring report; use it as Options.OnMembers.
func (m *Membership) FromRing(eps []Endpoint) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ring = append(m.ring[:0], eps...)
	m.ringSeen = true
	m.applyLocked()
}

func (m *Membership) applyLocked() {
	var set []Endpoint
	if !m.ringSeen {
		set = append(set, m.topo...)
	} else {
		for _, ep := range m.ring {
			if !m.notReady[ep.Addr] {
				set = append(set, ep)
			}
		}
	}
	slices.SortFunc(set, func(a, b Endpoint) int { return strings.Compare(a.Name, b.Name) })
	if m.applied && slices.Equal(set, m.last) {
		return
	}
	m.last, m.applied = set, true
	// Under m.mu so that two sources cannot apply out of order; SetBrokers
	// never calls back into the Membership.
	m.c.SetBrokers(set)
}

// Brokers returns the current broker set, sorted by name.
func (c *Client) Brokers() []Endpoint {
	ms := *c.members.Load()
	out := make([]Endpoint, len(ms))
	for i, b := range ms {
		out[i] = b.ep
	}
	return out
}
