package ring

import (
	"bytes"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/memberlist"
)

func startTransport(t *testing.T) (*transport, *net.UDPConn) {
	t.Helper()
	tr, err := newTransport("127.0.0.1", 0, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Shutdown() })
	to := tr.udp.LocalAddr().(*net.UDPAddr)
	c, err := net.DialUDP("udp", nil, to)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return tr, c
}

func nextPacket(t *testing.T, tr *transport) *memberlist.Packet {
	t.Helper()
	select {
	case p := <-tr.PacketCh():
		return p
	case <-time.After(5 * time.Second):
		t.Fatal("no packet within 5 s")
		return nil
	}
}

// A received packet costs what it is long, not a 64 KiB buffer: memberlist's
// NetTransport allocates 65,536 bytes per packet, which made idle brokers
// collect garbage every few seconds.
func TestTransportPacketCostsItsSize(t *testing.T) {
	tr, c := startTransport(t)
	msg := bytes.Repeat([]byte{'g'}, 200)
	const n = 200
	// Warm up: the first read allocates the listener's own buffer.
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	nextPacket(t, tr)

	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range n {
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if p := nextPacket(t, tr); len(p.Buf) != len(msg) {
			t.Fatalf("packet of %d bytes, sent %d", len(p.Buf), len(msg))
		}
	}
	runtime.ReadMemStats(&after)
	per := (after.TotalAlloc - before.TotalAlloc) / n
	t.Logf("%d bytes allocated per %d-byte packet", per, len(msg))
	if per > 4096 {
		t.Fatalf("%d bytes allocated per received packet of %d bytes (want the packet's size, not a 64 KiB buffer)", per, len(msg))
	}
}

// memberlist keeps a packet's bytes after it returns (some messages wait in
// its queues), so the next read must not overwrite them.
func TestTransportPacketOutlivesNextRead(t *testing.T) {
	tr, c := startTransport(t)
	if _, err := c.Write([]byte("first packet")); err != nil {
		t.Fatal(err)
	}
	first := nextPacket(t, tr)
	if _, err := c.Write([]byte("SECOND PACKET, longer")); err != nil {
		t.Fatal(err)
	}
	nextPacket(t, tr)
	if string(first.Buf) != "first packet" {
		t.Fatalf("first packet now reads %q", first.Buf)
	}
	if first.From.String() != c.LocalAddr().String() {
		t.Fatalf("from %s, sent from %s", first.From, c.LocalAddr())
	}
}

func TestTransportAdvertiseAddr(t *testing.T) {
	tr, _ := startTransport(t)
	port := tr.tcp.Addr().(*net.TCPAddr).Port
	if got := tr.udp.LocalAddr().(*net.UDPAddr).Port; got != port {
		t.Fatalf("UDP on port %d, TCP on %d", got, port)
	}
	ip, p, err := tr.FinalAdvertiseAddr("", 0)
	if err != nil || !ip.Equal(net.IPv4(127, 0, 0, 1)) || p != port {
		t.Fatalf("advertise %v:%d %v, want 127.0.0.1:%d", ip, p, err, port)
	}
	ip, p, err = tr.FinalAdvertiseAddr("10.1.2.3", 7000)
	if err != nil || ip.String() != "10.1.2.3" || p != 7000 {
		t.Fatalf("advertise %v:%d %v, want 10.1.2.3:7000", ip, p, err)
	}
	if _, _, err := tr.FinalAdvertiseAddr("not-an-ip", 7000); err == nil {
		t.Fatal("a bad advertise address was accepted")
	}
}

// A bind host given by name binds its address and advertises it (an empty
// host binds every address: not tried here, tests bind only loopback).
func TestTransportBindHostByName(t *testing.T) {
	tr, err := newTransport("localhost", 0, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Shutdown()
	ip, _, err := tr.FinalAdvertiseAddr("", 0)
	if err != nil || !ip.IsLoopback() {
		t.Fatalf("localhost advertises %v %v", ip, err)
	}
}
