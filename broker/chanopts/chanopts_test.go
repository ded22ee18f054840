package chanopts

import (
	"testing"
	"time"

	"github.com/shoalhq/shoal/configs"
)

func TestMatch(t *testing.T) {
	cases := []struct {
		pat, name string
		want      bool
	}{
		{"chat/**", "chat", true},
		{"chat/**", "chat/a", true},
		{"chat/**", "chat/a/b", true},
		{"chat/**", "chatter", false},
		{"chat/*", "chat/a", true},
		{"chat/*", "chat/a/b", false},
		{"chat/*", "chat", false},
		{"user/*/inbox", "user/42/inbox", true},
		{"user/*/inbox", "user/42/outbox", false},
		{"**/inbox", "a/b/inbox", true},
		{"**/inbox", "inbox", true},
		{"**", "anything/at/all", true},
		{"a/**/z", "a/z", true},
		{"a/**/z", "a/b/c/z", true},
		{"a/**/z", "a/b/c/y", false},
		{"exact", "exact", true},
		{"exact", "exact/x", false},
	}
	for _, c := range cases {
		r := Compile([]configs.ChannelRule{{Match: c.pat, Presence: true}})
		if got := r.Lookup(c.name).Presence; got != c.want {
			t.Errorf("%q vs %q: %v, want %v", c.pat, c.name, got, c.want)
		}
	}
}

func TestFirstMatchWinsAndDefaults(t *testing.T) {
	r := Compile([]configs.ChannelRule{
		{Match: "chat/vip/*", History: configs.History{Size: 10}},
		{Match: "chat/**", History: configs.History{Size: 100, TTL: configs.Duration(time.Hour)}, Durable: true, Recover: configs.Duration(time.Minute)},
		{Match: "store/**", Durable: true},
	})
	if o := r.Lookup("chat/vip/x"); o.HistorySize != 10 || o.Durable || o.Recover != DefaultRecover {
		t.Fatalf("vip: %+v", o)
	}
	if o := r.Lookup("chat/x"); o.HistorySize != 100 || o.HistoryTTL != time.Hour || !o.Durable || o.Recover != time.Minute {
		t.Fatalf("chat: %+v", o)
	}
	if o := r.Lookup("store/x"); !o.History() {
		t.Fatalf("durable implies history: %+v", o)
	}
	if o := r.Lookup("other"); o.Matched || o.History() {
		t.Fatalf("other: %+v", o)
	}
	var nilRules *Rules
	if nilRules.Lookup("x").Matched {
		t.Fatal("nil rules matched")
	}
	if n := testing.AllocsPerRun(100, func() { r.Lookup("chat/a/b") }); n != 0 {
		t.Fatalf("Lookup allocates %v", n)
	}
}
