package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/shoalhq/shoal/bench"
)

const benchUsage = `usage: shoal bench <conns|fanout|rtt|churn> [flags]

Load-tests a Shoal cluster or any SocketCluster v20 server on this machine
(ws:// or wss:// on 127.0.0.0/8 only). See docs/bench.md for what each figure means.

flags:
`

// cmdBench parses flags into bench.Options and runs one scenario; the hidden
// --agent mode is one load-generating child of a run.
func cmdBench(args []string) int {
	if len(args) > 0 && args[0] == "--agent" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		if err := bench.RunAgent(ctx, os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "shoal bench agent:", err)
			return 1
		}
		return 0
	}
	var o bench.Options
	fs := flag.NewFlagSet("shoal bench", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), benchUsage)
		fs.PrintDefaults()
	}
	var urls, pids multiFlag
	var quiet bool
	fs.Var(&urls, "url", "server URL, repeatable (default ws://127.0.0.1:8000/socketcluster/)")
	fs.IntVar(&o.Agents, "agents", 1, "load-generating processes (0 = inside this process); raised automatically past 19,000 conns per agent")
	fs.IntVar(&o.Conns, "conns", 0, "conns: connections to open; rtt: publishing connections; churn: concurrent loops")
	fs.Float64Var(&o.Rate, "rate", 0, "conns: new connections/s; fanout, rtt: publishes/s in total (0 = as fast as possible)")
	fs.IntVar(&o.Concurrency, "concurrency", 0, "dials in flight per agent (conns default 64, else 32)")
	fs.IntVar(&o.Channels, "channels", 0, "fanout: channels (default 1)")
	fs.IntVar(&o.Subscribers, "subs", 0, "fanout: subscribers per channel (default 100)")
	fs.IntVar(&o.Publishers, "publishers", 0, "fanout: publishing connections (default 1)")
	fs.IntVar(&o.Payload, "payload", 0, "size in bytes of each published JSON value (default 100, min 48)")
	fs.IntVar(&o.Window, "window", 0, "publish invokes in flight per publisher (fanout default 64, rtt 1)")
	fs.BoolVar(&o.Transmit, "transmit", false, "fanout: publish as transmit (no ack, no window)")
	fs.DurationVar(&o.Duration, "duration", 0, "measured phase of fanout, rtt, churn (default 5s, max 10m)")
	fs.DurationVar(&o.Hold, "hold", 0, "conns: idle time before memory is read (default 3s)")
	fs.DurationVar(&o.Timeout, "timeout", 0, "per dial, handshake and subscribe; also the wait for late acks (default 10s)")
	fs.IntVar(&o.Sources, "sources", 0, "source addresses to spread connections over (default 16)")
	fs.StringVar(&o.SourceBase, "source-base", "", "first source address, in 127.0.0.0/8 (default 127.0.1.1)")
	fs.StringVar(&o.Token, "token", "", "auth token to send in #handshake")
	fs.IntVar(&o.Pollers, "pollers", 0, "epoll pollers per agent (default GOMAXPROCS)")
	fs.StringVar(&o.AdminURL, "admin", "", "Shoal admin API (e.g. http://127.0.0.1:8001): server pids from /api/cluster")
	fs.Var(&pids, "pid", "server pid (with its descendants), repeatable or comma-separated")
	fs.IntVar(&o.PIDsFromPort, "pids-from-port", 0, "server pids = owners of this listening port (default: the URL's port)")
	fs.BoolVar(&o.JSON, "json", false, "print the result as one JSON line")
	fs.BoolVar(&quiet, "quiet", false, "no progress line")
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "-help") {
			fs.SetOutput(os.Stdout)
			fs.Usage()
			return 0
		}
		fs.Usage()
		return 2
	}
	o.Scenario, args = args[0], args[1:]
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "shoal bench: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	o.URLs = urls
	for _, p := range pids {
		for _, s := range strings.Split(p, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(s))
			if err != nil {
				fmt.Fprintf(os.Stderr, "shoal bench: bad --pid %q\n", s)
				return 2
			}
			o.PIDs = append(o.PIDs, n)
		}
	}
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "shoal bench:", err)
		return 1
	}
	o.AgentCommand = []string{exe, "bench", "--agent"}
	o.Stdout = os.Stdout
	if !quiet {
		o.Progress = os.Stderr
		if fi, err := os.Stderr.Stat(); err == nil && fi.Mode()&os.ModeCharDevice == 0 {
			o.ProgressLines = true // stderr is a file or pipe
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if _, err := bench.Run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "shoal", err) // bench's errors start with "bench:"
		return 1
	}
	return 0
}

// multiFlag collects a repeatable string flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(s string) error { *m = append(*m, s); return nil }
