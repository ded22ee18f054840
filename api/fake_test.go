package api

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"sync"
	"testing"
)

// fakeBackend records calls and answers from canned state.
type fakeBackend struct {
	mu        sync.Mutex
	published []fakePub
	offset    uint64
	pubErr    map[string]error // by channel
	pubGate   chan struct{}    // when set, Publish waits for it (or ctx)
	history   []Publication
	histErr   error
	presence  map[string][]ClientInfo
	channels  []ChannelInfo
	lastPat   string
	disc      []string // "user code reason"
	discIP    []string
	unsub     []string // "user channel reason"
	tokens    []Token
}

type fakePub struct {
	Channel string
	Data    string
}

var _ Backend = (*fakeBackend)(nil)

func (f *fakeBackend) Publish(ctx context.Context, channel string, data json.RawMessage) (StreamPosition, error) {
	f.mu.Lock()
	gate := f.pubGate
	f.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return StreamPosition{}, ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.pubErr[channel]; err != nil {
		return StreamPosition{}, fmt.Errorf("fake publish: %w", err)
	}
	f.offset++
	f.published = append(f.published, fakePub{channel, string(data)})
	return StreamPosition{Offset: f.offset, Epoch: "ep1"}, nil
}

func (f *fakeBackend) pubs() []fakePub {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]fakePub(nil), f.published...)
}

func (f *fakeBackend) History(_ context.Context, _ string, q HistoryQuery) (HistoryPage, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.histErr != nil {
		return HistoryPage{}, f.histErr
	}
	top := StreamPosition{Epoch: "ep1"}
	if n := len(f.history); n > 0 {
		top.Offset = f.history[n-1].Offset
	}
	if q.Since != nil && q.Since.Epoch != "ep1" {
		return HistoryPage{}, fmt.Errorf("epoch %q: %w", q.Since.Epoch, ErrUnrecoverablePosition)
	}
	var out []Publication
	if !q.Reverse {
		for _, p := range f.history {
			if (q.Since == nil || p.Offset > q.Since.Offset) && len(out) < q.Limit {
				out = append(out, p)
			}
		}
	} else {
		for i := len(f.history) - 1; i >= 0; i-- {
			p := f.history[i]
			if (q.Since == nil || p.Offset < q.Since.Offset) && len(out) < q.Limit {
				out = append(out, p)
			}
		}
	}
	return HistoryPage{Publications: out, Top: top}, nil
}

func (f *fakeBackend) Presence(_ context.Context, channel string) ([]ClientInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p, ok := f.presence[channel]
	if !ok {
		return nil, fmt.Errorf("channel %q has no presence: %w", channel, ErrNotSupported)
	}
	return p, nil
}

func (f *fakeBackend) PresenceStats(ctx context.Context, channel string) (PresenceStats, error) {
	p, err := f.Presence(ctx, channel)
	if err != nil {
		return PresenceStats{}, err
	}
	users := map[string]bool{}
	for _, c := range p {
		users[c.User] = true
	}
	return PresenceStats{NumClients: len(p), NumUsers: len(users)}, nil
}

func (f *fakeBackend) Channels(_ context.Context, pattern string) ([]ChannelInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lastPat = pattern
	return f.channels, nil
}

func (f *fakeBackend) Disconnect(_ context.Context, user string, code int, reason string) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.disc = append(f.disc, fmt.Sprintf("%s %d %s", user, code, reason))
	return 2, nil
}

func (f *fakeBackend) DisconnectIP(_ context.Context, p netip.Prefix, code int, reason string) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.discIP = append(f.discIP, fmt.Sprintf("%s %d %s", p, code, reason))
	return 1, nil
}

func (f *fakeBackend) Unsubscribe(_ context.Context, user, channel, reason string) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.unsub = append(f.unsub, user+" "+channel+" "+reason)
	return 1, nil
}

func (f *fakeBackend) PushToken(_ context.Context, user string, t Token) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if t.Token == "bad" {
		return 0, fmt.Errorf("token does not verify: %w", ErrInvalid)
	}
	f.tokens = append(f.tokens, t)
	return 1, nil
}

var netipZero netip.Addr

func mustAddr(t *testing.T, s string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}
