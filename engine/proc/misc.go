package proc

import (
	"encoding/binary"
	"fmt"
	"os"
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
