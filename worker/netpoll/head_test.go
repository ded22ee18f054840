package netpoll

import (
	"bufio"
	"net/http"
	"reflect"
	"strings"
	"testing"
)

// parseHead must give the hook what net/http would: the same header map
// (canonical keys, repeated headers in order, values trimmed) and target.
func TestParseHeadMatchesNetHTTP(t *testing.T) {
	heads := []string{
		"GET /socketcluster/ HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
			"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
		"GET /socketcluster/?token=x&y=1 HTTP/1.1\r\nhost: a\r\norigin: http://example.com\r\n" +
			"X-Forwarded-For: 1.2.3.4\r\nx-forwarded-for:  5.6.7.8 \r\nCookie: a=b; c=d\r\n\r\n",
		"GET http://a/socketcluster/ HTTP/1.1\r\nHost: a\r\nEmpty:\r\n\r\n",
	}
	for _, h := range heads {
		want, err := http.ReadRequest(bufio.NewReader(strings.NewReader(h)))
		if err != nil {
			t.Fatal(err)
		}
		got, ok := parseHead([]byte(h))
		if !ok {
			t.Fatalf("parseHead refused %q", h)
		}
		// net/http moves Host out of the map.
		want.Header["Host"] = []string{want.Host}
		if !reflect.DeepEqual(got.Header, want.Header) {
			t.Errorf("%q:\n got  %v\n want %v", h, got.Header, want.Header)
		}
		if got.RequestURI != want.RequestURI {
			t.Errorf("RequestURI %q, want %q", got.RequestURI, want.RequestURI)
		}
		if got.Origin != want.Header.Get("Origin") {
			t.Errorf("Origin %q, want %q", got.Origin, want.Header.Get("Origin"))
		}
	}
	for _, bad := range []string{
		"GET\r\n\r\n",
		"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
		"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
		"GET / HTTP/1.1\r\nBad Key: v\r\n\r\n",
	} {
		if _, ok := parseHead([]byte(bad)); ok {
			t.Errorf("parseHead accepted %q", bad)
		}
	}
}
