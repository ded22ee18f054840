// Package procstat reads this process's memory and goroutine figures for the
// control plane's Stats.
package procstat

import (
	"os"
	"runtime"
	"strconv"
	"strings"

	"github.com/shoalhq/shoal/proto/control"
)

// Fill sets the memory and goroutine fields of st.
func Fill(st *control.Stats) {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	st.HeapBytes = ms.HeapAlloc
	st.SysBytes = ms.Sys
	st.Goroutines = runtime.NumGoroutine()
	st.RSSBytes = RSS(os.Getpid())
}

// RSS returns the resident set size of a process in bytes (0 if unknown).
func RSS(pid int) uint64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/statm")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0
	}
	pages, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return 0
	}
	return pages * uint64(os.Getpagesize())
}
