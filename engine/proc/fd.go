package proc

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
)

// FDInfo is the parsed /proc/PID/fdinfo/FD of one descriptor.
type FDInfo struct {
	Pos   int64
	Flags uint32 // octal "flags:" field: open flags incl. O_CLOEXEC
	MntID int
	Ino   uint64
	// Extra holds the kind-specific lines (eventfd-count, tfd, clockid, ...)
	// in order, as key and value.
	Extra [][2]string
}

// Get returns the first value of an extra key.
func (fi *FDInfo) Get(key string) (string, bool) {
	for _, kv := range fi.Extra {
		if kv[0] == key {
			return kv[1], true
		}
	}
	return "", false
}

// ListFDs returns the open descriptor numbers of pid, sorted.
func ListFDs(pid int) ([]int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return nil, fmt.Errorf("list descriptors of %d: %w", pid, err)
	}
	fds := make([]int, 0, len(ents))
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil {
			fds = append(fds, n)
		}
	}
	sort.Ints(fds)
	return fds, nil
}

// ReadFDLink returns the target of /proc/PID/fd/FD ("/path", "pipe:[123]",
// "anon_inode:[eventfd]", "socket:[456]", ...).
func ReadFDLink(pid, fd int) (string, error) {
	s, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", pid, fd))
	if err != nil {
		return "", fmt.Errorf("read descriptor %d of %d: %w", fd, pid, err)
	}
	return s, nil
}

// ReadFDInfo reads /proc/PID/fdinfo/FD.
func ReadFDInfo(pid, fd int) (*FDInfo, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%d", pid, fd))
	if err != nil {
		return nil, fmt.Errorf("read fdinfo %d of %d: %w", fd, pid, err)
	}
	fi, err := ParseFDInfo(b)
	if err != nil {
		return nil, fmt.Errorf("parse fdinfo %d of %d: %w", fd, pid, err)
	}
	return fi, nil
}

// ParseFDInfo parses the contents of an fdinfo file.
func ParseFDInfo(b []byte) (*FDInfo, error) {
	fi := &FDInfo{}
	seenFlags := false
	for _, line := range strings.Split(string(b), "\n") {
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		val = strings.TrimSpace(val)
		var err error
		switch key {
		case "pos":
			fi.Pos, err = strconv.ParseInt(val, 10, 64)
		case "flags":
			var v uint64
			v, err = strconv.ParseUint(val, 8, 32)
			fi.Flags, seenFlags = uint32(v), true
		case "mnt_id":
			fi.MntID, err = strconv.Atoi(val)
		case "ino":
			fi.Ino, err = strconv.ParseUint(val, 10, 64)
		default:
			fi.Extra = append(fi.Extra, [2]string{key, val})
		}
		if err != nil {
			return nil, fmt.Errorf("bad %s line %q", key, line)
		}
	}
	if !seenFlags {
		return nil, errors.New("no flags line")
	}
	return fi, nil
}
