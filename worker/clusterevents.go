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
// When its local state goes up it joins, and the owner answers how many
// other workers' entries were there in the same step; it emits user.online
// / channel.occupied only when none was. When its local state goes down it
// leaves, the owner answering how many are left; it emits user.offline /
// channel.vacated only when none is. Because the owner counts in the same
// step as each change, the changes of all workers on a key form one
// sequence, and every 0→1 and 1→0 step in it is reported by the worker that
// made it. (Asking the count in a separate request lost events: a user who
// left worker A and came back on worker B within a second could be counted
// by B while A was still there, and A, counting after B's count but before
// B's join, saw nobody and reported offline; A's webhook sender then
// cancelled A's online+offline pair, and the backend never heard the user
// was online.) A worker whose query fails emits anyway (duplicates are
// allowed: webhook receivers must treat events as states).
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

// presenceCounter is the broker client's counting presence calls.
type presenceCounter interface {
	PresenceCount(ctx context.Context, channel string) (int, error)
	// PresenceJoinCount and PresenceLeaveCount change this worker's entry
	// and return the other entries counted in the same step.
	PresenceJoinCount(ctx context.Context, channel string, e brokerclient.PresenceEntry) (others int, err error)
	PresenceLeaveCount(ctx context.Context, channel, conn string) (left int, err error)
}

// startClusterEvents starts the deciding goroutine when webhooks are on
// and the broker can count presence.
func (e *Engine) startClusterEvents() {
	if e.cfg.Webhooks == nil {
		return
	}
	if _, ok := e.cfg.Broker.(presenceCounter); !ok {
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
	pc := e.cfg.Broker.(presenceCounter)
	me := brokerclient.PresenceEntry{Conn: e.cfg.Name, Worker: e.cfg.Name}
	for {
		var ev clusterEvent
		select {
		case ev = <-e.events:
		case <-e.stop:
			return
		}
		e.decide(ev, pc, me)
		e.eventsPending.Add(-1)
	}
}

// decide handles one local change: join or leave, answered with the other
// entries counted in the same step; emit when there are none.
func (e *Engine) decide(ev clusterEvent, pc presenceCounter, me brokerclient.PresenceEntry) {
	ch := chanPresencePrefix + ev.key
	if ev.user {
		ch = userChannelPrefix + ev.key
	}
	ctx, cancel := context.WithTimeout(context.Background(), clusterQueryTimeout)
	defer cancel()
	go func() { // end the query early when the engine stops
		select {
		case <-e.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	var others int
	var err error
	switch {
	case ev.up:
		others, err = pc.PresenceJoinCount(ctx, ch, me)
	case ev.orphan:
		// A dead worker's entry: the broker removed it; this worker holds
		// none there, so it only counts.
		others, err = pc.PresenceCount(ctx, ch)
	default:
		others, err = pc.PresenceLeaveCount(ctx, ch, me.Conn)
	}
	if err != nil {
		e.log.Debug("counting workers for a webhook; sending it anyway", "channel", ch, "error", err)
	}
	if err != nil || others == 0 {
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
