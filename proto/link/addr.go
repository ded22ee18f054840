package link

import (
	"context"
	"fmt"
	"net"
	"os"
	"strings"
)

// An address is "unix:/path/to.sock" (same host) or "tcp:host:port"
// (across hosts). The scheme prefix keeps one string field able to name
// either, and a bare "host:port" is read as tcp for convenience.

// SplitAddr returns the network ("unix" or "tcp") and the address proper.
func SplitAddr(addr string) (network, address string, err error) {
	switch {
	case strings.HasPrefix(addr, "unix:"):
		network, address = "unix", strings.TrimPrefix(addr, "unix:")
	case strings.HasPrefix(addr, "tcp:"):
		network, address = "tcp", strings.TrimPrefix(addr, "tcp:")
	case strings.Contains(addr, ":") && !strings.HasPrefix(addr, "/"):
		network, address = "tcp", addr
	default:
		return "", "", fmt.Errorf("link: address %q: want unix:/path or tcp:host:port", addr)
	}
	if address == "" {
		return "", "", fmt.Errorf("link: address %q has no path or host:port", addr)
	}
	return network, address, nil
}

// Listen listens on a link address. A stale unix socket file left by a
// crashed process is removed first (the run directory is private).
func Listen(addr string) (net.Listener, error) {
	network, address, err := SplitAddr(addr)
	if err != nil {
		return nil, err
	}
	if network == "unix" {
		if err := os.Remove(address); err != nil && !os.IsNotExist(err) {
			return nil, fmt.Errorf("link: removing stale socket %s: %w", address, err)
		}
	}
	ln, err := net.Listen(network, address)
	if err != nil {
		return nil, fmt.Errorf("link: listening on %s: %w", addr, err)
	}
	return ln, nil
}

// ListenerAddr formats a listener's address in link form.
func ListenerAddr(ln net.Listener) string {
	a := ln.Addr()
	return a.Network() + ":" + a.String()
}

// Dial connects to a link address.
func Dial(ctx context.Context, addr string) (net.Conn, error) {
	network, address, err := SplitAddr(addr)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("link: dialing %s: %w", addr, err)
	}
	if tc, ok := c.(*net.TCPConn); ok {
		// Frames are already coalesced by the Writer; Nagle would only add delay.
		_ = tc.SetNoDelay(true)
	}
	return c, nil
}
