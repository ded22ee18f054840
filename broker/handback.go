package broker

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/proto/link"
)

// Hand-back: a broker that (re)starts owns channels again whose history
// its peers kept meanwhile — the replica copy (the next broker in the
// channel's rendezvous order receives every history append), or the
// history a peer wrote while it served the channel during the outage. So
// before taking publishes, a starting broker asks every peer which history
// states it holds, and copies each channel it now owns from the peer that
// is the channel's next broker (the one that held the replica, or owned it
// while this broker was away). The copy is a foreign state: served with
// its epoch, and this broker's first publish starts a new, linked epoch
// (history.go). A channel this broker already has history for (reloaded
// from its bbolt file) is left alone.

// HandbackMax bounds how long a starting broker refuses publishes while it
// takes history back.
const HandbackMax = 3 * time.Second

// HandBack copies from the peers in members the history of the channels
// self owns (see above). It is safe to call while links are served;
// publishes should wait for it (Child arranges that).
func (s *Server) HandBack(ctx context.Context, self string, members []link.Member) (int, error) {
	return s.HandBackFrom(ctx, self, members, nil)
}

// HandBackFrom is HandBack asking only the peers named in ask (all of them
// if ask is nil); ownership is still computed over every member. The ring
// view a starting broker first sees can hold only some of its peers
// (memberlist reports the members of a join one by one), so the broker
// asks each peer once, when it first appears.
func (s *Server) HandBackFrom(ctx context.Context, self string, members []link.Member, ask []string) (int, error) {
	names := make([]string, 0, len(members))
	others := make([]string, 0, len(members))
	for _, m := range members {
		names = append(names, m.Name)
		if m.Name != self {
			others = append(others, m.Name)
		}
	}
	copied := 0
	var firstErr error
	for _, m := range members {
		if m.Name == self || (ask != nil && !slices.Contains(ask, m.Name)) {
			continue
		}
		n, err := s.handBackFrom(ctx, self, m, names, others)
		copied += n
		if err != nil && firstErr == nil {
			firstErr = fmt.Errorf("broker: taking history back from %s: %w", m.Name, err)
		}
	}
	return copied, firstErr
}

func (s *Server) handBackFrom(ctx context.Context, self string, peer link.Member, names, others []string) (int, error) {
	c := brokerclient.New(brokerclient.Options{Name: HandbackPrefix + self, MaxFrame: s.cfg.MaxFrame, Logger: s.log.Named("handback"), Secure: s.cfg.Secure})
	defer c.Close()
	c.SetBrokers([]brokerclient.Endpoint{{Name: peer.Name, Addr: peer.Addr}})
	for c.Stats().Connected == 0 {
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		time.Sleep(5 * time.Millisecond) // polling the link with the caller's deadline
	}
	states, err := c.HistoryStates(ctx)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, st := range states {
		if st.Stored == 0 || brokerclient.Owner(names, st.Channel) != self || brokerclient.Owner(others, st.Channel) != peer.Name {
			continue
		}
		if s.hasHistory(st.Channel) {
			continue
		}
		page, err := c.History(ctx, st.Channel, 0, 0)
		if err != nil {
			return n, err
		}
		if s.install(st, page) {
			n++
		}
	}
	return n, nil
}

func (s *Server) hasHistory(channel string) bool {
	sh := s.shard([]byte(channel))
	sh.mu.Lock()
	defer sh.mu.Unlock()
	st := sh.chans[channel]
	return st != nil && (st.offset > 0 || st.hist.n > 0)
}

// install adopts a peer's history for a channel that has none here (it may
// have interest and presence already: those are kept).
func (s *Server) install(hs brokerclient.HistoryState, page brokerclient.HistoryPage) bool {
	sh := s.shard([]byte(hs.Channel))
	sh.mu.Lock()
	defer sh.mu.Unlock()
	st := s.chanLocked(sh, []byte(hs.Channel))
	if st.offset > 0 || st.hist.n > 0 || !st.opts.History() {
		return false // published here meanwhile, or no history by this broker's rules
	}
	epoch := brokerclient.ParseEpoch(page.Epoch)
	if epoch == 0 {
		return false
	}
	st.epoch, st.prevEpoch, st.prevTop, st.offset, st.foreign = epoch, 0, 0, page.Offset, true
	if epoch == hs.Epoch {
		st.prevEpoch, st.prevTop = hs.PrevEpoch, hs.PrevTop
	}
	for _, m := range page.Messages {
		st.hist.add(st.opts.HistorySize, m.Offset, m.Time.UnixNano(), m.Data)
	}
	st.idleSince = time.Now().UnixNano()
	return true
}

// historyStates lists the channel states that hold history.
func (s *Server) historyStates() []brokerclient.HistoryState {
	out := []brokerclient.HistoryState{}
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for name, st := range sh.chans {
			if st.hist.n > 0 {
				out = append(out, brokerclient.HistoryState{Channel: name, Epoch: st.epoch, PrevEpoch: st.prevEpoch, PrevTop: st.prevTop, Offset: st.offset, Stored: st.hist.n})
			}
		}
		sh.mu.Unlock()
	}
	return out
}

// HoldForHandback makes publishes wait (as during warm-up) until
// HandbackDone, or HandbackMax passes. Call it before Serve.
func (s *Server) HoldForHandback() {
	s.handback.Store(time.Now().Add(HandbackMax).UnixNano())
}

// HandbackDone releases the hold.
func (s *Server) HandbackDone() { s.handback.Store(0) }
