package main

import (
	"context"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/middleware"
)

// TestAuditPluginThroughTheChain builds this plugin and runs publishes
// through the middleware chain the worker uses, which starts the binary
// over go-plugin.
func TestAuditPluginThroughTheChain(t *testing.T) {
	defer goleak.VerifyNone(t)
	bin := filepath.Join(t.TempDir(), "audit")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	cfg, err := configs.Load([]byte(`
middleware:
  inbound:
    - plugin: {path: `+bin+`, stages: [publishIn], timeout: 5s}
`), "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	chain, err := middleware.Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer chain.Shutdown()
	if err := chain.StartPlugins(); err != nil {
		t.Fatal(err)
	}
	sock := &middleware.Socket{ID: "s1", Authenticated: true, UserID: "alice", Claims: map[string]any{"sub": "alice"}}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	d := chain.Decide(ctx, &middleware.Input{Action: middleware.PublishIn, Socket: sock, Channel: "chat/1", Data: []byte(`{"text":"hello"}`)})
	if d.Verdict != middleware.Allow {
		t.Fatalf("clean publish: %+v (error %v)", d, d.Error)
	}
	d = chain.Decide(ctx, &middleware.Input{Action: middleware.PublishIn, Socket: sock, Channel: "chat/1", Data: []byte(`{"text":"a BadWord here"}`)})
	if d.Verdict != middleware.Deny || d.Error == nil || d.Error.Name != "BannedWordError" || d.Rule != "inbound[0].plugin" {
		t.Fatalf("banned publish: %+v (error %v)", d, d.Error)
	}
	// Other actions are not sent to the plugin (not in its stages).
	if chain.HasRules(middleware.Subscribe) {
		t.Fatal("plugin rule registered for subscribe")
	}
	chain.Shutdown()
	d = chain.Decide(ctx, &middleware.Input{Action: middleware.PublishIn, Socket: sock, Channel: "chat/1", Data: []byte(`1`)})
	if d.Verdict != middleware.Deny || d.Error.Name != "PluginError" {
		t.Fatalf("after shutdown: %+v", d)
	}
}
