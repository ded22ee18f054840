package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/shoalhq/shoal/auth"
	"github.com/shoalhq/shoal/configs"
)

// claimFlags collects repeated --claim k=v.
type claimFlags []string

func (c *claimFlags) String() string     { return strings.Join(*c, ",") }
func (c *claimFlags) Set(v string) error { *c = append(*c, v); return nil }

// cmdToken: `shoal token --sub alice --ttl 1h [-c FILE] [--claim k=v]...`
// mints a development JWT signed with the configured key (the same key the
// workers verify with: set SHOAL_AUTH_KEY, or auth.jwt.key_file).
func cmdToken(args []string) int {
	fs := flag.NewFlagSet("token", flag.ContinueOnError)
	sub := fs.String("sub", "", "subject (sub claim), e.g. a user id")
	ttl := fs.Duration("ttl", time.Hour, "lifetime of the token (exp = now + ttl)")
	cfgFile := fs.String("c", "", "config file (default: the embedded default config)")
	var claims claimFlags
	fs.Var(&claims, "claim", "extra claim k=v (repeatable; v is JSON if it parses, else a string)")
	fs.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: shoal token --sub ID [--ttl 1h] [-c FILE] [--claim k=v]...")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 0 || *ttl <= 0 {
		fs.Usage()
		return 2
	}
	cfg := configs.LoadDefault()
	if *cfgFile != "" {
		var err error
		if cfg, err = configs.LoadFile(*cfgFile); err != nil {
			fmt.Fprintln(os.Stderr, "shoal token:", err)
			return 1
		}
	}
	keys, err := auth.New(cfg.Auth.JWT, os.Getenv)
	if err != nil {
		fmt.Fprintln(os.Stderr, "shoal token: loading auth keys:", err)
		return 1
	}
	if !keys.Enabled() {
		fmt.Fprintln(os.Stderr, "shoal token:", keys.Missing())
		return 1
	}
	c := map[string]any{}
	for _, kv := range claims {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			fmt.Fprintf(os.Stderr, "shoal token: --claim %q: want key=value\n", kv)
			return 2
		}
		var jv any
		if err := json.Unmarshal([]byte(v), &jv); err == nil {
			c[k] = jv
		} else {
			c[k] = v
		}
	}
	if *sub != "" {
		c["sub"] = *sub
	}
	c["exp"] = time.Now().Add(*ttl).Unix()
	tok, err := keys.Sign(c)
	if err != nil {
		fmt.Fprintln(os.Stderr, "shoal token:", err)
		return 1
	}
	fmt.Println(tok)
	return 0
}
