package ring

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-sockaddr"
	"github.com/hashicorp/memberlist"
)

// transport is memberlist's network transport (UDP packets for gossip and
// probes, TCP streams for push/pull and joins) with one difference that
// matters to an idle broker: memberlist's own NetTransport allocates a fresh
// 64 KiB buffer for every UDP packet it receives, so a broker doing nothing
// but gossip produced ~0.5 MB of garbage per second and ran a GC cycle every
// few seconds. Here each listener reads into one reused buffer and hands
// memberlist a copy of exactly the packet's size (memberlist keeps the slice:
// some messages wait in its queues), which is what a gossip packet costs.
type transport struct {
	log      hclog.Logger
	tcp      *net.TCPListener
	udp      *net.UDPConn
	bindIP   string // as configured: "0.0.0.0" means "advertise a private IP"
	packetCh chan *memberlist.Packet
	streamCh chan net.Conn
	shutdown atomic.Bool
	wg       sync.WaitGroup
}

// udpMaxPacket is the largest datagram a listener reads: memberlist's own
// limit for a packet it receives (it never sends more than its UDP buffer
// size, 1,400 bytes by default, but a peer's config may say otherwise).
const udpMaxPacket = 65536

// udpRecvBuf is the kernel receive buffer asked for the UDP socket, so a
// burst of gossip while the listener is descheduled is not dropped (the same
// size memberlist asks for).
const udpRecvBuf = 2 << 20

// newTransport binds TCP and UDP on the same host and port. With port 0 the
// kernel picks the TCP port and UDP must get the same number, which can be
// taken in between: that is retried a few times, as memberlist does.
func newTransport(host string, port int, log hclog.Logger) (*transport, error) {
	if host == "" {
		host = "0.0.0.0" // ":7946" binds every address, as net.Listen does
	}
	ip := net.ParseIP(host)
	if ip == nil {
		// A name ("localhost", a host name): bind its first address, so
		// the advertised address is one the others can dial.
		a, err := net.ResolveIPAddr("ip", host)
		if err != nil {
			return nil, fmt.Errorf("ring: gossip bind host %q: %w", host, err)
		}
		ip = a.IP
	}
	tries := 1
	if port == 0 {
		tries = 10
	}
	var err error
	for range tries {
		var t *transport
		if t, err = bindTransport(ip, port, log); err == nil {
			t.bindIP = host
			return t, nil
		}
	}
	return nil, err
}

func bindTransport(ip net.IP, port int, log hclog.Logger) (*transport, error) {
	tcp, err := net.ListenTCP("tcp", &net.TCPAddr{IP: ip, Port: port})
	if err != nil {
		return nil, fmt.Errorf("ring: gossip TCP listener on %s: %w", net.JoinHostPort(ip.String(), strconv.Itoa(port)), err)
	}
	port = tcp.Addr().(*net.TCPAddr).Port
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: ip, Port: port})
	if err != nil {
		tcp.Close()
		return nil, fmt.Errorf("ring: gossip UDP listener on %s: %w", net.JoinHostPort(ip.String(), strconv.Itoa(port)), err)
	}
	for size := udpRecvBuf; size > 0; size /= 2 {
		if udp.SetReadBuffer(size) == nil {
			break
		}
	}
	t := &transport{
		log:      log,
		tcp:      tcp,
		udp:      udp,
		packetCh: make(chan *memberlist.Packet),
		streamCh: make(chan net.Conn),
	}
	t.wg.Add(2)
	go t.acceptStreams()
	go t.readPackets()
	return t, nil
}

// FinalAdvertiseAddr is the address other members reach this one at: the
// configured advertise address, else the bound one (a private interface
// address when bound to 0.0.0.0); port 0 means the bound port.
func (t *transport) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	bound := t.tcp.Addr().(*net.TCPAddr)
	if port == 0 {
		port = bound.Port
	}
	if ip == "" {
		if t.bindIP != "0.0.0.0" {
			return bound.IP, bound.Port, nil
		}
		priv, err := sockaddr.GetPrivateIP()
		if err != nil {
			return nil, 0, fmt.Errorf("ring: finding a private IP to advertise: %w", err)
		}
		if priv == "" {
			return nil, 0, errors.New("ring: bound to 0.0.0.0 and no private IP found: set the advertise address")
		}
		ip = priv
	}
	addr := net.ParseIP(ip)
	if addr == nil {
		return nil, 0, fmt.Errorf("ring: advertise address %q is not an IP address", ip)
	}
	if ip4 := addr.To4(); ip4 != nil {
		addr = ip4
	}
	return addr, port, nil
}

// WriteTo sends one gossip packet. memberlist passes resolved "ip:port"
// addresses; anything else goes through the resolver.
func (t *transport) WriteTo(b []byte, addr string) (time.Time, error) {
	var to *net.UDPAddr
	if ap, err := netip.ParseAddrPort(addr); err == nil {
		to = net.UDPAddrFromAddrPort(ap)
	} else if to, err = net.ResolveUDPAddr("udp", addr); err != nil {
		return time.Time{}, fmt.Errorf("ring: resolving gossip peer %q: %w", addr, err)
	}
	_, err := t.udp.WriteTo(b, to)
	return time.Now(), err
}

func (t *transport) PacketCh() <-chan *memberlist.Packet { return t.packetCh }

func (t *transport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout}
	return d.Dial("tcp", addr)
}

func (t *transport) StreamCh() <-chan net.Conn { return t.streamCh }

// Shutdown closes both listeners and waits for their goroutines. memberlist
// calls it before it stops reading PacketCh and StreamCh, so a listener
// blocked handing over a packet or stream still gets through and then sees
// the closed socket.
func (t *transport) Shutdown() error {
	t.shutdown.Store(true)
	t.tcp.Close()
	t.udp.Close()
	t.wg.Wait()
	return nil
}

func (t *transport) acceptStreams() {
	defer t.wg.Done()
	pause := time.Duration(0)
	for {
		c, err := t.tcp.AcceptTCP()
		if err != nil {
			if t.shutdown.Load() {
				return
			}
			// EMFILE and its kin persist until something closes: pause,
			// doubling up to a second, instead of spinning.
			pause = min(max(2*pause, 5*time.Millisecond), time.Second)
			t.log.Warn("gossip: accepting a TCP stream failed; pausing", "error", err, "pause", pause)
			time.Sleep(pause)
			continue
		}
		pause = 0
		t.streamCh <- c
	}
}

func (t *transport) readPackets() {
	defer t.wg.Done()
	buf := make([]byte, udpMaxPacket)
	for {
		n, from, err := t.udp.ReadFromUDPAddrPort(buf)
		ts := time.Now()
		if err != nil {
			if t.shutdown.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			if !strings.Contains(err.Error(), "connection refused") {
				t.log.Warn("gossip: reading a UDP packet failed", "error", err)
			}
			continue
		}
		if n < 1 {
			continue // memberlist needs at least a message type byte
		}
		t.packetCh <- &memberlist.Packet{
			Buf:       append([]byte(nil), buf[:n]...),
			From:      net.UDPAddrFromAddrPort(from),
			Timestamp: ts,
		}
	}
}
