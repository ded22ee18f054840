package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/shoalhq/shoal/configs"
)

const banUsage = `usage:
  shoal ban add    (--user ID | --ip ADDR|CIDR) [--reason TEXT] [--for DURATION]
  shoal ban remove (--user ID | --ip ADDR|CIDR)
  shoal ban list   [--json]

Every form also takes:
  -c FILE        config file (the API address and api.key_env come from it)
  --url URL      the server API base, e.g. http://127.0.0.1:8000 (default: listen.public of the config)
  --api-key KEY  the API key (default: the environment variable named by api.key_env, SHOAL_API_KEY)

Bans apply to the whole cluster and survive restarts (docs/api.md, "ban, unban, bans").
`

// cmdBan: `shoal ban add|remove|list` over the server HTTP API.
func cmdBan(args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(os.Stderr, banUsage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	sub, rest := args[0], args[1:]
	fs := flag.NewFlagSet("ban "+sub, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are printed below, once, with the usage
	cfgFile := fs.String("c", "", "")
	url := fs.String("url", "", "")
	apiKey := fs.String("api-key", "", "")
	user := fs.String("user", "", "")
	ip := fs.String("ip", "", "")
	reason := fs.String("reason", "", "")
	dur := fs.Duration("for", 0, "")
	asJSON := fs.Bool("json", false, "")
	if sub != "add" && sub != "remove" && sub != "list" {
		fmt.Fprintf(os.Stderr, "shoal ban: unknown subcommand %q (add, remove, list)\n\n%s", sub, banUsage)
		return 2
	}
	if err := fs.Parse(rest); err != nil {
		fmt.Fprintf(os.Stderr, "shoal ban %s: %v\n\n%s", sub, err, banUsage)
		return 2
	}
	if fs.NArg() != 0 {
		fmt.Fprintf(os.Stderr, "shoal ban %s: unexpected argument %q\n\n%s", sub, fs.Arg(0), banUsage)
		return 2
	}
	bad := func(msg string) int {
		fmt.Fprintf(os.Stderr, "shoal ban %s: %s\n", sub, msg)
		return 2
	}
	switch sub {
	case "add", "remove":
		if (*user == "") == (*ip == "") {
			return bad("give exactly one of --user or --ip")
		}
		if sub == "remove" && (*reason != "" || *dur != 0) {
			return bad("--reason and --for are for ban add")
		}
		if *dur < 0 {
			return bad("--for must be positive (omit it for a permanent ban)")
		}
	case "list":
		if *user != "" || *ip != "" || *reason != "" || *dur != 0 {
			return bad("list takes no --user, --ip, --reason or --for")
		}
	}
	cl, err := newAPIClient(*cfgFile, *url, *apiKey)
	if err != nil {
		fmt.Fprintf(os.Stderr, "shoal ban %s: %v\n", sub, err)
		return 1
	}
	switch sub {
	case "add":
		body := map[string]any{}
		if *user != "" {
			body["user"] = *user
		} else {
			body["ip"] = *ip
		}
		if *reason != "" {
			body["reason"] = *reason
		}
		if *dur > 0 {
			body["duration"] = dur.String()
		}
		var out struct {
			Ban          banLine `json:"ban"`
			Disconnected int     `json:"disconnected"`
		}
		if err := cl.call("ban", body, &out); err != nil {
			fmt.Fprintf(os.Stderr, "shoal ban add: %v\n", err)
			return 1
		}
		until := "permanently"
		if out.Ban.Expires != "" {
			until = "until " + out.Ban.Expires
		}
		fmt.Printf("banned %s %s; %d connection(s) closed\n", out.Ban.target(), until, out.Disconnected)
	case "remove":
		body := map[string]any{"user": *user}
		if *ip != "" {
			body = map[string]any{"ip": *ip}
		}
		var out struct {
			Removed bool `json:"removed"`
		}
		if err := cl.call("unban", body, &out); err != nil {
			fmt.Fprintf(os.Stderr, "shoal ban remove: %v\n", err)
			return 1
		}
		target := "user " + *user
		if *ip != "" {
			target = "ip " + *ip
		}
		if !out.Removed {
			fmt.Printf("%s was not banned\n", target)
			return 0
		}
		fmt.Printf("removed the ban on %s\n", target)
	case "list":
		var out struct {
			Bans []banLine `json:"bans"`
		}
		if err := cl.call("bans", map[string]any{}, &out); err != nil {
			fmt.Fprintf(os.Stderr, "shoal ban list: %v\n", err)
			return 1
		}
		if *asJSON {
			b, _ := json.MarshalIndent(out.Bans, "", "  ")
			fmt.Println(string(b))
			return 0
		}
		if len(out.Bans) == 0 {
			fmt.Println("no bans")
			return 0
		}
		tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "TARGET\tEXPIRES\tREASON\tCREATED")
		for _, b := range out.Bans {
			exp := b.Expires
			if exp == "" {
				exp = "never"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", b.target(), exp, b.Reason, b.Created)
		}
		_ = tw.Flush()
	}
	return 0
}

// banLine is a ban as the API lists it.
type banLine struct {
	User    string `json:"user,omitempty"`
	IP      string `json:"ip,omitempty"`
	Reason  string `json:"reason,omitempty"`
	Created string `json:"created"`
	Expires string `json:"expires,omitempty"`
}

func (b banLine) target() string {
	if b.User != "" {
		return "user " + b.User
	}
	return "ip " + b.IP
}

// apiClient calls the server HTTP API.
type apiClient struct {
	base string
	key  string
	http *http.Client
}

// newAPIClient finds the API address and key: flags first, then the config
// (listen.public, api.key_env and that variable).
func newAPIClient(cfgFile, url, key string) (*apiClient, error) {
	cfg := configs.LoadDefault()
	if cfgFile != "" {
		var err error
		if cfg, err = configs.LoadFile(cfgFile); err != nil {
			return nil, err
		}
	}
	if url == "" {
		host, port, err := net.SplitHostPort(cfg.Listen.Public)
		if err != nil {
			return nil, fmt.Errorf("listen.public %q: %w (or pass --url)", cfg.Listen.Public, err)
		}
		if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
			host = "127.0.0.1" // a wildcard listener is reachable on loopback
		}
		url = "http://" + net.JoinHostPort(host, port)
	}
	url = strings.TrimRight(url, "/")
	if !strings.HasPrefix(url, "http://") && !strings.HasPrefix(url, "https://") {
		return nil, fmt.Errorf("--url %q: want http://host:port or https://host:port", url)
	}
	if key == "" {
		env := cfg.API.KeyEnv
		if env == "" {
			env = configs.Default().API.KeyEnv
		}
		key = os.Getenv(env)
		if key == "" {
			return nil, fmt.Errorf("no API key: set %s (api.key_env) or pass --api-key", env)
		}
	}
	return &apiClient{base: url, key: key, http: &http.Client{Timeout: 15 * time.Second}}, nil
}

// call POSTs body to /api/v1/<method> and decodes a 200 answer into out; an
// error answer becomes an error with the API's code and message.
func (c *apiClient) call(method string, body, out any) error {
	b, err := json.Marshal(body)
	if err != nil {
		return err
	}
	req, err := http.NewRequest(http.MethodPost, c.base+"/api/v1/"+method, bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("building the request: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-API-Key", c.key)
	resp, err := c.http.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return fmt.Errorf("cannot reach the server API at %s (is the cluster running? use --url or -c): %w", c.base, err)
		}
		return fmt.Errorf("calling %s/api/v1/%s: %w", c.base, method, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("reading the answer of %s: %w", method, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error struct {
				Code    string `json:"code"`
				Message string `json:"message"`
			} `json:"error"`
		}
		if json.Unmarshal(raw, &e) == nil && e.Error.Message != "" {
			return fmt.Errorf("the server refused (%d %s): %s", resp.StatusCode, e.Error.Code, e.Error.Message)
		}
		return fmt.Errorf("the server answered %s: %.200s", resp.Status, raw)
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("decoding the answer of %s: %w", method, err)
	}
	return nil
}
