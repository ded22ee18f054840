package ring

import (
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestMetaRoundTrip(t *testing.T) {
	m := Meta{Role: "broker", Link: "tcp:10.0.0.2:41000", Version: "v0.1.0"}
	b, err := m.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeMeta(b)
	if err != nil || got != m {
		t.Fatalf("got %+v %v", got, err)
	}
	for _, bad := range [][]byte{nil, {9}, {1, 0}, {1, 0, 5, 'a'}} {
		if _, err := DecodeMeta(bad); err == nil {
			t.Errorf("%v decoded", bad)
		}
	}
}

// views records each ring's latest OnChange list.
type views struct {
	mu   sync.Mutex
	last map[string][]Member
}

func (v *views) set(name string) func([]Member) {
	return func(ms []Member) {
		v.mu.Lock()
		defer v.mu.Unlock()
		v.last[name] = ms
	}
}

func (v *views) names(name string) string {
	v.mu.Lock()
	defer v.mu.Unlock()
	s := ""
	for _, m := range v.last[name] {
		s += m.Name + "=" + m.Meta.Link + " "
	}
	return s
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

func startRing(t *testing.T, v *views, name string, join []string) *Ring {
	t.Helper()
	r, err := Start(Config{
		Name:     name,
		Bind:     "127.0.0.1:0",
		Join:     join,
		Meta:     Meta{Role: "broker", Link: "unix:/run/" + name + ".link.sock", Version: "test"},
		OnChange: v.set(name),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Shutdown() })
	return r
}

func TestThreeBrokersJoinAndDetectFailure(t *testing.T) {
	v := &views{last: map[string][]Member{}}
	a := startRing(t, v, "broker-a", nil)
	b := startRing(t, v, "broker-b", []string{a.Addr()})
	c := startRing(t, v, "broker-c", []string{b.Addr()}) // joins through b, learns a by gossip
	all := "broker-a=unix:/run/broker-a.link.sock broker-b=unix:/run/broker-b.link.sock broker-c=unix:/run/broker-c.link.sock "
	for _, n := range []string{"broker-a", "broker-b", "broker-c"} {
		waitFor(t, 5*time.Second, n+" sees all three", func() bool { return v.names(n) == all })
	}

	// A crash (no leave): the others notice through failed probes.
	if err := c.Shutdown(); err != nil {
		t.Fatal(err)
	}
	two := "broker-a=unix:/run/broker-a.link.sock broker-b=unix:/run/broker-b.link.sock "
	var worst time.Duration
	for _, n := range []string{"broker-a", "broker-b"} {
		worst = max(worst, waitFor(t, 10*time.Second, n+" drops broker-c", func() bool { return v.names(n) == two }))
	}
	t.Logf("crash detected by both survivors after %v", worst)

	// A graceful leave is seen at once.
	start := time.Now()
	if err := b.Leave(time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "broker-a drops broker-b", func() bool {
		return v.names("broker-a") == "broker-a=unix:/run/broker-a.link.sock "
	})
	t.Logf("leave seen after %v", time.Since(start))
	_ = b.Shutdown()
}

func TestLoneNodeRejoins(t *testing.T) {
	v := &views{last: map[string][]Member{}}
	// Reserve an address, then start the contact there after the joiner.
	probe := startRing(t, v, "probe", nil)
	addr := probe.Addr()
	_ = probe.Shutdown()
	j := startRing(t, v, "joiner", []string{addr})
	if n := len(j.Members()); n != 1 {
		t.Fatalf("joiner sees %d members before its contact exists", n)
	}
	r, err := Start(Config{Name: "late", Bind: addr, Meta: Meta{Role: "broker"}, OnChange: v.set("late")})
	if err != nil {
		t.Skipf("could not rebind %s for the late contact: %v", addr, err)
	}
	t.Cleanup(func() { _ = r.Shutdown() })
	waitFor(t, 10*time.Second, "the lone node to rejoin", func() bool { return len(j.Members()) == 2 })
}

// TestRestartedMemberRejoinsUnderItsName: a broker that crashes and is
// restarted at once (the supervisor takes ~0.3 s) comes back under the same
// name at a new gossip address. Its first join is refused by the others
// while they still hold the old address as alive or recently dead
// (memberlist's "conflicting address"), so the restarted member must keep
// announcing itself until they take it back, instead of waiting for the
// next full-state sync.
func TestRestartedMemberRejoinsUnderItsName(t *testing.T) {
	v := &views{last: map[string][]Member{}}
	start := func(name, link string, join []string) *Ring {
		r, err := Start(Config{
			Name: name, Bind: "127.0.0.1:0", Join: join, Tune: Tuned,
			Meta:     Meta{Role: "broker", Link: link, Version: "test"},
			OnChange: v.set(name + link),
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = r.Shutdown() })
		return r
	}
	a := start("broker-a", "unix:/a", nil)
	b := start("broker-b", "unix:/b", []string{a.Addr()})
	both := "broker-a=unix:/a broker-b=unix:/b "
	waitFor(t, 5*time.Second, "broker-a sees broker-b", func() bool { return v.names("broker-aunix:/a") == both })

	if err := b.Shutdown(); err != nil { // a crash: no leave
		t.Fatal(err)
	}
	// Through Join, as a broker learns its siblings from the topology.
	b2 := start("broker-b", "unix:/b2", nil)
	if err := b2.Join([]string{a.Addr()}); err != nil {
		t.Fatal(err)
	}
	took := waitFor(t, 8*time.Second, "broker-a takes the restarted broker-b back", func() bool {
		return v.names("broker-aunix:/a") == "broker-a=unix:/a broker-b=unix:/b2 "
	})
	t.Logf("restarted member back in broker-a's view after %v", took)
}

// TestSecretGatesTheRing: with a cluster secret, gossip is encrypted and
// authenticated: members with the same secret form one ring; a member
// with another secret, or none, is never let in, and the ring never
// learns of it.
func TestSecretGatesTheRing(t *testing.T) {
	start := func(name, secret string, join []string) *Ring {
		t.Helper()
		var s [][]byte
		if secret != "" {
			s = [][]byte{[]byte(secret)}
		}
		r, err := Start(Config{Name: name, Bind: "127.0.0.1:0", Join: join, Meta: Meta{Role: "broker"}, Secrets: s})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = r.Shutdown() })
		return r
	}
	const secret = "correct horse battery staple"
	a := start("a", secret, nil)
	b := start("b", secret, []string{a.Addr()})
	waitFor(t, 5*time.Second, "a and b to meet", func() bool { return a.NumMembers() == 2 && b.NumMembers() == 2 })
	other := start("other", "another cluster's secret value", []string{a.Addr()})
	plain := start("plain", "", []string{a.Addr()})
	// Joining is retried every second while alone: give it a few tries.
	time.Sleep(2500 * time.Millisecond)
	for _, r := range []*Ring{a, b} {
		if n := r.NumMembers(); n != 2 {
			t.Fatalf("a member of the ring sees %d members: %v", n, r.Members())
		}
	}
	if other.NumMembers() != 1 || plain.NumMembers() != 1 {
		t.Fatalf("outsiders see %d and %d members", other.NumMembers(), plain.NumMembers())
	}
}

// TestSecretChange: a member that accepts the old and the new secret but
// still encrypts with the old one joins a ring on the old secret; one that
// encrypts with the new one joins that member (which can read it), the
// steps of changing the secret node by node.
func TestSecretChange(t *testing.T) {
	oldS, newS := []byte("the old cluster secret"), []byte("the new cluster secret")
	start := func(name string, join []string, secrets ...[]byte) *Ring {
		t.Helper()
		r, err := Start(Config{Name: name, Bind: "127.0.0.1:0", Join: join, Meta: Meta{Role: "broker"}, Secrets: secrets})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = r.Shutdown() })
		return r
	}
	a := start("a", nil, oldS)
	b := start("b", []string{a.Addr()}, oldS, newS)
	waitFor(t, 5*time.Second, "b (old first, new accepted) to join a (old)", func() bool { return a.NumMembers() == 2 })
	c := start("c", []string{b.Addr()}, newS, oldS)
	waitFor(t, 5*time.Second, "c (new first, old accepted) to join b", func() bool { return b.NumMembers() == 3 && c.NumMembers() >= 2 })
}
