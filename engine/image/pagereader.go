package image

import (
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"

	"github.com/phaul/phaul/protocol/imagepb"
)

// Pages is the page data of one process in one image: the validated runs
// of its page map and the open pages file they point into.
type Pages struct {
	Dir  string
	PID  int
	Runs []*imagepb.PageRun
	f    *os.File
	size int64
}

// OpenPages opens the pages of pid in the checkpoint directory dir and
// validates its page map against the pages file.
func OpenPages(dir string, pid int) (*Pages, error) {
	d := Dir{Path: dir}
	f, size, err := openPagesFile(d.PagesPath(pid), pid)
	if err != nil {
		return nil, err
	}
	pm, err := d.readPageMap(pid, size)
	if err != nil {
		f.Close()
		return nil, err
	}
	return &Pages{Dir: dir, PID: pid, Runs: pm.GetRuns(), f: f, size: size}, nil
}

// File returns the open pages file, for large reads (or mmap) at the
// offsets of PAGES_HERE runs. Such reads skip the checksum check of
// ReadRun; Verify does it once for all runs.
func (p *Pages) File() *os.File { return p.f }

// Path returns the path of the pages file.
func (p *Pages) Path() string { return Dir{Path: p.Dir}.PagesPath(p.PID) }

// Close closes the pages file.
func (p *Pages) Close() error {
	if p.f == nil {
		return nil
	}
	return p.f.Close()
}

// RunBytes returns the size in bytes of the pages of PAGES_HERE run r (at
// most 64 MiB in a validated page map).
func RunBytes(r *imagepb.PageRun) int { return int(r.GetNrPages()) * PageSize }

// ReadRun reads the pages of PAGES_HERE run r (one of p.Runs) into the
// first RunBytes(r) bytes of dst and checks their checksum.
func (p *Pages) ReadRun(r *imagepb.PageRun, dst []byte) error {
	if r.GetSource() != imagepb.PageSource_PAGES_HERE {
		return fmt.Errorf("read %s: run at %#x has no data here (%v)", p.Path(), r.GetAddr(), r.GetSource())
	}
	if err := ValidatePageMap(&imagepb.PageMap{Runs: []*imagepb.PageRun{r}}, p.size); err != nil {
		return fmt.Errorf("read %s: %w", p.Path(), err)
	}
	n := RunBytes(r)
	if len(dst) < n {
		return fmt.Errorf("read %s: run at %#x is %d bytes, buffer holds %d", p.Path(), r.GetAddr(), n, len(dst))
	}
	if p.f == nil {
		return fmt.Errorf("read %s: pages file not open", p.Path())
	}
	if _, err := p.f.ReadAt(dst[:n], int64(r.GetFileOffset())); err != nil {
		if err == io.EOF {
			err = fmt.Errorf("%w: the file ends inside the run", ErrTruncated)
		}
		return fmt.Errorf("read %s: run at %#x: %w", p.Path(), r.GetAddr(), bare(err))
	}
	if got := crc32.Checksum(dst[:n], castagnoli); got != r.GetCrc32C() {
		return fmt.Errorf("read %s: run at %#x: %w: CRC-32C is %#08x, page map says %#08x",
			p.Path(), r.GetAddr(), ErrChecksum, got, r.GetCrc32C())
	}
	return nil
}

// Verify reads every PAGES_HERE run and checks its checksum.
func (p *Pages) Verify() error {
	var buf []byte
	for _, r := range p.Runs {
		if r.GetSource() != imagepb.PageSource_PAGES_HERE {
			continue
		}
		if n := RunBytes(r); len(buf) < n {
			buf = make([]byte, n)
		}
		if err := p.ReadRun(r, buf); err != nil {
			return err
		}
	}
	return nil
}

// MaxChainDepth bounds the number of parents OpenChain follows.
const MaxChainDepth = 32

// Extent is a range of pages of a process after chain resolution: either
// zero, or data at Offset in a pages file.
type Extent struct {
	Addr    uint64
	NrPages uint64
	// Zero: the pages are zero (restored as holes); Pages is nil.
	Zero bool
	// Pages holds the data, at Offset in Pages.File().
	Pages  *Pages
	Offset int64
	// Dir is the image the extent comes from; Depth is its distance from
	// the image asked for (0 for itself, 1 for its parent, ...).
	Dir   string
	Depth int
}

// End returns the address after the extent.
func (e Extent) End() uint64 { return e.Addr + e.NrPages*PageSize }

// Chain is the pages of one process in an image and in as many of its
// parents as its PAGES_IN_PARENT runs need.
type Chain struct {
	// Images are the opened images, newest first: Images[i] is at depth i.
	Images []*Pages
	// Extents is where every page of the newest image's page map is, in
	// address order, each from the newest image that has it.
	Extents []Extent

	pid     int
	parents []string // parents[i] is the parent directory of Images[i], "" if none
	open    func(dir string, pid int) (*Pages, string, error)
}

// OpenChain opens the pages of pid in the image dir and resolves its
// PAGES_IN_PARENT runs through the parents named by the inventories
// (relative to the naming image, or absolute), up to MaxChainDepth deep.
// The returned Chain holds the pages files open; close it with Close.
func OpenChain(dir string, pid int) (*Chain, error) {
	c := &Chain{pid: pid, open: openChainLevel}
	if err := c.push(dir); err != nil {
		return nil, err
	}
	if err := c.resolve(); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// openChainLevel opens the pages of pid in dir and returns them with the
// path of dir's parent image ("" if none).
func openChainLevel(dir string, pid int) (*Pages, string, error) {
	inv, err := Dir{Path: dir}.ReadInventory()
	if err != nil {
		return nil, "", err
	}
	p, err := OpenPages(dir, pid)
	if err != nil {
		return nil, "", err
	}
	parent := inv.GetParent()
	if parent != "" && !filepath.IsAbs(parent) {
		parent = filepath.Join(dir, parent)
	}
	return p, parent, nil
}

// push opens dir as the next (older) image of the chain.
func (c *Chain) push(dir string) error {
	if len(c.Images) > MaxChainDepth {
		return corruptf("image %s: parent chain deeper than %d", c.Images[0].Dir, MaxChainDepth)
	}
	key := chainKey(dir)
	for _, im := range c.Images {
		if chainKey(im.Dir) == key {
			return corruptf("image %s: parent chain loops back to %s", c.Images[len(c.Images)-1].Dir, dir)
		}
	}
	p, parent, err := c.open(dir, c.pid)
	if err != nil {
		if len(c.Images) > 0 {
			return fmt.Errorf("parent of image %s: %w", c.Images[len(c.Images)-1].Dir, err)
		}
		return err
	}
	c.Images = append(c.Images, p)
	c.parents = append(c.parents, parent)
	return nil
}

// chainKey identifies a directory for loop detection.
func chainKey(dir string) string {
	if p, err := filepath.EvalSymlinks(dir); err == nil {
		dir = p
	}
	if p, err := filepath.Abs(dir); err == nil {
		dir = p
	}
	return filepath.Clean(dir)
}

// Close closes the pages files of every image of the chain.
func (c *Chain) Close() error {
	var errs []error
	for _, p := range c.Images {
		errs = append(errs, p.Close())
	}
	return errors.Join(errs...)
}

// Verify checks the checksum of every PAGES_HERE run of every image of the
// chain that an extent uses.
func (c *Chain) Verify() error {
	used := make(map[*imagepb.PageRun]*Pages)
	for _, e := range c.Extents {
		if e.Zero {
			continue
		}
		for _, r := range runsAt(e.Pages.Runs, e.Addr, e.End()) {
			used[r] = e.Pages
		}
	}
	var buf []byte
	for _, p := range c.Images {
		for _, r := range p.Runs {
			if used[r] == nil {
				continue
			}
			if n := RunBytes(r); len(buf) < n {
				buf = make([]byte, n)
			}
			if err := p.ReadRun(r, buf); err != nil {
				return err
			}
		}
	}
	return nil
}

// runsAt returns the runs of sorted runs that overlap [addr, end).
func runsAt(runs []*imagepb.PageRun, addr, end uint64) []*imagepb.PageRun {
	i := sort.Search(len(runs), func(i int) bool { return runEnd(runs[i]) > addr })
	j := i
	for j < len(runs) && runs[j].GetAddr() < end {
		j++
	}
	return runs[i:j]
}

// resolve computes c.Extents from c.Images[0], opening parents as needed.
func (c *Chain) resolve() error {
	for _, r := range c.Images[0].Runs {
		if err := c.resolveRange(0, r.GetAddr(), runEnd(r)); err != nil {
			return fmt.Errorf("resolve pages of pid %d: %w", c.pid, err)
		}
	}
	return nil
}

// resolveRange appends the extents of [addr, end) as image depth has them.
func (c *Chain) resolveRange(depth int, addr, end uint64) error {
	p := c.Images[depth]
	for _, r := range runsAt(p.Runs, addr, end) {
		start := max(addr, r.GetAddr())
		if start > addr {
			break // a hole before r, reported below
		}
		stop := min(end, runEnd(r))
		e := Extent{Addr: start, NrPages: (stop - start) / PageSize, Dir: p.Dir, Depth: depth}
		switch r.GetSource() {
		case imagepb.PageSource_PAGES_HERE:
			e.Pages = p
			e.Offset = int64(r.GetFileOffset() + (start - r.GetAddr()))
			c.add(e)
		case imagepb.PageSource_PAGES_ZERO:
			e.Zero = true
			c.add(e)
		case imagepb.PageSource_PAGES_IN_PARENT:
			if err := c.resolveParent(depth, start, stop); err != nil {
				return err
			}
		}
		addr = stop
	}
	if addr < end {
		return corruptf("image %s: no pages at %#x (needed by its child %s)", p.Dir, addr, c.Images[max(depth-1, 0)].Dir)
	}
	return nil
}

// resolveParent resolves [addr, end), which image depth says is in its
// parent.
func (c *Chain) resolveParent(depth int, addr, end uint64) error {
	if depth+1 == len(c.Images) {
		parent := c.parents[depth]
		if parent == "" {
			return corruptf("image %s: pages at %#x are in the parent image, but it has no parent", c.Images[depth].Dir, addr)
		}
		if err := c.push(parent); err != nil {
			return fmt.Errorf("pages at %#x: %w", addr, err)
		}
	}
	return c.resolveRange(depth+1, addr, end)
}

// add appends e to c.Extents, merging it into the last extent when both
// come from the same image and continue each other.
func (c *Chain) add(e Extent) {
	if n := len(c.Extents); n > 0 {
		last := &c.Extents[n-1]
		if last.End() == e.Addr && last.Depth == e.Depth && last.Zero == e.Zero &&
			(e.Zero || last.Offset+int64(last.NrPages*PageSize) == e.Offset) {
			last.NrPages += e.NrPages
			return
		}
	}
	c.Extents = append(c.Extents, e)
}
