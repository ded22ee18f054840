package brokerclient_test

import (
	"fmt"
	"testing"

	"github.com/shoalhq/shoal/brokerclient"
	"github.com/shoalhq/shoal/proto/control"
)

func TestMembershipCombinesTopologyAndRing(t *testing.T) {
	c, _ := newClient(t, "w")
	m := brokerclient.NewMembership(c)
	peer := func(name, state string) control.Peer {
		return control.Peer{Name: name, Role: control.RoleBroker, State: state, Addrs: map[string]string{control.AddrLink: "unix:/x/" + name}}
	}
	ep := func(name string) brokerclient.Endpoint {
		return brokerclient.Endpoint{Name: name, Addr: "unix:/x/" + name}
	}
	check := func(want string) {
		t.Helper()
		if got := fmt.Sprint(c.Brokers()); got != want {
			t.Fatalf("brokers %s, want %s", got, want)
		}
	}
	// Before any ring report: the topology's ready brokers.
	m.FromTopology(control.Topology{Peers: []control.Peer{peer("b1", control.StateReady), peer("b2", control.StateStarting)}})
	check("[{b1 unix:/x/b1}]")
	// The ring takes over (it also knows another node's broker).
	m.FromRing([]brokerclient.Endpoint{ep("b1"), ep("b2"), {Name: "b9@10.0.0.9:7946", Addr: "tcp:10.0.0.9:4000"}})
	check("[{b1 unix:/x/b1} {b9@10.0.0.9:7946 tcp:10.0.0.9:4000}]") // b2 still starting per the topology
	m.FromTopology(control.Topology{Peers: []control.Peer{peer("b1", control.StateReady), peer("b2", control.StateReady)}})
	check("[{b1 unix:/x/b1} {b2 unix:/x/b2} {b9@10.0.0.9:7946 tcp:10.0.0.9:4000}]")
	// The supervisor sees b1 die before the ring does: it leaves at once.
	m.FromTopology(control.Topology{Peers: []control.Peer{peer("b1", control.StateDead), peer("b2", control.StateReady)}})
	check("[{b2 unix:/x/b2} {b9@10.0.0.9:7946 tcp:10.0.0.9:4000}]")
	// The ring's later verdict changes nothing more.
	m.FromRing([]brokerclient.Endpoint{ep("b2"), {Name: "b9@10.0.0.9:7946", Addr: "tcp:10.0.0.9:4000"}})
	check("[{b2 unix:/x/b2} {b9@10.0.0.9:7946 tcp:10.0.0.9:4000}]")
}
