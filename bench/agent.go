package bench

// An agent is one load-generating process (or, with --agents 0, one
// goroutine group inside the parent). The parent sends it a spec and then
// phase commands as JSON lines; the agent answers with JSON lines: a
// progress snapshot every 250 ms, "ready" when its connections are set up,
// "done" when its run phase ends, and "result" after "stop". Splitting the
// load this way keeps every process under the machine's 20,000-file limit
// and lets the run use more than one core.

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoalhq/shoal/internal/procstat"
)

// agentSpec is one agent's share of the run.
type agentSpec struct {
	Scenario string   `json:"scenario"`
	Index    int      `json:"index"`
	Agents   int      `json:"agents"`
	URLs     []string `json:"urls"`
	Sources  []string `json:"sources"`
	Prefix   string   `json:"prefix"` // channel name prefix, unique per run
	Token    string   `json:"token,omitempty"`

	Conns           int           `json:"conns"`        // conns: idle conns; rtt: publishing conns; churn: concurrent loops
	Rate            float64       `json:"rate"`         // conns: new conns/s for this agent; 0 = max
	PublishRate     float64       `json:"publish_rate"` // fanout, rtt: publishes/s of the whole run; 0 = max
	Concurrency     int           `json:"concurrency"`  // dials in flight
	Channels        int           `json:"channels"`
	Subscribers     int           `json:"subscribers"` // per channel, whole run
	Publishers      int           `json:"publishers"`  // whole run
	Payload         int           `json:"payload"`
	Window          int           `json:"window"`
	Transmit        bool          `json:"transmit"`
	Duration        time.Duration `json:"duration"`
	Timeout         time.Duration `json:"timeout"`
	Pollers         int           `json:"pollers"`
	InProcessAgents bool          `json:"-"`
}

// Counters are an agent's cumulative figures; the parent sums them.
type Counters struct {
	Connected       uint64 `json:"connected"`
	ConnectFailed   uint64 `json:"connect_failed"`
	SubscribeFailed uint64 `json:"subscribe_failed"`
	Closed          uint64 `json:"closed"` // closed by the server while held
	Published       uint64 `json:"published"`
	PublishFailed   uint64 `json:"publish_failed"`
	Acked           uint64 `json:"acked"`
	PubErrors       uint64 `json:"pub_errors"`
	Delivered       uint64 `json:"delivered"`
	WindowDelivered uint64 `json:"window_delivered"`
	OrderViolations uint64 `json:"order_violations"`
	BadPayload      uint64 `json:"bad_payload"`
	Cycles          uint64 `json:"cycles"`
	CycleFailed     uint64 `json:"cycle_failed"`
	CPUNanos        int64  `json:"cpu_ns"` // user+system CPU of the agent process
	RSS             uint64 `json:"rss"`    // resident memory of the agent process
	RSSGrowth       int64  `json:"rss_growth"`
}

func (c *Counters) add(o Counters) {
	c.Connected += o.Connected
	c.ConnectFailed += o.ConnectFailed
	c.SubscribeFailed += o.SubscribeFailed
	c.Closed += o.Closed
	c.Published += o.Published
	c.PublishFailed += o.PublishFailed
	c.Acked += o.Acked
	c.PubErrors += o.PubErrors
	c.Delivered += o.Delivered
	c.WindowDelivered += o.WindowDelivered
	c.OrderViolations += o.OrderViolations
	c.BadPayload += o.BadPayload
	c.Cycles += o.Cycles
	c.CycleFailed += o.CycleFailed
	c.CPUNanos += o.CPUNanos
	c.RSS += o.RSS
	c.RSSGrowth += o.RSSGrowth
}

// agentMsg is one line from an agent.
type agentMsg struct {
	Type     string                    `json:"type"` // progress | ready | done | result | error
	Counters Counters                  `json:"counters"`
	Hists    map[string]map[int]uint64 `json:"hists,omitempty"`
	Error    string                    `json:"error,omitempty"`
	FirstErr string                    `json:"first_err,omitempty"`    // first failure seen, for the report
	Elapsed  time.Duration             `json:"elapsed,omitempty"`      // length of the phase just ended
	PhaseCPU int64                     `json:"phase_cpu_ns,omitempty"` // agent CPU during that phase (not its start-up)
}

// agentCmd is one line to an agent.
type agentCmd struct {
	Spec *agentSpec `json:"spec,omitempty"`
	Cmd  string     `json:"cmd,omitempty"` // start | stop
}

// agent is the state of one running agent.
type agent struct {
	spec    agentSpec
	dopts   dialOpts
	targets []*target // s.URLs resolved
	pollers []*poller
	pubs    []*publisher

	stopping  atomic.Bool // teardown started: closes are ours, not the server's
	measuring atomic.Bool // inside the publish window

	connected, connectFailed, subscribeFailed atomic.Uint64
	published, publishFailed                  atomic.Uint64
	cycles, cycleFailed                       atomic.Uint64
	connect, cycle                            Hist

	rss0 uint64 // RSS before any connection, to report the growth per connection

	errMu    sync.Mutex
	firstErr string

	outMu sync.Mutex
	out   *json.Encoder
}

func (a *agent) noteErr(err error) {
	a.errMu.Lock()
	if a.firstErr == "" {
		a.firstErr = err.Error()
	}
	a.errMu.Unlock()
}

func (a *agent) send(m agentMsg) error {
	a.outMu.Lock()
	defer a.outMu.Unlock()
	return a.out.Encode(m)
}

// counters snapshots the agent's figures.
func (a *agent) counters() Counters {
	c := Counters{
		Connected:       a.connected.Load(),
		ConnectFailed:   a.connectFailed.Load(),
		SubscribeFailed: a.subscribeFailed.Load(),
		Published:       a.published.Load(),
		PublishFailed:   a.publishFailed.Load(),
		Cycles:          a.cycles.Load(),
		CycleFailed:     a.cycleFailed.Load(),
	}
	for _, p := range a.pollers {
		c.Closed += p.st.closed.Load()
		c.Acked += p.st.acked.Load()
		c.PubErrors += p.st.pubErrors.Load()
		c.Delivered += p.st.delivered.Load()
		c.WindowDelivered += p.st.windowDelivered.Load()
		c.OrderViolations += p.st.orderViolations.Load()
		c.BadPayload += p.st.badPayload.Load()
	}
	if !a.spec.InProcessAgents {
		c.CPUNanos = selfCPU()
		c.RSS = procstat.RSS(os.Getpid())
		c.RSSGrowth = int64(c.RSS) - int64(a.rss0)
	}
	return c
}

// selfCPU returns this process's user+system CPU time in nanoseconds.
func selfCPU() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

// RunAgent runs one agent: it reads the spec and commands from in and writes
// its reports to out. `shoal bench --agent` calls it with stdin and stdout.
func RunAgent(ctx context.Context, in io.Reader, out io.Writer) error {
	return runAgent(ctx, in, out, false)
}

func runAgent(ctx context.Context, in io.Reader, out io.Writer, inProcess bool) error {
	cmds := make(chan agentCmd, 4)
	go func() {
		// Closing stdin (the parent died or is done) ends the agent.
		defer close(cmds)
		sc := bufio.NewScanner(in)
		for sc.Scan() {
			var c agentCmd
			if json.Unmarshal(sc.Bytes(), &c) == nil {
				cmds <- c
			}
		}
	}()
	var first agentCmd
	select {
	case first = <-cmds:
	case <-ctx.Done():
		return ctx.Err()
	}
	if first.Spec == nil {
		return fmt.Errorf("bench agent: first line must carry the spec")
	}
	a := &agent{spec: *first.Spec, out: json.NewEncoder(out)}
	a.spec.InProcessAgents = inProcess
	if dir := os.Getenv("SHOAL_BENCH_PROFILE"); dir != "" && !inProcess {
		// A CPU profile per agent, to see when and why the tool itself is
		// the bottleneck: go tool pprof DIR/agent-N.cpu.prof
		if f, err := os.Create(filepath.Join(dir, fmt.Sprintf("agent-%d.cpu.prof", a.spec.Index))); err == nil {
			if pprof.StartCPUProfile(f) == nil {
				defer func() { pprof.StopCPUProfile(); f.Close() }()
			}
		}
	}
	if err := a.setup(); err != nil {
		_ = a.send(agentMsg{Type: "error", Error: err.Error()})
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, p := range a.pollers {
		wg.Add(1)
		go func() { defer wg.Done(); p.run(stop) }()
	}
	wg.Add(1)
	go func() { defer wg.Done(); a.progress(ctx) }()
	defer func() {
		a.stopping.Store(true)
		cancel()
		close(stop)
		wg.Wait()
		for _, p := range a.pollers {
			p.closeAll()
		}
	}()

	wait := func(want string) bool {
		for {
			select {
			case c, ok := <-cmds:
				if !ok {
					return false
				}
				if c.Cmd == want {
					return true
				}
			case <-ctx.Done():
				return false
			}
		}
	}
	t0, cpu0 := time.Now(), selfCPU()
	a.prepare(ctx)
	elapsed, phaseCPU := time.Since(t0), selfCPU()-cpu0
	if !inProcess {
		// Return the dial phase's garbage (upgrade buffers, handshake
		// buffers) to the OS, so the agent's RSS while holding shows what
		// idle connections cost the tool, and the tool stays small beside
		// the server it measures.
		debug.FreeOSMemory()
	}
	if err := a.send(agentMsg{Type: "ready", Counters: a.counters(), FirstErr: a.firstError(), Elapsed: elapsed, PhaseCPU: phaseCPU}); err != nil {
		return err
	}
	if !wait("start") {
		return nil
	}
	t0, cpu0 = time.Now(), selfCPU()
	a.runPhase(ctx)
	if err := a.send(agentMsg{Type: "done", Counters: a.counters(), Elapsed: time.Since(t0), PhaseCPU: selfCPU() - cpu0}); err != nil {
		return err
	}
	if !wait("stop") {
		return nil
	}
	m := agentMsg{Type: "result", Counters: a.counters(), FirstErr: a.firstError(), Hists: map[string]map[int]uint64{}}
	var lat, ack Hist
	for _, p := range a.pollers {
		lat.Merge(&p.st.latency)
		ack.Merge(&p.st.ack)
	}
	m.Hists["latency"] = lat.Sparse()
	m.Hists["ack"] = ack.Sparse()
	m.Hists["connect"] = a.connect.Sparse()
	m.Hists["cycle"] = a.cycle.Sparse()
	return a.send(m)
}

func (a *agent) firstError() string {
	a.errMu.Lock()
	defer a.errMu.Unlock()
	return a.firstErr
}

// progress sends a counters snapshot every 250 ms.
func (a *agent) progress(ctx context.Context) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if a.send(agentMsg{Type: "progress", Counters: a.counters()}) != nil {
				return
			}
		}
	}
}

// setup checks the spec, raises the open-file limit to its hard maximum and
// starts the pollers.
func (a *agent) setup() error {
	s := &a.spec
	if len(s.URLs) == 0 {
		return fmt.Errorf("no URL")
	}
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &rl) == nil && rl.Cur < rl.Max {
		rl.Cur = rl.Max
		_ = unix.Setrlimit(unix.RLIMIT_NOFILE, &rl)
	}
	a.rss0 = procstat.RSS(os.Getpid())
	// wss:// targets here are loopback servers with development
	// certificates (often self-signed), so the bench does not verify them;
	// it measures TLS cost, not PKI.
	for _, u := range s.URLs {
		t, err := resolveTarget(u)
		if err != nil {
			return err
		}
		a.targets = append(a.targets, t)
	}
	a.dopts = dialOpts{urls: s.URLs, timeout: s.Timeout, token: s.Token,
		tls: &tls.Config{InsecureSkipVerify: true}} // no session cache: every connection pays a full handshake, as new clients do
	for _, src := range s.Sources {
		ip := net.ParseIP(src)
		if ip == nil {
			return fmt.Errorf("bad source address %q", src)
		}
		a.dopts.sources = append(a.dopts.sources, ip)
	}
	n := s.Pollers
	if n <= 0 {
		n = runtime.GOMAXPROCS(0)
	}
	for range n {
		p, err := newPoller(a)
		if err != nil {
			return err
		}
		a.pollers = append(a.pollers, p)
	}
	return nil
}

// prepare opens this agent's connections for the scenario.
func (a *agent) prepare(ctx context.Context) {
	s := &a.spec
	switch s.Scenario {
	case "conns":
		a.openConns(ctx, s.Conns, s.Rate, func(i int) string { return "" })
	case "fanout":
		// Global subscriber j (j ≡ Index mod Agents) listens on channel j mod C,
		// so each channel's subscribers are spread evenly over the agents.
		var mine []int
		for j := s.Index; j < s.Channels*s.Subscribers; j += s.Agents {
			mine = append(mine, j)
		}
		a.openConns(ctx, len(mine), 0, func(i int) string {
			return s.Prefix + strconv.Itoa(mine[i]%s.Channels)
		})
		a.openPublishers(ctx)
	case "rtt":
		a.openPublishers(ctx)
	}
}

// openConns opens n connections at rate per second (0 = as fast as the
// concurrency allows), each subscribed to channel(i) when that is not "".
// At most Concurrency openings are in flight; they run in the pollers, so
// this loop is the only goroutine involved.
func (a *agent) openConns(ctx context.Context, n int, rate float64, channel func(i int) string) {
	sem := make(chan struct{}, max(a.spec.Concurrency, 1))
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < n && ctx.Err() == nil; i++ {
		if rate > 0 {
			if d := time.Until(start.Add(time.Duration(float64(i) / rate * float64(time.Second)))); d > 0 {
				time.Sleep(d)
			}
		}
		sem <- struct{}{}
		wg.Add(1)
		a.startConn(ctx, a.spec.Index+i*a.spec.Agents, channel(i), nil, func(_ *conn, err error) {
			a.count(err)
			<-sem
			wg.Done()
		})
	}
	wg.Wait()
}

// count accounts the outcome of one opening.
func (a *agent) count(err error) {
	var se errSubscribe
	switch {
	case err == nil:
		a.connected.Add(1)
	case errors.As(err, &se):
		a.subscribeFailed.Add(1)
		a.noteErr(err)
	default:
		a.connectFailed.Add(1)
		a.noteErr(err)
	}
}

// startConn opens global connection number gi (target and source address
// gi mod their counts), subscribed to channel if set, publishing as pub if
// set, and calls done once with the open connection or the error. ws://
// opens in a poller (connect.go); wss:// dials on a goroutine.
func (a *agent) startConn(ctx context.Context, gi int, channel string, pub *publisher, done func(*conn, error)) {
	t := a.targets[gi%len(a.targets)]
	if t.tls {
		go func() {
			c, err := a.openConn(ctx, gi, channel, pub)
			done(c, err)
		}()
		return
	}
	c := &conn{fd: -1, channel: channel}
	if pub != nil {
		// Complete before the poller can see the conn: acks read it.
		pub.c, c.pub = c, pub
	}
	var src net.IP
	if len(a.dopts.sources) > 0 {
		src = a.dopts.sources[gi%len(a.dopts.sources)]
	}
	p := a.pollers[gi%len(a.pollers)]
	if err := p.open(c, t, src, a.spec.Timeout, a.spec.Token, done); err != nil {
		done(nil, err)
	}
}

// openConn dials global connection number gi synchronously (the wss:// path),
// subscribes it if channel is set, and hands it to a poller's TLS reader.
func (a *agent) openConn(ctx context.Context, gi int, channel string, pub *publisher) (*conn, error) {
	t0 := time.Now()
	s, err := dial(ctx, &a.dopts, gi)
	if err != nil {
		return nil, err
	}
	a.connect.Record(time.Since(t0))
	if channel != "" {
		if err := s.subscribe(channel); err != nil {
			s.nc.Close()
			return nil, errSubscribe{fmt.Errorf("#subscribe %s: %w", channel, err)}
		}
	}
	c := &conn{fd: -1, tc: s.nc, channel: channel}
	if pub != nil {
		pub.c, pub.nextCID = c, s.cid
		c.pub = pub
	}
	var rest []byte
	if s.n > 0 {
		rest = append([]byte(nil), s.buf[:s.n]...)
	}
	a.pollers[gi%len(a.pollers)].addTLS(c, rest)
	return c, nil
}

// openPublishers opens this agent's publishing connections. Publisher g
// (g ≡ Index mod Agents) gets global id g, which subscribers use to track
// per-publisher order.
func (a *agent) openPublishers(ctx context.Context) {
	s := &a.spec
	var ids []int
	for g := s.Index; g < s.Publishers; g += s.Agents {
		ids = append(ids, g)
	}
	window := max(s.Window, 1)
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, max(s.Concurrency, 1))
	for _, g := range ids {
		p := &publisher{id: uint64(g), a: a, window: window,
			sent: make([]atomic.Int64, window), slots: make(chan struct{}, window)}
		for range window {
			p.slots <- struct{}{}
		}
		sem <- struct{}{}
		wg.Add(1)
		// Numbered past the subscribers so publishers use their own mix of
		// source addresses and pollers.
		a.startConn(ctx, 1_000_003+g, "", p, func(_ *conn, err error) {
			a.count(err)
			if err == nil {
				mu.Lock()
				a.pubs = append(a.pubs, p)
				mu.Unlock()
			}
			<-sem
			wg.Done()
		})
	}
	wg.Wait()
}

// runPhase runs the measured part of the scenario for the spec's duration.
func (a *agent) runPhase(ctx context.Context) {
	s := &a.spec
	switch s.Scenario {
	case "fanout", "rtt":
		ctx, cancel := context.WithTimeout(ctx, s.Duration)
		defer cancel()
		a.measuring.Store(true)
		var wg sync.WaitGroup
		rate := 0.0
		if s.PublishRate > 0 && s.Publishers > 0 {
			// Per publisher, from the run's total: agents may hold
			// different numbers of publishers (or none).
			rate = s.PublishRate / float64(s.Publishers)
		}
		for _, p := range a.pubs {
			wg.Add(1)
			go func() { defer wg.Done(); p.run(ctx, rate) }()
		}
		wg.Wait()
		// The window is the whole duration in every agent, also in one
		// that holds only subscribers.
		<-ctx.Done()
		a.measuring.Store(false)
		// Give acks still in flight up to the ack timeout to arrive.
		deadline := time.Now().Add(s.Timeout)
		for _, p := range a.pubs {
			for len(p.slots) < p.window && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
		}
	case "churn":
		a.churn(ctx)
	}
}

// churn runs Conns loops of open (connect, upgrade, #handshake,
// #subscribe) and close until the duration ends. A loop is not a goroutine:
// each cycle's completion, on a poller, starts the next one. The end of the
// run stops new cycles but does not cut one short, so the deadline never
// shows up as a failure.
func (a *agent) churn(ctx context.Context) {
	s := &a.spec
	end := time.Now().Add(s.Duration)
	var next atomic.Int64
	var wg sync.WaitGroup
	var cycle func(w int)
	cycle = func(w int) {
		if ctx.Err() != nil || !time.Now().Before(end) {
			wg.Done()
			return
		}
		gi := s.Index + int(next.Add(1))*s.Agents
		t0 := time.Now()
		a.startConn(ctx, gi, s.Prefix+"churn/"+strconv.Itoa(w), nil, func(c *conn, err error) {
			if err != nil {
				a.cycleFailed.Add(1)
				a.noteErr(err)
				// Back off briefly so a refusing server is not hammered in a
				// tight loop that only measures the tool.
				time.AfterFunc(10*time.Millisecond, func() { cycle(w) })
				return
			}
			c.p.closeConn(c)
			a.cycle.Record(time.Since(t0))
			a.cycles.Add(1)
			cycle(w)
		})
	}
	for w := range max(s.Conns, 1) {
		wg.Add(1)
		cycle(w)
	}
	wg.Wait()
}

// publisher publishes on one connection with at most window invokes in
// flight (or without acks when the spec says transmit).
type publisher struct {
	a       *agent
	c       *conn
	id      uint64
	window  int
	nextCID uint64
	slots   chan struct{}  // one token per free window slot
	sent    []atomic.Int64 // send time by cid mod window
}

// run publishes until ctx ends, paced at rate per second when rate > 0.
// Publish k of publisher p goes to channel (p+k) mod C (fanout) or to the
// publisher's own channel (rtt), carrying p, k and the send time.
func (p *publisher) run(ctx context.Context, rate float64) {
	s := &p.a.spec
	var data, msg, fr []byte
	ownChannel := s.Prefix + "rtt/" + strconv.FormatUint(p.id, 10)
	chans := make([]string, max(s.Channels, 1))
	for i := range chans {
		chans[i] = s.Prefix + strconv.Itoa(i)
	}
	start := time.Now()
	for k := uint64(0); ctx.Err() == nil; k++ {
		if rate > 0 {
			if d := time.Until(start.Add(time.Duration(float64(k) / rate * float64(time.Second)))); d > 0 {
				t := time.NewTimer(d)
				select {
				case <-t.C:
				case <-ctx.Done():
					t.Stop()
					return
				}
			}
		}
		if !s.Transmit {
			select {
			case <-p.slots:
			case <-ctx.Done():
				return
			}
		}
		ch := ownChannel
		if s.Scenario == "fanout" {
			ch = chans[(p.id+k)%uint64(len(chans))]
		}
		now := time.Now().UnixNano()
		data = appendPublishData(data[:0], ch, p.id, k, now, s.Payload)
		if s.Transmit {
			msg = appendTransmit(msg[:0], "#publish", data)
		} else {
			cid := p.nextCID
			p.nextCID++
			p.sent[cid%uint64(p.window)].Store(now)
			msg = appendInvoke(msg[:0], "#publish", data, cid)
		}
		fr = appendClientFrame(fr[:0], opText, msg)
		for {
			err := p.c.write(fr)
			if err == nil {
				p.a.published.Add(1)
				break
			}
			if err == errBackpressed && ctx.Err() == nil {
				time.Sleep(time.Millisecond)
				continue
			}
			p.a.publishFailed.Add(1)
			if err != errBackpressed {
				p.a.noteErr(fmt.Errorf("publish: %w", err))
				return // the connection is gone
			}
			return
		}
	}
}

// ack accounts the response to publish invoke cid (on the poller goroutine).
func (p *publisher) ack(pl *poller, cid uint64, isErr bool) {
	if isErr {
		pl.st.pubErrors.Add(1)
	} else {
		pl.st.acked.Add(1)
	}
	sent := p.sent[cid%uint64(p.window)].Load()
	pl.st.ack.Record(time.Duration(time.Now().UnixNano() - sent))
	select {
	case p.slots <- struct{}{}:
	default: // a stray response; never block the poller
	}
}
