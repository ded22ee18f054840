package logfile

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"time"
)

// maxLine bounds one line held in memory by a reader; a longer line is
// delivered in pieces rather than growing the buffer without limit.
const maxLine = 1 << 20

// Filter selects entries. The zero Filter selects everything.
type Filter struct {
	MinLevel Level
	// Procs keeps entries of these processes: an exact name ("worker-1") or a
	// role prefix ("worker" matches worker-1, worker-2, ...). Empty keeps all.
	Procs []string
	Since time.Time // zero = no lower bound
}

// Match reports whether e passes the filter.
func (f Filter) Match(e Entry) bool {
	if e.Level < f.MinLevel {
		return false
	}
	if !f.Since.IsZero() && e.Time.Before(f.Since) {
		return false
	}
	if len(f.Procs) == 0 {
		return true
	}
	for _, p := range f.Procs {
		if e.Proc == p || strings.HasPrefix(e.Proc, p+"-") {
			return true
		}
	}
	return false
}

// Files returns the existing files of the log at path, oldest first:
// path.N … path.1, path.
func Files(path string) []string {
	var old []string
	// Rotated files are numbered without gaps; stop at the first missing one
	// (bounded anyway so a strange directory cannot loop for long).
	for i := 1; i <= 10000; i++ {
		if _, err := os.Stat(rotated(path, i)); err != nil {
			break
		}
		old = append(old, rotated(path, i))
	}
	out := make([]string, 0, len(old)+1)
	for i := len(old) - 1; i >= 0; i-- {
		out = append(out, old[i])
	}
	if _, err := os.Stat(path); err == nil {
		out = append(out, path)
	}
	return out
}

// Read calls fn for each entry matching f in the rotated files and the live
// one, oldest first. A missing log is not an error (nothing was logged yet).
// fn's error stops the read and is returned.
func Read(path string, f Filter, fn func(Entry) error) error {
	for _, name := range Files(path) {
		file, err := os.Open(name)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) { // rotated away meanwhile
				continue
			}
			return fmt.Errorf("reading log: %w", err)
		}
		t := newTail(file)
		err = t.drain(f, fn, true)
		file.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

// FollowOptions tune Follow.
type FollowOptions struct {
	History bool          // deliver what the files already hold before following
	Tail    int           // with History: only the last Tail matching entries of it (0 = all)
	Poll    time.Duration // how often to look for new lines; default 200ms
}

// Follow delivers matching entries as they are appended to the log at path,
// across rotations, until ctx ends (then it returns nil) or fn fails. It
// waits for the file if it does not exist yet.
func Follow(ctx context.Context, path string, f Filter, opts FollowOptions, fn func(Entry) error) error {
	if opts.Poll <= 0 {
		opts.Poll = 200 * time.Millisecond
	}
	tick := time.NewTicker(opts.Poll)
	defer tick.Stop()
	wait := func() bool {
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
			return true
		}
	}

	var cur *os.File
	for cur == nil {
		file, err := os.Open(path)
		switch {
		case err == nil:
			cur = file
		case errors.Is(err, fs.ErrNotExist):
			if !wait() {
				return nil
			}
		default:
			return fmt.Errorf("following log: %w", err)
		}
	}
	defer func() { cur.Close() }()

	t := newTail(cur)
	if opts.History {
		// The live file is already open, so the rotated files read here are
		// older than anything it will deliver.
		hist := fn
		var last *Last
		if opts.Tail > 0 {
			last = NewLast(opts.Tail)
			hist = last.Add
		}
		files := Files(path)
		for _, name := range files[:max(0, len(files)-1)] {
			file, err := os.Open(name)
			if err != nil {
				continue
			}
			err = newTail(file).drain(f, hist, true)
			file.Close()
			if err != nil {
				return err
			}
		}
		if err := t.drain(f, hist, false); err != nil {
			return err
		}
		for _, e := range last.Entries() {
			if err := fn(e); err != nil {
				return err
			}
		}
	} else {
		if _, err := cur.Seek(0, io.SeekEnd); err != nil {
			return fmt.Errorf("following log: %w", err)
		}
		t = newTail(cur)
	}

	for ctx.Err() == nil {
		if err := t.drain(f, fn, false); err != nil {
			return err
		}
		now, err := os.Stat(path)
		if err == nil {
			was, serr := cur.Stat()
			if serr == nil && !os.SameFile(now, was) {
				// Rotated: the writer closed the old file before renaming it,
				// so what is left of it is final. Finish it, then switch.
				if err := t.drain(f, fn, true); err != nil {
					return err
				}
				next, oerr := os.Open(path)
				if oerr == nil {
					cur.Close()
					cur = next
					t = newTail(cur)
					continue
				}
			} else if serr == nil && now.Size() < t.off {
				// Truncated in place (copytruncate-style): start over.
				if _, err := cur.Seek(0, io.SeekStart); err == nil {
					t = newTail(cur)
					continue
				}
			}
		}
		if !wait() {
			break
		}
	}
	return nil
}

// tail reads complete lines from a file that may still be growing.
type tail struct {
	r       *bufio.Reader
	partial []byte
	off     int64 // bytes consumed, including the partial line
}

func newTail(f *os.File) *tail {
	off, _ := f.Seek(0, io.SeekCurrent)
	return &tail{r: bufio.NewReaderSize(f, 64<<10), off: off}
}

// drain delivers every complete line up to the current end of the file. With
// final set, an unterminated last line is delivered too (the file will not
// grow any more).
func (t *tail) drain(f Filter, fn func(Entry) error, final bool) error {
	for {
		chunk, err := t.r.ReadSlice('\n')
		t.off += int64(len(chunk))
		if len(chunk) > 0 {
			t.partial = append(t.partial, chunk...)
		}
		complete := err == nil || (final && errors.Is(err, io.EOF) && len(t.partial) > 0)
		if !complete && len(t.partial) >= maxLine {
			complete = true
		}
		if complete && len(t.partial) > 0 {
			line := bytes.TrimRight(t.partial, "\r\n")
			if len(line) > 0 {
				e, perr := ParseLine(line)
				if perr != nil {
					// Not ours (or damaged): keep it visible rather than lose it.
					e = Entry{Level: LevelInfo, Msg: string(line)}
				}
				if f.Match(e) {
					if err := fn(e); err != nil {
						return err
					}
				}
			}
			t.partial = t.partial[:0]
		}
		switch {
		case err == nil, errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF):
			return nil
		default:
			return fmt.Errorf("reading log: %w", err)
		}
	}
}

// Last keeps the last n entries given to Add (a ring), for `shoal logs -n`.
type Last struct {
	buf  []Entry
	next int
	full bool
}

// NewLast keeps up to n entries (n >= 1).
func NewLast(n int) *Last { return &Last{buf: make([]Entry, max(n, 1))} }

// Add keeps e, forgetting the oldest when full. It never fails; the error
// makes it usable as a Read or Follow callback.
func (l *Last) Add(e Entry) error {
	l.buf[l.next] = e
	l.next = (l.next + 1) % len(l.buf)
	if l.next == 0 {
		l.full = true
	}
	return nil
}

// Entries returns what is kept, oldest first. A nil *Last has none.
func (l *Last) Entries() []Entry {
	if l == nil {
		return nil
	}
	if !l.full {
		return l.buf[:l.next]
	}
	return append(append([]Entry(nil), l.buf[l.next:]...), l.buf[:l.next]...)
}
