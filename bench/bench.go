// Package bench is `shoal bench`: a load generator that speaks the
// SocketCluster protocol, for Shoal and for the official socketcluster-server
// alike, so both are measured by the same tool in the same run.
//
// The parent process plans the run, starts K agent processes (the same
// binary re-executed as `shoal bench --agent`), drives them through their
// phases over stdin/stdout JSON lines, samples the server's processes from
// /proc, prints a live progress line on stderr and a result table (or JSON
// lines) at the end. Each agent holds its connections in epoll pollers, with
// no goroutine per connection; see conn.go.
package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/url"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Scenarios lists the scenario names Run accepts.
var Scenarios = []string{"conns", "fanout", "rtt", "churn"}

// maxConnsPerAgent keeps an agent process well under the 20,000 open files
// every process may have here (dials in flight briefly hold two descriptors).
const maxConnsPerAgent = 19000

// maxRun bounds every run, whatever the flags say.
const maxRun = 10 * time.Minute

// Options is a whole bench run. Zero fields take the scenario's default.
type Options struct {
	Scenario string
	URLs     []string // ws://127.x.x.x:port/socketcluster/; connections go round-robin

	Agents       int      // agent processes; 0 runs one agent inside this process
	AgentCommand []string // argv that starts one agent (e.g. shoal bench --agent)

	Conns       int     // conns: connections to open; rtt: publishing conns; churn: concurrent loops
	Rate        float64 // conns: new conns/s; fanout, rtt: publishes/s in total; 0 = as fast as possible
	Concurrency int     // dials in flight per agent
	Channels    int     // fanout
	Subscribers int     // fanout: per channel
	Publishers  int     // fanout
	Payload     int     // bytes of each published JSON value
	Window      int     // publish invokes in flight per publisher
	Transmit    bool    // publish without ack (fanout)

	Duration time.Duration // measured phase (fanout, rtt, churn)
	Hold     time.Duration // conns: how long connections stay idle before memory is read
	Timeout  time.Duration // per dial/handshake/subscribe, and for late acks

	Sources    int    // source addresses to spread connections over
	SourceBase string // first source address, within 127.0.0.0/8
	Token      string // auth token sent in #handshake
	Pollers    int    // epoll pollers per agent (0 = GOMAXPROCS)

	AdminURL     string // supervisor admin API; its /api/cluster lists the pids
	PIDs         []int  // server pids (with their descendants)
	PIDsFromPort int    // find the server as the owner of this listening port

	JSON          bool      // results as JSON lines
	Stdout        io.Writer // results
	Progress      io.Writer // live progress line (nil = none)
	ProgressLines bool      // Progress is not a terminal: one line every 5 s instead of rewriting one
}

func (o *Options) defaults() error {
	def := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	switch o.Scenario {
	case "conns":
		def(&o.Conns, 1000)
		def(&o.Concurrency, 64)
	case "fanout":
		def(&o.Channels, 1)
		def(&o.Subscribers, 100)
		def(&o.Publishers, 1)
		def(&o.Window, 64)
	case "rtt":
		def(&o.Conns, 10)
		def(&o.Window, 1)
	case "churn":
		def(&o.Conns, 16)
	case "":
		return fmt.Errorf("bench: no scenario (one of %s)", strings.Join(Scenarios, ", "))
	default:
		return fmt.Errorf("bench: unknown scenario %q (one of %s)", o.Scenario, strings.Join(Scenarios, ", "))
	}
	def(&o.Concurrency, 32)
	def(&o.Payload, 100)
	def(&o.Sources, 16)
	if o.Payload < minPayload {
		o.Payload = minPayload
	}
	if o.SourceBase == "" {
		o.SourceBase = "127.0.1.1"
	}
	if o.Duration == 0 {
		o.Duration = 5 * time.Second
	}
	if o.Hold == 0 {
		o.Hold = 3 * time.Second
	}
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Second
	}
	if o.Duration > maxRun || o.Hold > maxRun {
		return fmt.Errorf("bench: duration and hold are capped at %s", maxRun)
	}
	if o.Stdout == nil {
		o.Stdout = io.Discard
	}
	if len(o.URLs) == 0 {
		o.URLs = []string{"ws://127.0.0.1:8000/socketcluster/"}
	}
	for _, u := range o.URLs {
		if err := checkLoopbackURL(u); err != nil {
			return err
		}
	}
	if o.AdminURL != "" {
		// Only one GET, but this tool talks to nothing off this machine.
		if u, err := url.Parse(o.AdminURL); err != nil || !isLoopbackHost(u.Hostname()) {
			return fmt.Errorf("bench: --admin %q: only loopback addresses", o.AdminURL)
		}
	}
	if o.Agents < 0 {
		return errors.New("bench: --agents must be ≥ 0")
	}
	if o.Agents > 0 && len(o.AgentCommand) == 0 {
		return errors.New("bench: agent processes need an agent command")
	}
	// Too many connections for one process: spread them over more agents.
	if need := (o.totalConns() + maxConnsPerAgent - 1) / maxConnsPerAgent; need > max(o.Agents, 1) {
		if len(o.AgentCommand) == 0 {
			return fmt.Errorf("bench: %d connections need at least %d agent processes (20,000 files per process)", o.totalConns(), need)
		}
		o.Agents = need
	}
	return nil
}

// totalConns is the number of long-lived connections the run holds.
func (o *Options) totalConns() int {
	switch o.Scenario {
	case "conns", "rtt":
		return o.Conns
	case "fanout":
		return o.Channels*o.Subscribers + o.Publishers
	}
	return o.Conns * 2
}

// checkLoopbackURL allows only ws:// URLs on this machine: the bench must
// never load anything but 127.0.0.0/8 or ::1.
func checkLoopbackURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("bench: bad URL %q: %w", s, err)
	}
	if u.Scheme != "ws" && u.Scheme != "wss" {
		return fmt.Errorf("bench: URL %q: only ws:// and wss:// are supported", s)
	}
	if !isLoopbackHost(u.Hostname()) {
		return fmt.Errorf("bench: URL %q: the bench only targets loopback addresses (127.0.0.0/8, ::1)", s)
	}
	return nil
}

func isLoopbackHost(h string) bool {
	if h == "localhost" {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// sourceAddrs returns n consecutive addresses from base, all in 127.0.0.0/8,
// skipping .0 and .255 host bytes.
func sourceAddrs(base string, n int) ([]string, error) {
	ip := net.ParseIP(base).To4()
	if ip == nil || ip[0] != 127 {
		return nil, fmt.Errorf("bench: source base %q is not in 127.0.0.0/8", base)
	}
	v := uint32(ip[1])<<16 | uint32(ip[2])<<8 | uint32(ip[3])
	var out []string
	for len(out) < n {
		if v > 0xFFFFFE {
			return nil, fmt.Errorf("bench: %d source addresses from %s leave 127.0.0.0/8", n, base)
		}
		if b := v & 0xFF; b != 0 && b != 255 {
			out = append(out, fmt.Sprintf("127.%d.%d.%d", v>>16&0xFF, v>>8&0xFF, v&0xFF))
		}
		v++
	}
	return out, nil
}

// agentHandle is the parent's side of one agent.
type agentHandle struct {
	idx  int
	in   io.WriteCloser
	wait func() error
	kill func()
	last Counters // latest counters reported
}

type agentEvent struct {
	idx int
	msg agentMsg
	err error // set with Type "exit"
}

// Run runs one scenario and writes its result.
func Run(ctx context.Context, o Options) (*Result, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, maxRun+o.Duration+o.Hold)
	defer cancel()

	pids, names, pidSource := serverPIDs(ctx, &o)
	srcs, err := sourceAddrs(o.SourceBase, o.Sources)
	if err != nil {
		return nil, err
	}
	nAgents := max(o.Agents, 1)
	// Each run gets its own channel names, so a leftover subscriber from an
	// earlier run on the same server never counts as a loss or a duplicate.
	prefix := "bench" + strconv.FormatInt(time.Now().UnixNano()%1e9, 36) + "/"
	base := agentSpec{
		Scenario: o.Scenario, Agents: nAgents, URLs: o.URLs, Sources: srcs, Prefix: prefix,
		Token: o.Token, Concurrency: o.Concurrency, Channels: o.Channels, Subscribers: o.Subscribers,
		Publishers: o.Publishers, Payload: o.Payload, Window: o.Window, Transmit: o.Transmit,
		Duration: o.Duration, Timeout: o.Timeout, Pollers: o.Pollers,
	}
	if o.Scenario == "rtt" {
		base.Publishers = o.Conns
	}
	events := make(chan agentEvent, 64*nAgents)
	handles := make([]*agentHandle, nAgents)
	var readers sync.WaitGroup
	for i := range nAgents {
		spec := base
		spec.Index = i
		spec.Conns = share(o.Conns, nAgents, i)
		spec.Rate = o.Rate / float64(nAgents)
		spec.PublishRate = o.Rate
		h, out, err := startAgent(ctx, &o, i)
		if err != nil {
			for _, h := range handles[:i] {
				h.kill()
			}
			return nil, err
		}
		handles[i] = h
		readers.Add(1)
		go func() {
			defer readers.Done()
			readAgent(i, out, events)
		}()
		if err := json.NewEncoder(h.in).Encode(agentCmd{Spec: &spec}); err != nil {
			return nil, fmt.Errorf("bench: agent %d: %w", i, err)
		}
	}
	c := &coordinator{o: &o, handles: handles, events: events, pids: pids, names: names, start: time.Now()}
	defer func() {
		for _, h := range handles {
			h.in.Close()
		}
		done := make(chan struct{})
		go func() {
			for _, h := range handles {
				_ = h.wait()
			}
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			for _, h := range handles {
				h.kill()
			}
			<-done
		}
		readers.Wait()
		c.clearProgress()
	}()
	r, err := c.run(ctx)
	c.clearProgress() // the table must not share a line with the progress
	if err != nil {
		return nil, err
	}
	r.Target = strings.Join(o.URLs, " ")
	if len(pids) > 0 {
		r.Notes = append(r.Notes, fmt.Sprintf("server processes (%s): %s", pidSource, joinInts(pids)))
	} else if pidSource != "" {
		r.Notes = append(r.Notes, "server memory and CPU not measured: "+pidSource)
	}
	if o.JSON {
		err = r.WriteJSON(o.Stdout)
	} else {
		err = r.WriteTable(o.Stdout)
	}
	return r, err
}

func share(total, n, i int) int {
	s := total / n
	if i < total%n {
		s++
	}
	return s
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, " ")
}

// serverPIDs resolves which processes make up the server: --pid (with
// descendants), else --admin's /api/cluster, else the owners of
// --pids-from-port, else the owners of the first URL's port. It also says
// how it found them (or why it could not).
func serverPIDs(ctx context.Context, o *Options) ([]int, map[int]string, string) {
	if len(o.PIDs) > 0 {
		return withDescendants(o.PIDs), nil, "--pid and descendants"
	}
	if o.AdminURL != "" {
		p, names, err := adminPIDs(ctx, o.AdminURL)
		if err != nil {
			return nil, nil, err.Error()
		}
		return p, names, "admin API " + o.AdminURL
	}
	port := o.PIDsFromPort
	how := "listening on port " + strconv.Itoa(port)
	if port == 0 {
		u, err := url.Parse(o.URLs[0])
		if err != nil {
			return nil, nil, err.Error()
		}
		port, _ = strconv.Atoi(u.Port())
		if port == 0 {
			port = 80
		}
		how = "listening on the URL's port " + strconv.Itoa(port)
	}
	p, err := portPIDs(port)
	if err != nil {
		return nil, nil, err.Error()
	}
	return p, nil, how
}

// startAgent starts agent i as a process, or in this process when
// o.Agents is 0, and returns its handle and its report stream.
func startAgent(ctx context.Context, o *Options, i int) (*agentHandle, io.Reader, error) {
	if o.Agents == 0 {
		inR, inW := io.Pipe()
		outR, outW := io.Pipe()
		errc := make(chan error, 1)
		go func() {
			err := runAgent(ctx, inR, outW, true)
			outW.CloseWithError(io.EOF)
			inR.Close()
			errc <- err
		}()
		var once sync.Once
		var werr error
		wait := func() error { once.Do(func() { werr = <-errc }); return werr }
		return &agentHandle{idx: i, in: inW, wait: wait, kill: func() { inW.Close() }}, outR, nil
	}
	cmd := exec.Command(o.AgentCommand[0], o.AgentCommand[1:]...)
	cmd.Stderr = os.Stderr
	// Agents die with the parent: Pdeathsig covers a parent killed hard,
	// closing stdin covers everything else.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("bench: start agent: %w", err)
	}
	h := &agentHandle{idx: i, in: in, wait: cmd.Wait, kill: func() { _ = cmd.Process.Kill() }}
	return h, out, nil
}

// readAgent forwards an agent's JSON lines as events, then an "exit".
func readAgent(i int, r io.Reader, events chan<- agentEvent) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var m agentMsg
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			continue
		}
		events <- agentEvent{idx: i, msg: m}
	}
	events <- agentEvent{idx: i, msg: agentMsg{Type: "exit"}, err: sc.Err()}
}

// coordinator drives the agents through the phases of a run.
type coordinator struct {
	o       *Options
	handles []*agentHandle
	events  chan agentEvent
	pids    []int
	names   map[int]string // from the admin API
	start   time.Time

	phase    string
	lastLine time.Time
	lastSum  Counters
	lastAt   time.Time
	progLen  int
}

// sum adds the latest counters of every agent.
func (c *coordinator) sum() Counters {
	var s Counters
	for _, h := range c.handles {
		s.add(h.last)
	}
	if c.o.Agents == 0 {
		s.CPUNanos = selfCPU() // in-process: the whole process is the tool
	}
	return s
}

// await handles events until every agent sent typ, and returns those
// messages. It keeps the progress line fresh meanwhile.
func (c *coordinator) await(ctx context.Context, typ string, limit time.Duration) ([]agentMsg, error) {
	got := make([]agentMsg, len(c.handles))
	have := make([]bool, len(c.handles))
	n := 0
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(limit)
	for n < len(c.handles) {
		select {
		case ev := <-c.events:
			h := c.handles[ev.idx]
			m := ev.msg
			if m.Type != "exit" { // an exit carries no counters
				h.last = m.Counters
			}
			switch m.Type {
			case "error":
				return nil, fmt.Errorf("bench: agent %d: %s", ev.idx, m.Error)
			case "exit":
				if !have[ev.idx] {
					return nil, fmt.Errorf("bench: agent %d exited during %q (see its stderr)", ev.idx, c.phase)
				}
			case typ:
				if !have[ev.idx] {
					have[ev.idx], got[ev.idx] = true, m
					n++
				}
			}
		case <-tick.C:
			c.showProgress()
		case <-deadline:
			return nil, fmt.Errorf("bench: agents did not finish %q within %s", c.phase, limit)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return got, nil
}

// tell sends a command to every agent.
func (c *coordinator) tell(cmd string) error {
	for _, h := range c.handles {
		if err := json.NewEncoder(h.in).Encode(agentCmd{Cmd: cmd}); err != nil {
			return fmt.Errorf("bench: agent %d: %w", h.idx, err)
		}
	}
	return nil
}

// sleep waits d while keeping the progress line fresh and the agents'
// counters current.
func (c *coordinator) sleep(ctx context.Context, d time.Duration) error {
	end := time.After(d)
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case ev := <-c.events:
			if ev.msg.Type == "exit" || ev.msg.Type == "error" {
				return fmt.Errorf("bench: agent %d stopped during %q %s", ev.idx, c.phase, ev.msg.Error)
			}
			c.handles[ev.idx].last = ev.msg.Counters
		case <-tick.C:
			c.showProgress()
		case <-end:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// showProgress rewrites the progress line about once a second.
func (c *coordinator) showProgress() {
	every := time.Second
	if c.o.ProgressLines {
		every = 5 * time.Second // a log file gets a line now and then, not a \r stream
	}
	if c.o.Progress == nil || time.Since(c.lastLine) < every {
		return
	}
	now := time.Now()
	s := c.sum()
	dt := now.Sub(c.lastAt).Seconds()
	rate := func(a, b uint64) float64 {
		if c.lastAt.IsZero() || dt <= 0 || a < b {
			return 0
		}
		return float64(a-b) / dt
	}
	cpu := 0.0
	if !c.lastAt.IsZero() && dt > 0 {
		cpu = float64(s.CPUNanos-c.lastSum.CPUNanos) / 1e9 / dt
	}
	line := fmt.Sprintf("[%s %s %4.0fs] conns %s (%s/s) fail %s", c.o.Scenario, c.phase,
		now.Sub(c.start).Seconds(), group(strconv.FormatUint(s.Connected, 10)),
		FormatValue(math.Round(rate(s.Connected, c.lastSum.Connected))), group(strconv.FormatUint(s.ConnectFailed+s.SubscribeFailed, 10)))
	switch c.o.Scenario {
	case "fanout", "rtt":
		line += fmt.Sprintf(" | pub %s/s ack %s/s deliv %s/s", FormatValue(math.Round(rate(s.Published, c.lastSum.Published))),
			FormatValue(math.Round(rate(s.Acked, c.lastSum.Acked))), FormatValue(math.Round(rate(s.Delivered, c.lastSum.Delivered))))
	case "churn":
		line += fmt.Sprintf(" | cycles %s/s fail %d", FormatValue(math.Round(rate(s.Cycles, c.lastSum.Cycles))), s.CycleFailed)
	}
	if s.Closed > 0 {
		line += fmt.Sprintf(" | closed by server %d", s.Closed)
	}
	line += fmt.Sprintf(" | tool cpu %.2f", cpu)
	c.lastSum, c.lastAt, c.lastLine = s, now, now
	if c.o.ProgressLines {
		fmt.Fprintln(c.o.Progress, line)
		return
	}
	pad := ""
	if c.progLen > len(line) {
		pad = strings.Repeat(" ", c.progLen-len(line))
	}
	c.progLen = len(line)
	fmt.Fprintf(c.o.Progress, "\r%s%s", line, pad)
}

func (c *coordinator) clearProgress() {
	if c.o.Progress != nil && c.progLen > 0 {
		fmt.Fprintf(c.o.Progress, "\r%s\r", strings.Repeat(" ", c.progLen))
		c.progLen = 0
	}
}

// run executes the phases: setup (connect) → [hold] → start → done → drain → stop.
func (c *coordinator) run(ctx context.Context) (*Result, error) {
	o := c.o
	r := &Result{Scenario: o.Scenario}
	before := sampleServer(c.pids)

	c.phase = "setup"
	setupLimit := maxRun
	ready, err := c.await(ctx, "ready", setupLimit)
	if err != nil {
		return nil, err
	}
	setup := c.sum()
	afterSetup := sampleServer(c.pids)
	setupElapsed := maxElapsed(ready)
	firstErr := firstError(ready)

	var held serverSample
	if o.Scenario == "conns" {
		c.phase = "hold"
		if err := c.sleep(ctx, o.Hold); err != nil {
			return nil, err
		}
		held = sampleServer(c.pids)
	}

	c.phase = "run"
	sBefore := sampleServer(c.pids)
	runStart := c.sum()
	if err := c.tell("start"); err != nil {
		return nil, err
	}
	done, err := c.await(ctx, "done", o.Duration+2*o.Timeout+30*time.Second)
	if err != nil {
		return nil, err
	}
	window := maxElapsed(done)
	var runCPU int64 // the agents' CPU in the run phase, measured by each agent
	for _, m := range done {
		runCPU += m.PhaseCPU
	}
	sAfter := sampleServer(c.pids)
	runEnd := c.sum()

	expected := uint64(0)
	if o.Scenario == "fanout" {
		// Drain: wait until every delivery is in, or nothing new came for a
		// second, or the ack timeout has passed.
		c.phase = "drain"
		expected = (runEnd.Published - runEnd.PubErrors) * uint64(o.Subscribers)
		last, lastChange := c.sum().Delivered, time.Now()
		limit := time.Now().Add(o.Timeout)
		for time.Now().Before(limit) {
			if err := c.sleep(ctx, 100*time.Millisecond); err != nil {
				return nil, err
			}
			d := c.sum().Delivered
			if d >= expected || time.Since(lastChange) > time.Second {
				break
			}
			if d != last {
				last, lastChange = d, time.Now()
			}
		}
	}

	c.phase = "stop"
	if err := c.tell("stop"); err != nil {
		return nil, err
	}
	results, err := c.await(ctx, "result", 30*time.Second)
	if err != nil {
		return nil, err
	}
	var tot Counters
	var lat, ack, conn, cycle Hist
	for _, m := range results {
		tot.add(m.Counters)
		lat.AddSparse(m.Hists["latency"])
		ack.AddSparse(m.Hists["ack"])
		conn.AddSparse(m.Hists["connect"])
		cycle.AddSparse(m.Hists["cycle"])
		if firstErr == "" {
			firstErr = m.FirstErr
		}
	}
	if o.Agents == 0 {
		tot.CPUNanos = selfCPU()
	}

	r.param("agents", "agents", float64(max(o.Agents, 1)), "")
	toolCores := func(a, b Counters, d time.Duration) float64 {
		if d <= 0 {
			return math.NaN()
		}
		return float64(b.CPUNanos-a.CPUNanos) / float64(d)
	}
	if o.Agents > 0 {
		// Exact per-phase figures from the agents rather than the parent's
		// last progress snapshots, which can be 250 ms old.
		runStart.CPUNanos, runEnd.CPUNanos = 0, runCPU
	}
	serverCores := func(a, b serverSample, d time.Duration) float64 {
		if len(c.pids) == 0 || d <= 0 {
			return math.NaN()
		}
		return float64(b.CPU-a.CPU) / float64(d)
	}
	var tool float64
	switch o.Scenario {
	case "conns":
		r.param("conns", "connections", float64(o.Conns), "")
		r.param("rate", "target rate (0 = max)", o.Rate, "/s")
		r.param("concurrency", "dials in flight per agent", float64(o.Concurrency), "")
		r.add("connected", "connected", float64(setup.Connected), "")
		r.add("failed", "failed", float64(setup.ConnectFailed), "")
		r.add("conns_per_s", "connections/s (handshake incl.)", perSec(setup.Connected, setupElapsed), "/s")
		r.addLatency("connect", "connect+handshake", &conn)
		// The agents' CPU while connecting, without their start-up.
		var phaseCPU int64
		for _, m := range ready {
			phaseCPU += m.PhaseCPU
		}
		if o.Agents == 0 {
			phaseCPU = setup.CPUNanos // in-process: no separate start-up to leave out
		}
		tool = toolCores(Counters{}, Counters{CPUNanos: phaseCPU}, setupElapsed)
		r.add("tool_cpu_cores", "bench CPU while connecting", tool, "cores")
		r.add("server_cpu_cores", "server CPU while connecting", serverCores(before, afterSetup, setupElapsed), "cores")
		if len(c.pids) > 0 && setup.Connected > 0 {
			n := float64(setup.Connected)
			r.add("server_processes", "server processes", float64(held.Alive), "")
			r.add("server_rss_mib", "server RSS held", float64(held.RSS)/(1<<20), "MiB")
			r.add("server_rss_per_conn_kib", "server RSS / connection", float64(held.RSS)/n/1024, "KiB")
			r.add("server_rss_delta_per_conn_kib", "server RSS growth / connection", (float64(held.RSS)-float64(before.RSS))/n/1024, "KiB")
			r.Notes = append(r.Notes, "server RSS by process: "+c.rssByProcess(held))
		}
		r.add("closed_by_server", "closed by server while held", float64(runEnd.Closed), "")
		if o.Agents > 0 && setup.Connected > 0 {
			r.add("tool_rss_per_conn_kib", "bench RSS growth / connection", float64(setup.RSSGrowth)/float64(setup.Connected)/1024, "KiB")
		}
	case "fanout":
		r.param("channels", "channels", float64(o.Channels), "")
		r.param("subscribers", "subscribers per channel", float64(o.Subscribers), "")
		r.param("publishers", "publishers", float64(o.Publishers), "")
		r.param("payload", "payload", float64(o.Payload), "B")
		r.param("rate", "target publish rate (0 = max)", o.Rate, "/s")
		if o.Transmit {
			r.param("window", "publish mode: transmit (no ack)", 0, "")
		} else {
			r.param("window", "publish window per publisher", float64(o.Window), "")
		}
		r.param("duration", "duration", o.Duration.Seconds(), "s")
		r.add("subscribed", "subscribers connected", float64(setup.Connected-uint64(min(o.Publishers, int(setup.Connected)))), "")
		r.add("setup_failed", "connect/subscribe failures", float64(setup.ConnectFailed+setup.SubscribeFailed), "")
		r.add("published", "published", float64(tot.Published), "")
		r.add("publishes_per_s", "publishes/s", perSec(runEnd.Published-runStart.Published, window), "/s")
		r.add("deliveries_per_s", "deliveries/s (in the window)", perSec(tot.WindowDelivered, window), "/s")
		r.add("delivered", "delivered (incl. drain)", float64(tot.Delivered), "")
		r.add("expected", "expected", float64(expected), "")
		lost := 0.0
		if expected > tot.Delivered {
			lost = float64(expected - tot.Delivered)
		}
		r.add("lost", "lost", lost, "")
		r.add("loss_pct", "loss", pct(lost, float64(expected)), "%")
		r.add("order_violations", "order violations (incl. duplicates)", float64(tot.OrderViolations), "")
		r.add("pub_errors", "publish error responses", float64(tot.PubErrors), "")
		r.add("bad_payload", "unparsable deliveries", float64(tot.BadPayload), "")
		r.add("closed_by_server", "closed by server", float64(tot.Closed), "")
		r.addLatency("latency", "publish→deliver", &lat)
		if !o.Transmit {
			r.addLatency("ack", "publish ack", &ack)
		}
		tool = toolCores(runStart, runEnd, window)
		r.add("tool_cpu_cores", "bench CPU in the window", tool, "cores")
		r.add("server_cpu_cores", "server CPU in the window", serverCores(sBefore, sAfter, window), "cores")
	case "rtt":
		r.param("conns", "connections", float64(o.Conns), "")
		r.param("window", "invokes in flight per conn", float64(o.Window), "")
		r.param("payload", "payload", float64(o.Payload), "B")
		r.param("duration", "duration", o.Duration.Seconds(), "s")
		r.add("connected", "connected", float64(setup.Connected), "")
		r.add("round_trips", "round trips", float64(runEnd.Acked+runEnd.PubErrors-runStart.Acked-runStart.PubErrors), "")
		r.add("round_trips_per_s", "round trips/s (publish+ack)", perSec(runEnd.Acked+runEnd.PubErrors-runStart.Acked-runStart.PubErrors, window), "/s")
		r.add("pub_errors", "error responses", float64(tot.PubErrors), "")
		r.add("closed_by_server", "closed by server", float64(tot.Closed), "")
		r.addLatency("rtt", "round trip", &ack)
		tool = toolCores(runStart, runEnd, window)
		r.add("tool_cpu_cores", "bench CPU in the window", tool, "cores")
		r.add("server_cpu_cores", "server CPU in the window", serverCores(sBefore, sAfter, window), "cores")
	case "churn":
		r.param("loops", "concurrent loops", float64(o.Conns), "")
		r.param("duration", "duration", o.Duration.Seconds(), "s")
		r.add("cycles", "cycles (connect+handshake+subscribe+close)", float64(tot.Cycles), "")
		r.add("cycles_per_s", "cycles/s", perSec(tot.Cycles, window), "/s")
		r.add("failed", "failed cycles", float64(tot.CycleFailed), "")
		r.addLatency("cycle", "cycle", &cycle)
		tool = toolCores(runStart, runEnd, window)
		r.add("tool_cpu_cores", "bench CPU in the window", tool, "cores")
		r.add("server_cpu_cores", "server CPU in the window", serverCores(sBefore, sAfter, window), "cores")
	}
	if firstErr != "" {
		r.Notes = append(r.Notes, "first failure: "+firstErr)
	}
	if ncpu := float64(runtime.NumCPU()); tool > 0.5*ncpu {
		r.Notes = append(r.Notes, fmt.Sprintf("the bench itself used %.2f of %.0f cores: on this machine it competes with the server, so figures may be bounded by the tool", tool, ncpu))
	}
	return r, nil
}

// rssByProcess lists each server process's RSS, named when the admin API
// gave names, so a reader sees where the memory per connection sits.
func (c *coordinator) rssByProcess(s serverSample) string {
	var parts []string
	for _, p := range c.pids {
		rss, ok := s.ByPID[p]
		if !ok {
			continue
		}
		name := strconv.Itoa(p)
		if n := c.names[p]; n != "" {
			name = n + "(" + name + ")"
		}
		parts = append(parts, fmt.Sprintf("%s %.1f MiB", name, float64(rss)/(1<<20)))
	}
	return strings.Join(parts, ", ")
}

func maxElapsed(ms []agentMsg) time.Duration {
	var d time.Duration
	for _, m := range ms {
		d = max(d, m.Elapsed)
	}
	return d
}

func firstError(ms []agentMsg) string {
	for _, m := range ms {
		if m.FirstErr != "" {
			return m.FirstErr
		}
	}
	return ""
}

func perSec(n uint64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / d.Seconds()
}

func pct(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return 100 * a / b
}
