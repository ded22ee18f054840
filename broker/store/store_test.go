package store

import (
	"fmt"
	"path/filepath"
	"testing"
)

// TestContract runs the same behaviour against every implementation.
func TestContract(t *testing.T) {
	impls := map[string]func(t *testing.T) (Store, func() Store){
		"mem": func(t *testing.T) (Store, func() Store) {
			m := NewMem()
			// "Reopening" a Mem is the same value: it models a store that
			// survives the broker, which is what Bolt's file does.
			return m, func() Store { return m }
		},
		"bolt": func(t *testing.T) (Store, func() Store) {
			path := filepath.Join(t.TempDir(), "broker.db")
			s, err := OpenBolt(path)
			if err != nil {
				t.Fatal(err)
			}
			return s, func() Store {
				s2, err := OpenBolt(path)
				if err != nil {
					t.Fatal(err)
				}
				return s2
			}
		},
	}
	for name, open := range impls {
		t.Run(name, func(t *testing.T) { contract(t, open) })
	}
}

func contract(t *testing.T, open func(t *testing.T) (Store, func() Store)) {
	s, reopen := open(t)
	meta := Meta{Epoch: 7, PrevEpoch: 3, PrevTop: 10}
	var ops []Op
	ops = append(ops, Op{Channel: "chat/a", SetMeta: true, Meta: meta})
	for i := uint64(11); i <= 20; i++ {
		ops = append(ops, Op{Channel: "chat/a", Msg: Message{Offset: i, Time: int64(i), Data: []byte(fmt.Sprint(i))}})
	}
	ops = append(ops, Op{Channel: "chat/b", SetMeta: true, Meta: Meta{Epoch: 9}, Msg: Message{Offset: 1, Time: 1, Data: []byte("b1")}})
	if err := s.Apply(ops); err != nil {
		t.Fatal(err)
	}
	// Trim and a no-op for an unknown channel.
	if err := s.Apply([]Op{{Channel: "chat/a", TrimBelow: 15}, {Channel: "nobody", TrimBelow: 3}, {Channel: "chat/b", Drop: true}}); err != nil {
		t.Fatal(err)
	}
	// Data given to Apply is not retained.
	buf := []byte("x21")
	if err := s.Apply([]Op{{Channel: "chat/a", Msg: Message{Offset: 21, Time: 21, Data: buf}}}); err != nil {
		t.Fatal(err)
	}
	buf[0] = 'Z'
	if _, isMem := s.(*Mem); !isMem {
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
	s = reopen()
	defer s.Close()
	chans, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if len(chans) != 1 || chans[0].Name != "chat/a" || chans[0].Meta != meta {
		t.Fatalf("loaded %+v", chans)
	}
	msgs := chans[0].Messages
	if len(msgs) != 7 || msgs[0].Offset != 15 || msgs[6].Offset != 21 || string(msgs[6].Data) != "x21" || msgs[0].Time != 15 || string(msgs[0].Data) != "15" {
		t.Fatalf("messages %+v", msgs)
	}
	for i := 1; i < len(msgs); i++ {
		if msgs[i].Offset != msgs[i-1].Offset+1 {
			t.Fatalf("not ascending: %+v", msgs)
		}
	}
}

func BenchmarkBoltApply100(b *testing.B) {
	s, err := OpenBolt(filepath.Join(b.TempDir(), "b.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	data := make([]byte, 100)
	ops := make([]Op, 100)
	off := uint64(0)
	for b.Loop() {
		for i := range ops {
			off++
			ops[i] = Op{Channel: "chat/x", Msg: Message{Offset: off, Data: data}, TrimBelow: max(off, 1000) - 999}
		}
		if err := s.Apply(ops); err != nil {
			b.Fatal(err)
		}
	}
}
