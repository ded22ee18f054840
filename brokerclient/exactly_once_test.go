package brokerclient_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shoalhq/shoal/brokerclient"
)

// 3 workers × 3 brokers × 1,000 channels: every worker is interested in
// every channel and every worker publishes. Messages must arrive exactly
// once and in publish order — also while one broker is restarted, when some
// publishes fail (the publisher is told) but none is duplicated or
// reordered.
func TestExactlyOnceInOrderAcrossBrokerRestart(t *testing.T) {
	const nWorkers, nChannels, perPhase = 3, 1000, 1500
	dir := runDir(t)
	brokers := []*testBroker{startBroker(t, dir, "broker-1"), startBroker(t, dir, "broker-2"), startBroker(t, dir, "broker-3")}
	var eps []brokerclient.Endpoint
	for _, b := range brokers {
		eps = append(eps, b.ep)
	}
	var clients []*brokerclient.Client
	var recs []*recorder
	for w := range nWorkers {
		c, r := newClient(t, "worker-"+strconv.Itoa(w))
		c.SetBrokers(eps)
		clients, recs = append(clients, c), append(recs, r)
	}
	channel := func(i int) string { return "ch/" + strconv.Itoa(i) }
	for _, c := range clients {
		waitConnected(t, c, 3)
		for i := range nChannels {
			c.Subscribe(channel(i))
		}
	}
	byName := map[string]*testBroker{}
	for _, b := range brokers {
		byName[b.ep.Name] = b
	}
	allInterest := func() bool {
		for i := range nChannels {
			if byName[clients[0].Owner(channel(i))].child.Server().Interest(channel(i)) != nWorkers {
				return false
			}
		}
		return true
	}
	waitFor(t, 10*time.Second, "interest on every channel", allInterest)

	// acked[p] records which of publisher p's messages were acknowledged.
	type pubState struct {
		mu    sync.Mutex
		acked map[int]bool
		fails int
		calls map[int]int
	}
	pubs := make([]*pubState, nWorkers)
	for i := range pubs {
		pubs[i] = &pubState{acked: map[int]bool{}, calls: map[int]int{}}
	}
	seq := make([]int, nWorkers)
	// publish sends n messages from every worker (in parallel), spread over
	// the channels, and returns once every done was called.
	publish := func(n int, during func()) {
		var wg sync.WaitGroup
		var all sync.WaitGroup
		for w, c := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ps := pubs[w]
				for k := range n {
					if k == n/3 && w == 0 && during != nil {
						during()
					}
					i := seq[w]
					seq[w]++
					all.Add(1)
					ch := channel((i*7 + w*13) % nChannels)
					c.Publish(ch, []byte(fmt.Sprintf("%d/%d", w, i)), func(_ uint64, err error) {
						ps.mu.Lock()
						ps.calls[i]++
						if err == nil {
							ps.acked[i] = true
						} else {
							ps.fails++
						}
						ps.mu.Unlock()
						all.Done()
					})
				}
			}()
		}
		wg.Wait()
		all.Wait()
	}

	// Phase 1: steady state.
	publish(perPhase, nil)
	phase1 := append([]int(nil), seq...)
	// Phase 2: broker-2 restarts mid-way (same name and address, new epoch).
	publish(perPhase, func() {
		_ = brokers[1].child.Stop(context.Background())
		byName["broker-2"] = startBroker(t, dir, "broker-2")
	})
	waitFor(t, 10*time.Second, "interest re-registered on the restarted broker", allInterest)
	phase2 := append([]int(nil), seq...)
	// Phase 3: steady again.
	publish(perPhase, nil)

	for w, ps := range pubs {
		for i, n := range ps.calls {
			if n != 1 {
				t.Fatalf("publisher %d message %d: done called %d times", w, i, n)
			}
		}
		t.Logf("publisher %d: %d acked, %d failed (restart gap)", w, len(ps.acked), ps.fails)
	}
	wantDelivered := func(w, i int) bool {
		inPhase1 := i < phase1[w]
		inPhase3 := i >= phase2[w]
		return pubs[w].acked[i] && (inPhase1 || inPhase3)
	}
	// Every acknowledged message of the steady phases reaches every worker
	// (phase 2's deliveries also count in a recorder's total, so wait for
	// the messages themselves).
	missing := func(rec *recorder) string {
		have := map[string]bool{}
		for c := range nChannels {
			for _, m := range rec.get(channel(c)) {
				have[m.data] = true
			}
		}
		for w := range nWorkers {
			for i := range seq[w] {
				if k := fmt.Sprintf("%d/%d", w, i); wantDelivered(w, i) && !have[k] {
					return k
				}
			}
		}
		return ""
	}
	for r, rec := range recs {
		waitFor(t, 10*time.Second, fmt.Sprintf("worker %d receives every acknowledged steady-phase message", r), func() bool { return missing(rec) == "" })
		seen := map[string]bool{}
		for c := range nChannels {
			last := map[int]int{}
			for _, m := range rec.get(channel(c)) {
				if seen[m.data] {
					t.Fatalf("worker %d got %s twice", r, m.data)
				}
				seen[m.data] = true
				p, i, _ := strings.Cut(m.data, "/")
				pw, _ := strconv.Atoi(p)
				pi, _ := strconv.Atoi(i)
				if prev, ok := last[pw]; ok && pi <= prev {
					t.Fatalf("worker %d, %s: publisher %d's message %d after %d", r, channel(c), pw, pi, prev)
				}
				last[pw] = pi
			}
		}
	}
}
