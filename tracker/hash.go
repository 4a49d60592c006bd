package tracker

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/internal/pagereader"
	"github.com/phaul/phaul/protocol/imagepb"
)

// hashBatch is how much memory the hash backend reads at once.
const hashBatch = 8 << 20

// hashTracker finds changed pages by their contents: it keeps a digest of
// every page as last recorded and, each round, reads every present page
// and compares. It needs nothing from the kernel but process_vm_readv and
// never stops the process; it costs one read of all memory per round.
//
// The digest kept for a page is that of the bytes a dump recorded for it
// (Saved), or else of the bytes this backend read. A round reads while the
// process runs, so a page written during the read may be read half old,
// half new; its digest then matches neither the old nor the final
// contents, and as long as the recorded bytes are not the current ones the
// digests differ and the page is reported again. A page reported clean
// has, up to a digest collision (2^-64), the contents recorded. The final
// round runs with the process frozen, so its answer is exact.
type hashTracker struct {
	*base
	pm     *Pagemap
	rd     *pagereader.Reader
	areas  []digestArea // in address order, not overlapping
	buf    []byte
	cursor int // lookup position in areas
}

// digestArea holds the digests of the pages from start on; 0 stands for a
// page that was not present.
type digestArea struct {
	start uint64
	d     []uint64
}

func (a *digestArea) end() uint64 { return a.start + uint64(len(a.d))*PageSize }

func (t *hashTracker) start(ctx context.Context) error {
	if err := t.open(); err != nil {
		return err
	}
	t.last = time.Now()
	return nil
}

func (t *hashTracker) resume(ctx context.Context, st *imagepb.TrackerState) error {
	if err := t.open(); err != nil {
		return err
	}
	if t.reset != "" {
		return nil
	}
	for _, h := range st.GetHashed() {
		if h.GetStart()%PageSize != 0 || len(h.GetDigests()) == 0 {
			return fmt.Errorf("%w: hashed area at %#x", ErrBadState, h.GetStart())
		}
		a := digestArea{start: h.GetStart(), d: h.GetDigests()}
		if n := len(t.areas); n > 0 && t.areas[n-1].end() > a.start {
			return fmt.Errorf("%w: hashed areas overlap at %#x", ErrBadState, a.start)
		}
		t.areas = append(t.areas, a)
	}
	return nil
}

func (t *hashTracker) open() error {
	pm, err := OpenPagemap(t.pid)
	if err != nil {
		return err
	}
	rd, err := pagereader.Open(t.pid)
	if err != nil {
		pm.Close()
		return err
	}
	t.pm, t.rd = pm, rd
	return nil
}

// old returns the digest recorded for the page at addr (0: none). Calls
// with increasing addresses are cheap.
func (t *hashTracker) old(addr uint64) uint64 {
	as := t.areas
	if t.cursor >= len(as) || as[t.cursor].start > addr {
		t.cursor = sort.Search(len(as), func(i int) bool { return as[i].end() > addr })
	}
	for t.cursor < len(as) && as[t.cursor].end() <= addr {
		t.cursor++
	}
	if t.cursor < len(as) && as[t.cursor].start <= addr {
		a := &as[t.cursor]
		return a.d[(addr-a.start)/PageSize]
	}
	return 0
}

func (t *hashTracker) Round(ctx context.Context) (*Delta, error) { return t.round(ctx, nil) }

// FinalRound is a round over maps: comparing digests arms nothing, so
// there is nothing to leave out.
func (t *hashTracker) FinalRound(ctx context.Context, maps []proc.Mapping) (*Delta, error) {
	return t.round(ctx, maps)
}

// round compares the digests of the pages of maps (nil: /proc/PID/maps)
// with those of the previous round.
func (t *hashTracker) round(ctx context.Context, maps []proc.Mapping) (*Delta, error) {
	start := time.Now()
	if t.pm == nil {
		return nil, fmt.Errorf("tracking round of %d: tracker closed", t.pid)
	}
	areas, err := areasIn(t.pid, maps)
	if err != nil {
		return nil, fmt.Errorf("tracking round of %d: %w", t.pid, t.gone(err))
	}
	d := t.newDelta(time.Now(), areas)
	if t.buf == nil {
		t.buf = make([]byte, hashBatch)
	}
	fresh := make([]digestArea, len(areas))
	var dirty Ranges
	t.cursor = 0
	for i, a := range areas {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		cur := digestArea{start: a.Start, d: make([]uint64, a.Pages())}
		if err := t.digest(a, &cur); err != nil {
			return nil, fmt.Errorf("tracking round of %d: %w", t.pid, t.gone(err))
		}
		for p, h := range cur.d {
			addr := a.Start + uint64(p)*PageSize
			if h != t.old(addr) {
				dirty.Add(addr, addr+PageSize)
			}
		}
		fresh[i] = cur
	}
	t.areas = fresh
	d.Dirty = dirty
	if _, err := startTime(t.pid); err != nil {
		return nil, fmt.Errorf("tracking round of %d: %w", t.pid, err)
	}
	return t.finish(d, start), nil
}

// digest reads the present pages of a and fills in their digests.
func (t *hashTracker) digest(a Area, out *digestArea) error {
	present, err := t.pm.Present(a)
	if err != nil {
		return err
	}
	spans := make([]pagereader.Span, len(present))
	for i, r := range present {
		spans[i] = pagereader.Span{Addr: r.Start, Pages: r.Pages()}
	}
	for len(spans) > 0 {
		var runs []pagereader.Run
		runs, spans, err = t.rd.Batch(spans, a.Readable, t.buf)
		if err != nil {
			return err
		}
		for _, r := range runs {
			i := (r.Addr - out.start) / PageSize
			for off := 0; off < len(r.Data); off += PageSize {
				out.d[i] = pageDigest(r.Data[off : off+PageSize])
				i++
			}
		}
	}
	return nil
}

// Saved records the digests of the bytes recorded for the pages at addr.
func (t *hashTracker) Saved(addr uint64, data []byte) {
	for off := 0; off+PageSize <= len(data); off += PageSize {
		p := addr + uint64(off)
		i := sort.Search(len(t.areas), func(i int) bool { return t.areas[i].end() > p })
		if i < len(t.areas) && t.areas[i].start <= p {
			a := &t.areas[i]
			a.d[(p-a.start)/PageSize] = pageDigest(data[off : off+PageSize])
		}
	}
}

func (t *hashTracker) Park(dir string) error {
	st := t.state()
	for _, a := range t.areas {
		st.Hashed = append(st.Hashed, &imagepb.HashedArea{Start: a.start, Digests: a.d})
	}
	if err := writeState(dir, st); err != nil {
		return fmt.Errorf("park tracking of %d: %w", t.pid, err)
	}
	return t.Close()
}

// Stop has nothing to remove from the process.
func (t *hashTracker) Stop() error { return t.Close() }

func (t *hashTracker) Close() error {
	var err error
	if t.rd != nil {
		err = t.rd.Close()
		t.rd = nil
	}
	if perr := t.pm.Close(); err == nil {
		err = perr
	}
	t.pm = nil
	t.areas = nil
	return err
}
