// Package store persists durable channels' history for a broker: each
// channel's epoch chain and its recent messages. The broker writes through
// Store.Apply in group commits (one transaction and one fsync per batch) and
// reads everything back with Load when it restarts.
//
// Two implementations satisfy the same contract (store_test.go runs it
// against both): Bolt (go.etcd.io/bbolt, one file per broker) and Mem (for
// tests and for brokers without a storage dir).
package store

import (
	"errors"
	"slices"
	"sort"
	"sync"
)

// Meta is a channel's epoch chain: the current epoch and the one it
// continues (see docs/history.md: an owner that did not write a channel's
// history itself starts a new epoch linked to the old one).
type Meta struct {
	Epoch     uint64
	PrevEpoch uint64 // 0: none
	PrevTop   uint64 // last offset of PrevEpoch
}

// Message is one stored publication.
type Message struct {
	Offset uint64
	Time   int64 // unix ns when the broker stored it (for the TTL)
	Data   []byte
}

// Op is one change: set the channel's meta (when SetMeta), append Msg (when
// Msg.Offset > 0), then delete messages below TrimBelow (when > 0).
type Op struct {
	Channel   string
	SetMeta   bool
	Meta      Meta
	Msg       Message
	TrimBelow uint64
	Drop      bool // forget the channel entirely (applied first)
}

// Channel is one channel as loaded.
type Channel struct {
	Name     string
	Meta     Meta
	Messages []Message // ascending offsets
}

// Store is the persistence of durable channels. Apply is called by one
// goroutine at a time (the broker's committer); Load before the first
// Apply. Data passed in is not retained.
type Store interface {
	Apply(ops []Op) error
	Load() ([]Channel, error)
	Close() error
}

// ErrClosed is returned after Close.
var ErrClosed = errors.New("store: closed")

// Mem is an in-memory Store.
type Mem struct {
	mu     sync.Mutex
	closed bool
	chans  map[string]*Channel
}

// NewMem returns an empty in-memory store.
func NewMem() *Mem { return &Mem{chans: map[string]*Channel{}} }

func (m *Mem) Apply(ops []Op) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	for _, op := range ops {
		if op.Drop {
			delete(m.chans, op.Channel)
		}
		c := m.chans[op.Channel]
		if c == nil {
			if !op.SetMeta && op.Msg.Offset == 0 {
				continue
			}
			c = &Channel{Name: op.Channel}
			m.chans[op.Channel] = c
		}
		if op.SetMeta {
			c.Meta = op.Meta
		}
		if op.Msg.Offset > 0 {
			msg := op.Msg
			msg.Data = slices.Clone(msg.Data)
			i := sort.Search(len(c.Messages), func(i int) bool { return c.Messages[i].Offset >= msg.Offset })
			if i < len(c.Messages) && c.Messages[i].Offset == msg.Offset {
				c.Messages[i] = msg
			} else {
				c.Messages = slices.Insert(c.Messages, i, msg)
			}
		}
		if op.TrimBelow > 0 {
			i := sort.Search(len(c.Messages), func(i int) bool { return c.Messages[i].Offset >= op.TrimBelow })
			c.Messages = slices.Delete(c.Messages, 0, i)
		}
	}
	return nil
}

func (m *Mem) Load() ([]Channel, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, ErrClosed
	}
	out := make([]Channel, 0, len(m.chans))
	for _, c := range m.chans {
		cc := Channel{Name: c.Name, Meta: c.Meta, Messages: make([]Message, len(c.Messages))}
		for i, msg := range c.Messages {
			msg.Data = slices.Clone(msg.Data)
			cc.Messages[i] = msg
		}
		out = append(out, cc)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (m *Mem) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	return nil
}
