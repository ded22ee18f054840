package bench

// Finding the server's processes and reading their memory and CPU from
// /proc. The cluster's own list comes from the admin API (GET /api/cluster);
// for a server without one (the reference SocketCluster server) the pids can
// be given, or found as the owners of the listening socket on a port.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/shoalhq/shoal/internal/procstat"
)

// clkTck is the kernel's USER_HZ, the unit of utime/stime in /proc/PID/stat.
// It is 100 on every Linux architecture Go supports.
const clkTck = 100

// adminPIDs asks the supervisor's admin API for the cluster's processes. The
// response's shape may still change, so every numeric "pid" or "*_pid" field
// anywhere in the JSON counts; a "name" beside a "pid" names it.
func adminPIDs(ctx context.Context, base string) ([]int, map[int]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	url := strings.TrimSuffix(base, "/") + "/api/cluster"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	var v any
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	if err := dec.Decode(&v); err != nil {
		return nil, nil, fmt.Errorf("GET %s: %w", url, err)
	}
	names := map[int]string{}
	var pids []int
	collectPIDs(v, &pids, names)
	if len(pids) == 0 {
		return nil, nil, fmt.Errorf("GET %s: no pid in the response", url)
	}
	return dedupe(pids), names, nil
}

func collectPIDs(v any, out *[]int, names map[int]string) {
	switch t := v.(type) {
	case map[string]any:
		for k, x := range t {
			if k == "pid" || strings.HasSuffix(k, "_pid") { // "supervisor_pid" too
				n, ok := x.(json.Number)
				if !ok {
					continue
				}
				p, err := strconv.Atoi(n.String())
				if err != nil || p <= 0 {
					continue
				}
				*out = append(*out, p)
				if name, ok := t["name"].(string); ok && k == "pid" {
					names[p] = name
				} else if k != "pid" {
					names[p] = strings.TrimSuffix(k, "_pid")
				}
				continue
			}
			collectPIDs(x, out, names)
		}
	case []any:
		for _, x := range t {
			collectPIDs(x, out, names)
		}
	}
}

// portPIDs returns the processes holding a listening TCP socket on port.
func portPIDs(port int) ([]int, error) {
	inodes := map[string]bool{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		listenInodes(f, port, inodes)
	}
	if len(inodes) == 0 {
		return nil, fmt.Errorf("no process listens on port %d", port)
	}
	dirs, _ := filepath.Glob("/proc/[0-9]*/fd")
	var pids []int
	for _, d := range dirs {
		pid, err := strconv.Atoi(filepath.Base(filepath.Dir(d)))
		if err != nil {
			continue
		}
		fds, err := os.ReadDir(d)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			l, err := os.Readlink(filepath.Join(d, fd.Name()))
			if err == nil && strings.HasPrefix(l, "socket:[") && inodes[l[8:len(l)-1]] {
				pids = append(pids, pid)
				break
			}
		}
	}
	if len(pids) == 0 {
		return nil, fmt.Errorf("port %d: listening socket found but not its process (permissions?)", port)
	}
	return dedupe(pids), nil
}

// listenInodes adds the inodes of sockets listening on port in a
// /proc/net/tcp-format file.
func listenInodes(file string, port int, into map[string]bool) {
	f, err := os.Open(file)
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 10 || fs[3] != "0A" { // 0A = TCP_LISTEN
			continue
		}
		i := strings.LastIndexByte(fs[1], ':')
		p, err := strconv.ParseUint(fs[1][i+1:], 16, 16)
		if err == nil && int(p) == port {
			into[fs[9]] = true
		}
	}
}

// withDescendants adds every descendant of pids (a cluster given by its
// supervisor's pid, or a server that forks workers).
func withDescendants(pids []int) []int {
	children := map[int][]int{}
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, s := range stats {
		b, err := os.ReadFile(s)
		if err != nil {
			continue
		}
		pid, ppid, ok := parseStatPPID(b)
		if ok {
			children[ppid] = append(children[ppid], pid)
		}
	}
	seen := map[int]bool{}
	var out []int
	var walk func(int)
	walk = func(p int) {
		if seen[p] {
			return
		}
		seen[p] = true
		out = append(out, p)
		for _, c := range children[p] {
			walk(c)
		}
	}
	for _, p := range pids {
		walk(p)
	}
	sort.Ints(out)
	return out
}

// parseStatPPID reads pid and ppid from /proc/PID/stat. The command name is
// in parentheses and may contain spaces, so fields are counted from the
// last ')'.
func parseStatPPID(b []byte) (pid, ppid int, ok bool) {
	i := bytes.IndexByte(b, ' ')
	j := bytes.LastIndexByte(b, ')')
	if i < 0 || j < 0 {
		return 0, 0, false
	}
	pid, err := strconv.Atoi(string(b[:i]))
	if err != nil {
		return 0, 0, false
	}
	f := strings.Fields(string(b[j+1:]))
	if len(f) < 2 {
		return 0, 0, false
	}
	ppid, err = strconv.Atoi(f[1])
	return pid, ppid, err == nil
}

// procCPU returns a process's user+system CPU time (0 if it is gone).
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	j := bytes.LastIndexByte(b, ')')
	if j < 0 {
		return 0
	}
	f := strings.Fields(string(b[j+1:]))
	// After the name: state(0) ppid(1) ... utime(11) stime(12).
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseUint(f[11], 10, 64)
	s, _ := strconv.ParseUint(f[12], 10, 64)
	return time.Duration(u+s) * time.Second / clkTck
}

// serverSample is the summed RSS and CPU of the server's processes.
type serverSample struct {
	RSS   uint64
	CPU   time.Duration
	Alive int
	ByPID map[int]uint64 // RSS of each live process
}

func sampleServer(pids []int) serverSample {
	s := serverSample{ByPID: map[int]uint64{}}
	for _, p := range pids {
		rss := procstat.RSS(p)
		if rss == 0 {
			continue
		}
		s.Alive++
		s.RSS += rss
		s.ByPID[p] = rss
		s.CPU += procCPU(p)
	}
	return s
}

func dedupe(p []int) []int {
	sort.Ints(p)
	out := p[:0]
	for i, x := range p {
		if i == 0 || x != p[i-1] {
			out = append(out, x)
		}
	}
	return out
}
