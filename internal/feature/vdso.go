package feature

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/phaul/phaul/internal/sys"
)

// vdsoNames are the kernel-provided mappings that make up the vdso.
var vdsoNames = map[string]bool{"[vvar]": true, "[vvar_vclock]": true, "[vdso]": true}

// VDSORegion is one of the mappings of the vdso: "[vvar]", "[vvar_vclock]"
// or "[vdso]".
type VDSORegion struct {
	Name  string
	Start uint64
	End   uint64
}

// Size is the region's length in bytes.
func (r VDSORegion) Size() uint64 { return r.End - r.Start }

// VDSOLayout is how the kernel lays out the vdso in a process: the regions
// in address order. The layout (names, sizes, relative offsets) is the same
// in every process on one kernel; only the base moves.
type VDSOLayout struct {
	Regions []VDSORegion
}

// Base is the lowest address of the layout.
func (l VDSOLayout) Base() uint64 {
	if len(l.Regions) == 0 {
		return 0
	}
	return l.Regions[0].Start
}

// Span is the distance from the first region's start to the last one's end.
func (l VDSOLayout) Span() uint64 {
	if len(l.Regions) == 0 {
		return 0
	}
	return l.Regions[len(l.Regions)-1].End - l.Regions[0].Start
}

// Contiguous reports whether each region starts where the previous ends,
// so that the whole layout moves as one block.
func (l VDSOLayout) Contiguous() bool {
	for i := 1; i < len(l.Regions); i++ {
		if l.Regions[i].Start != l.Regions[i-1].End {
			return false
		}
	}
	return true
}

// Region returns the region called name ("[vdso]", ...).
func (l VDSOLayout) Region(name string) (VDSORegion, bool) {
	for _, r := range l.Regions {
		if r.Name == name {
			return r, true
		}
	}
	return VDSORegion{}, false
}

// String describes the layout, e.g. "vvar 4 pages at +0x0, vvar_vclock 2
// pages at +0x4000, vdso 2 pages at +0x6000, contiguous".
func (l VDSOLayout) String() string {
	parts := make([]string, 0, len(l.Regions)+1)
	for _, r := range l.Regions {
		parts = append(parts, fmt.Sprintf("%s %d pages at +%#x",
			strings.Trim(r.Name, "[]"), r.Size()/uint64(sys.Pagesize), r.Start-l.Base()))
	}
	if l.Contiguous() {
		parts = append(parts, "contiguous")
	} else {
		parts = append(parts, "not contiguous")
	}
	return strings.Join(parts, ", ")
}

// errNoVDSO is returned by ParseVDSOLayout for maps without a [vdso].
var errNoVDSO = errors.New("no [vdso] mapping")

// ParseVDSOLayout reads the vdso layout from a /proc/PID/maps text. It fails
// when there is no [vdso] mapping (a kernel booted with vdso=0, for one).
func ParseVDSOLayout(r io.Reader) (VDSOLayout, error) {
	var l VDSOLayout
	s := bufio.NewScanner(r)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 6 || !vdsoNames[fields[5]] {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			return VDSOLayout{}, fmt.Errorf("parse maps line %q: no address range", s.Text())
		}
		start, err := strconv.ParseUint(lo, 16, 64)
		if err != nil {
			return VDSOLayout{}, fmt.Errorf("parse maps line %q: %w", s.Text(), err)
		}
		end, err := strconv.ParseUint(hi, 16, 64)
		if err != nil || end <= start {
			return VDSOLayout{}, fmt.Errorf("parse maps line %q: bad range", s.Text())
		}
		l.Regions = append(l.Regions, VDSORegion{Name: fields[5], Start: start, End: end})
	}
	if err := s.Err(); err != nil {
		return VDSOLayout{}, fmt.Errorf("read maps: %w", err)
	}
	if _, ok := l.Region("[vdso]"); !ok {
		return VDSOLayout{}, errNoVDSO
	}
	return l, nil // maps lists mappings in address order
}

// selfVDSO is this process's layout, read once.
var selfVDSO = sync.OnceValues(func() (VDSOLayout, error) {
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return VDSOLayout{}, err
	}
	defer f.Close()
	return ParseVDSOLayout(f)
})

// CurrentVDSOLayout returns the vdso layout of this kernel, as found in
// /proc/self/maps (read once per process). Its error is VDSO's.
func CurrentVDSOLayout() (VDSOLayout, error) {
	l, err := selfVDSO()
	if err != nil {
		return VDSOLayout{}, VDSO()
	}
	return l, nil
}

func probeVDSOLayout() (string, error) {
	l, err := selfVDSO()
	if errors.Is(err, errNoVDSO) {
		return "", absent("no [vdso] in /proc/self/maps", nil)
	}
	if err != nil {
		return "", err
	}
	return l.String(), nil
}
