package api

import (
	"context"
	"net/http"
	"net/netip"
	"sort"
	"sync"
	"time"
)

// MemoryBans is a BanStore in one process's memory: bans vanish when the
// process restarts and bind only the worker that holds them. It is the
// building block for a persistent, cluster-wide store (which would load
// from the brokers and apply bans other workers publish) and the store
// tests use. Expired bans are dropped lazily on every call.
type MemoryBans struct {
	mu    sync.Mutex
	now   func() time.Time
	users map[string]Ban
	ips   map[netip.Prefix]Ban
}

var _ BanStore = (*MemoryBans)(nil)

// MaxBans bounds a MemoryBans, so the API cannot be used to fill memory.
const MaxBans = 100000

// NewMemoryBans returns an empty store; now is the clock (nil: time.Now).
func NewMemoryBans(now func() time.Time) *MemoryBans {
	if now == nil {
		now = time.Now
	}
	return &MemoryBans{now: now, users: make(map[string]Ban), ips: make(map[netip.Prefix]Ban)}
}

// Ban stores b, replacing an earlier ban on the same target.
func (m *MemoryBans) Ban(_ context.Context, b Ban) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.expireLocked()
	_, uok := m.users[b.User]
	_, iok := m.ips[b.IP]
	if len(m.users)+len(m.ips) >= MaxBans && !uok && !iok {
		return &Error{Status: http.StatusInsufficientStorage, Code: "too_many_bans", Message: "the ban store is full; unban or use CIDR bans"}
	}
	if b.User != "" {
		m.users[b.User] = b
	} else {
		m.ips[b.IP] = b
	}
	return nil
}

// Unban removes the ban on target.
func (m *MemoryBans) Unban(_ context.Context, t BanTarget) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.expireLocked()
	if t.User != "" {
		_, ok := m.users[t.User]
		delete(m.users, t.User)
		return ok, nil
	}
	_, ok := m.ips[t.IP]
	delete(m.ips, t.IP)
	return ok, nil
}

// Bans lists the bans in force, users first, each group sorted.
func (m *MemoryBans) Bans(_ context.Context) ([]Ban, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.expireLocked()
	out := make([]Ban, 0, len(m.users)+len(m.ips))
	for _, b := range m.users {
		out = append(out, b)
	}
	for _, b := range m.ips {
		out = append(out, b)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if (a.User == "") != (b.User == "") {
			return a.User != ""
		}
		if a.User != b.User {
			return a.User < b.User
		}
		return a.IP.String() < b.IP.String()
	})
	return out, nil
}

// Banned reports the ban that bars user (may be "") or addr (may be
// invalid), for the handshake middleware. IP bans are scanned linearly:
// keep them few (CIDRs), or index them before relying on thousands.
func (m *MemoryBans) Banned(user string, addr netip.Addr) (Ban, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	if user != "" {
		if b, ok := m.users[user]; ok && live(b, now) {
			return b, true
		}
	}
	if addr.IsValid() {
		addr = addr.Unmap()
		for p, b := range m.ips {
			if p.Contains(addr) && live(b, now) {
				return b, true
			}
		}
	}
	return Ban{}, false
}

func live(b Ban, now time.Time) bool { return b.Expires.IsZero() || now.Before(b.Expires) }

func (m *MemoryBans) expireLocked() {
	now := m.now()
	for k, b := range m.users {
		if !live(b, now) {
			delete(m.users, k)
		}
	}
	for k, b := range m.ips {
		if !live(b, now) {
			delete(m.ips, k)
		}
	}
}
