package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/supervisor"
)

// cmdRun: `shoal run [-c FILE] [--join host:port,...] [--admin host:port]`.
func cmdRun(args []string) int {
	fs := flag.NewFlagSet("shoal run", flag.ContinueOnError)
	cfgPath := fs.String("c", "", "config `file` (default: the embedded default config)")
	join := fs.String("join", "", "gossip `addresses` of other nodes, comma-separated (overrides cluster.join)")
	admin := fs.String("admin", "", "admin HTTP `address` (overrides listen.admin)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "shoal run: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	// load is also the config source of a rolling reload, so the flags
	// keep overriding the file after a reload too.
	load := func() (configs.Config, error) {
		cfg, err := loadConfig(*cfgPath)
		if err != nil {
			return cfg, err
		}
		if *join != "" {
			cfg.Cluster.Join = nil
			for _, j := range strings.Split(*join, ",") {
				j = strings.TrimSpace(j)
				if _, _, err := net.SplitHostPort(j); err != nil {
					return cfg, fmt.Errorf("--join: expected host:port, got %q", j)
				}
				cfg.Cluster.Join = append(cfg.Cluster.Join, j)
			}
		}
		if *admin != "" {
			if _, _, err := net.SplitHostPort(*admin); err != nil {
				return cfg, fmt.Errorf("--admin: expected host:port, got %q", *admin)
			}
			cfg.Listen.Admin = *admin
		}
		// Every broker and worker reads the cluster secret the same way:
		// refuse a bad one here, once, instead of in each child.
		if _, err := cfg.Cluster.Secrets(); err != nil {
			return cfg, err
		}
		return cfg, nil
	}
	cfg, err := load()
	if err != nil {
		fmt.Fprintln(os.Stderr, "shoal run: "+oneLine(err))
		return 1
	}
	name := *cfgPath
	if name == "" {
		name = "<default>"
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	reloads := make(chan struct{}, 1)       // SIGUSR2: rolling restart of the workers
	configReloads := make(chan struct{}, 1) // SIGHUP: new config applied in place
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGUSR2)
	defer signal.Stop(sigs)
	done := make(chan struct{})
	defer close(done)
	go func() {
		var stopping time.Time
		for {
			select {
			case <-done:
				return
			case sig := <-sigs:
				switch {
				case sig == syscall.SIGHUP:
					select {
					case configReloads <- struct{}{}:
					default: // one is pending already
					}
				case sig == syscall.SIGUSR2:
					select {
					case reloads <- struct{}{}:
					default: // one is pending already
					}
				case stopping.IsZero():
					stopping = time.Now()
					fmt.Fprintf(os.Stderr, "shoal: %s: draining and stopping (again to exit at once)\n", sig)
					cancel()
				case time.Since(stopping) < time.Second:
					// The same stop delivered twice (timeout(1) signals the
					// process and then its group; a terminal's Ctrl-C and a
					// service manager's SIGTERM can coincide): not a second
					// request from a person.
				default:
					// The children die with us (Pdeathsig, parent watch).
					fmt.Fprintln(os.Stderr, "shoal: exiting at once")
					os.Exit(130)
				}
			}
		}
	}()

	err = supervisor.Run(ctx, cfg, supervisor.Options{
		Stdout:         os.Stdout,
		Stderr:         os.Stderr,
		ConfigName:     name,
		Reload:         load,
		ReloadRequests: reloads,

		ConfigReloadRequests: configReloads,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "shoal run: "+oneLine(err))
		return 1
	}
	return 0
}

// loadConfig reads a config file, or the embedded default for "".
func loadConfig(path string) (configs.Config, error) {
	if path == "" {
		return configs.LoadDefaultErr()
	}
	return configs.LoadFile(path)
}

// oneLine reduces an error to the single line a user reads first; a config
// with several mistakes says how to see them all.
func oneLine(err error) string {
	var errs configs.Errors
	if errors.As(err, &errs) && len(errs) > 1 {
		return fmt.Sprintf("%v (and %d more: shoal config check %s)", errs[0], len(errs)-1, errs[0].File)
	}
	msg := err.Error()
	if i := strings.IndexByte(msg, '\n'); i >= 0 {
		msg = msg[:i]
	}
	return msg
}
