package brokerclient_test

import (
	"bytes"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/shoalhq/shoal/brokerclient"
)

// logBuf is a log sink safe for the client's goroutines.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestAddressSwapLogsNoWarning: when the membership gives a broker a new
// address (the ring swapping a unix link for a TCP one), the old link is
// closed on purpose; its writer, busy with queued publishes, must not log
// that expected close as a warning.
func TestAddressSwapLogsNoWarning(t *testing.T) {
	dir := runDir(t)
	b1 := startHistoryBroker(t, dir, "broker-1")
	b2 := startHistoryBroker(t, dir, "broker-2")
	var logs logBuf
	log := hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Warn})
	c, _ := newClient(t, "w", withRules, func(o *brokerclient.Options) { o.Logger = log })
	payload := make([]byte, 1000)
	for i := range 10 {
		addr := b1.ep.Addr
		if i%2 == 1 {
			addr = b2.ep.Addr
		}
		c.SetBrokers([]brokerclient.Endpoint{{Name: "broker-1", Addr: addr}})
		waitConnected(t, c, 1)
		// Keep the writer busy so the swap closes it mid-write.
		for range 2000 {
			c.Publish("plain/swap", payload, nil)
		}
	}
	if out := logs.String(); strings.Contains(out, "closed network connection") {
		t.Fatalf("an address swap logged a warning:\n%s", out)
	}
}
