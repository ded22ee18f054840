package broker

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/proto/link"
)

// Presence lives on the channel's owner, keyed by connection id, and each
// entry belongs to the worker link that announced it: when that link dies
// (the worker crashed, or its node died and the link timed out) every entry
// it announced is removed, with leave events. Entries are not replicated
// between brokers: when a broker dies, the workers re-announce their
// connections' entries to the channel's new owner (brokerclient keeps them,
// like interests), so presence is rebuilt without a central store and
// without ghosts.

// ChannelInfo is one channel in a channel list.
type ChannelInfo struct {
	Channel  string   `json:"channel"`
	Workers  int      `json:"workers"`  // worker links with interest
	Names    []string `json:"names"`    // their workers' names (the API asks them for socket counts)
	Presence int      `json:"presence"` // presence entries
	Offset   uint64   `json:"offset"`
	Epoch    uint64   `json:"epoch"`
}

type presEntry struct {
	raw  []byte // the entry's JSON as announced (copied)
	user string
	l    *blink
}

var errBadPresence = errors.New("broker: bad presence entry")

// presence runs one pres frame on the link's reader goroutine and answers it.
func (l *blink) presence(f *link.Frame) error {
	var data []byte
	var count uint64
	var err error
	flags := uint8(0)
	switch f.Op {
	case link.PresJoin, link.PresUpdate:
		// The reply counts the channel's other entries, taken in the same
		// step as the join (worker/clusterevents.go decides webhooks on it:
		// a count asked separately could see a state between two workers'
		// changes).
		var others int
		others, err = l.presJoin(string(f.Channel), f.Data)
		count, flags = uint64(others), link.FlagCounted
	case link.PresLeave:
		count, flags = uint64(l.presLeave(string(f.Channel), string(f.Data))), link.FlagCounted
	case link.PresShadowJoin:
		err = l.shadowJoin(string(f.Channel), f.Data)
	case link.PresShadowLeave:
		l.shadowLeave(string(f.Channel), string(f.Data))
	case link.PresList:
		if len(f.Data) > 0 && f.Data[0] == link.PresPageMark {
			var more bool
			data, count, more = l.s.presPage(string(f.Channel), string(f.Data[1:]), l.s.replyBudget())
			if more {
				flags = link.FlagMore
			}
		} else {
			data, count, _ = l.s.presPage(string(f.Channel), "", math.MaxInt)
		}
	case link.PresCount:
		count = uint64(l.s.Presence(string(f.Channel)))
	case link.PresUser:
		data, err = json.Marshal(l.s.userChannels(string(f.Channel)))
	case link.PresChannels:
		var more bool
		data, more, err = l.s.channelPage(string(f.Data), l.s.replyBudget())
		if more {
			flags = link.FlagMore
		}
	case link.PresHistory:
		data, err = json.Marshal(l.s.historyStates())
	default:
		err = fmt.Errorf("broker: unknown presence op %d", f.Op)
	}
	if err == nil && link.HeaderSize+replyOverhead+len(data) > l.s.cfg.MaxFrame {
		// The worker's decoder would refuse the frame and drop the link:
		// answer an error instead (a presence list of a huge channel).
		err = fmt.Errorf("broker: the answer (%d bytes) does not fit a link frame (%d); ask for counts instead", len(data), l.s.cfg.MaxFrame)
	}
	if err != nil {
		flags, data = link.FlagError, []byte(err.Error())
	}
	return l.w.WriteRawAlways(link.AppendReply(nil, f.ReqID, count, 0, flags, data))
}

// presJoin adds or replaces an entry and returns how many other entries
// the channel holds.
func (l *blink) presJoin(channel string, raw []byte) (others int, err error) {
	var e brokerclient.PresenceEntry // the entry as the worker sent it
	if err := json.Unmarshal(raw, &e); err != nil || e.Conn == "" {
		return 0, fmt.Errorf("%w: %v", errBadPresence, err)
	}
	if e.Worker == "" {
		e.Worker = l.name()
		if b, err := json.Marshal(e); err == nil {
			raw = b
		}
	}
	raw = slices.Clone(raw)
	s := l.s
	sh := s.shard([]byte(channel))
	sh.mu.Lock()
	st := s.chanLocked(sh, []byte(channel))
	if st.pres == nil {
		st.pres = map[string]*presEntry{}
	}
	_, existed := st.pres[e.Conn]
	st.pres[e.Conn] = &presEntry{raw: raw, user: e.User, l: l}
	if !existed && st.opts.JoinLeave {
		s.event(st, link.EventJoin, channel, raw)
	}
	others = len(st.pres) - 1
	sh.mu.Unlock()
	connSetAdd(&l.pres, channel, e.Conn)
	return others, nil
}

// presLeave removes an entry and returns how many the channel still holds.
func (l *blink) presLeave(channel, conn string) (left int) {
	connSetRemove(l.pres, channel, conn)
	left, _ = l.s.dropPresence(l, channel, conn)
	return left
}

// connSetAdd and connSetRemove keep a link's channel → connections index
// (its presence entries, or its shadows), so that a dead link's entries can
// be found without scanning every channel.
func connSetAdd(m *map[string]map[string]struct{}, channel, conn string) {
	if *m == nil {
		*m = map[string]map[string]struct{}{}
	}
	if (*m)[channel] == nil {
		(*m)[channel] = map[string]struct{}{}
	}
	(*m)[channel][conn] = struct{}{}
}

func connSetRemove(m map[string]map[string]struct{}, channel, conn string) {
	if cs := m[channel]; cs != nil {
		delete(cs, conn)
		if len(cs) == 0 {
			delete(m, channel)
		}
	}
}

// shadowJoin keeps a shadow entry (link.PresShadowJoin): not listed, not
// counted, no events; it only lets this broker notice, should it become the
// channel's owner, that a dead worker's entry was the channel's last.
func (l *blink) shadowJoin(channel string, raw []byte) error {
	if !strings.HasPrefix(channel, "#") {
		return fmt.Errorf("%w: shadow entries are for internal channels, not %q", errBadPresence, channel)
	}
	var e brokerclient.PresenceEntry // the entry as the worker sent it
	if err := json.Unmarshal(raw, &e); err != nil || e.Conn == "" {
		return fmt.Errorf("%w: %v", errBadPresence, err)
	}
	s := l.s
	sh := s.shard([]byte(channel))
	sh.mu.Lock()
	st := s.chanLocked(sh, []byte(channel))
	if st.shadow == nil {
		st.shadow = map[string]*blink{}
	}
	st.shadow[e.Conn] = l // the link only: shadows are never listed
	sh.mu.Unlock()
	connSetAdd(&l.shadows, channel, e.Conn)
	return nil
}

func (l *blink) shadowLeave(channel, conn string) {
	connSetRemove(l.shadows, channel, conn)
	l.s.dropShadow(l, channel, conn)
}

// dropShadow removes a shadow entry this link owns; it reports whether the
// channel is then left with no entry at all (shadow or not).
func (s *Server) dropShadow(l *blink, channel, conn string) bool {
	sh := s.shard([]byte(channel))
	sh.mu.Lock()
	defer sh.mu.Unlock()
	st := sh.chans[channel]
	if st == nil || st.shadow[conn] != l {
		return false
	}
	delete(st.shadow, conn)
	if len(st.shadow) > 0 {
		return false
	}
	st.shadow = nil
	st.idleSince = time.Now().UnixNano()
	return len(st.pres) == 0
}

// dropPresence removes one entry if this link owns it (a connection that
// moved to another worker keeps the newer entry). It returns how many
// entries the channel still holds, and whether this removed its last one
// (with no shadow left either).
func (s *Server) dropPresence(l *blink, channel, conn string) (left int, emptied bool) {
	sh := s.shard([]byte(channel))
	sh.mu.Lock()
	defer sh.mu.Unlock()
	st := sh.chans[channel]
	if st == nil || st.pres == nil {
		return 0, false
	}
	e := st.pres[conn]
	if e == nil || e.l != l {
		return len(st.pres), false
	}
	delete(st.pres, conn)
	left = len(st.pres)
	if len(st.pres) == 0 {
		st.pres = nil
		st.idleSince = time.Now().UnixNano()
		emptied = len(st.shadow) == 0
	}
	if st.opts.JoinLeave {
		s.event(st, link.EventLeave, channel, e.raw)
	}
	return left, emptied
}

// Vacated notices (link.EventVacated).
//
// The workers turn their local changes into cluster-wide webhook events by
// keeping one presence entry each on internal channels ("#user/<id>",
// "#chan/<channel>"; worker/clusterevents.go): the worker whose leave
// empties such a channel reports user.offline / channel.vacated. A worker
// that dies cannot; its entries are removed here, when its link dies
// (at once for a crashed process, after IdleTimeout for a vanished node).
// So when that removal empties an internal channel, the broker — which
// survives — hands a vacated notice to exactly one other live worker link,
// which reports the event. With no such link (a one-worker node whose
// worker is restarting) the notices wait, bounded, for the next worker
// link that says ready.

// Which broker reports: the channel's owner in this broker's ring view.
// While the owner lives, it holds the entries and reports (the others only
// hold shadows and stay quiet). When a whole node vanished with the owner
// of a key, its workers' links to the surviving brokers time out after
// IdleTimeout — by then the ring has dropped the dead brokers and one of
// the survivors is the owner in everyone's view: it held shadows of the
// dead workers' entries and the survivors' re-announced entries, so it
// knows when the last one went. Without a ring view (no gossip) a broker
// reports what it holds as owner only.
//
// The limit: two brokers whose ring views disagree at that moment may both
// report, or neither; and a worker that dies before its entries reached
// the brokers is never reported.

// reportsVacated tells whether this broker reports channel's vacancy: it
// owns channel in its ring view; without a ring view, only for the entries
// it holds as owner (not for shadows).
func (s *Server) reportsVacated(channel string, shadow bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.members) == 0 || s.ringName == "" {
		return !shadow
	}
	names := make([]string, len(s.members))
	for i, m := range s.members {
		names[i] = m.Name
	}
	return brokerclient.Owner(names, channel) == s.ringName
}

// SetRingName tells the server its own name in the ring view (SetMembers),
// which may differ from its link name (name@host:port across hosts).
func (s *Server) SetRingName(name string) {
	s.mu.Lock()
	s.ringName = name
	s.mu.Unlock()
}

// maxOrphans bounds the vacated notices waiting for a worker link.
const maxOrphans = 10000

// HandbackPrefix starts the hello name of a broker's own hand-back client
// (handback.go): such links are not workers and get no vacated notices.
const HandbackPrefix = "handback:"

// vacated schedules a vacated notice per channel, for one live worker link
// (handOut), once the grace below has passed.
//
// A link that drops is not always a dead worker: a network blip or a slow
// link that was cut reconnects within the client's back-off (≤ 250 ms) and
// re-announces its entries. So a notice waits VacatedGrace (default 2 s)
// and is handed out only if the channel is still empty then.
func (s *Server) vacated(channels []string) {
	if len(channels) == 0 {
		return
	}
	due := time.Now().Add(s.cfg.VacatedGrace)
	s.mu.Lock()
	if s.closed {
		// This broker is stopping: its links close because of that, not
		// because their workers died, and the keys move to other brokers.
		s.mu.Unlock()
		return
	}
	for _, ch := range channels {
		s.graced = append(s.graced, gracedVacancy{channel: ch, due: due})
	}
	if n := len(s.graced) - maxOrphans; n > 0 {
		s.log.Warn("dropping vacated notices: too many waiting", "dropped", n)
		s.graced = append(s.graced[:0], s.graced[n:]...)
	}
	s.mu.Unlock()
	select {
	case s.vacKick <- struct{}{}:
	default: // the loop is already due to look
	}
}

// gracedVacancy is a vacated notice waiting out VacatedGrace.
type gracedVacancy struct {
	channel string
	due     time.Time
}

// vacatedLoop hands out the notices whose grace has passed and whose
// channel is still empty (no entry, no shadow). One goroutine per server,
// joined by Close.
func (s *Server) vacatedLoop() {
	defer s.wg.Done()
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	for {
		select {
		case <-s.stopSweep:
			return
		case <-s.vacKick:
		case <-t.C:
		}
		now := time.Now()
		var ready []string
		next := time.Duration(-1)
		s.mu.Lock()
		keep := s.graced[:0]
		for _, g := range s.graced {
			if g.due.After(now) {
				keep = append(keep, g)
				if d := g.due.Sub(now); next < 0 || d < next {
					next = d
				}
				continue
			}
			ready = append(ready, g.channel)
		}
		clear(s.graced[len(keep):])
		s.graced = keep
		s.mu.Unlock()
		if !t.Stop() {
			select {
			case <-t.C:
			default:
			}
		}
		if next >= 0 {
			t.Reset(next)
		}
		var still []string
		for _, ch := range ready {
			if s.emptyChannel(ch) {
				still = append(still, ch)
			} else {
				s.log.Debug("vacancy refilled within the grace; not reported", "channel", ch)
			}
		}
		s.handOut(still)
	}
}

// emptyChannel reports whether channel has no presence entry and no shadow.
func (s *Server) emptyChannel(channel string) bool {
	sh := s.shard([]byte(channel))
	sh.mu.Lock()
	defer sh.mu.Unlock()
	st := sh.chans[channel]
	return st == nil || (len(st.pres) == 0 && len(st.shadow) == 0)
}

// handOut queues vacated notices and gives them to the first eligible
// worker link.
func (s *Server) handOut(channels []string) {
	if len(channels) == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	for _, ch := range channels {
		s.orphans = append(s.orphans, link.AppendEvent(nil, link.EventVacated, ch, nil))
	}
	if n := len(s.orphans) - maxOrphans; n > 0 {
		s.log.Warn("dropping vacated notices: no worker link took them", "dropped", n)
		s.orphans = append(s.orphans[:0], s.orphans[n:]...)
	}
	s.norphans.Store(int64(len(s.orphans)))
	for l := range s.links {
		if s.flushOrphansLocked(l) {
			return
		}
	}
	s.log.Debug("vacated notices wait for a worker link", "pending", len(s.orphans))
}

// flushOrphansLocked queues the waiting vacated notices on l if it is an
// eligible worker link; it reports whether none is left waiting. s.mu held.
//
// Eligible: a worker (not a hand-back client) that sent ready and whose
// last ping is recent (within half the IdleTimeout, i.e. 1.5 of the
// workers' ping intervals by default). The freshness check matters when a
// whole node vanished: its workers' links time out one after the other,
// and the first one's notices must not go to a sibling that is just as
// dead but not yet timed out.
func (s *Server) flushOrphansLocked(l *blink) bool {
	fresh := time.Now().UnixNano()-l.lastPing.Load() < int64(s.cfg.IdleTimeout/2)
	if !l.ready.Load() || !fresh || strings.HasPrefix(l.name(), HandbackPrefix) {
		return len(s.orphans) == 0
	}
	sent := 0
	for _, f := range s.orphans {
		if l.w.WriteRaw(f) != nil {
			break // full or closing: the rest go to another link
		}
		sent++
	}
	if sent > 0 {
		s.log.Debug("vacated notices handed to a worker", "worker", l.name(), "notices", sent)
	}
	clear(s.orphans[:sent])
	s.orphans = s.orphans[sent:]
	s.norphans.Store(int64(len(s.orphans)))
	if len(s.orphans) == 0 {
		s.orphans = nil
		return true
	}
	return false
}

// linkReady marks l as a worker whose interests are registered and gives
// it the vacated notices that wait.
func (l *blink) linkReady() {
	l.ready.Store(true)
	l.pinged()
}

// pinged records a sign of life of the worker (its ping, every few
// seconds whatever the traffic) and hands it the waiting notices.
func (l *blink) pinged() {
	l.lastPing.Store(time.Now().UnixNano())
	s := l.s
	if s.norphans.Load() == 0 {
		return
	}
	s.mu.Lock()
	if len(s.orphans) > 0 {
		s.flushOrphansLocked(l)
	}
	s.mu.Unlock()
}

// event queues a join/leave event to every interested link; a full link
// misses it (events are advisory; Presence is the truth). Shard lock held.
func (s *Server) event(st *chanState, kind uint8, channel string, raw []byte) {
	if len(st.links) == 0 {
		return
	}
	frame := link.AppendEvent(nil, kind, channel, raw)
	for _, dl := range st.links {
		_ = dl.w.WriteRaw(frame)
	}
}

// presPage lists channel's entries sorted by conn id, those after the
// cursor after ("" = from the first), as a JSON array of at most budget
// bytes (at least one entry); more says entries were left out. n is the
// channel's whole count. Pages are read at different moments, so an entry
// that joins or leaves between two pages may be missed or seen: as with any
// presence list, the events say what changed since.
func (s *Server) presPage(channel, after string, budget int) (out []byte, n uint64, more bool) {
	sh := s.shard([]byte(channel))
	sh.mu.Lock()
	defer sh.mu.Unlock()
	st := sh.chans[channel]
	if st == nil || len(st.pres) == 0 {
		return []byte("[]"), 0, false
	}
	conns := make([]string, 0, len(st.pres))
	for c := range st.pres {
		if after == "" || c > after {
			conns = append(conns, c)
		}
	}
	sort.Strings(conns)
	out = []byte{'['}
	for i, c := range conns {
		raw := st.pres[c].raw
		if i > 0 && len(out)+len(raw)+2 > budget {
			more = true
			break
		}
		if i > 0 {
			out = append(out, ',')
		}
		out = append(out, raw...)
	}
	return append(out, ']'), uint64(len(st.pres)), more
}

func (s *Server) userChannels(user string) []string {
	out := []string{}
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for name, st := range sh.chans {
			for _, e := range st.pres {
				if e.user == user {
					out = append(out, name)
					break
				}
			}
		}
		sh.mu.Unlock()
	}
	sort.Strings(out)
	return out
}

// replyOverhead is a reply frame's size beyond its data and header.
const replyOverhead = 8 + 8 + 8 + 1

// replyBudget is how many bytes of channel list one reply carries: far
// below the link's frame limit, so a broker with many channels answers in
// pages instead of one frame the worker would refuse.
func (s *Server) replyBudget() int { return min(256<<10, s.cfg.MaxFrame/2) }

// channelPage is the channel list after channel name after (sorted by
// name), as a JSON array of at most budget bytes (at least one entry);
// more reports that entries were left for the next page.
func (s *Server) channelPage(after string, budget int) (data []byte, more bool, err error) {
	list := s.channelList(after)
	data = append(make([]byte, 0, 256), '[')
	for i, ci := range list {
		b, err := json.Marshal(ci)
		if err != nil {
			return nil, false, fmt.Errorf("broker: encoding the channel list: %w", err)
		}
		if i > 0 && len(data)+len(b)+2 > budget {
			more = true
			break
		}
		if i > 0 {
			data = append(data, ',')
		}
		data = append(data, b...)
	}
	return append(data, ']'), more, nil
}

// channelList lists the channels with interest or presence whose name
// sorts after after ("" = all), sorted by name.
func (s *Server) channelList(after string) []ChannelInfo {
	out := []ChannelInfo{}
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for name, st := range sh.chans {
			if len(st.links) == 0 && len(st.pres) == 0 {
				continue // a replica's or an idle channel's state
			}
			if after != "" && name <= after {
				continue
			}
			names := make([]string, 0, len(st.links))
			for _, l := range st.links {
				names = append(names, l.name())
			}
			sort.Strings(names)
			out = append(out, ChannelInfo{Channel: name, Workers: len(st.links), Names: names, Presence: len(st.pres), Offset: st.offset, Epoch: st.epoch})
		}
		sh.mu.Unlock()
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Channel < out[j].Channel })
	return out
}

// Presence counts channel's entries on this broker, for tests and
// diagnostics; PresCount answers with it too (counting needs no list).
func (s *Server) Presence(channel string) int {
	sh := s.shard([]byte(channel))
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if st := sh.chans[channel]; st != nil {
		return len(st.pres)
	}
	return 0
}
