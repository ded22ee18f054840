package brokerclient

// Rendezvous (highest random weight) hashing: a channel belongs to the
// broker whose hash of (broker name, channel) is highest. Removing a broker
// moves only the channels it owned (each to its second-highest broker);
// adding one takes over only the channels for which it now scores highest —
// about 1/N of them — and no virtual nodes or ring state are needed. The
// cost is one hash per broker per lookup, which for a handful of brokers is
// less than a ring's binary search.

// score hashes name and channel (FNV-1a 64, with a separator so that
// ("ab","c") and ("a","bc") differ) and finishes with a 64-bit mixer: plain
// FNV's high bits depend weakly on the last bytes, which would skew owners.
func score(name, channel string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(name); i++ {
		h ^= uint64(name[i])
		h *= 1099511628211
	}
	h ^= 0xff
	h *= 1099511628211
	for i := 0; i < len(channel); i++ {
		h ^= uint64(channel[i])
		h *= 1099511628211
	}
	// splitmix64 finaliser
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	h ^= h >> 31
	return h
}

// owner returns the member with the highest score for channel, or nil.
// members is sorted by name, so equal scores resolve the same everywhere.
func owner(members []*bconn, channel string) *bconn {
	var best *bconn
	var bestScore uint64
	for _, b := range members {
		if s := score(b.ep.Name, channel); best == nil || s > bestScore {
			best, bestScore = b, s
		}
	}
	return best
}

// Owner returns which of brokers owns channel by the same rule the client
// uses ("" for an empty set); for tools and tests.
func Owner(brokers []string, channel string) string {
	var best string
	var bestScore uint64
	for i, name := range brokers {
		if s := score(name, channel); i == 0 || s > bestScore || (s == bestScore && name < best) {
			best, bestScore = name, s
		}
	}
	return best
}
