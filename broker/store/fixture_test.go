package store

import (
	"os"
	"path/filepath"
	"testing"
)

// fixtureOps is what testdata/store-v1.db holds (written by this version;
// regenerate only when adding a new version's fixture:
// SHOAL_WRITE_STORE_FIXTURE=1 go test -run TestFixture ./broker/store).
var fixtureOps = []Op{
	{Channel: "chat/a", SetMeta: true, Meta: Meta{Epoch: 1700000000000000001, PrevEpoch: 42, PrevTop: 2}, Msg: Message{Offset: 3, Time: 1700000000000000000, Data: []byte(`{"text":"three"}`)}},
	{Channel: "chat/a", Msg: Message{Offset: 4, Time: 1700000000000000100, Data: []byte(`"four"`)}},
}

// TestFixtureV1 keeps files written by the first layout readable.
func TestFixtureV1(t *testing.T) {
	src := filepath.Join("testdata", "store-v1.db")
	if os.Getenv("SHOAL_WRITE_STORE_FIXTURE") != "" {
		os.Remove(src)
		s, err := OpenBolt(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Apply(fixtureOps); err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "v1.db") // bbolt writes on open; keep testdata pristine
	if err := os.WriteFile(dst, b, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := OpenBolt(dst)
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
