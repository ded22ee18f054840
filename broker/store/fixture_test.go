package store

import (
	"encoding/binary"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// fixtureOps is what the v1 fixture holds.
var fixtureOps = []Op{
	{Channel: "chat/a", SetMeta: true, Meta: Meta{Epoch: 1700000000000000001, PrevEpoch: 42, PrevTop: 2}, Msg: Message{Offset: 3, Time: 1700000000000000000, Data: []byte(`{"text":"three"}`)}},
	{Channel: "chat/a", Msg: Message{Offset: 4, Time: 1700000000000000100, Data: []byte(`"four"`)}},
}

// writeV1 writes fixtureOps in the first on-disk layout (see the comment at
// the top of bolt.go) with raw bbolt calls, byte by byte, not through Apply:
// if Apply's encoding ever changes, files already on users' disks still have
// this layout, and Load must keep reading it.
func writeV1(t *testing.T, path string) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		top, err := tx.CreateBucket([]byte("channels"))
		if err != nil {
			return err
		}
		cb, err := top.CreateBucket([]byte("chat/a"))
		if err != nil {
			return err
		}
		m := fixtureOps[0].Meta
		meta := binary.BigEndian.AppendUint64(nil, m.Epoch)
		meta = binary.BigEndian.AppendUint64(meta, m.PrevEpoch)
		meta = binary.BigEndian.AppendUint64(meta, m.PrevTop)
		if err := cb.Put([]byte("m"), meta); err != nil {
			return err
		}
		for _, op := range fixtureOps {
			key := binary.BigEndian.AppendUint64([]byte{0x00}, op.Msg.Offset)
			val := append(binary.BigEndian.AppendUint64(nil, uint64(op.Msg.Time)), op.Msg.Data...)
			if err := cb.Put(key, val); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestFixtureV1 keeps files written in the first layout readable.
func TestFixtureV1(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v1.db")
	writeV1(t, path)
	s, err := OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	chans, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if len(chans) != 1 || chans[0].Meta != fixtureOps[0].Meta || len(chans[0].Messages) != 2 ||
		string(chans[0].Messages[0].Data) != `{"text":"three"}` || chans[0].Messages[1].Offset != 4 || chans[0].Messages[1].Time != 1700000000000000100 {
		t.Fatalf("fixture loaded as %+v", chans)
	}
}
