package netpoll

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"strings"
	"time"

	"github.com/gobwas/ws"
	"github.com/hashicorp/go-hclog"
)

// Errors returned by Conn writes and Server.Serve.
var (
	// ErrQueueFull is returned by WriteFrame and WriteText when the
	// connection's send queue is over SendQueueBytes or SendQueueMsgs. The
	// frame was not queued; the caller applies its slow-consumer policy
	// (typically Close with a documented code).
	ErrQueueFull = errors.New("netpoll: send queue full")
	// ErrClosed is returned by writes on a connection that is closing or closed.
	ErrClosed = errors.New("netpoll: connection closed")
	// ErrServerClosed is returned by Serve after Shutdown started.
	ErrServerClosed = errors.New("netpoll: server closed")
)

// Handler receives connection events. Calls for one connection are
// sequential (never concurrent with each other) and run on the read pool, so
// a handler that blocks holds a pool goroutine: keep them short.
type Handler interface {
	// OnOpen is called once after the upgrade response was queued.
	OnOpen(c *Conn)
	// OnMessage is called once per complete text or binary data message.
	// payload is valid only during the call; copy what you keep.
	OnMessage(c *Conn, payload []byte)
	// OnClose is called exactly once per opened connection, whoever closed
	// it: with the peer's close code (1005 if its close frame had none),
	// 1006 when the connection dropped without a close frame or timed out,
	// or the code given to Close (or chosen by the server for a protocol
	// violation: 1002, 1007, 1009). No OnMessage follows it.
	OnClose(c *Conn, code ws.StatusCode, reason string)
}

// HandlerFuncs adapts functions to Handler; nil fields are no-ops.
type HandlerFuncs struct {
	Open    func(c *Conn)
	Message func(c *Conn, payload []byte)
	Closed  func(c *Conn, code ws.StatusCode, reason string)
}

var _ Handler = HandlerFuncs{}

func (h HandlerFuncs) OnOpen(c *Conn) {
	if h.Open != nil {
		h.Open(c)
	}
}

func (h HandlerFuncs) OnMessage(c *Conn, p []byte) {
	if h.Message != nil {
		h.Message(c, p)
	}
}

func (h HandlerFuncs) OnClose(c *Conn, code ws.StatusCode, reason string) {
	if h.Closed != nil {
		h.Closed(c, code, reason)
	}
}

// Config configures a Server. Zero fields take the documented default.
type Config struct {
	// Path is the only request path upgraded to WebSocket (exact match of the
	// path, the query is ignored). Default "/socketcluster/".
	Path string
	// Origins lists allowed Origin patterns: "*", "host", "host:port",
	// "host:*", "*:port". A request without Origin, or with "null", is
	// allowed. An empty list allows every origin. A rejected origin gets 403.
	Origins []string
	// MaxPayload bounds a data message (all its fragments together). A
	// bigger one closes that connection with 1009. Default 1 MiB.
	MaxPayload int64
	// MaxHeaderBytes bounds the HTTP request head. Default 8 KiB.
	MaxHeaderBytes int
	// SendQueueBytes and SendQueueMsgs bound each connection's send queue;
	// WriteFrame returns ErrQueueFull beyond them. A single frame bigger than
	// SendQueueBytes is still accepted into an empty queue. Defaults 1 MiB
	// and 1024.
	SendQueueBytes int
	SendQueueMsgs  int
	// WriteTimeout closes a connection that accepts no byte for this long
	// while data is pending. It also bounds Close: the close frame must be
	// written, and the peer must hang up, each within it. Default 10 s.
	WriteTimeout time.Duration
	// HandshakeReadTimeout closes a socket whose HTTP request head is not
	// complete within it. Default 10 s.
	HandshakeReadTimeout time.Duration
	// Pool is the number of goroutines that run reads and Handler calls.
	// Default 4 × GOMAXPROCS, at least 4. Flushes run on max(2, GOMAXPROCS)
	// goroutines of their own, so blocked Handler calls do not stall writes.
	Pool int
	// HTTP serves requests that are not WebSocket upgrades on Path. Each such
	// socket leaves epoll and becomes an ordinary net.Conn served by an
	// http.Server. Nil answers 404 (400 for an upgrade on another path).
	HTTP http.Handler
	// Handler receives connection events. Required.
	Handler Handler
	// Upgrade, if set, decides each WebSocket upgrade after the path and
	// origin checks passed and before the 101 is sent (handshake middleware:
	// IP rules, connection limits, a backend hook). Status 0 accepts: data
	// becomes the connection's initial Data() (see UpgradeData). Any other
	// status refuses the upgrade with that HTTP status and reason as body.
	// It runs on a pool goroutine: a slow decision holds one of them, so
	// bound it (the worker bounds backend hooks with their timeout). When
	// the connection ends before OnOpen (its handshake timed out during
	// the decision), data's Release method is called if it has one, so
	// what the decision reserved for the connection is given back.
	Upgrade func(r *UpgradeRequest) (data any, status int, reason string)
	// FlowControl pauses reads while most connections have deep send
	// queues (stall.go). Off by default: in the issue #8 maximum-rate runs
	// it did not prevent slow-consumer closes (the backlog sits in the
	// kernel's socket buffers and on the other workers), so it is not yet
	// shown to help.
	FlowControl bool
	// Logger is optional (default: discard).
	Logger hclog.Logger
}

// UpgradeRequest is what Config.Upgrade sees of an upgrade request.
type UpgradeRequest struct {
	Remote     net.Addr    // the client's address (the real one on the PROXY path)
	Origin     string      // the Origin header, "" when absent
	Header     http.Header // every request header
	RequestURI string      // path and query as sent
}

const (
	defaultPath         = "/socketcluster/"
	defaultMaxPayload   = 1 << 20
	defaultMaxHeader    = 8 << 10
	defaultQueueBytes   = 1 << 20
	defaultQueueMsgs    = 1024
	defaultWriteTimeout = 10 * time.Second
	defaultHSTimeout    = 10 * time.Second
)

// withDefaults returns c with defaults filled in, or an error naming the bad field.
func (c Config) withDefaults() (Config, error) {
	if c.Handler == nil {
		return c, errors.New("netpoll: Config.Handler is required")
	}
	if c.Path == "" {
		c.Path = defaultPath
	}
	if !strings.HasPrefix(c.Path, "/") {
		return c, fmt.Errorf("netpoll: Config.Path %q must start with /", c.Path)
	}
	if c.MaxPayload < 0 || c.MaxHeaderBytes < 0 || c.SendQueueBytes < 0 || c.SendQueueMsgs < 0 ||
		c.WriteTimeout < 0 || c.HandshakeReadTimeout < 0 || c.Pool < 0 {
		return c, errors.New("netpoll: Config limits must not be negative")
	}
	if c.MaxPayload == 0 {
		c.MaxPayload = defaultMaxPayload
	}
	if c.MaxHeaderBytes == 0 {
		c.MaxHeaderBytes = defaultMaxHeader
	}
	if c.SendQueueBytes == 0 {
		c.SendQueueBytes = defaultQueueBytes
	}
	if c.SendQueueMsgs == 0 {
		c.SendQueueMsgs = defaultQueueMsgs
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = defaultWriteTimeout
	}
	if c.HandshakeReadTimeout == 0 {
		c.HandshakeReadTimeout = defaultHSTimeout
	}
	if c.Pool == 0 {
		c.Pool = max(4, 4*runtime.GOMAXPROCS(0))
	}
	for _, o := range c.Origins {
		if o == "" {
			return c, errors.New("netpoll: Config.Origins has an empty pattern")
		}
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return c, nil
}
