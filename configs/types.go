package configs

import (
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// Duration is a time.Duration written as Go duration text ("8s", "250ms")
// in YAML and JSON, so configs stay readable and round-trip unchanged.
type Duration time.Duration

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("invalid duration %q (use e.g. 500ms, 8s, 2m)", string(b))
	}
	if v < 0 {
		return fmt.Errorf("duration %q must not be negative", string(b))
	}
	*d = Duration(v)
	return nil
}

// ByteSize is a size in bytes written as "1MiB", "512KiB", "100MB" or a plain number.
type ByteSize int64

var sizeUnits = []struct {
	suffix string
	mult   int64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30},
	{"KB", 1000}, {"MB", 1000 * 1000}, {"GB", 1000 * 1000 * 1000},
	{"B", 1},
}

func (s ByteSize) MarshalText() ([]byte, error) {
	v := int64(s)
	switch {
	case v != 0 && v%(1<<30) == 0:
		return []byte(strconv.FormatInt(v>>30, 10) + "GiB"), nil
	case v != 0 && v%(1<<20) == 0:
		return []byte(strconv.FormatInt(v>>20, 10) + "MiB"), nil
	case v != 0 && v%(1<<10) == 0:
		return []byte(strconv.FormatInt(v>>10, 10) + "KiB"), nil
	}
	return []byte(strconv.FormatInt(v, 10)), nil
}

func (s *ByteSize) UnmarshalText(b []byte) error {
	txt := strings.TrimSpace(string(b))
	mult := int64(1)
	num := txt
	for _, u := range sizeUnits {
		if strings.HasSuffix(txt, u.suffix) {
			mult, num = u.mult, strings.TrimSpace(strings.TrimSuffix(txt, u.suffix))
			break
		}
	}
	v, err := strconv.ParseInt(num, 10, 64)
	if err != nil || v < 0 {
		return fmt.Errorf("invalid size %q (use e.g. 1MiB, 512KiB, 65536)", txt)
	}
	*s = ByteSize(v * mult)
	return nil
}

// Count is a process count that may be written "auto" (one per CPU); 0 means auto.
type Count int

// N resolves auto to the CPU count.
func (c Count) N() int {
	if c <= 0 {
		return runtime.NumCPU()
	}
	return int(c)
}

func (c Count) MarshalText() ([]byte, error) {
	if c <= 0 {
		return []byte("auto"), nil
	}
	return []byte(strconv.Itoa(int(c))), nil
}

func (c *Count) UnmarshalText(b []byte) error {
	txt := strings.TrimSpace(string(b))
	if txt == "auto" || txt == "" {
		*c = 0
		return nil
	}
	v, err := strconv.Atoi(txt)
	if err != nil || v < 1 {
		return fmt.Errorf("invalid count %q (use a positive number or auto)", txt)
	}
	*c = Count(v)
	return nil
}

// Rate is "N/s", "N/m" or "N/h": a number of events per period.
type Rate struct {
	N   float64
	Per time.Duration
}

// PerSecond returns the rate in events per second (0 = unlimited).
func (r Rate) PerSecond() float64 {
	if r.Per <= 0 {
		return 0
	}
	return r.N / r.Per.Seconds()
}

func (r Rate) MarshalText() ([]byte, error) {
	if r.Per == 0 {
		return []byte(""), nil
	}
	unit := "s"
	switch r.Per {
	case time.Minute:
		unit = "m"
	case time.Hour:
		unit = "h"
	}
	return []byte(strconv.FormatFloat(r.N, 'f', -1, 64) + "/" + unit), nil
}

func (r *Rate) UnmarshalText(b []byte) error {
	txt := strings.TrimSpace(string(b))
	n, unit, ok := strings.Cut(txt, "/")
	v, err := strconv.ParseFloat(strings.TrimSpace(n), 64)
	if !ok || err != nil || v < 0 {
		return fmt.Errorf("invalid rate %q (use e.g. 100/s, 20/m)", txt)
	}
	switch strings.TrimSpace(unit) {
	case "s":
		r.Per = time.Second
	case "m":
		r.Per = time.Minute
	case "h":
		r.Per = time.Hour
	default:
		return fmt.Errorf("invalid rate unit in %q (use /s, /m or /h)", txt)
	}
	r.N = v
	return nil
}
