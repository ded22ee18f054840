// Command shoal is the whole of Shoal in one binary: the CLI, and (through
// the hidden `child` command) every process role the supervisor starts.
package main

import (
	"fmt"
	"os"
)

const usage = `usage: shoal <command> [flags]

commands:
  run       run a cluster node (supervisor, balancer, workers, brokers)
  status    print the cluster's process table
  logs      print or follow the central log
  reload    replace workers one at a time (rolling restart)
  token     mint a development JWT with the configured key
  ban       add, remove or list bans: shoal ban add --user ID
  config    check a config file: shoal config check FILE
  bench     load-test a cluster
  version   print the version
`

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() { os.Exit(run(os.Args[1:])) }

func run(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return 2
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "run":
		return cmdRun(rest)
	case "status":
		return cmdStatus(rest)
	case "logs":
		return cmdLogs(rest)
	case "reload":
		return cmdReload(rest)
	case "token":
		return cmdToken(rest)
	case "ban":
		return cmdBan(rest)
	case "config":
		return cmdConfig(rest)
	case "bench":
		return cmdBench(rest)
	case "version", "--version", "-v":
		fmt.Println("shoal", version)
		return 0
	case "child":
		return cmdChild(rest)
	case "help", "-h", "--help":
		fmt.Print(usage)
		return 0
	}
	fmt.Fprintf(os.Stderr, "shoal: unknown command %q\n\n%s", cmd, usage)
	return 2
}
