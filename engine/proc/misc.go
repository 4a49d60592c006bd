package proc

import (
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// ReadAuxv returns the raw auxiliary vector of pid.
func ReadAuxv(pid int) ([]byte, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/auxv", pid))
	if err != nil {
		return nil, fmt.Errorf("read auxv of %d: %w", pid, err)
	}
	return b, nil
}

// ReadLink reads /proc/PID/NAME (exe, cwd, root).
func ReadLink(pid int, name string) (string, error) {
	s, err := os.Readlink(fmt.Sprintf("/proc/%d/%s", pid, name))
	if err != nil {
		return "", fmt.Errorf("read %s of %d: %w", name, pid, err)
	}
	return s, nil
}

// ReadComm returns the command name of pid (or of thread tid when non-zero).
func ReadComm(pid, tid int) (string, error) {
	path := fmt.Sprintf("/proc/%d/comm", pid)
	if tid != 0 {
		path = fmt.Sprintf("/proc/%d/task/%d/comm", pid, tid)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	return strings.TrimSuffix(string(b), "\n"), nil
}

// Pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const (
	PMPresent   = 1 << 63
	PMSwapped   = 1 << 62
	PMFile      = 1 << 61 // file page or shared anon
	PMExclusive = 1 << 56
	PMSoftDirty = 1 << 55
	PMUffdWP    = 1 << 57
)

// Pagemap reads /proc/PID/pagemap entries.
type Pagemap struct {
	f *os.File
}

// OpenPagemap opens the pagemap of pid.
func OpenPagemap(pid int) (*Pagemap, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", pid))
	if err != nil {
		return nil, fmt.Errorf("open pagemap of %d: %w", pid, err)
	}
	return &Pagemap{f: f}, nil
}

// Read fills out with the entries of the pages starting at addr.
func (p *Pagemap) Read(addr uint64, out []uint64) error {
	buf := make([]byte, 8*len(out))
	n, err := p.f.ReadAt(buf, int64(addr/4096*8))
	if err != nil || n != len(buf) {
		return fmt.Errorf("read pagemap at %#x: %w", addr, err)
	}
	for i := range out {
		out[i] = binary.LittleEndian.Uint64(buf[8*i:])
	}
	return nil
}

// Close closes the pagemap.
func (p *Pagemap) Close() error { return p.f.Close() }

// Limit is one resource limit; Unlimited is RLIM_INFINITY.
type Limit struct {
	Resource  int
	Soft, Max uint64
}

// Unlimited is RLIM_INFINITY.
const Unlimited = ^uint64(0)

// ReadLimits reads /proc/PID/limits (readable where prlimit(2) on another
// user's process would need CAP_SYS_RESOURCE).
func ReadLimits(pid int) ([]Limit, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		return nil, fmt.Errorf("read limits of %d: %w", pid, err)
	}
	l, err := ParseLimits(b)
	if err != nil {
		return nil, fmt.Errorf("parse /proc/%d/limits: %w", pid, err)
	}
	return l, nil
}

// ParseLimits parses a limits file: a header line, then one line per
// resource in resource-number order, with fixed-width columns.
func ParseLimits(b []byte) ([]Limit, error) {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) < 2 || !strings.HasPrefix(lines[0], "Limit") {
		return nil, fmt.Errorf("no header")
	}
	softAt := strings.Index(lines[0], "Soft Limit")
	hardAt := strings.Index(lines[0], "Hard Limit")
	if softAt < 0 || hardAt < softAt {
		return nil, fmt.Errorf("bad header %q", lines[0])
	}
	parse := func(s string) (uint64, error) {
		s = strings.TrimSpace(s)
		if s == "unlimited" {
			return Unlimited, nil
		}
		return strconv.ParseUint(s, 10, 64)
	}
	var out []Limit
	for i, line := range lines[1:] {
		if len(line) < hardAt+1 {
			return nil, fmt.Errorf("short line %q", line)
		}
		soft, err1 := parse(line[softAt:hardAt])
		hardField := strings.Fields(line[hardAt:])
		if len(hardField) == 0 {
			return nil, fmt.Errorf("no hard limit in %q", line)
		}
		hard, err2 := parse(hardField[0])
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("bad values in %q", line)
		}
		out = append(out, Limit{Resource: i, Soft: soft, Max: hard})
	}
	return out, nil
}
