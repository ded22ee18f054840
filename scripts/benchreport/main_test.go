package main

import (
	"math"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestFreePort(t *testing.T) {
	p, err := freePort(3)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p+i))
		if err != nil {
			t.Fatalf("port %d: %v", p+i, err)
		}
		l.Close()
	}
}

func TestFmtNum(t *testing.T) {
	for _, c := range []struct {
		v    float64
		want string
	}{{0, "0"}, {1234567, "1,234,567"}, {1234.6, "1,235"}, {123.45, "123.5"}, {12.345, "12.35"}, {1.23456, "1.235"}, {-2500, "-2,500"}, {math.NaN(), "–"}, {math.Inf(1), "–"}} {
		if got := fmtNum(c.v); got != c.want {
			t.Errorf("fmtNum(%v) = %q, want %q", c.v, got, c.want)
		}
	}
}

func write(t *testing.T, path, s string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestReport(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "ref", "fanout-1x.json"), `{"scenario":"fanout","time":"T1","params":{"channels":1,"subscribers":1000},"metrics":{"deliveries_per_s":50000,"lost":0,"order_violations":0},"notes":["n1"]}`+"\n")
	write(t, filepath.Join(dir, "ref", "fanout-1x.cmd"), "bin/shoal bench fanout --ref")
	write(t, filepath.Join(dir, "shoal", "fanout-1x.json"), `{"scenario":"fanout","time":"T2","params":{"channels":1,"subscribers":1000},"metrics":{"deliveries_per_s":1500000,"lost":0,"order_violations":0}}`)
	write(t, filepath.Join(dir, "shoal", "fanout-1x.cmd"), "bin/shoal bench fanout --shoal")
	write(t, filepath.Join(dir, "shoal", "rtt.json"), `not json`)
	write(t, filepath.Join(dir, "machine.txt"), "CPU: 2 × Test\nkernel: Linux 1: x\n")
	out := filepath.Join(dir, "out.md")
	write(t, out, "old generated part\n"+KeepMarker+"\n\n## Notes\nhand-written\n")
	if err := writeReport(dir, out); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(out)
	s := string(b)
	for _, want := range []string{
		"| CPU | 2 × Test |",
		"| kernel | Linux 1: x |",
		"| **deliveries/s** | 50,000 | 1,500,000 | 30× |",
		"| fan-out 1 × 1,000 deliveries/s | ≥ 10× reference and > 1,000,000/s | 50,000 | 1,500,000 | 30× | yes |",
		"bin/shoal bench fanout --ref",
		"- reference: n1",
		KeepMarker + "\n\n## Notes\nhand-written\n",
	} {
		if !strings.Contains(s, want) {
			t.Errorf("report lacks %q:\n%s", want, s)
		}
	}
	if strings.Contains(s, "old generated part") || strings.Count(s, KeepMarker) != 1 {
		t.Errorf("generated part not replaced:\n%s", s)
	}
	if strings.Contains(s, "Publish-with-ack") {
		t.Errorf("a broken result was reported")
	}
	r, err := readResult(filepath.Join(dir, "shoal", "fanout-1x.json"))
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := r.get("params.subscribers"); !ok || v != 1000 {
		t.Errorf("get params.subscribers = %v %v", v, ok)
	}
	if v, ok := r.get("metrics.deliveries_per_s"); !ok || v != 1500000 {
		t.Errorf("get metrics.deliveries_per_s = %v %v", v, ok)
	}
}

func TestAddMem(t *testing.T) {
	r := &result{Metrics: map[string]float64{"connected": 1000}}
	r.addMem([][2]string{{"pss_peak_kib", "4000"}, {"private_peak_kib", "2000"}, {"junk", "1"}, {"rss_peak_kib", "x"}})
	if r.Metrics["pss_peak_per_conn_kib"] != 4 || r.Metrics["private_peak_mib"] != 2000.0/1024 {
		t.Errorf("metrics %v", r.Metrics)
	}
	if _, ok := r.Metrics["rss_peak_mib"]; ok {
		t.Errorf("a bad value was added: %v", r.Metrics)
	}
}
