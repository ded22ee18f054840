package bench

import (
	"bytes"
	"encoding/json"
	"math"
	"strings"
	"testing"
	"time"
)

func TestFormatValue(t *testing.T) {
	for _, c := range []struct {
		v    float64
		want string
	}{
		{0, "0"}, {7, "7"}, {1234567, "1,234,567"}, {-1234, "-1,234"},
		{1234.6, "1,235"}, {123.45, "123.5"}, {12.345, "12.35"}, {0.12345, "0.123"},
		{math.NaN(), "-"}, {math.Inf(1), "-"},
	} {
		if got := FormatValue(c.v); got != c.want {
			t.Errorf("FormatValue(%v) = %q, want %q", c.v, got, c.want)
		}
	}
}

func sampleResult() *Result {
	r := &Result{Scenario: "fanout", Target: "ws://127.0.0.1:8000/socketcluster/"}
	r.param("channels", "channels", 1, "")
	r.param("payload", "payload", 100, "B")
	r.add("deliveries_per_s", "deliveries/s", 1234567.8, "/s")
	r.add("lost", "lost", 0, "")
	r.add("server_cpu_cores", "server CPU", math.NaN(), "cores")
	var h Hist
	h.Record(2 * time.Millisecond)
	r.addLatency("latency", "latency", &h)
	r.Notes = []string{"a note"}
	return r
}

func TestWriteTable(t *testing.T) {
	var b bytes.Buffer
	if err := sampleResult().WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	want := `== fanout  ws://127.0.0.1:8000/socketcluster/
  channels              1
  payload             100 B
  -----------------------
  deliveries/s  1,234,568 /s
  lost                  0
  server CPU            - cores
  latency p50       2.015 ms
  latency p90       2.015 ms
  latency p99       2.015 ms
  latency p999      2.015 ms
  latency max       2.032 ms
  note: a note
`
	if got := b.String(); got != want {
		t.Errorf("table:\n%s\nwant:\n%s", got, want)
	}
}

func TestWriteJSON(t *testing.T) {
	var b bytes.Buffer
	if err := sampleResult().WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	if strings.Count(b.String(), "\n") != 1 {
		t.Fatalf("want exactly one line, got %q", b.String())
	}
	var got struct {
		Scenario string
		Params   map[string]float64
		Metrics  map[string]float64
		Notes    []string
	}
	if err := json.Unmarshal(b.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if got.Scenario != "fanout" || got.Params["payload"] != 100 || got.Metrics["deliveries_per_s"] != 1234567.8 {
		t.Errorf("unexpected JSON %s", b.String())
	}
	if _, ok := got.Metrics["server_cpu_cores"]; ok {
		t.Errorf("NaN metrics must be left out of JSON")
	}
	if _, ok := got.Metrics["latency_p99_ms"]; !ok || len(got.Notes) != 1 {
		t.Errorf("latency or notes missing: %s", b.String())
	}
}
