package main

import (
	"fmt"
	"os"

	"github.com/shoalhq/shoal/balancer"
	"github.com/shoalhq/shoal/broker"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/worker"
)

// cmdChild is the hidden entry point the supervisor re-executes for each
// process role: `shoal child worker|broker|balancer`.
func cmdChild(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: shoal child balancer|worker|broker (started by the supervisor)")
		return 2
	}
	role := control.Role(args[0])
	logger := control.NewLogger(string(role), os.Getenv("SHOAL_LOG_LEVEL"))
	var impl control.Child
	switch role {
	case control.RoleWorker:
		impl = worker.New(logger)
	case control.RoleBroker:
		impl = broker.New(logger)
	case control.RoleBalancer:
		impl = balancer.New(logger)
	default:
		fmt.Fprintf(os.Stderr, "shoal child: unknown role %q\n", role)
		return 2
	}
	if os.Getenv(control.Handshake.MagicCookieKey) != control.Handshake.MagicCookieValue {
		fmt.Fprintln(os.Stderr, "shoal child: this command is started by `shoal run`, not by hand")
		return 2
	}
	control.Serve(impl, logger)
	return 0
}
