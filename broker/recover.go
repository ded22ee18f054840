package broker

import (
	"time"

	"github.com/shoalhq/shoal/proto/link"
)

// subscribeRecover registers interest like sub and answers with the missed
// messages (hist frames) and a reply carrying the channel's epoch, its top
// offset and whether the gap was filled. All of it is queued under the shard
// lock before the link joins the channel's fan-out, so the worker sees the
// missed messages, then the reply, then live messages with offsets above the
// reply's: no gap and no duplicate at the seam. If the link was already
// interested, live messages keep flowing; those queued before the reply have
// offsets ≤ its offset and are part of the recovery when they were missed.
func (l *blink) subscribeRecover(f *link.Frame) {
	s := l.s
	name := string(f.Channel)
	_, already := l.chans[name]
	if !already {
		l.chans[name] = struct{}{}
	}
	sh := s.shard(f.Channel)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	st := s.chanLocked(sh, f.Channel)
	now := time.Now().UnixNano()
	from, ok := s.recoverable(st, f.Since, f.Epoch, now)
	buf := sh.scratch[:0]
	flags := uint8(0)
	if ok {
		flags = link.FlagRecovered
		for i := st.hist.from(from); i < st.hist.n; i++ {
			e := st.hist.at(i)
			buf = link.AppendHist(buf, f.ReqID, e.off, e.t, e.data)
		}
	}
	buf = link.AppendReply(buf, f.ReqID, st.offset, st.epoch, flags, nil)
	// The reply is bounded by the channel's history size and must not be
	// cut in half by the queue bound.
	_ = l.w.WriteRawAlways(buf)
	if cap(buf) > 256<<10 {
		buf = nil
	}
	sh.scratch = buf
	if !already {
		st.links = append(st.links, l)
	}
}

// historyPage answers a histreq: messages with offsets above since (from the
// oldest kept when since is 0), at most limit, then a reply with the epoch,
// the top offset, and FlagMore when the page was cut by the limit.
func (l *blink) historyPage(f *link.Frame) error {
	s := l.s
	sh := s.shard(f.Channel)
	sh.mu.Lock()
	st := sh.chans[string(f.Channel)]
	var buf []byte
	var top, epoch uint64
	flags := uint8(0)
	if st != nil {
		top, epoch = st.offset, st.epoch
		st.hist.expire(st.opts.HistoryTTL, time.Now().UnixNano())
		limit := f.Limit
		if limit == 0 {
			limit = uint64(st.hist.n)
		}
		n := uint64(0)
		for i := st.hist.from(f.Since + 1); i < st.hist.n; i++ {
			if n == limit {
				flags |= link.FlagMore
				break
			}
			e := st.hist.at(i)
			buf = link.AppendHist(buf, f.ReqID, e.off, e.t, e.data)
			n++
		}
	}
	sh.mu.Unlock()
	buf = link.AppendReply(buf, f.ReqID, top, epoch, flags, nil)
	return l.w.WriteRawAlways(buf)
}

// replicate stores a history append forwarded by a worker from the
// channel's owner (this broker is the next in the channel's rendezvous
// order). The state is foreign: if the owner dies and this broker becomes
// the owner, it serves this history and continues its offsets under a new,
// linked epoch. An append under another epoch than the one held replaces
// the replica: the sender's owner is the owner now.
func (l *blink) replicate(f *link.Frame) error {
	s := l.s
	sh := s.shard(f.Channel)
	sh.mu.Lock()
	st := sh.chans[string(f.Channel)] // no string allocated for the lookup
	if st == nil {
		name := string(f.Channel)
		st = s.newChan(name)
		st.epoch, st.foreign = f.Epoch, true
		sh.chans[name] = st
	}
	errText := ""
	switch {
	case !st.opts.History():
		errText = "channel keeps no history on this broker"
	case f.Epoch != st.epoch:
		// The sender's owner has another epoch (it restarted, or took the
		// channel back after this broker served it meanwhile): follow the
		// owner and start the replica over.
		st.hist = histRing{}
		st.epoch, st.offset, st.prevEpoch, st.prevTop, st.foreign = f.Epoch, 0, 0, 0, true
	}
	if errText == "" {
		now := time.Now().UnixNano()
		st.hist.add(st.opts.HistorySize, f.Offset, now, f.Data)
		st.hist.expire(st.opts.HistoryTTL, now)
		st.offset = max(st.offset, f.Offset)
		st.idleSince = now
	}
	sh.mu.Unlock()
	flags := uint8(0)
	var data []byte
	if errText != "" {
		flags, data = link.FlagError, []byte(errText)
	}
	l.scratch = link.AppendReply(l.scratch[:0], f.ReqID, f.Offset, f.Epoch, flags, data)
	return l.w.WriteRawAlways(l.scratch)
}
