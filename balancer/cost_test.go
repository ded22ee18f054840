package balancer

// The balancer's cost, measured (SHOAL_BALANCER_COST=1 go test -run TestBalancerCost -v ./balancer).
// The balancer runs in a child process (this test binary re-executed), so
// its memory is measured alone; clients and an echo "worker" stay here.

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shoalhq/shoal/handoff"
	"github.com/shoalhq/shoal/internal/procstat"
	"github.com/shoalhq/shoal/proto/control"
	"github.com/shoalhq/shoal/proxyproto"
)

const (
	envHelper = "SHOAL_BALANCER_HELPER"
	envCost   = "SHOAL_BALANCER_COST"
	// envHeap names a file: the child samples every allocation and writes
	// a heap profile there while the proxied TLS connections are idle
	// (go tool pprof -sample_index=inuse_space FILE).
	envHeap = "SHOAL_BALANCER_HEAPPROFILE"
)

type helperStats struct {
	RSS        uint64
	HeapInuse  uint64
	StackInuse uint64
	Goroutines int
	CPU        time.Duration // user + system, whole process
}

// TestHelperBalancerProcess is the child: a balancer driven over stdin.
func TestHelperBalancerProcess(t *testing.T) {
	if os.Getenv(envHelper) == "" {
		t.Skip("helper process only")
	}
	if os.Getenv(envHeap) != "" {
		runtime.MemProfileRate = 1 // before the first connection
	}
	var p control.StartParams
	if err := json.Unmarshal([]byte(os.Getenv(envHelper)), &p); err != nil {
		t.Fatal(err)
	}
	c := New(nil)
	res, err := c.Start(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	out, _ := json.Marshal(res.Addrs)
	fmt.Printf("ADDRS %s\n", out)
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() { // ends when the parent closes stdin
		runtime.GC()
		if path, ok := strings.CutPrefix(sc.Text(), "heap "); ok {
			if err := writeHeapProfile(path); err != nil {
				t.Error(err)
			}
		}
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		var ru syscall.Rusage
		_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		cpu := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		st, _ := json.Marshal(helperStats{RSS: procstat.RSS(os.Getpid()), HeapInuse: ms.HeapInuse, StackInuse: ms.StackInuse,
			Goroutines: runtime.NumGoroutine(), CPU: cpu})
		fmt.Printf("STATS %s\n", st)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = c.Stop(ctx)
}

func writeHeapProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// echoWorker answers every byte it gets, on a handoff socket, a proxy
// socket (PROXY v2 required), a direct TCP port and a direct TLS port.
type echoWorker struct {
	hl       *handoff.Listener
	pl, tl   net.Listener
	tlsl     net.Listener
	wg       sync.WaitGroup
	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	handoffP string
	proxyP   string
}

func startEchoWorker(t *testing.T, dir string, tconf *tls.Config) *echoWorker {
	t.Helper()
	w := &echoWorker{conns: map[net.Conn]struct{}{}, handoffP: filepath.Join(dir, "w.sock"), proxyP: filepath.Join(dir, "w.proxy.sock")}
	var err error
	if w.hl, err = handoff.Listen(w.handoffP); err != nil {
		t.Fatal(err)
	}
	if w.pl, err = net.Listen("unix", w.proxyP); err != nil {
		t.Fatal(err)
	}
	if w.tl, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	if w.tlsl, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	w.wg.Add(4)
	go func() {
		defer w.wg.Done()
		for {
			fd, _, err := w.hl.Accept()
			if err != nil {
				return
			}
			f := os.NewFile(uintptr(fd), "h")
			c, err := net.FileConn(f)
			f.Close()
			if err == nil {
				w.echo(c)
			}
		}
	}()
	acceptLoop := func(l net.Listener, wrap func(net.Conn) net.Conn) {
		defer w.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			w.echo(wrap(c))
		}
	}
	go acceptLoop(w.pl, func(c net.Conn) net.Conn { return &headerConn{Conn: c} })
	go acceptLoop(w.tl, func(c net.Conn) net.Conn { return c })
	go acceptLoop(w.tlsl, func(c net.Conn) net.Conn { return tls.Server(c, tconf) })
	t.Cleanup(func() {
		w.hl.Close()
		w.pl.Close()
		w.tl.Close()
		w.tlsl.Close()
		w.mu.Lock()
		for c := range w.conns {
			c.Close()
		}
		w.mu.Unlock()
		w.wg.Wait()
	})
	return w
}

// headerConn reads (and requires) the PROXY header before the first byte.
type headerConn struct {
	net.Conn
	once sync.Once
	err  error
}

func (h *headerConn) Read(b []byte) (int, error) {
	h.once.Do(func() { _, h.err = proxyproto.ReadHeader(h.Conn) })
	if h.err != nil {
		return 0, h.err
	}
	return h.Conn.Read(b)
}

func (w *echoWorker) echo(c net.Conn) {
	w.mu.Lock()
	w.conns[c] = struct{}{}
	w.mu.Unlock()
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		defer func() {
			w.mu.Lock()
			delete(w.conns, c)
			w.mu.Unlock()
			c.Close()
		}()
		_, _ = io.Copy(c, c)
	}()
}

type costRig struct {
	t      *testing.T
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	out    *bufio.Scanner
	addrs  map[string]string
	worker *echoWorker
	tlsCli *tls.Config
}

func startCostRig(t *testing.T) *costRig {
	cfg := testConfig(t, true)
	// The worker's own TLS (the "balancers: 0" comparison) uses the same dev cert.
	cert, _, _, err := loadOrCreateDevCert(filepath.Join(cfg.Storage.Dir, "tls"), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	w := startEchoWorker(t, t.TempDir(), &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	raw, _ := json.Marshal(cfg)
	p := control.StartParams{Role: control.RoleBalancer, Name: "balancer-1", Config: raw, Topology: topology(1, control.Peer{
		Name: "w", Role: control.RoleWorker, State: control.StateReady, Pid: 1,
		Addrs: map[string]string{control.AddrHandoff: w.handoffP, control.AddrProxy: w.proxyP},
	})}
	pj, _ := json.Marshal(p)
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperBalancerProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), envHelper+"="+string(pj))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r := &costRig{t: t, cmd: cmd, stdin: stdin, out: bufio.NewScanner(stdout), worker: w,
		tlsCli: &tls.Config{RootCAs: devCertPool(t, cfg.Storage.Dir)}}
	t.Cleanup(func() {
		stdin.Close()
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	line := r.line("ADDRS ")
	if err := json.Unmarshal([]byte(line), &r.addrs); err != nil {
		t.Fatal(err)
	}
	return r
}

// line returns the payload of the child's next stdout line with prefix.
func (r *costRig) line(prefix string) string {
	for r.out.Scan() {
		if s, ok := strings.CutPrefix(r.out.Text(), prefix); ok {
			return s
		}
	}
	r.t.Fatalf("child exited before printing %q: %v", prefix, r.out.Err())
	return ""
}

func (r *costRig) stats() helperStats { return r.statsCmd("stats") }

// statsCmd sends cmd ("stats", or "heap FILE" to write a profile first).
func (r *costRig) statsCmd(cmd string) helperStats {
	if _, err := io.WriteString(r.stdin, cmd+"\n"); err != nil {
		r.t.Fatal(err)
	}
	var s helperStats
	if err := json.Unmarshal([]byte(r.line("STATS ")), &s); err != nil {
		r.t.Fatal(err)
	}
	return s
}

func (r *costRig) dial(path string) (net.Conn, error) {
	switch path {
	case "plain":
		return net.Dial("tcp", r.addrs[control.AddrPublic])
	case "proxied-tls":
		return tls.Dial("tcp", r.addrs[control.AddrTLS], r.tlsCli)
	case "direct":
		return net.Dial("tcp", r.worker.tl.Addr().String())
	case "direct-tls":
		return tls.Dial("tcp", r.worker.tlsl.Addr().String(), r.tlsCli)
	}
	return nil, fmt.Errorf("unknown path %s", path)
}

func roundTrip(c net.Conn, msg, buf []byte) error {
	if _, err := c.Write(msg); err != nil {
		return err
	}
	_, err := io.ReadFull(c, buf[:len(msg)])
	return err
}

func TestBalancerCost(t *testing.T) {
	if os.Getenv(envCost) == "" {
		t.Skip("set " + envCost + "=1 to measure the balancer (slow; numbers go to docs/balancer.md)")
	}
	r := startCostRig(t)
	paths := []string{"direct", "plain", "direct-tls", "proxied-tls"}

	// Connections per second: connect, one 1-byte round trip, close; 4 clients.
	const connsPerClient, clients = 500, 4
	for _, path := range paths {
		before := r.stats()
		start := time.Now()
		var wg sync.WaitGroup
		var failed sync.Map
		for range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, 1)
				for range connsPerClient {
					c, err := r.dial(path)
					if err != nil {
						failed.Store(path, err)
						return
					}
					err = roundTrip(c, []byte{'x'}, buf)
					c.Close()
					if err != nil {
						failed.Store(path, err)
						return
					}
				}
			}()
		}
		wg.Wait()
		failed.Range(func(k, v any) bool { t.Fatalf("%v: %v", k, v); return false })
		d := time.Since(start)
		after := r.stats()
		t.Logf("connections/s %-12s %8.0f; balancer CPU %.0f µs per connection", path, float64(connsPerClient*clients)/d.Seconds(),
			float64((after.CPU-before.CPU).Microseconds())/(connsPerClient*clients))
	}

	// Messages per second: 32 connections, 64-byte ping-pong.
	const conns, rounds = 32, 2000
	for _, path := range paths {
		cs := make([]net.Conn, conns)
		for i := range cs {
			c, err := r.dial(path)
			if err != nil {
				t.Fatal(err)
			}
			cs[i] = c
		}
		msg := make([]byte, 64)
		before := r.stats()
		start := time.Now()
		var wg sync.WaitGroup
		for _, c := range cs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, 64)
				for range rounds {
					if roundTrip(c, msg, buf) != nil {
						return
					}
				}
			}()
		}
		wg.Wait()
		d := time.Since(start)
		after := r.stats()
		for _, c := range cs {
			c.Close()
		}
		// The balancer's CPU per round trip is steadier than the rate on a
		// shared machine.
		t.Logf("round trips/s %-12s %8.0f (64 B each way, %d conns); balancer CPU %.1f µs per round trip", path,
			float64(conns*rounds)/d.Seconds(), conns, float64((after.CPU-before.CPU).Microseconds())/float64(conns*rounds))
	}

	// Bulk: 8 proxied connections each echo 4 MiB written in 64 KiB pieces
	// (full TLS records both ways).
	{
		const bulkConns, total, piece = 8, 4 << 20, 64 << 10
		before := r.stats()
		start := time.Now()
		var wg sync.WaitGroup
		var failed sync.Map
		for range bulkConns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := r.dial("proxied-tls")
				if err != nil {
					failed.Store("dial", err)
					return
				}
				defer c.Close()
				go func() {
					chunk := make([]byte, piece)
					for sent := 0; sent < total; sent += piece {
						if _, err := c.Write(chunk); err != nil {
							return
						}
					}
				}()
				if _, err := io.CopyN(io.Discard, c, total); err != nil {
					failed.Store("echo", err)
				}
			}()
		}
		wg.Wait()
		failed.Range(func(k, v any) bool { t.Fatalf("bulk %v: %v", k, v); return false })
		d := time.Since(start)
		after := r.stats()
		mib := float64(bulkConns*total) / (1 << 20)
		t.Logf("bulk proxied-tls  %6.1f MiB/s each way (%d conns); balancer CPU %.2f ms per MiB each way", mib/d.Seconds(), bulkConns,
			float64((after.CPU-before.CPU).Microseconds())/1000/mib)
	}

	// Memory per idle connection in the balancer process.
	const idle = 3000
	for _, path := range []string{"plain", "proxied-tls"} {
		before := r.stats()
		cs := make([]net.Conn, 0, idle)
		buf := make([]byte, 1)
		for range idle {
			c, err := r.dial(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := roundTrip(c, []byte{'x'}, buf); err != nil {
				t.Fatal(err)
			}
			cs = append(cs, c)
		}
		if path == "proxied-tls" {
			// Long enough for the balancer to see the burst has ended
			// (memrelease.go), as it would while these stay idle.
			time.Sleep(2*releaseEvery + time.Second)
		}
		after := r.stats()
		if f := os.Getenv(envHeap); f != "" && path == "proxied-tls" {
			r.statsCmd("heap " + f)
		}
		per := func(a, b uint64) float64 { return (float64(a) - float64(b)) / idle }
		t.Logf("idle %-12s per conn: RSS %6.0f B, heap %6.0f B, stacks %6.0f B; goroutines %d -> %d",
			path, per(after.RSS, before.RSS), per(after.HeapInuse, before.HeapInuse), per(after.StackInuse, before.StackInuse),
			before.Goroutines, after.Goroutines)
		for _, c := range cs {
			c.Close()
		}
	}
}
