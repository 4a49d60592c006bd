package tracker

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/internal/feature"
	"github.com/phaul/phaul/internal/sys"
)

// scanVecLen is how many regions one PAGEMAP_SCAN call may return.
const scanVecLen = 4096

// Pagemap reads which pages of a process exist, from /proc/PID/pagemap:
// with the PAGEMAP_SCAN ioctl where the kernel has it (one call returns
// runs of pages), else entry by entry.
type Pagemap struct {
	pid  int
	f    *os.File
	scan bool
	vec  []sys.PageRegion
	used int // entries of vec the last scan may have written
	ents []byte
}

// OpenPagemap opens the pagemap of pid.
func OpenPagemap(pid int) (*Pagemap, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", pid))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("open pagemap of %d: %w", pid, ErrProcessGone)
		}
		return nil, fmt.Errorf("open pagemap of %d: %w", pid, err)
	}
	return &Pagemap{pid: pid, f: f, scan: feature.PagemapScan() == nil}, nil
}

// Close closes the pagemap.
func (p *Pagemap) Close() error {
	if p == nil || p.f == nil {
		return nil
	}
	err := p.f.Close()
	p.f = nil
	return err
}

// fd returns the descriptor for ioctls.
func (p *Pagemap) fd() int { return int(p.f.Fd()) }

// Scan runs PAGEMAP_SCAN over [start, end) with arg's flags and masks,
// following the walk until end, and appends the regions found to out.
//
// A call that fails half-way (PM_SCAN_CHECK_WPASYNC meeting a mapping
// not registered, for instance) may already have reported, and with
// PM_SCAN_WP_MATCHING write-protected, regions without saying how many:
// the vector is cleared before each call so that they can be told from
// the rest, and they are returned with the error.
func (p *Pagemap) Scan(start, end uint64, arg sys.PmScanArg, out []sys.PageRegion) ([]sys.PageRegion, error) {
	if p.vec == nil {
		p.vec = make([]sys.PageRegion, scanVecLen)
	}
	for cur := start; cur < end; {
		// Only what the last call may have written needs clearing.
		clear(p.vec[:p.used])
		a := arg
		a.Start, a.End = cur, end
		n, err := sys.PagemapScan(p.fd(), &a, p.vec)
		if err != nil {
			p.used = len(p.vec)
			for _, r := range p.vec {
				if r.End == 0 {
					break
				}
				out = append(out, r)
			}
			return out, fmt.Errorf("scan pages %#x-%#x of %d: %w", cur, end, p.pid, err)
		}
		p.used = n
		out = append(out, p.vec[:n]...)
		if a.WalkEnd <= cur {
			return out, fmt.Errorf("scan pages %#x-%#x of %d: the walk stopped at %#x", cur, end, p.pid, a.WalkEnd)
		}
		cur = a.WalkEnd
	}
	return out, nil
}

// Present returns the pages of area a whose contents are the process's
// own: present or swapped out, and in a private file mapping only those
// no longer the file's (copied on write). A page of the shared zero page
// is present: it reads as zeros.
func (p *Pagemap) Present(a Area) (Ranges, error) { return p.PresentWithin(a, nil) }

// PresentWithin is Present asked only of the pages in within (nil: all of
// a); pages outside it are left out of the answer. A pre-copy round after
// the first asks only of the pages recorded before and those written since:
// any other page holds nothing of the process's own, and a large sparse
// mapping, whose unpopulated pages carry userfaultfd markers the walk must
// visit, is not walked whole again on every round.
//
// Ranges of within less than lookGap apart are walked as one and the
// answer cut back to them: walking a few hundred pages costs less than a
// system call, and the pages written between two rounds are scattered
// (1,600 of them over 1 GiB took 1,600 scans and 10 ms).
func (p *Pagemap) PresentWithin(a Area, within Ranges) (Ranges, error) {
	look := Ranges{a.Range}
	if within != nil {
		look = Intersect(look, within)
	}
	var out Ranges
	for i := 0; i < len(look); {
		j := i + 1
		for j < len(look) && look[j].Start-look[j-1].End <= lookGap {
			j++
		}
		walk := Area{Range: Range{look[i].Start, look[j-1].End}, File: a.File}
		var got Ranges
		var err error
		if p.scan {
			got, err = p.presentScan(walk)
		} else {
			got, err = p.presentEntries(walk)
		}
		if err != nil {
			return nil, err
		}
		if j-i > 1 {
			got = Intersect(got, look[i:j])
		}
		for _, g := range got {
			out.Add(g.Start, g.End)
		}
		i = j
	}
	return out, nil
}

// lookGap is the widest gap between two ranges PresentWithin walks over.
const lookGap = 256 * PageSize

func (p *Pagemap) presentScan(a Area) (Ranges, error) {
	regs, err := p.Scan(a.Start, a.End, sys.PmScanArg{
		CategoryAnyofMask: sys.PAGE_IS_PRESENT | sys.PAGE_IS_SWAPPED,
		ReturnMask:        sys.PAGE_IS_PRESENT | sys.PAGE_IS_SWAPPED | sys.PAGE_IS_FILE,
	}, nil)
	if err != nil {
		return nil, err
	}
	var out Ranges
	for _, r := range regs {
		switch {
		case r.Categories&sys.PAGE_IS_SWAPPED != 0:
			// Swapped out, or not a page at all: the kernel reports the
			// write-protect markers of userfaultfd (on pages never
			// populated, or dropped) as swap entries too. Tell them apart
			// entry by entry.
			err := p.Entries(Range{r.Start, r.End}, func(addr, e uint64) {
				if e&proc.PMSwapped != 0 && !isUffdMarker(e) {
					out.Add(addr, addr+PageSize)
				}
			})
			if err != nil {
				return nil, err
			}
		case a.File && r.Categories&sys.PAGE_IS_FILE != 0:
			// Still the file's page.
		default:
			out.Add(r.Start, r.End)
		}
	}
	return out, nil
}

// entryChunk is how many pagemap entries presentEntries reads at once.
const entryChunk = 16384

func (p *Pagemap) presentEntries(a Area) (Ranges, error) {
	var out Ranges
	err := p.Entries(a.Range, func(addr, e uint64) {
		keep := e&proc.PMPresent != 0 || e&proc.PMSwapped != 0 && !isUffdMarker(e)
		if a.File && e&proc.PMPresent != 0 && e&proc.PMFile != 0 {
			keep = false
		}
		if keep {
			out.Add(addr, addr+PageSize)
		}
	})
	return out, err
}

// isUffdMarker reports whether the swap-type pagemap entry e is a
// userfaultfd write-protect marker (no page) rather than a page swapped
// out. Markers carry the uffd-wp bit and a fixed swap type and offset,
// learned once from a marker of our own (uffdMarker). When the swap
// details are hidden (no CAP_SYS_ADMIN) a protected swap entry cannot be
// told from a marker and counts as one: a pre-dump then leaves a swapped
// protected page to a later round, which is safe (the final dump, after
// tracking is removed, records it).
func isUffdMarker(e uint64) bool {
	if e&proc.PMSwapped == 0 || e&proc.PMUffdWP == 0 {
		return false
	}
	bits := e & pfnMask
	return bits == 0 || bits == uffdMarker()
}

// uffdMarker returns the pagemap bits 0-54 of a userfaultfd write-protect
// marker on this kernel, or 0 when they cannot be learned.
var uffdMarker = sync.OnceValue(func() uint64 {
	fd, err := sys.Userfaultfd(sys.O_CLOEXEC | sys.O_NONBLOCK)
	if err != nil {
		if fd, err = sys.Userfaultfd(sys.O_CLOEXEC | sys.O_NONBLOCK | sys.UFFD_USER_MODE_ONLY); err != nil {
			return 0
		}
	}
	defer sys.Close(fd)
	if _, err := sys.UffdAPI(fd, uffdFeatures); err != nil {
		return 0
	}
	b, err := sys.Mmap(-1, 0, PageSize, sys.PROT_READ|sys.PROT_WRITE, sys.MAP_PRIVATE|sys.MAP_ANONYMOUS)
	if err != nil {
		return 0
	}
	defer sys.Munmap(b)
	addr, err := sys.BufferAddr(b)
	if err != nil {
		return 0
	}
	if _, err := sys.UffdRegister(fd, addr, PageSize, sys.UFFDIO_REGISTER_MODE_WP); err != nil {
		return 0
	}
	if err := sys.UffdWriteProtect(fd, addr, PageSize, sys.UFFDIO_WRITEPROTECT_MODE_WP); err != nil {
		return 0
	}
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return 0
	}
	defer f.Close()
	var e [8]byte
	if _, err := f.ReadAt(e[:], int64(addr/PageSize*8)); err != nil {
		return 0
	}
	v := binary.LittleEndian.Uint64(e[:])
	if v&proc.PMSwapped == 0 || v&proc.PMUffdWP == 0 {
		return 0
	}
	return v & pfnMask
})

// Entries calls fn with the address and raw pagemap entry of every page
// of r, in order.
func (p *Pagemap) Entries(r Range, fn func(addr, entry uint64)) error {
	if p.ents == nil {
		p.ents = make([]byte, 8*entryChunk)
	}
	for addr := r.Start; addr < r.End; {
		n := min((r.End-addr)/PageSize, entryChunk)
		buf := p.ents[:8*n]
		got, err := p.f.ReadAt(buf, int64(addr/PageSize*8))
		if err != nil || got != len(buf) {
			return fmt.Errorf("read pagemap of %d at %#x: %w", p.pid, addr, err)
		}
		for i := uint64(0); i < n; i++ {
			fn(addr+i*PageSize, binary.LittleEndian.Uint64(buf[8*i:]))
		}
		addr += n * PageSize
	}
	return nil
}
