// Package netpoll is the worker's WebSocket transport: an epoll server that
// holds no goroutine and no buffer for an idle connection.
//
// # Model
//
// Serve takes an accepted socket fd (from the balancer's SCM_RIGHTS hand-off,
// a PROXY-protocol stream, or an accept) and registers it in the Server's
// epoll instance with EPOLLONESHOT. One poller goroutine waits for readiness
// and only schedules work; fixed pools of goroutines do it (Config.Pool for
// reads, a few more for flushes, so blocked Handler calls cannot stall the
// writes to every other connection):
//
//   - a read task reads into the pool goroutine's own buffer, parses the HTTP
//     request or the client frames, and calls the Handler. At most one read
//     task exists per connection (Conn.reading), so Handler calls for a
//     connection are sequential. A frame that arrives in pieces is copied into
//     a per-connection stash sized for that frame and freed when it completes.
//   - a flush task writes the connection's send queue with one writev per
//     round. On EAGAIN it arms EPOLLOUT and returns; the poller schedules the
//     next flush when the socket is writable. Frames queued meanwhile coalesce
//     into the same writev. At most one flush task exists per connection
//     (Conn.flushing).
//
// While a read task processes a batch of input it also owns the flush: what
// its Handler calls (and anyone else) queue meanwhile is written inline when
// the batch ends, in one writev, without a hand-off. A Handler call that
// blocks therefore delays its own connection's writes too.
//
// After every event and task the one-shot registration is re-armed with what
// the connection still waits for (input unless a read task owns it, output
// while a write is stalled).
//
// The poller waits for the epoll fd through Go's runtime netpoller (the fd is
// itself pollable): a goroutine blocked in epoll_wait would keep its P until
// sysmon retakes it, which with GOMAXPROCS=1 delays the pool by up to 10 ms.
//
// # Writes
//
// WriteFrame queues a complete frame built once (AppendTextFrame) and shared
// read-only by every connection that sends it; it never copies it and never
// blocks. The queue is bounded by SendQueueBytes and SendQueueMsgs: beyond
// them WriteFrame returns ErrQueueFull and the caller applies its
// slow-consumer policy. A connection that accepts no byte for WriteTimeout
// while data is pending is cut (OnClose 1006, "write timeout"). Send queues
// come from size-class pools and go back when empty.
//
// # Closing
//
// Close queues a close frame behind pending data. When it is written the
// server waits, bounded by WriteTimeout, for the peer's close frame (or
// hang-up) and then closes the fd; when the peer closed first, the server
// echoes its code and closes the fd as soon as the echo is written (RFC 6455
// §7.1.1). OnClose runs once per opened connection on its read task, after any
// OnMessage, with the code of whoever closed first (1006 when the connection
// dropped or timed out). The fd is closed only when no task uses it, and the
// fd table is cleared first, so a reused fd number is never confused with the
// old connection (epoll events also carry a per-connection sequence number).
//
// # Locks
//
// Conn.mu guards a connection's state and send queue. It is never held
// during a Handler call or a read or write system call, only around
// epoll_ctl, shutdown(2) and the runtime timer's Reset/Stop; tasks are pushed
// to the pool after it is released. Server.tabMu (the fd table) and pool.mu
// are leaves: no other lock is taken while holding them.
// Handlers must not call Shutdown (it waits for the pool they run on). A
// Handler panic is recovered, logged with its stack and counted; that
// connection is closed with 1011.
package netpoll
