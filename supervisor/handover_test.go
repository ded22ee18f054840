package supervisor

import (
	"encoding/json"
	"errors"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoalhq/shoal/configs"
	"github.com/shoalhq/shoal/logfile"
	"github.com/shoalhq/shoal/proto/control"
)

// A rolling reload hands each worker's clients over with 4000 over
// worker.drain_window, once the worker is out of the balancer's rotation and
// only after the previous worker's replacement is ready; a worker without
// Handover (Unimplemented) is drained with Drain instead.
func TestReloadHandsOverWithDrainWindow(t *testing.T) {
	cfg := testConfig(t, 3)
	cfg.Worker.DrainWindow = configs.Duration(1500 * time.Millisecond)
	n := startNode(t, cfg, map[string]string{"worker-3": "no-handover"})
	admin := n.waitReady()
	before := pidsByName(t, admin)

	resp, err := http.Post(admin+"/api/reload", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	var res ReloadResult
	err = json.NewDecoder(resp.Body).Decode(&res)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || strings.Join(res.Restarted, ",") != "worker-1,worker-2,worker-3" {
		t.Fatalf("reload: %d %+v", resp.StatusCode, res)
	}
	after := pidsByName(t, admin)

	read := func(name string) (fakeHandover, error) {
		var h fakeHandover
		b, err := os.ReadFile(filepath.Join(n.dir, name+".handover"))
		if err != nil {
			return h, err
		}
		return h, json.Unmarshal(b, &h)
	}
	peer := func(topo control.Topology, name string) control.Peer {
		for _, p := range topo.Peers {
			if p.Name == name {
				return p
			}
		}
		t.Fatalf("%s not in the topology %+v", name, topo)
		return control.Peer{}
	}
	for _, name := range []string{"worker-1", "worker-2"} {
		h, err := read(name)
		if err != nil {
			t.Fatalf("%s: no handover recorded: %v", name, err)
		}
		if h.Code != 4000 || h.Reason != "worker restarting" || h.Window != 1500*time.Millisecond || h.Timeout != h.Window+drainTimeout {
			t.Errorf("%s: handover %+v, want code 4000, the configured window and window+%s", name, h, drainTimeout)
		}
		if h.Pid != before[name] {
			t.Errorf("%s: handover reached pid %d, want the old process %d", name, h.Pid, before[name])
		}
		// The balancers had been told before the clients were.
		if st := peer(h.Topo, name).State; st != control.StateDraining {
			t.Errorf("%s: at its handover its own state in the pushed topology was %q, want draining", name, st)
		}
	}
	// worker-2 went only once worker-1's replacement was ready and announced.
	h2, _ := read("worker-2")
	if p := peer(h2.Topo, "worker-1"); p.State != control.StateReady || p.Pid != after["worker-1"] {
		t.Errorf("at worker-2's handover, worker-1 was %+v; want ready with the new pid %d", p, after["worker-1"])
	}

	// worker-3 has no Handover: the reload falls back to Drain (1001).
	if _, err := read("worker-3"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("worker-3 (no Handover) recorded a handover: %v", err)
	}
	fellBack, drained := false, map[int]bool{}
	for _, e := range n.logEntries(logfile.Filter{}) {
		if strings.HasPrefix(e.Msg, "worker cannot hand over") && fieldString(e.Get("worker")) == "worker-3" {
			fellBack = true
		}
		if e.Msg == "fake draining" {
			drained[e.Pid] = true
		}
	}
	if !fellBack {
		t.Error("no log line about worker-3 falling back to Drain")
	}
	// Every old worker still got the slot's Drain and Stop (a no-op after a
	// handover, the 1001 close for worker-3).
	for _, name := range []string{"worker-1", "worker-2", "worker-3"} {
		if !drained[before[name]] {
			t.Errorf("%s (pid %d) was not drained", name, before[name])
		}
		if after[name] == before[name] || alive(before[name]) {
			t.Errorf("%s: pid %d → %d, old one alive %v", name, before[name], after[name], alive(before[name]))
		}
	}
	if err := n.stop(); err != nil {
		t.Fatal(err)
	}
}

// fieldString is a log entry's string field (the reader keeps values as raw
// JSON).
func fieldString(v any) string {
	var raw []byte
	switch x := v.(type) {
	case string:
		return x
	case json.RawMessage:
		raw = x
	case []byte:
		raw = x
	default:
		return ""
	}
	var s string
	if json.Unmarshal(raw, &s) != nil {
		return ""
	}
	return s
}
