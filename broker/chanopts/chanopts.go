// Package chanopts resolves a channel's options (history, durability,
// presence, join/leave events, recovery window) from the config's
// `channels:` rules. Brokers and workers resolve with the same code, so they
// agree on which channels keep history.
//
// Matching: a channel name and a rule's `match` are split on "/" into
// segments. A literal segment matches itself; "*" matches exactly one
// segment (any text, including empty); "**" matches zero or more segments.
// The rules are tried in config order and the first match wins; a channel
// that matches no rule has every option off. Examples: "chat/**" matches
// "chat", "chat/a" and "chat/a/b"; "chat/*" matches "chat/a" only;
// "user/*/inbox" matches "user/42/inbox".
package chanopts

import (
	"strings"
	"time"

	"github.com/shoalhq/shoal/configs"
)

// DefaultRecover is the recovery window of a rule that does not set one.
const DefaultRecover = 120 * time.Second

// Options are one channel's resolved options.
type Options struct {
	HistorySize int           // messages kept; 0 = no history
	HistoryTTL  time.Duration // 0 = kept until pushed out by size
	Durable     bool          // written to the broker's bbolt file
	Presence    bool
	JoinLeave   bool
	Recover     time.Duration // how old the first missed message may be for a recovery
	Matched     bool          // a rule matched
}

// History reports whether the channel keeps history.
func (o Options) History() bool { return o.HistorySize > 0 }

type rule struct {
	segs []string
	opts Options
}

// Rules is a compiled, immutable rule list; safe for concurrent use.
type Rules struct {
	rules []rule
}

// Internal channels whose options do not come from the config. "#bans"
// (the workers' ban log, worker/bans.go) keeps a durable history so the
// bans survive a restart of the whole cluster; these rules come before the
// config's, so a user pattern such as "**" cannot turn that off.
var internal = []rule{
	{segs: []string{"#bans"}, opts: Options{HistorySize: BansHistory, Durable: true, Recover: DefaultRecover, Matched: true}},
}

// InternalDurable reports whether an internal channel is durable, so a
// broker opens its store even when no config rule is.
func InternalDurable() bool {
	for _, r := range internal {
		if r.opts.Durable {
			return true
		}
	}
	return false
}

// BansHistory is how many messages the "#bans" log keeps. Workers write a
// snapshot of every ban once half of it has been used since the last one,
// so a replay always finds the latest snapshot in it.
const BansHistory = 4096

// Compile prepares rules. A durable rule without a history size keeps
// nothing, so durable implies history; such a rule gets size 100 (the
// example config's) rather than silently storing nothing.
func Compile(rs []configs.ChannelRule) *Rules {
	out := &Rules{rules: append([]rule(nil), internal...)}
	for _, r := range rs {
		o := Options{
			HistorySize: max(r.History.Size, 0),
			HistoryTTL:  time.Duration(r.History.TTL),
			Durable:     r.Durable,
			Presence:    r.Presence,
			JoinLeave:   r.JoinLeave,
			Recover:     time.Duration(r.Recover),
			Matched:     true,
		}
		if o.Durable && o.HistorySize == 0 {
			o.HistorySize = 100
		}
		if o.Recover <= 0 {
			o.Recover = DefaultRecover
		}
		out.rules = append(out.rules, rule{segs: strings.Split(r.Match, "/"), opts: o})
	}
	return out
}

// Lookup returns the options of channel (first matching rule). A nil Rules
// has no rules. It does not allocate.
func (r *Rules) Lookup(channel string) Options {
	if r == nil {
		return Options{}
	}
	for i := range r.rules {
		if match(r.rules[i].segs, channel) {
			return r.rules[i].opts
		}
	}
	return Options{}
}

// Empty reports whether there are no rules from the config (no channel
// other than the internal ones has any option).
func (r *Rules) Empty() bool { return r == nil || len(r.rules) <= len(internal) }

// match reports whether name (a "/"-separated channel) matches segs. "**"
// backtracks; the loop is bounded by segments × name length.
func match(segs []string, name string) bool {
	if len(segs) == 0 {
		return false
	}
	seg := segs[0]
	if seg == "**" {
		if len(segs) == 1 {
			return true
		}
		// Zero segments, then one more at a time.
		rest := name
		for {
			if match(segs[1:], rest) {
				return true
			}
			i := strings.IndexByte(rest, '/')
			if i < 0 {
				return false
			}
			rest = rest[i+1:]
		}
	}
	head, tail, more := strings.Cut(name, "/")
	if seg != "*" && seg != head {
		return false
	}
	if len(segs) == 1 {
		return !more
	}
	if !more {
		// Only trailing "**" segments can match nothing.
		for _, s := range segs[1:] {
			if s != "**" {
				return false
			}
		}
		return true
	}
	return match(segs[1:], tail)
}
