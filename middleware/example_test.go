package middleware_test

import (
	"fmt"
	"net/netip"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/middleware"
	"github.com/shoalhq/shoal/proto/sc"
)

// The worker's side: compile once, keep a Socket and an Input per
// connection, and turn each Decision into what the protocol sends.
func Example() {
	cfg, err := configs.Load([]byte(`
middleware:
  inbound:
    - channels:
        - match: "private/**"
          subscribe: {require: authenticated}
          error: {name: AuthError, message: "Cannot subscribe to {channel} without authentication"}
`), "shoal.yaml")
	if err != nil {
		panic(err)
	}
	chain, err := middleware.Compile(cfg)
	if err != nil {
		panic(err)
	}
	sock := &middleware.Socket{ID: "abc", RemoteIP: netip.MustParseAddr("192.0.2.1")}
	chain.Open(sock)
	defer chain.Close(sock)

	in := middleware.Input{Action: middleware.Subscribe, Socket: sock, Channel: "private/room"}
	d, pending := chain.Run(&in, func(d middleware.Decision) { /* hooks only: hand d to the socket */ })
	if !pending && d.Verdict == middleware.Deny {
		fmt.Println(string(sc.AppendErrorResponse(nil, []byte("5"), d.Error)))
	}
	// Output: {"rid":5,"error":{"message":"Cannot subscribe to private/room without authentication","name":"AuthError"}}
}
