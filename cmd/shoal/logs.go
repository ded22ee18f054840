package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/shoalhq/shoal/logfile"
	"github.com/shoalhq/shoal/supervisor"
)

// cmdLogs: `shoal logs [-c FILE | --file PATH | --admin ADDR] [-f] [-n N] [--level L]
// [--proc NAME] [--since DURATION|TIME] [--json]`.
func cmdLogs(args []string) int {
	fs := flag.NewFlagSet("shoal logs", flag.ContinueOnError)
	cfgPath := fs.String("c", "", "config `file` of the node (for log.file)")
	file := fs.String("file", "", "log `path` (default: log.file of the config)")
	admin := fs.String("admin", "", "ask the supervisor at this admin `address` where its log is")
	follow := fs.Bool("f", false, "follow: keep printing new lines, across rotation, until Ctrl-C")
	n := fs.Int("n", -1, "print only the last `N` matching lines (default: all; 10 with -f)")
	level := fs.String("level", "", "minimum `level`: trace, debug, info, warn or error")
	procs := fs.String("proc", "", "only these processes, comma-separated: worker-1, or a role like worker")
	since := fs.String("since", "", "only lines since a `duration` ago (10m) or an RFC 3339 time")
	asJSON := fs.Bool("json", false, "print the JSON lines as stored")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "shoal logs: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	path := *file
	if path == "" && *admin != "" {
		p, err := logPathFromAdmin(*admin)
		if err != nil {
			fmt.Fprintln(os.Stderr, "shoal logs: "+err.Error())
			return 1
		}
		path = p
	}
	if path == "" {
		cfg, err := loadConfig(*cfgPath)
		if err != nil {
			fmt.Fprintln(os.Stderr, "shoal logs: "+oneLine(err))
			return 1
		}
		path = cfg.Log.File
	}
	var f logfile.Filter
	if *level != "" {
		lv, err := logfile.ParseLevel(*level)
		if err != nil {
			fmt.Fprintln(os.Stderr, "shoal logs: --level: "+err.Error())
			return 2
		}
		f.MinLevel = lv
	}
	for _, p := range strings.Split(*procs, ",") {
		if p = strings.TrimSpace(p); p != "" {
			f.Procs = append(f.Procs, p)
		}
	}
	if *since != "" {
		t, err := logfile.ParseSince(*since, time.Now())
		if err != nil {
			fmt.Fprintln(os.Stderr, "shoal logs: "+err.Error())
			return 2
		}
		f.Since = t
	}

	out := bufio.NewWriterSize(os.Stdout, 64<<10)
	defer out.Flush()
	var buf []byte
	emit := func(e logfile.Entry) error {
		if *asJSON {
			buf = logfile.AppendJSON(buf[:0], e)
		} else {
			buf = logfile.Format(buf[:0], e)
		}
		_, err := out.Write(buf)
		return err
	}

	if !*follow {
		if len(logfile.Files(path)) == 0 {
			fmt.Fprintf(os.Stderr, "shoal logs: %s: no log yet\n", path)
			return 1
		}
		var err error
		if *n >= 0 {
			last := logfile.NewLast(max(*n, 1))
			err = logfile.Read(path, f, last.Add)
			if *n > 0 {
				for _, e := range last.Entries() {
					if err == nil {
						err = emit(e)
					}
				}
			}
		} else {
			err = logfile.Read(path, f, emit)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "shoal logs: "+err.Error())
			return 1
		}
		return 0
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	tail := *n
	if tail < 0 {
		tail = 10
	}
	err := logfile.Follow(ctx, path, f, logfile.FollowOptions{History: tail > 0, Tail: tail}, func(e logfile.Entry) error {
		if err := emit(e); err != nil {
			return err
		}
		// A follower is read by a person or a pipe: show each line now.
		return out.Flush()
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "shoal logs: "+err.Error())
		return 1
	}
	return 0
}

// logPathFromAdmin asks a running supervisor for its log's absolute path.
func logPathFromAdmin(addr string) (string, error) {
	af := adminFlags{cfgPath: new(string), addr: &addr}
	base, err := af.base()
	if err != nil {
		return "", err
	}
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get(base + "/api/cluster")
	if err != nil {
		return "", errors.New(adminErr(base, err))
	}
	defer resp.Body.Close()
	var ci supervisor.ClusterInfo
	if err := json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(&ci); err != nil || ci.Log == "" {
		return "", fmt.Errorf("%s/api/cluster did not say where the log is (%s)", base, resp.Status)
	}
	return ci.Log, nil
}
