package tracker

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/phaul/phaul/engine/proc"
)

// Area is one mapping of the process whose pages a dump saves: private
// memory (anonymous or file-backed, whatever its protection) and shared
// anonymous memory.
type Area struct {
	Range
	// File marks a private file mapping: only its copied-on-write pages
	// are the process's own; the others come back from the file.
	File bool
	// Shared marks shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS).
	Shared bool
	// Readable is false for a mapping without PROT_READ, which
	// process_vm_readv cannot read (/proc/PID/mem can).
	Readable bool
	// Untracked marks an area the backend could not track this round:
	// all its pages count as written.
	Untracked bool
}

// hasOwnPages reports whether the pages of m belong in a dump (the same
// rule as the engine's: anonymous memory, private or shared, and the
// private file mappings).
func hasOwnPages(m *proc.Mapping) (ok, shared bool) {
	if m.IsSpecial() {
		return false, false
	}
	if !m.Shared {
		return true, false
	}
	if m.Inode != 0 && m.Path == "/dev/zero" && m.Deleted || strings.HasPrefix(m.Path, "[anon_shmem:") {
		return true, true
	}
	return false, false
}

// areasOf returns the areas of maps, in address order.
func areasOf(maps []proc.Mapping) []Area {
	out := make([]Area, 0, len(maps))
	for i := range maps {
		m := &maps[i]
		ok, shared := hasOwnPages(m)
		if !ok {
			continue
		}
		out = append(out, Area{
			Range:    Range{Start: m.Start, End: m.End},
			File:     !shared && m.Inode != 0,
			Shared:   shared,
			Readable: m.Read,
		})
	}
	return out
}

// areasIn returns the areas of maps, or of pid's /proc/PID/maps when maps
// is nil.
func areasIn(pid int, maps []proc.Mapping) ([]Area, error) {
	if maps != nil {
		return areasOf(maps), nil
	}
	return readAreas(pid)
}

// readAreas reads the areas of pid from /proc/PID/maps.
func readAreas(pid int) ([]Area, error) {
	maps, err := proc.ReadMaps(pid)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, errESRCH) {
			return nil, fmt.Errorf("%w: %w", ErrProcessGone, err)
		}
		return nil, err
	}
	return areasOf(maps), nil
}

// AreaRanges returns the pages of areas as a set.
func AreaRanges(areas []Area) Ranges {
	var out Ranges
	for _, a := range areas {
		out.Add(a.Start, a.End)
	}
	return out
}

// startTime returns the start time of pid (/proc/PID/stat field 22, clock
// ticks after boot). Together with the PID it names one process for good.
func startTime(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, errESRCH) {
			return 0, fmt.Errorf("process %d: %w", pid, ErrProcessGone)
		}
		return 0, fmt.Errorf("read start time of %d: %w", pid, err)
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("read start time of %d: no comm in /proc/%d/stat", pid, pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state): field 22 is f[19].
	if len(f) < 20 {
		return 0, fmt.Errorf("read start time of %d: /proc/%d/stat has %d fields", pid, pid, len(f)+2)
	}
	if f[0] == "Z" || f[0] == "X" {
		return 0, fmt.Errorf("process %d is a zombie: %w", pid, ErrProcessGone)
	}
	v, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("read start time of %d: %w", pid, err)
	}
	return v, nil
}

// effectiveUID returns the effective user ID of pid.
func effectiveUID(pid int) (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return -1, fmt.Errorf("read status of %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Uid:"); ok {
			f := strings.Fields(v)
			if len(f) >= 2 {
				return strconv.Atoi(f[1])
			}
		}
	}
	return -1, fmt.Errorf("read status of %d: no Uid line", pid)
}
