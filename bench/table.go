package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"
)

// Metric is one figure of a result.
type Metric struct {
	Key   string  // stable machine name, the JSON key
	Label string  // what the table shows
	Value float64 // in Unit
	Unit  string  // "", "/s", "ms", "B", "KiB", "cores", "s", "%"
}

// Result is one scenario's outcome: its parameters and its figures in the
// order the table prints them.
type Result struct {
	Scenario string
	Target   string
	Params   []Metric
	Metrics  []Metric
	Notes    []string // warnings a reader must see (the tool was the bottleneck, …)
}

func (r *Result) add(key, label string, v float64, unit string) {
	r.Metrics = append(r.Metrics, Metric{Key: key, Label: label, Value: v, Unit: unit})
}

func (r *Result) param(key, label string, v float64, unit string) {
	r.Params = append(r.Params, Metric{Key: key, Label: label, Value: v, Unit: unit})
}

// addLatency adds p50/p90/p99/p999/max of h in milliseconds.
func (r *Result) addLatency(key, label string, h *Hist) {
	if h.Count() == 0 {
		return
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	for _, q := range []struct {
		name string
		q    float64
	}{{"p50", 0.50}, {"p90", 0.90}, {"p99", 0.99}, {"p999", 0.999}} {
		r.add(key+"_"+q.name+"_ms", label+" "+q.name, ms(h.Quantile(q.q)), "ms")
	}
	r.add(key+"_max_ms", label+" max", ms(h.Max()), "ms")
}

// FormatValue prints v (as the bench table does) with a precision suited to its size: integers as
// integers with thousands separators, small values with 3 significant
// digits.
func FormatValue(v float64) string {
	switch {
	case math.IsNaN(v) || math.IsInf(v, 0):
		return "-"
	case v == math.Trunc(v) && math.Abs(v) < 1e15:
		return group(strconv.FormatInt(int64(v), 10))
	case math.Abs(v) >= 1000:
		return group(strconv.FormatInt(int64(math.Round(v)), 10))
	case math.Abs(v) >= 100:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case math.Abs(v) >= 10:
		return strconv.FormatFloat(v, 'f', 2, 64)
	default:
		return strconv.FormatFloat(v, 'f', 3, 64)
	}
}

// group inserts thousands separators into an integer string.
func group(s string) string {
	neg := strings.HasPrefix(s, "-")
	if neg {
		s = s[1:]
	}
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// WriteTable prints the result as an aligned two-column table.
func (r *Result) WriteTable(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "== %s  %s\n", r.Scenario, r.Target)
	rows := append(append([]Metric(nil), r.Params...), r.Metrics...)
	lw, vw := 0, 0
	vals := make([]string, len(rows))
	for i, m := range rows {
		vals[i] = FormatValue(m.Value)
		lw = max(lw, len(m.Label))
		vw = max(vw, len(vals[i]))
	}
	for i, m := range rows {
		if i == len(r.Params) && i > 0 {
			fmt.Fprintf(&b, "  %s\n", strings.Repeat("-", lw+vw+2))
		}
		line := fmt.Sprintf("  %-*s  %*s %s", lw, m.Label, vw, vals[i], m.Unit)
		b.WriteString(strings.TrimRight(line, " "))
		b.WriteByte('\n')
	}
	for _, n := range r.Notes {
		fmt.Fprintf(&b, "  note: %s\n", n)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteJSON prints the result as one JSON line:
// {"scenario":..,"target":..,"params":{key:value},"metrics":{key:value},"notes":[..]}.
func (r *Result) WriteJSON(w io.Writer) error {
	type line struct {
		Scenario string             `json:"scenario"`
		Target   string             `json:"target"`
		Time     string             `json:"time"`
		Params   map[string]float64 `json:"params"`
		Metrics  map[string]float64 `json:"metrics"`
		Notes    []string           `json:"notes,omitempty"`
	}
	l := line{Scenario: r.Scenario, Target: r.Target, Time: time.Now().UTC().Format(time.RFC3339),
		Params: map[string]float64{}, Metrics: map[string]float64{}, Notes: r.Notes}
	for _, m := range r.Params {
		l.Params[m.Key] = m.Value
	}
	for _, m := range r.Metrics {
		if !math.IsNaN(m.Value) && !math.IsInf(m.Value, 0) {
			l.Metrics[m.Key] = m.Value
		}
	}
	b, err := json.Marshal(l)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}
