// Command benchreport is the helper of scripts/bench.sh: it finds free
// ports, reads single figures out of `shoal bench --json` results, and
// writes docs/benchmarks.md from a directory of results.
//
//	benchreport freeport [N]           a port P with P..P+N-1 free on 127.0.0.1 (TCP and UDP)
//	benchreport get FILE KEY           KEY = metrics.NAME or params.NAME of one JSON result
//	benchreport report -dir DIR -o OUT write the Markdown report
//
// DIR holds ref/LABEL.json and shoal/LABEL.json (one `shoal bench --json`
// line each) with LABEL.cmd beside each (the exact command), machine.txt
// and sizes.txt ("key: value" lines), and optionally gobench.txt and
// profile.txt. The part of an existing OUT after the line KeepMarker is
// hand-written and is carried over unchanged.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/shoalhq/shoal/bench"
)

// KeepMarker starts the hand-written part of the report that a new run keeps.
const KeepMarker = "<!-- bench.sh keeps everything below this line: hand-written notes -->"

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "freeport":
		n := 1
		if len(os.Args) > 2 {
			n, err = strconv.Atoi(os.Args[2])
			if err != nil || n < 1 || n > 16 {
				fail(fmt.Errorf("freeport: bad count %q", os.Args[2]))
			}
		}
		var p int
		p, err = freePort(n)
		if err == nil {
			fmt.Println(p)
		}
	case "get":
		if len(os.Args) != 4 {
			usage()
		}
		var r *result
		r, err = readResult(os.Args[2])
		if err == nil {
			v, ok := r.get(os.Args[3])
			if !ok {
				err = fmt.Errorf("%s: no %s", os.Args[2], os.Args[3])
			} else {
				fmt.Println(strconv.FormatFloat(v, 'f', -1, 64))
			}
		}
	case "report":
		fs := flag.NewFlagSet("report", flag.ExitOnError)
		dir := fs.String("dir", "", "results directory")
		out := fs.String("o", "", "output Markdown file")
		_ = fs.Parse(os.Args[2:])
		if *dir == "" || *out == "" {
			usage()
		}
		err = writeReport(*dir, *out)
	default:
		usage()
	}
	if err != nil {
		fail(err)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: benchreport freeport [N] | get FILE KEY | report -dir DIR -o OUT")
	os.Exit(2)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "benchreport:", err)
	os.Exit(1)
}

// freePort returns a port P such that P..P+n-1 can all be bound on
// 127.0.0.1 over TCP and UDP (memberlist uses both on the gossip port, and
// each broker takes cluster.gossip's port + its index). It tries random
// ports below the kernel's ephemeral range first, so that the outgoing
// connections of a load run (which take ephemeral ports) cannot take them
// between the check and the server's bind. The ports are released before
// it returns; bench.sh retries a server start that loses a race anyway.
func freePort(n int) (int, error) {
	lo := ephemeralLow()
	for try := 0; try < 400; try++ {
		var base int
		if try < 200 && lo > 11000 {
			base = 10000 + rand.IntN(lo-10000-n)
		} else {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				return 0, err
			}
			base = l.Addr().(*net.TCPAddr).Port
			l.Close()
		}
		if base+n-1 > 65535 || (base <= 18099 && base+n > 18000) {
			continue // 180xx: well-known ports other people's clusters use
		}
		if rangeFree(base, n) {
			return base, nil
		}
	}
	return 0, errors.New("no free port range found")
}

func rangeFree(base, n int) bool {
	var held []io.Closer
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for p := base; p < base+n; p++ {
		a := fmt.Sprintf("127.0.0.1:%d", p)
		t, err := net.Listen("tcp", a)
		if err != nil {
			return false
		}
		held = append(held, t)
		u, err := net.ListenPacket("udp", a)
		if err != nil {
			return false
		}
		held = append(held, u)
	}
	return true
}

// ephemeralLow is the first port of the kernel's ephemeral range (0 if unknown).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	lo, _ := strconv.Atoi(f[0])
	return lo
}

// result is one `shoal bench --json` line.
type result struct {
	Scenario string             `json:"scenario"`
	Target   string             `json:"target"`
	Time     string             `json:"time"`
	Params   map[string]float64 `json:"params"`
	Metrics  map[string]float64 `json:"metrics"`
	Notes    []string           `json:"notes"`
	Cmd      string             `json:"-"`
}

func (r *result) get(key string) (float64, bool) {
	if r == nil {
		return 0, false
	}
	m := r.Metrics
	if k, ok := strings.CutPrefix(key, "params."); ok {
		m, key = r.Params, k
	} else if k, ok := strings.CutPrefix(key, "metrics."); ok {
		key = k
	}
	v, ok := m[key]
	return v, ok
}

// addMem adds the peaks bench.sh's memwatch sampled from
// /proc/PID/smaps_rollup during a conns run (KiB, summed over the server
// processes) as MiB and per connection.
func (r *result) addMem(kv [][2]string) {
	if len(kv) == 0 {
		return
	}
	if r.Metrics == nil {
		r.Metrics = map[string]float64{}
	}
	conns := r.Metrics["connected"]
	for _, e := range kv {
		v, err := strconv.ParseFloat(e[1], 64)
		name, ok := strings.CutSuffix(e[0], "_peak_kib")
		if err != nil || !ok || v <= 0 {
			continue
		}
		r.Metrics[name+"_peak_mib"] = v / 1024
		if conns > 0 {
			r.Metrics[name+"_peak_per_conn_kib"] = v / conns
		}
	}
}

func readResult(path string) (*result, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	// The file holds one JSON line; take the last non-empty one.
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	var r result
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	base := strings.TrimSuffix(path, ".json")
	if c, err := os.ReadFile(base + ".cmd"); err == nil {
		r.Cmd = strings.TrimSpace(string(c))
	}
	r.addMem(readKV(base + ".mem"))
	return &r, nil
}

// loadSide reads every LABEL.json of dir/side; a missing or broken file is
// a missing run (the report says so), not a failure.
func loadSide(dir, side string) map[string]*result {
	out := map[string]*result{}
	files, _ := filepath.Glob(filepath.Join(dir, side, "*.json"))
	for _, f := range files {
		r, err := readResult(f)
		if err != nil {
			fmt.Fprintln(os.Stderr, "benchreport:", err)
			continue
		}
		out[strings.TrimSuffix(filepath.Base(f), ".json")] = r
	}
	return out
}

// row is one metric of a scenario table.
type row struct {
	key, label string
}

// section is one scenario: the same label on both sides.
type section struct {
	label, title, text string
	rows               []row
}

var latencyRows = []row{
	{"latency_p50_ms", "publish → deliver p50 (ms)"},
	{"latency_p90_ms", "p90 (ms)"},
	{"latency_p99_ms", "p99 (ms)"},
	{"latency_p999_ms", "p999 (ms)"},
	{"latency_max_ms", "max (ms)"},
}

var connRows = []row{
	{"params.conns", "connections asked"},
	{"connected", "connected"},
	{"failed", "failed"},
	{"closed_by_server", "closed by the server while idle"},
	{"server_processes", "server processes measured"},
	{"server_rss_mib", "server RSS, summed (MiB)"},
	{"server_rss_per_conn_kib", "**server RSS ÷ connections (KiB)**"},
	{"server_rss_delta_per_conn_kib", "RSS growth ÷ connections (KiB)"},
	{"pss_peak_mib", "server PSS, summed, peak (MiB)"},
	{"pss_peak_per_conn_kib", "**server PSS ÷ connections (KiB)**"},
	{"private_peak_mib", "server private memory, summed, peak (MiB)"},
	{"private_peak_per_conn_kib", "server private memory ÷ connections (KiB)"},
	{"conns_per_s", "new connections/s (handshake included)"},
	{"connect_p50_ms", "connect p50 (ms)"},
	{"connect_p99_ms", "connect p99 (ms)"},
	{"server_cpu_cores", "server CPU (cores)"},
	{"tool_cpu_cores", "bench tool CPU (cores)"},
	{"tool_rss_per_conn_kib", "bench tool RSS ÷ connections (KiB)"},
}

var fanoutRows = append([]row{
	{"params.channels", "channels"},
	{"params.subscribers", "subscribers per channel"},
	{"params.publishers", "publishers"},
	{"params.rate", "publish rate asked (0 = max)"},
	{"publishes_per_s", "publishes/s"},
	{"deliveries_per_s", "**deliveries/s**"},
	{"expected", "deliveries expected"},
	{"delivered", "delivered"},
	{"lost", "lost"},
	{"order_violations", "order violations"},
	{"pub_errors", "publish errors"},
	{"closed_by_server", "closed by the server"},
}, append(latencyRows,
	row{"ack_p50_ms", "publish ack p50 (ms)"},
	row{"ack_p99_ms", "publish ack p99 (ms)"},
	row{"server_cpu_cores", "server CPU (cores)"},
	row{"tool_cpu_cores", "bench tool CPU (cores)"},
)...)

var sections = []section{
	{label: "conns-10k", title: "Idle memory and connection rate: 10,000 ws:// connections",
		text: "Connections opened as fast as the tool's concurrency allows, held idle, then the summed RSS of the server's processes is read (Shoal: supervisor, balancer, workers and brokers; the reference: its one Node process). " +
			"Summed RSS counts every page once per process that maps it: Shoal's six processes all map the same 27 MB binary, and about 15 MiB of each idle process's ~20 MiB RSS is those shared, clean pages. " +
			"So bench.sh also samples `/proc/PID/smaps_rollup` during the run and reports the peak of the summed PSS (shared pages divided among the processes that map them; the bench agents run the same binary, so they take a share too) and of the summed private memory (pages only one process maps: a lower bound). " +
			"For the reference, one process, the three figures are nearly the same."},
	{label: "conns-20k", title: "Idle memory: 20,000 ws:// connections",
		text: "One Node process holds at most about 19,900 connections here (20,000 open files per process), so the reference column is measured at the reference's own limit: see its command."},
	{label: "conns-max", title: "Idle memory: the most connections this run allows (Shoal only)",
		text: "A cluster with more workers, since each worker holds at most ~19,000 connections (`worker.max_connections`). The reference cannot go past ~19,900 in one process."},
	{label: "conns-wss", title: "Idle memory and connection rate: wss:// through the balancer (Shoal only)",
		text: "TLS is terminated by the balancer (`listen.tls: {auto: true}`, a generated development certificate; the bench tool does not verify certificates) and proxied to the workers over unix sockets, so the balancer holds two descriptors per connection and one balancer tops out near 9,900 wss:// connections. Every connection pays a full TLS handshake (no resumption). Measured on a fresh cluster of the same shape, so that no heap left over from the fan-out scenarios is counted. The reference server here has no TLS listener."},
	{label: "fanout-1x", title: "Fan-out: 1 channel × subscribers, 100-byte payloads, maximum rate",
		text: "Publishes are invokes (`#publish` with a cid) with at most 64 unacknowledged per publisher."},
	{label: "fanout-100x", title: "Fan-out: 100 channels × N subscribers × 10 publishers, maximum rate",
		text: "Scaled so that the reference's single process stays below its ~19,900-connection limit: the issue's 100 × 2,000 needs 200,000 connections, which one Node process cannot hold. Both servers get the same size."},
	{label: "fanout-100x-big", title: "Fan-out: 100 channels × 2,000 subscribers × 10 publishers (Shoal only)",
		text: "The issue's full size on a cluster with enough workers for 200,000 connections."},
	{label: "latency-half", title: "Latency at half of each server's own maximum rate",
		text: "Same scenario as the 1-channel fan-out, paced with `--rate` at half of that server's sustained maximum: the publishes/s that reached every subscriber in the max-rate window (deliveries/s ÷ subscribers). The publishes/s the publisher got acked at maximum rate is higher, because a publish is acked before it is delivered, and the excess only fills queues; that is why latency at maximum rate (above) is mostly queueing. Latency is from the send time written in the payload to its receipt, so it includes both kernels and the server's queues."},
	{label: "latency-same", title: "Latency at the same rate for both (half of the reference's maximum)",
		text: "The reference's column repeats its half-rate run above."},
	{label: "rtt", title: "Publish-with-ack round trips",
		rows: []row{
			{"params.conns", "connections"},
			{"params.window", "invokes in flight per connection"},
			{"round_trips_per_s", "**round trips/s**"},
			{"rtt_p50_ms", "round trip p50 (ms)"},
			{"rtt_p99_ms", "round trip p99 (ms)"},
			{"pub_errors", "error replies"},
			{"closed_by_server", "closed by the server"},
			{"server_cpu_cores", "server CPU (cores)"},
			{"tool_cpu_cores", "bench tool CPU (cores)"},
		}},
	{label: "churn", title: "Connection churn: connect, handshake, subscribe, close",
		rows: []row{
			{"params.loops", "concurrent loops"},
			{"cycles_per_s", "**cycles/s**"},
			{"failed", "failed cycles"},
			{"cycle_p50_ms", "cycle p50 (ms)"},
			{"cycle_p99_ms", "cycle p99 (ms)"},
			{"server_cpu_cores", "server CPU (cores)"},
			{"tool_cpu_cores", "bench tool CPU (cores)"},
		}},
}

func (s section) table() []row {
	if s.rows != nil {
		return s.rows
	}
	if strings.HasPrefix(s.label, "conns") {
		return connRows
	}
	return fanoutRows
}

// figure says whether a row's ratio means something: rates, sizes, times
// and CPU, not counts or parameters.
func figure(key string) bool {
	for _, suf := range []string{"_per_s", "_kib", "_mib", "_ms", "_cores"} {
		if strings.HasSuffix(key, suf) && !strings.HasPrefix(key, "params.") {
			return true
		}
	}
	return false
}

func readKV(path string) [][2]string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out [][2]string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok {
			out = append(out, [2]string{strings.TrimSpace(k), strings.TrimSpace(v)})
		}
	}
	return out
}

// fmtNum prints v like the bench table does (bench.FormatValue), with an
// en dash for a missing figure.
func fmtNum(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "–"
	}
	return bench.FormatValue(v)
}

func ratio(shoal, ref float64, okS, okR bool) string {
	if !okS || !okR || ref == 0 || strings.HasPrefix(fmtNum(ref), "0.000") {
		return ""
	}
	r := shoal / ref
	switch {
	case r >= 10:
		return fmt.Sprintf("%.0f×", r)
	case r >= 1:
		return fmt.Sprintf("%.1f×", r)
	default:
		return fmt.Sprintf("%.2f×", r)
	}
}

func cell(r *result, key string) (string, float64, bool) {
	if r == nil {
		return "not run", 0, false
	}
	v, ok := r.get(key)
	if !ok {
		return "–", 0, false
	}
	return fmtNum(v), v, true
}

// target is one line of the summary against the targets.
type target struct {
	what, label, key, goal string
	check                  func(s, ref float64) bool
	ref                    bool // the goal compares with the reference
}

var targets = []target{
	{"idle memory per ws:// connection, 10k", "conns-10k", "server_rss_per_conn_kib", "≤ 4 KiB", func(s, _ float64) bool { return s <= 4 }, false},
	{"idle memory per ws:// connection, 20k", "conns-20k", "server_rss_per_conn_kib", "≤ 4 KiB", func(s, _ float64) bool { return s <= 4 }, false},
	{"idle memory per ws:// connection, max run", "conns-max", "server_rss_per_conn_kib", "≤ 4 KiB", func(s, _ float64) bool { return s <= 4 }, false},
	{"idle memory per wss:// connection (balancer)", "conns-wss", "server_rss_per_conn_kib", "≤ 12 KiB", func(s, _ float64) bool { return s <= 12 }, false},
	{"same, PSS instead of RSS: ws:// 10k", "conns-10k", "pss_peak_per_conn_kib", "≤ 4 KiB", func(s, _ float64) bool { return s <= 4 }, false},
	{"same, PSS: ws:// 20k", "conns-20k", "pss_peak_per_conn_kib", "≤ 4 KiB", func(s, _ float64) bool { return s <= 4 }, false},
	{"same, PSS: ws:// max run", "conns-max", "pss_peak_per_conn_kib", "≤ 4 KiB", func(s, _ float64) bool { return s <= 4 }, false},
	{"same, PSS: wss://", "conns-wss", "pss_peak_per_conn_kib", "≤ 12 KiB", func(s, _ float64) bool { return s <= 12 }, false},
	{"fan-out 1 × 1,000 deliveries/s", "fanout-1x", "deliveries_per_s", "≥ 10× reference and > 1,000,000/s", func(s, r float64) bool { return s >= 10*r && s > 1e6 }, true},
	{"fan-out 100 channels deliveries/s", "fanout-100x", "deliveries_per_s", "≥ 10× reference", func(s, r float64) bool { return s >= 10*r }, true},
	{"latency p99 at half of Shoal's sustained max rate", "latency-half", "latency_p99_ms", "< 10 ms", func(s, _ float64) bool { return s < 10 }, false},
	{"new ws:// connections/s (10k run)", "conns-10k", "conns_per_s", "≥ 20,000/s", func(s, _ float64) bool { return s >= 20000 }, false},
	{"publish-with-ack round trips/s", "rtt", "round_trips_per_s", "≥ 5× reference", func(s, r float64) bool { return s >= 5*r }, true},
}

// writeSweep writes the latency-rN runs (1 channel, fixed publish rates)
// of both servers as one table, by rate.
func writeSweep(p func(string, ...any), ref, shoal map[string]*result) {
	type entry struct {
		rate float64
		side string
		r    *result
	}
	var es []entry
	for _, side := range []struct {
		name string
		m    map[string]*result
	}{{"reference", ref}, {"Shoal", shoal}} {
		for label, r := range side.m {
			if strings.HasPrefix(label, "latency-r") {
				es = append(es, entry{r.Params["rate"], side.name, r})
			}
		}
	}
	if len(es) == 0 {
		return
	}
	sort.Slice(es, func(i, j int) bool {
		if es[i].rate != es[j].rate {
			return es[i].rate < es[j].rate
		}
		return es[i].side < es[j].side
	})
	p("## Latency at fixed publish rates (1 channel × subscribers)\n\n")
	p("Each server runs only the rates below its sustained maximum. Every publish is delivered to every subscriber of the channel, so deliveries/s ≈ rate × subscribers.\n\n")
	p("| server | publishes/s | deliveries/s | p50 (ms) | p90 (ms) | p99 (ms) | p999 (ms) | max (ms) | lost | server CPU | tool CPU |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, e := range es {
		m := e.r.Metrics
		p("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", e.side, fmtNum(e.rate), fmtNum(m["deliveries_per_s"]),
			fmtNum(m["latency_p50_ms"]), fmtNum(m["latency_p90_ms"]), fmtNum(m["latency_p99_ms"]), fmtNum(m["latency_p999_ms"]),
			fmtNum(m["latency_max_ms"]), fmtNum(m["lost"]+m["order_violations"]), fmtNum(m["server_cpu_cores"]), fmtNum(m["tool_cpu_cores"]))
	}
	p("\nCommands (Shoal; the reference's differ only in --url and --pid):\n\n```\n")
	for _, e := range es {
		if e.side == "Shoal" {
			p("%s\n", e.r.Cmd)
		}
	}
	p("```\n\n")
}

func writeReport(dir, out string) error {
	ref, shoal := loadSide(dir, "ref"), loadSide(dir, "shoal")
	var kept string
	if old, err := os.ReadFile(out); err == nil {
		if i := strings.Index(string(old), KeepMarker); i >= 0 {
			kept = string(old[i+len(KeepMarker):])
		}
	}
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	p("# Benchmarks: Shoal and socketcluster-server v20 in the same run\n\n")
	p("Generated by `make bench` (`scripts/bench.sh bin/shoal`). Do not edit above the marker line near the end: the next run rewrites it.\n\n")
	p("## Machine and run\n\n| | |\n|---|---|\n")
	for _, kv := range readKV(filepath.Join(dir, "machine.txt")) {
		p("| %s | %s |\n", kv[0], kv[1])
	}
	p("\nSizes (environment variables of `scripts/bench.sh`):\n\n| variable | value |\n|---|---|\n")
	for _, kv := range readKV(filepath.Join(dir, "sizes.txt")) {
		p("| `%s` | %s |\n", kv[0], kv[1])
	}
	p("\nThe load generator (`shoal bench`) runs on the same two cores as the server. Each table shows both processes' CPU; when the tool takes a large share, the figure is bounded by the machine rather than by the server. Ratios are Shoal ÷ reference (for memory and latency, lower is better).\n\n")

	p("## Against the issue's targets\n\n| target | goal | reference | Shoal | ratio | met |\n|---|---|---|---|---|---|\n")
	for _, t := range targets {
		rs, rv, rok := cell(ref[t.label], t.key)
		ss, sv, sok := cell(shoal[t.label], t.key)
		met := "not measured"
		if sok && (!t.ref || rok) {
			met = "no"
			if t.check(sv, rv) {
				met = "yes"
			}
		}
		p("| %s | %s | %s | %s | %s | %s |\n", t.what, t.goal, rs, ss, ratio(sv, rv, sok, rok), met)
	}
	lossS, lossR := 0.0, 0.0
	var profLoss, profClosed float64
	for l, r := range shoal {
		if strings.HasPrefix(l, "profile-") {
			profLoss += r.Metrics["lost"] + r.Metrics["order_violations"]
			profClosed += r.Metrics["closed_by_server"]
			continue
		}
		lossS += r.Metrics["lost"] + r.Metrics["order_violations"]
	}
	for l, r := range ref {
		if l != "latency-same" { // a copy of latency-half
			lossR += r.Metrics["lost"] + r.Metrics["order_violations"]
		}
	}
	p("| fan-out: messages lost or reordered (every scenario table below) | 0 | %s | %s | | %s |\n", fmtNum(lossR), fmtNum(lossS), map[bool]string{true: "yes", false: "no"}[lossS == 0])
	if profLoss > 0 || profClosed > 0 {
		p("| same, in the extra fan-out runs made for the CPU profile (end of this page) | 0 | | %s (%s subscribers closed by the server) | | no |\n", fmtNum(profLoss), fmtNum(profClosed))
	}
	p("\n")

	for _, s := range sections {
		r, sh := ref[s.label], shoal[s.label]
		if r == nil && sh == nil {
			continue
		}
		p("## %s\n\n", s.title)
		if s.text != "" {
			p("%s\n\n", s.text)
		}
		p("| metric | reference | Shoal | ratio |\n|---|---|---|---|\n")
		for _, rw := range s.table() {
			rs, rv, rok := cell(r, rw.key)
			ss, sv, sok := cell(sh, rw.key)
			if !rok && !sok && r != nil && sh != nil {
				continue // a figure neither side reports (no acks in transmit mode, …)
			}
			ra := ""
			if figure(rw.key) {
				ra = ratio(sv, rv, sok, rok)
			}
			p("| %s | %s | %s | %s |\n", rw.label, rs, ss, ra)
		}
		p("\nCommands:\n\n```\n")
		for _, side := range []struct {
			name string
			r    *result
		}{{"reference", r}, {"Shoal", sh}} {
			if side.r != nil && side.r.Cmd != "" {
				p("# %s (%s)\n%s\n", side.name, side.r.Time, side.r.Cmd)
			}
		}
		p("```\n\n")
		var notes []string
		for _, side := range []struct {
			name string
			r    *result
		}{{"reference", r}, {"Shoal", sh}} {
			if side.r == nil {
				continue
			}
			for _, n := range side.r.Notes {
				notes = append(notes, fmt.Sprintf("- %s: %s", side.name, n))
			}
		}
		if len(notes) > 0 {
			p("Notes from the tool:\n\n%s\n\n", strings.Join(notes, "\n"))
		}
	}

	writeSweep(p, ref, shoal)

	if g, err := os.ReadFile(filepath.Join(dir, "gobench.txt")); err == nil && len(g) > 0 {
		p("## Go benchmarks of the packages\n\n")
		if c, err := os.ReadFile(filepath.Join(dir, "gobench.cmd")); err == nil {
			p("```\n%s\n```\n\n", strings.TrimSpace(string(c)))
		}
		p("```\n%s\n```\n\n", strings.TrimSpace(string(g)))
	}
	if g, err := os.ReadFile(filepath.Join(dir, "profile.txt")); err == nil && len(g) > 0 {
		p("## CPU profile of the Shoal cluster under fan-out (perf)\n\n")
		p("```\n%s\n```\n\n", strings.TrimSpace(string(g)))
	}
	p("%s", KeepMarker)
	if kept == "" {
		kept = "\n"
	}
	p("%s", kept)
	tmp := out + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, out)
}
