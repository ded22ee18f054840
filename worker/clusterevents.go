package worker

import (
	"context"
	"strings"
	"time"

	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/webhook"
)

// Webhook events with cluster-wide meaning (docs/api.md, "Webhooks from
// the worker").
//
// A worker sees only its own sessions: its first subscriber of a channel is
// not the cluster's first. The brokers already hold one place per key that
// every worker reaches: the owner of an internal channel. So each worker
// that hosts a user, or has subscribers on a channel, keeps one presence
// entry (conn = the worker's name) on "#user/<id>" or "#chan/<channel>".
// When its local state goes up it asks the count first and then joins;
// it emits user.online / channel.occupied only when no other worker was
// there. When its local state goes down it leaves first and then asks the
// count; it emits user.offline / channel.vacated only when no worker is
// left. Two workers racing may both emit (duplicates are allowed: webhook
// receivers must treat events as states); a worker whose count query fails
// emits anyway, for the same reason.
//
// The queries run on one goroutine, in the order the local changes
// happened, so the events of one key leave this worker in order. The queue
// is bounded; when it is full the event is emitted with this worker's
// meaning only (counted in cluster_events_local).

// chanPresencePrefix is the internal channel of a channel's occupancy.
const chanPresencePrefix = "#chan/"

// clusterEventQueue bounds the changes waiting for their broker round trip.
const clusterEventQueue = 4096

// clusterQueryTimeout bounds one count query.
const clusterQueryTimeout = 2 * time.Second

type clusterEvent struct {
	user bool // user event (else channel)
	key  string
	up   bool
	// orphan: a broker's vacated notice for a dead worker's key (Vacated);
	// this worker holds no entry there, so it only counts.
	orphan bool
}

// presenceCounter is the broker client's PresenceCount.
type presenceCounter interface {
	PresenceCount(ctx context.Context, channel string) (int, error)
}

// startClusterEvents starts the deciding goroutine when webhooks are on
// and the broker can count presence.
func (e *Engine) startClusterEvents() {
	if e.cfg.Webhooks == nil {
		return
	}
	if _, ok := e.cfg.Broker.(presenceCounter); !ok || e.recoveryBroker() == nil {
		return
	}
	e.events = make(chan clusterEvent, clusterEventQueue)
	e.bg.Add(1)
	go e.decideEvents()
}

// clusterEvent records a local change of a user's or channel's state.
// Never blocks (it runs under the hub's and the user registry's locks).
func (e *Engine) clusterEvent(ev clusterEvent) {
	if e.cfg.Webhooks == nil {
		return
	}
	if e.events != nil {
		e.eventsPending.Add(1)
		select {
		case e.events <- ev:
			return
		default:
			e.eventsPending.Add(-1)
			e.stats.eventsLocal.Add(1)
		}
	}
	e.emitEvent(ev)
}

func (e *Engine) emitEvent(ev clusterEvent) {
	var w webhook.Event
	switch {
	case ev.user && ev.up:
		w = webhook.Event{Type: webhook.UserOnline, User: ev.key}
	case ev.user:
		w = webhook.Event{Type: webhook.UserOffline, User: ev.key}
	case ev.up:
		w = webhook.Event{Type: webhook.ChannelOccupied, Channel: ev.key}
	default:
		w = webhook.Event{Type: webhook.ChannelVacated, Channel: ev.key}
	}
	e.cfg.Webhooks.Emit(w)
}

// decideEvents turns local changes into cluster-wide events (see above).
func (e *Engine) decideEvents() {
	defer e.bg.Done()
	rb := e.recoveryBroker()
	pc := e.cfg.Broker.(presenceCounter)
	me := brokerclient.PresenceEntry{Conn: e.cfg.Name, Worker: e.cfg.Name}
	count := func(ch string) (int, error) {
		ctx, cancel := context.WithTimeout(context.Background(), clusterQueryTimeout)
		defer cancel()
		go func() { // end the query early when the engine stops
			select {
			case <-e.stop:
				cancel()
			case <-ctx.Done():
			}
		}()
		return pc.PresenceCount(ctx, ch)
	}
	for {
		var ev clusterEvent
		select {
		case ev = <-e.events:
		case <-e.stop:
			return
		}
		e.decide(ev, rb, me, count)
		e.eventsPending.Add(-1)
	}
}

// decide handles one local change: count-then-join going up,
// leave-then-count going down; emit when no other worker is there.
func (e *Engine) decide(ev clusterEvent, rb RecoveryBroker, me brokerclient.PresenceEntry, count func(string) (int, error)) {
	ch := chanPresencePrefix + ev.key
	if ev.user {
		ch = userChannelPrefix + ev.key
	}
	if ev.up {
		n, err := count(ch)
		if jerr := rb.PresenceJoin(ch, me); jerr != nil {
			e.log.Warn("announcing occupancy", "channel", ch, "error", jerr)
		}
		if err != nil || n == 0 {
			e.emitEvent(ev)
		}
		return
	}
	if !ev.orphan {
		rb.PresenceLeave(ch, me.Conn)
	}
	if n, err := count(ch); err != nil || n == 0 {
		e.emitEvent(ev)
	}
}

// Vacated is the broker client's OnVacated: a worker died (SIGKILL, or its
// node vanished) while it was the last one holding a user or a channel, so
// it could not report user.offline / channel.vacated itself. The broker
// that removed its entries hands the notice to one live worker — this one
// — which reports the event after checking, in the same ordered queue as
// its own changes, that nobody took the key meanwhile. The notice reaches
// exactly one worker; if this worker dies before deciding it, it is lost
// (a double failure).
func (e *Engine) Vacated(channel string) {
	var ev clusterEvent
	switch {
	case strings.HasPrefix(channel, userChannelPrefix):
		ev = clusterEvent{user: true, key: channel[len(userChannelPrefix):], orphan: true}
	case strings.HasPrefix(channel, chanPresencePrefix):
		ev = clusterEvent{key: channel[len(chanPresencePrefix):], orphan: true}
	default:
		return
	}
	if ev.key == "" || e.cfg.Webhooks == nil {
		return
	}
	e.log.Debug("reporting for a dead worker", "channel", channel)
	e.clusterEvent(ev)
}

// FlushEvents waits until the changes queued for a cluster-wide decision
// have been decided and handed to the webhook sender (Drain, before the
// sender is closed), or until ctx ends.
func (e *Engine) FlushEvents(ctx context.Context) {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for e.eventsPending.Load() > 0 {
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
	}
}
