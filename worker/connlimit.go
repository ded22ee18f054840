package worker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/middleware"
)

// conn_limit scope: cluster (middleware/connlimit.go) over broker presence.
//
// Each socket that completed its handshake keeps one presence entry (conn =
// the session id) on the internal channels "#conn/ip/<addr>" and
// "#conn/user/<sub>" while the chain has a cluster-scoped conn_limit rule
// for that key; the check counts the channel's entries on its owning broker
// (PresenceCount, one round trip). The broker client re-announces the
// entries after a broker restart or an owner change, and the brokers drop a
// dead worker's entries with its link, so a crashed worker's sockets stop
// counting on their own. A handshake under way is checked with a join and
// count in one step (Reserve) under a reservation id of its
// middleware.Hold, left once the socket is open (and joined under its
// session id) or gone. The channels start with '#': clients cannot
// subscribe to them, and the broker client also keeps shadows of them on
// the other brokers (one extra small message per broker per join/leave).

// connChannelPrefix starts the conn_limit presence channels.
const connChannelPrefix = "#conn/"

// maxConnChannel bounds a conn_limit channel name; a longer user id is
// replaced by its SHA-256.
const maxConnChannel = 512

// connPresence is what the cluster conn_limit needs of the broker client.
type connPresence interface {
	PresenceJoin(channel string, e brokerclient.PresenceEntry) error
	PresenceJoinCounted(channel string, e brokerclient.PresenceEntry) (func(context.Context) (int, error), error)
	PresenceLeave(channel, conn string)
	PresenceCount(ctx context.Context, channel string) (int, error)
}

var _ connPresence = (*brokerclient.Client)(nil)

// brokerConnCounter is middleware.ConnCounter over broker presence.
type brokerConnCounter struct {
	b   connPresence
	log hclog.Logger
}

// connChannel is the presence channel of a conn_limit key.
func connChannel(key string) string {
	ch := connChannelPrefix + key
	if len(ch) > maxConnChannel {
		sum := sha256.Sum256([]byte(key))
		ch = connChannelPrefix + "h/" + hex.EncodeToString(sum[:])
	}
	return ch
}

func (c brokerConnCounter) Join(key, conn string) {
	if err := c.b.PresenceJoin(connChannel(key), brokerclient.PresenceEntry{Conn: conn}); err != nil {
		c.log.Warn("conn_limit: cannot register the socket with the brokers", "key", key, "error", err)
	}
}

func (c brokerConnCounter) Leave(key, conn string) { c.b.PresenceLeave(connChannel(key), conn) }

func (c brokerConnCounter) Count(ctx context.Context, key string) (int, error) {
	return c.b.PresenceCount(ctx, connChannel(key))
}

// Reserve is the handshake check's join-and-count (middleware.ConnReserver):
// the owning broker counts the other entries in the same step as the join.
func (c brokerConnCounter) Reserve(key, conn string) (func(context.Context) (int, error), error) {
	return c.b.PresenceJoinCounted(connChannel(key), brokerclient.PresenceEntry{Conn: conn})
}

var _ middleware.ConnReserver = brokerConnCounter{}

// installConnCounter gives the chain the broker-backed counter when the
// engine takes a chain with a cluster-scoped conn_limit rule (New and
// SetChain; the counter then stays for every reloaded chain). A worker without brokers
// (or a broker without presence) keeps counting its own sockets only.
func (e *Engine) installConnCounter(chain *middleware.Chain) {
	if !chain.WantsConnCounter() {
		return
	}
	if b, ok := e.cfg.Broker.(connPresence); ok {
		chain.SetConnCounter(brokerConnCounter{b: b, log: e.log})
	}
}
