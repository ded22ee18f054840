package balancer

import (
	"sync"
	"sync/atomic"
)

// stats are the balancer's counters, reported in control.Stats.Counters.
// Per-worker counts are keyed by worker name and survive the worker's
// restarts (the name is the slot, not the process).
type stats struct {
	active      atomic.Int64 // TLS connections held now (handshaking or proxied)
	tlsAccepted atomic.Int64 // TLS connections taken on (past the fd cap check), ever
	bytesIn     atomic.Int64 // proxied plaintext, client → worker
	bytesOut    atomic.Int64 // proxied plaintext, worker → client

	mu        sync.Mutex
	perWorker map[string]int64 // "handed.<w>", "proxied.<w>", "failures.<w>"
	counters  map[string]int64 // failures and errors by kind
}

func newStats() *stats {
	return &stats{perWorker: map[string]int64{}, counters: map[string]int64{}}
}

// Counter names (besides the per-worker ones).
const (
	ctrHanded           = "handed"             // plain connections handed to a worker
	ctrProxied          = "proxied"            // TLS connections proxied to a worker
	ctrHandoffFailures  = "handoff_failures"   // a worker's handoff socket failed (worker marked dead)
	ctrProxyFailures    = "proxy_failures"     // a worker's proxy socket failed (worker marked dead)
	ctrNoWorker         = "no_worker"          // connections closed because no worker was live
	ctrAcceptErrors     = "accept_errors"      // accept(2) failures (EMFILE...), each followed by a pause
	ctrTLSHandshakeFail = "tls_handshake_fail" // TLS handshakes that failed or timed out
)

func (s *stats) add(name string, n int64) {
	s.mu.Lock()
	s.counters[name] += n
	s.mu.Unlock()
}

func (s *stats) addWorker(prefix, worker string, n int64) {
	s.mu.Lock()
	s.perWorker[prefix+"."+worker] += n
	s.counters[prefix] += n
	s.mu.Unlock()
}

func (s *stats) snapshot() map[string]int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]int64, len(s.perWorker)+len(s.counters)+1)
	for k, v := range s.counters {
		out[k] = v
	}
	for k, v := range s.perWorker {
		out[k] = v
	}
	out["active_tls"] = s.active.Load()
	return out
}
