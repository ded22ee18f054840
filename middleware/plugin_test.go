package middleware

import (
	"context"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/shoalhq/shoal/configs"
)

// buildAudit builds the example plugin (examples/audit-plugin).
func buildAudit(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "audit")
	if out, err := exec.Command("go", "build", "-o", bin, "../examples/audit-plugin").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// TestPluginRestartsAfterCrash: a plugin that dies is restarted after the
// back-off; meanwhile its actions are denied with PluginError.
func TestPluginRestartsAfterCrash(t *testing.T) {
	bin := buildAudit(t)
	clk := newFakeClock()
	cfg, err := configs.Load([]byte("middleware:\n  inbound:\n    - plugin: {path: "+bin+", stages: [publishIn], timeout: 5s}\n"), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c, err := CompileWith(cfg, Options{Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Shutdown()
	ctx := context.Background()
	pub := func() Decision {
		return c.Decide(ctx, &Input{Action: PublishIn, Socket: &Socket{ID: "s"}, Channel: "x", Data: []byte(`"ok"`)})
	}
	if d := pub(); d.Verdict != Allow {
		t.Fatalf("first call: %+v %v", d, d.Error)
	}
	h := c.shared.plugins.m[bin]
	h.mu.Lock()
	rc := h.client.ReattachConfig()
	h.mu.Unlock()
	if rc == nil || rc.Pid == 0 {
		t.Fatal("no plugin pid")
	}
	if err := syscall.Kill(rc.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		h.mu.Lock()
		exited := h.client.Exited()
		h.mu.Unlock()
		if exited {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("plugin never seen exiting")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if d := pub(); d.Verdict != Deny || d.Error.Name != "PluginError" {
		t.Fatalf("during back-off: %+v", d)
	}
	clk.Advance(pluginMinBackoff)
	if d := pub(); d.Verdict != Allow {
		t.Fatalf("after restart: %+v %v", d, d.Error)
	}
}
