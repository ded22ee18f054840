// Command audit-plugin is an example go-plugin middleware for Shoal. It logs
// every client publish (publishIn) and denies publishes whose data contains a
// banned word. Build it and name it in the config:
//
//	go build -o ./plugins/audit ./examples/audit-plugin
//
//	middleware:
//	  inbound:
//	    - plugin: {path: ./plugins/audit, stages: [publishIn], timeout: 1s}
//
// The banned words are AUDIT_BANNED (comma separated; default "badword").
// The worker starts the binary itself (a go-plugin handshake guards it:
// started by hand it prints a notice and exits) and forwards its stderr,
// where this plugin logs, into the worker's log.
package main

import (
	"bytes"
	"context"
	"os"
	"strings"

	"github.com/hashicorp/go-hclog"

	pmw "github.com/shoalhq/shoal/proto/middleware"
	"github.com/shoalhq/shoal/proto/middleware/middlewarepb"
)

// audit is the Middleware implementation.
type audit struct {
	banned [][]byte
	log    hclog.Logger
}

func newAudit(bannedList string, log hclog.Logger) *audit {
	a := &audit{log: log}
	for _, w := range strings.Split(bannedList, ",") {
		if w = strings.TrimSpace(w); w != "" {
			a.banned = append(a.banned, bytes.ToLower([]byte(w)))
		}
	}
	return a
}

// Decide logs each publishIn and denies it when its data holds a banned
// word (case-insensitive, anywhere in the raw JSON). Other actions pass.
func (a *audit) Decide(_ context.Context, req *middlewarepb.DecideRequest) (*middlewarepb.DecideReply, error) {
	if req.GetAction() != "publishIn" {
		return &middlewarepb.DecideReply{Verdict: middlewarepb.Verdict_PASS}, nil
	}
	a.log.Info("publish", "socket", req.GetSocketId(), "user", req.GetUser(), "remote", req.GetRemoteAddr(),
		"channel", req.GetChannel(), "bytes", len(req.GetData()))
	data := bytes.ToLower(req.GetData())
	for _, w := range a.banned {
		if bytes.Contains(data, w) {
			a.log.Warn("publish denied", "socket", req.GetSocketId(), "channel", req.GetChannel(), "word", string(w))
			return &middlewarepb.DecideReply{
				Verdict: middlewarepb.Verdict_DENY,
				Error: &middlewarepb.Error{Name: "BannedWordError",
					Message: "Publishing to " + req.GetChannel() + " was refused: the message contains a banned word"},
			}, nil
		}
	}
	return &middlewarepb.DecideReply{Verdict: middlewarepb.Verdict_PASS}, nil
}

func main() {
	banned := os.Getenv("AUDIT_BANNED")
	if banned == "" {
		banned = "badword"
	}
	// go-plugin reads the plugin's stderr; JSON lines keep their fields.
	log := hclog.New(&hclog.LoggerOptions{Name: "audit", Output: os.Stderr, JSONFormat: true})
	pmw.Serve(newAudit(banned, log))
}
