package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/shoalhq/shoal/supervisor"
)

// cmdReload: `shoal reload [-c FILE | --admin ADDR]` asks the running
// supervisor for a rolling restart of its workers (re-reading its config).
func cmdReload(args []string) int {
	fs := flag.NewFlagSet("shoal reload", flag.ContinueOnError)
	af := addAdminFlags(fs)
	timeout := fs.Duration("timeout", 5*time.Minute, "give up waiting after this `duration`")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	base, err := af.base()
	if err != nil {
		fmt.Fprintln(os.Stderr, "shoal reload: "+oneLine(err))
		return 1
	}
	client := &http.Client{Timeout: *timeout}
	resp, err := client.Post(base+"/api/reload", "application/json", nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, "shoal reload: "+adminErr(base, err))
		return 1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var res supervisor.ReloadResult
	if err := json.Unmarshal(body, &res); err != nil {
		fmt.Fprintf(os.Stderr, "shoal reload: %s answered %s\n", base, resp.Status)
		return 1
	}
	if len(res.Restarted) > 0 {
		fmt.Printf("restarted %s\n", strings.Join(res.Restarted, ", "))
	}
	if len(res.Skipped) > 0 {
		fmt.Printf("skipped %s\n", strings.Join(res.Skipped, ", "))
	}
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(os.Stderr, "shoal reload: %s\n", res.Error)
		return 1
	}
	return 0
}
