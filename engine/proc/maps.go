package proc

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Mapping is one VMA as /proc/PID/smaps describes it.
type Mapping struct {
	Start, End uint64
	Read       bool
	Write      bool
	Exec       bool
	Shared     bool // 's' in the permissions: MAP_SHARED
	Offset     uint64
	Dev        uint64 // makedev(major, minor)
	Inode      uint64
	Path       string   // file path, "[heap]", "[stack]", "[vdso]", ... or ""
	Deleted    bool     // the file was unlinked (" (deleted)" suffix)
	Flags      []string // VmFlags two-letter codes
}

// Size is the mapping's length in bytes.
func (m *Mapping) Size() uint64 { return m.End - m.Start }

// HasFlag reports whether VmFlags contains code (e.g. "gd", "hg").
func (m *Mapping) HasFlag(code string) bool {
	for _, f := range m.Flags {
		if f == code {
			return true
		}
	}
	return false
}

// IsSpecial reports the kernel-provided mappings ([vdso], [vvar], ...),
// except [heap] and [stack], which are ordinary anonymous memory.
func (m *Mapping) IsSpecial() bool {
	return strings.HasPrefix(m.Path, "[") && m.Path != "[heap]" && m.Path != "[stack]" &&
		!strings.HasPrefix(m.Path, "[anon:") && !strings.HasPrefix(m.Path, "[anon_shmem:")
}

// IsFile reports a mapping backed by a file.
func (m *Mapping) IsFile() bool { return m.Inode != 0 }

// ReadSmaps returns the mappings of pid from /proc/PID/smaps.
func ReadSmaps(pid int) ([]Mapping, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return nil, fmt.Errorf("read mappings of %d: %w", pid, err)
	}
	ms, err := ParseSmaps(b)
	if err != nil {
		return nil, fmt.Errorf("parse /proc/%d/smaps: %w", pid, err)
	}
	return ms, nil
}

// ReadMaps returns the mappings of pid from /proc/PID/maps (no VmFlags;
// cheaper than smaps).
func ReadMaps(pid int) ([]Mapping, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return nil, fmt.Errorf("read mappings of %d: %w", pid, err)
	}
	ms, err := ParseSmaps(b)
	if err != nil {
		return nil, fmt.Errorf("parse /proc/%d/maps: %w", pid, err)
	}
	return ms, nil
}

// TakeFlags gives each of maps the VmFlags of the mapping of earlier (both
// in address order, as read) with the same range, permissions, offset and
// file, and reports whether every mapping found one. Mappings read from
// /proc/PID/maps so get the flags of an earlier smaps read without the
// page-table walk that makes smaps slow; a mapping that changed meanwhile
// (split, moved, remapped, reprotected) makes it return false.
func TakeFlags(maps, earlier []Mapping) bool {
	j := 0
	for i := range maps {
		m := &maps[i]
		for j < len(earlier) && earlier[j].Start < m.Start {
			j++
		}
		if j == len(earlier) || !sameMapping(m, &earlier[j]) {
			return false
		}
		m.Flags = earlier[j].Flags
	}
	return true
}

// sameMapping compares everything but the flags.
func sameMapping(a, b *Mapping) bool {
	return a.Start == b.Start && a.End == b.End && a.Read == b.Read && a.Write == b.Write &&
		a.Exec == b.Exec && a.Shared == b.Shared && a.Offset == b.Offset && a.Dev == b.Dev &&
		a.Inode == b.Inode && a.Path == b.Path && a.Deleted == b.Deleted
}

// ParseSmaps parses the contents of a smaps (or maps) file.
func ParseSmaps(b []byte) ([]Mapping, error) {
	var ms []Mapping
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		if isHeader(line) {
			m, err := parseMapLine(line)
			if err != nil {
				return nil, err
			}
			ms = append(ms, m)
			continue
		}
		if v, ok := strings.CutPrefix(line, "VmFlags:"); ok && len(ms) > 0 {
			ms[len(ms)-1].Flags = strings.Fields(v)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return ms, nil
}

// isHeader tells a mapping line ("start-end perms ...") from a smaps field
// line ("Rss:   4 kB").
func isHeader(line string) bool {
	sp := strings.IndexByte(line, ' ')
	if sp <= 0 {
		return false
	}
	return strings.IndexByte(line[:sp], '-') > 0 && !strings.HasSuffix(line[:sp], ":")
}

func parseMapLine(line string) (Mapping, error) {
	var m Mapping
	// start-end perms offset dev inode [path]
	f := strings.SplitN(line, " ", 6)
	if len(f) < 5 {
		return m, fmt.Errorf("bad mapping line %q", line)
	}
	a, b, ok := strings.Cut(f[0], "-")
	if !ok {
		return m, fmt.Errorf("bad address range in %q", line)
	}
	var err error
	if m.Start, err = strconv.ParseUint(a, 16, 64); err != nil {
		return m, fmt.Errorf("bad start in %q", line)
	}
	if m.End, err = strconv.ParseUint(b, 16, 64); err != nil || m.End <= m.Start {
		return m, fmt.Errorf("bad end in %q", line)
	}
	p := f[1]
	if len(p) != 4 {
		return m, fmt.Errorf("bad permissions in %q", line)
	}
	m.Read, m.Write, m.Exec, m.Shared = p[0] == 'r', p[1] == 'w', p[2] == 'x', p[3] == 's'
	if m.Offset, err = strconv.ParseUint(f[2], 16, 64); err != nil {
		return m, fmt.Errorf("bad offset in %q", line)
	}
	maj, min, ok := strings.Cut(f[3], ":")
	if !ok {
		return m, fmt.Errorf("bad device in %q", line)
	}
	ma, err1 := strconv.ParseUint(maj, 16, 32)
	mi, err2 := strconv.ParseUint(min, 16, 32)
	if err1 != nil || err2 != nil {
		return m, fmt.Errorf("bad device in %q", line)
	}
	m.Dev = Mkdev(ma, mi)
	if m.Inode, err = strconv.ParseUint(f[4], 10, 64); err != nil {
		return m, fmt.Errorf("bad inode in %q", line)
	}
	if len(f) == 6 {
		path := strings.TrimLeft(f[5], " ")
		if s, ok := strings.CutSuffix(path, " (deleted)"); ok {
			path, m.Deleted = s, true
		}
		m.Path = path
	}
	return m, nil
}

// Mkdev combines a device's major and minor numbers like the kernel's
// new_encode_dev does for stat(2).
func Mkdev(major, minor uint64) uint64 {
	return (minor & 0xff) | (major&0xfff)<<8 | (minor&^0xff)<<12 | (major&^0xfff)<<32
}
