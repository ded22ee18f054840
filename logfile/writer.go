package logfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"sync"
)

// Options configure a Writer.
type Options struct {
	Path    string // the live file; rotated files are Path.1 (newest) … Path.Keep
	MaxSize int64  // rotate before a line would take the file past this; 0 = never
	Keep    int    // rotated files kept; 0 = the live file is simply restarted

	// Echo, when set, also receives a one-line readable copy of every entry at
	// EchoLevel or above (the supervisor's stderr, so an operator sees
	// warnings without tailing the file).
	Echo      io.Writer
	EchoLevel Level
}

// Writer appends entries to the central log. It is safe for concurrent use;
// each entry is written with one write(2) so that a reader never sees half a
// line followed by another process's line.
type Writer struct {
	opts Options

	mu     sync.Mutex
	f      *os.File
	size   int64
	buf    []byte
	ebuf   []byte
	err    error // the last failure to reopen after rotation
	closed bool
}

// Open opens (creating it and its directory if needed) the log file for
// appending.
func Open(opts Options) (*Writer, error) {
	if opts.Path == "" {
		return nil, errors.New("opening log: no file name")
	}
	if err := os.MkdirAll(filepath.Dir(opts.Path), 0o755); err != nil {
		return nil, fmt.Errorf("creating log directory: %w", err)
	}
	w := &Writer{opts: opts}
	if err := w.open(); err != nil {
		return nil, err
	}
	return w, nil
}

// Path is the live file's name.
func (w *Writer) Path() string { return w.opts.Path }

func (w *Writer) open() error {
	f, err := os.OpenFile(w.opts.Path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("opening log: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("opening log: %w", err)
	}
	w.f, w.size = f, fi.Size()
	return nil
}

// Write appends one entry.
func (w *Writer) Write(e Entry) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.opts.Echo != nil && e.Level >= w.opts.EchoLevel {
		w.ebuf = FormatBrief(w.ebuf[:0], e)
		_, _ = w.opts.Echo.Write(w.ebuf)
	}
	if w.f == nil {
		if w.closed {
			return errors.New("writing log: closed")
		}
		// A failed rotation left no file open: try again on every line so a
		// transient problem (a full disk) does not silence the log for good.
		if err := w.open(); err != nil {
			return fmt.Errorf("writing log (after %v): %w", w.err, err)
		}
	}
	w.buf = AppendJSON(w.buf[:0], e)
	if w.opts.MaxSize > 0 && w.size > 0 && w.size+int64(len(w.buf)) > w.opts.MaxSize {
		if err := w.rotate(); err != nil {
			return err
		}
	}
	n, err := w.f.Write(w.buf)
	w.size += int64(n)
	if err != nil {
		return fmt.Errorf("writing log: %w", err)
	}
	// Keep the buffer from pinning a huge line (a long panic) forever.
	if cap(w.buf) > 64<<10 {
		w.buf = nil
	}
	return nil
}

// rotate shifts Path.(k) to Path.(k+1), Path to Path.1 and starts a new Path.
// The old file is closed before it is renamed, so a follower that reaches its
// end and then finds a new file at Path has seen every line of it.
func (w *Writer) rotate() error {
	if err := w.f.Close(); err != nil {
		w.f = nil
		w.err = fmt.Errorf("rotating log: closing: %w", err)
		return w.err
	}
	w.f = nil
	p := w.opts.Path
	if w.opts.Keep <= 0 {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			w.err = fmt.Errorf("rotating log: %w", err)
			return w.err
		}
	} else {
		_ = os.Remove(rotated(p, w.opts.Keep)) // the oldest falls off
		for i := w.opts.Keep - 1; i >= 1; i-- {
			if err := os.Rename(rotated(p, i), rotated(p, i+1)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				w.err = fmt.Errorf("rotating log: %w", err)
				return w.err
			}
		}
		if err := os.Rename(p, rotated(p, 1)); err != nil {
			w.err = fmt.Errorf("rotating log: %w", err)
			return w.err
		}
	}
	if err := w.open(); err != nil {
		w.err = fmt.Errorf("rotating log: %w", err)
		return w.err
	}
	w.err = nil
	return nil
}

func rotated(path string, i int) string { return path + "." + strconv.Itoa(i) }

// Close closes the file; later writes fail.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.closed = true
	if w.f == nil {
		return nil
	}
	err := w.f.Close()
	w.f = nil
	if err != nil {
		return fmt.Errorf("closing log: %w", err)
	}
	return nil
}
