package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// Bucket layout (one bbolt file per broker):
//
//	channels/                      top-level bucket
//	  <channel name>/              one nested bucket per durable channel
//	    "m"                        meta: u64 epoch, u64 prev epoch, u64 prev top (big endian)
//	    0x00 + u64 offset          message: u64 unix ns, then the data
//
// Message keys sort by offset (big endian after a 0x00 prefix that keeps
// them apart from "m"), so trimming walks a cursor from the first key.
var (
	bucketChannels = []byte("channels")
	keyMeta        = []byte("m")
)

const msgPrefix = 0x00

// Bolt is a Store in a bbolt file.
type Bolt struct {
	db *bolt.DB
}

// OpenBolt opens (creating if needed) the store at path. The broker does its
// own group commit, so each Apply is one Update transaction and one fsync.
func OpenBolt(path string) (*Bolt, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("store: opening %s: %w", path, err)
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucketChannels)
		return err
	}); err != nil {
		db.Close()
		return nil, fmt.Errorf("store: creating buckets in %s: %w", path, err)
	}
	return &Bolt{db: db}, nil
}

func msgKey(off uint64) []byte {
	var k [9]byte
	k[0] = msgPrefix
	binary.BigEndian.PutUint64(k[1:], off)
	return k[:]
}

func (b *Bolt) Apply(ops []Op) error {
	// bbolt keeps Put's value until the transaction ends: the batch's
	// values are carved from one slab instead of one allocation each.
	size := 0
	for _, op := range ops {
		size += 24
		if op.Msg.Offset > 0 {
			size += 8 + len(op.Msg.Data)
		}
	}
	slab := make([]byte, 0, size)
	carve := func(n int) []byte {
		v := slab[len(slab) : len(slab)+n : len(slab)+n]
		slab = slab[:len(slab)+n]
		return v
	}
	lastMeta := map[string]Meta{} // a batch repeats a channel's meta per message: write it once
	err := b.db.Update(func(tx *bolt.Tx) error {
		top := tx.Bucket(bucketChannels)
		for _, op := range ops {
			name := []byte(op.Channel)
			if op.Drop {
				delete(lastMeta, op.Channel)
				if err := top.DeleteBucket(name); err != nil && !errors.Is(err, bolterrors.ErrBucketNotFound) {
					return fmt.Errorf("dropping %q: %w", op.Channel, err)
				}
			}
			if !op.SetMeta && op.Msg.Offset == 0 && op.TrimBelow == 0 {
				continue
			}
			cb := top.Bucket(name)
			if cb == nil {
				if !op.SetMeta && op.Msg.Offset == 0 {
					continue
				}
				var err error
				if cb, err = top.CreateBucket(name); err != nil {
					return fmt.Errorf("creating %q: %w", op.Channel, err)
				}
			}
			if m, ok := lastMeta[op.Channel]; op.SetMeta && !(ok && m == op.Meta && !op.Drop) {
				lastMeta[op.Channel] = op.Meta
				v := carve(24)
				binary.BigEndian.PutUint64(v, op.Meta.Epoch)
				binary.BigEndian.PutUint64(v[8:], op.Meta.PrevEpoch)
				binary.BigEndian.PutUint64(v[16:], op.Meta.PrevTop)
				if err := cb.Put(keyMeta, v); err != nil {
					return fmt.Errorf("meta of %q: %w", op.Channel, err)
				}
			}
			if op.Msg.Offset > 0 {
				v := carve(8 + len(op.Msg.Data))
				binary.BigEndian.PutUint64(v, uint64(op.Msg.Time))
				copy(v[8:], op.Msg.Data)
				if err := cb.Put(msgKey(op.Msg.Offset), v); err != nil {
					return fmt.Errorf("message %d of %q: %w", op.Msg.Offset, op.Channel, err)
				}
			}
			if op.TrimBelow > 0 {
				limit := msgKey(op.TrimBelow)
				c := cb.Cursor()
				// Delete moves the cursor to the next key; bounded by the
				// bucket's size.
				for k, _ := c.Seek([]byte{msgPrefix}); k != nil && k[0] == msgPrefix && bytes.Compare(k, limit) < 0; k, _ = c.Seek([]byte{msgPrefix}) {
					if err := c.Delete(); err != nil {
						return fmt.Errorf("trimming %q: %w", op.Channel, err)
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("store: apply: %w", err)
	}
	return nil
}

func (b *Bolt) Load() ([]Channel, error) {
	var out []Channel
	err := b.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketChannels).ForEachBucket(func(name []byte) error {
			cb := tx.Bucket(bucketChannels).Bucket(name)
			ch := Channel{Name: string(name)}
			if v := cb.Get(keyMeta); len(v) == 24 {
				ch.Meta = Meta{
					Epoch:     binary.BigEndian.Uint64(v),
					PrevEpoch: binary.BigEndian.Uint64(v[8:]),
					PrevTop:   binary.BigEndian.Uint64(v[16:]),
				}
			}
			c := cb.Cursor()
			for k, v := c.Seek([]byte{msgPrefix}); k != nil && k[0] == msgPrefix; k, v = c.Next() {
				if len(k) != 9 || len(v) < 8 {
					return fmt.Errorf("channel %q: malformed message key %x", name, k)
				}
				// Copied: bbolt's slices are valid only inside the transaction.
				ch.Messages = append(ch.Messages, Message{
					Offset: binary.BigEndian.Uint64(k[1:]),
					Time:   int64(binary.BigEndian.Uint64(v)),
					Data:   bytes.Clone(v[8:]),
				})
			}
			out = append(out, ch)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("store: load: %w", err)
	}
	return out, nil
}

func (b *Bolt) Close() error {
	if err := b.db.Close(); err != nil {
		return fmt.Errorf("store: close: %w", err)
	}
	return nil
}
