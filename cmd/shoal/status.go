package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/shoalhq/shoal/supervisor"
)

// adminFlags are the flags of the commands that talk to a running
// supervisor: its admin address, directly or from a config file.
type adminFlags struct {
	cfgPath *string
	addr    *string
}

func addAdminFlags(fs *flag.FlagSet) adminFlags {
	return adminFlags{
		cfgPath: fs.String("c", "", "config `file` of the running node (for listen.admin)"),
		addr:    fs.String("admin", "", "admin `address` host:port (default: listen.admin of the config)"),
	}
}

// base resolves the admin URL.
func (a adminFlags) base() (string, error) {
	addr := *a.addr
	if addr == "" {
		cfg, err := loadConfig(*a.cfgPath)
		if err != nil {
			return "", err
		}
		addr = cfg.Listen.Admin
		if addr == "" {
			return "", errors.New("listen.admin is empty in the config: the admin API is off")
		}
	}
	if strings.HasPrefix(addr, "http://") || strings.HasPrefix(addr, "https://") {
		return strings.TrimRight(addr, "/"), nil
	}
	if strings.HasPrefix(addr, ":") {
		addr = "127.0.0.1" + addr
	}
	return "http://" + addr, nil
}

// adminErr explains a failed admin request in one line.
func adminErr(base string, err error) string {
	if errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Sprintf("no supervisor answers on %s (is `shoal run` running, with this config?)", base)
	}
	return err.Error()
}

// cmdStatus: `shoal status [-c FILE | --admin ADDR] [--json]`.
func cmdStatus(args []string) int {
	fs := flag.NewFlagSet("shoal status", flag.ContinueOnError)
	af := addAdminFlags(fs)
	asJSON := fs.Bool("json", false, "print the raw JSON of /api/cluster")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	base, err := af.base()
	if err != nil {
		fmt.Fprintln(os.Stderr, "shoal status: "+oneLine(err))
		return 1
	}
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get(base + "/api/cluster")
	if err != nil {
		fmt.Fprintln(os.Stderr, "shoal status: "+adminErr(base, err))
		return 1
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil || resp.StatusCode != http.StatusOK {
		fmt.Fprintf(os.Stderr, "shoal status: %s/api/cluster answered %s\n", base, resp.Status)
		return 1
	}
	if *asJSON {
		os.Stdout.Write(body)
		return 0
	}
	var ci supervisor.ClusterInfo
	if err := json.Unmarshal(body, &ci); err != nil {
		fmt.Fprintf(os.Stderr, "shoal status: reading the process table: %v\n", err)
		return 1
	}
	printStatus(os.Stdout, ci)
	return 0
}

func printStatus(w io.Writer, ci supervisor.ClusterInfo) {
	fmt.Fprintf(w, "node %s  supervisor pid %d  up %s  config %s\n", ci.Node, ci.SupervisorPid,
		fmtSeconds(ci.Uptime), ci.Config)
	fmt.Fprintf(w, "public %s  admin %s  log %s\n", ci.Public, ci.Admin, ci.Log)
	if ci.TLS != "" {
		fmt.Fprintf(w, "tls %s  ", ci.TLS)
	}
	if ci.Balancing == "kernel" {
		fmt.Fprint(w, "balancing kernel (workers share the ports with SO_REUSEPORT)")
	} else if ci.Balancing != "" {
		fmt.Fprint(w, "balancing balancer process")
	}
	fmt.Fprint(w, "\n\n")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tROLE\tPID\tSTATE\tRESTARTS\tUPTIME\tCONNS\tRSS\tLAST EXIT")
	for _, p := range ci.Processes {
		pid, up, rss := "-", "-", "-"
		if p.Pid != 0 {
			pid = fmt.Sprint(p.Pid)
		}
		if p.Uptime > 0 {
			up = fmtSeconds(p.Uptime)
		}
		if p.RSSBytes > 0 {
			rss = fmt.Sprintf("%.1fMiB", float64(p.RSSBytes)/(1<<20))
		}
		last := p.LastExit
		if last == "" {
			last = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%d\t%s\t%s\n", p.Name, p.Role, pid, p.State, p.Restarts, up, p.Connections, rss, last)
	}
	tw.Flush()
}

func fmtSeconds(s float64) string {
	return (time.Duration(s) * time.Second).String()
}
