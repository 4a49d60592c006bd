package predump

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/internal/pagereader"
	"github.com/phaul/phaul/tracker"
)

// PageSize is the size of the pages a round moves.
const PageSize = tracker.PageSize

// Sink receives the pages of one round, in increasing address order, with
// no page given twice.
type Sink interface {
	// WritePages records the data of the pages at addr (whole pages; the
	// slice is not retained after the call).
	WritePages(addr uint64, data []byte) error
	// ZeroPages records n pages at addr whose contents are all zero.
	ZeroPages(addr, n uint64) error
	// KeepPages records n pages at addr as unchanged since the previous
	// round: their contents are what that round recorded.
	KeepPages(addr, n uint64) error
	// Done ends the round. Pages of the previous round that were not
	// mentioned are gone.
	Done() error
}

// Options configure one round.
type Options struct {
	// Previous holds the pages the previous round recorded (present in its
	// copy); nil when there is none, and every present page is read.
	Previous tracker.Ranges
	// Layout, when set, bounds the round to these address ranges: the
	// mappings the copy was told about before the round (a migration
	// target maps them first). Present pages outside it (memory mapped
	// since) are left to a later round: Result.Deferred.
	Layout tracker.Ranges
	// Deferred holds the pages earlier rounds left out (their
	// Result.Deferred): read if present, whatever the tracker says.
	Deferred tracker.Ranges
	// Buffers, when set, holds the read buffers from one round to the
	// next; nil allocates them for the round.
	Buffers *Buffers
}

// Buffers are the read buffers of a series of rounds. A round that takes
// them from the previous one reads into memory that is already there:
// each page of a fresh buffer costs a page fault and clearing (an 8 MiB
// buffer took 20 ms on a 2-vCPU VM), which a short round, or the final
// one inside the downtime, notices. The zero value is ready; a Buffers
// serves one round at a time.
type Buffers struct {
	mu   sync.Mutex
	free [][]byte
}

// get returns a buffer of size bytes, reusing a kept one that is large
// enough.
func (b *Buffers) get(size int) []byte {
	if b != nil {
		b.mu.Lock()
		defer b.mu.Unlock()
		for i, buf := range b.free {
			if cap(buf) >= size {
				b.free = append(b.free[:i], b.free[i+1:]...)
				return buf[:size]
			}
		}
	}
	return make([]byte, size)
}

// put keeps buf for a later round.
func (b *Buffers) put(buf []byte) {
	if b == nil || buf == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.free) < readBuffers {
		b.free = append(b.free, buf[:cap(buf)])
	}
}

// Stats describe one round.
type Stats struct {
	Round int `json:"round"`
	// PagesScanned counts the pages of the mappings the round covered.
	PagesScanned uint64 `json:"pages_scanned"`
	// PagesPresent counts the pages the process has (present or swapped).
	PagesPresent uint64 `json:"pages_present"`
	// PagesDirty counts the present pages the tracker reported written.
	PagesDirty uint64 `json:"pages_dirty"`
	// PagesWritten counts the pages whose data went to the sink.
	PagesWritten uint64 `json:"pages_written"`
	// PagesZero counts the pages read and found all zero.
	PagesZero uint64 `json:"pages_zero"`
	// PagesKept counts the pages recorded as unchanged.
	PagesKept uint64 `json:"pages_kept"`
	// PagesGone counts the pages of the previous round that are gone.
	PagesGone    uint64 `json:"pages_gone"`
	BytesWritten uint64 `json:"bytes_written"`
	// Scan is the tracker's round; Copy the reading and recording.
	Scan     time.Duration `json:"-"`
	Copy     time.Duration `json:"-"`
	Duration time.Duration `json:"-"`
	// Since is the time since the previous round looked (0: unknown).
	Since time.Duration `json:"-"`
	// DirtyRate is PagesDirty per second of Since.
	DirtyRate float64 `json:"dirty_pages_per_sec"`
	// Reset says why every page counted as written (see tracker.Delta).
	Reset string `json:"reset,omitempty"`
}

// Result is what a round did.
type Result struct {
	Stats
	// Recorded holds every page the sink now has: the Previous of the next
	// round.
	Recorded tracker.Ranges `json:"-"`
	// Deferred holds the present pages the round left out, outside
	// Options.Layout: the Deferred of the next round.
	Deferred tracker.Ranges `json:"-"`
}

// BatchSize is the most a round reads at once (one process_vm_readv);
// readBuffers is how many such buffers the reading runs ahead of the
// recording with.
const (
	BatchSize   = 8 << 20
	readBuffers = 3
)

// op is a piece of one round's work: pages to keep, or to read.
type op struct {
	tracker.Range
	keep     bool
	readable bool
}

// batch is what the reader hands to the recorder: runs read into buf and
// the kept ranges among and before them, each in address order.
type batch struct {
	keeps []tracker.Range
	runs  []pagereader.Run
	buf   []byte
	err   error
}

// Run runs one round: it asks t what changed, reads what must be read
// while the process runs, and records everything in sink, ending with
// sink.Done. On error the sink's round is incomplete; the caller discards
// it.
func Run(ctx context.Context, t tracker.Tracker, sink Sink, opt Options) (*Result, error) {
	start := time.Now()
	pid := t.Pid()
	d, err := t.Round(ctx)
	if err != nil {
		return nil, err
	}
	res := &Result{Stats: Stats{Round: d.Round, Scan: d.Took, Since: d.Since, Reset: d.Reset, PagesScanned: d.Scanned()}}
	copyStart := time.Now()

	pm, err := tracker.OpenPagemap(pid)
	if err != nil {
		return nil, fmt.Errorf("pre-dump round of %d: %w", pid, err)
	}
	defer pm.Close()
	rd, err := pagereader.Open(pid)
	if err != nil {
		return nil, fmt.Errorf("pre-dump round of %d: %w", pid, err)
	}
	defer rd.Close()

	// Pages recorded by the previous round and not written since.
	keepable := tracker.Intersect(opt.Previous, d.Unchanged())
	// After the first round, a page outside what was recorded and what
	// was written since cannot hold anything of the process's own.
	var within, changed tracker.Ranges
	if opt.Previous != nil {
		changed = append(tracker.Ranges{}, tracker.Union(d.Dirty, opt.Deferred)...) // never nil: nil means all
		within = tracker.Union(opt.Previous, changed)
	}
	var deferred []tracker.Range
	var ops []op
	for _, a := range d.Areas {
		w, assumed := within, tracker.Ranges(nil)
		look := true
		if opt.Previous != nil && d.DropsReported && !a.File && !a.Shared {
			// Private anonymous memory loses a page only with a report
			// of it: the kept pages are there, and the walk (over every
			// kept page, inside the downtime for the final round) is
			// only for what changed.
			in := tracker.Ranges{a.Range}
			w, assumed = changed, tracker.Intersect(keepable, in)
			if d.Seen != nil {
				// The round saw which written pages are still there:
				// only the others need the walk (one per scattered
				// page, a millisecond per hundred in the final round).
				w = tracker.Subtract(tracker.Intersect(changed, in), d.Seen)
				assumed = tracker.Union(assumed, tracker.Intersect(d.Present, in))
				look = len(w) > 0 // nil would mean the whole area
			}
		}
		var present tracker.Ranges
		if look {
			if present, err = pm.PresentWithin(a, w); err != nil {
				return nil, fmt.Errorf("pre-dump round of %d: %w", pid, err)
			}
		}
		present = tracker.Union(present, assumed)
		if opt.Layout != nil {
			deferred = append(deferred, tracker.Subtract(present, opt.Layout)...)
			present = tracker.Intersect(present, opt.Layout)
		}
		res.PagesPresent += present.Pages()
		res.PagesDirty += tracker.Intersect(present, d.Dirty).Pages()
		keep := tracker.Intersect(present, keepable)
		read := tracker.Subtract(present, keepable)
		for len(keep) > 0 || len(read) > 0 {
			if len(read) == 0 || len(keep) > 0 && keep[0].Start < read[0].Start {
				ops = append(ops, op{Range: keep[0], keep: true})
				keep = keep[1:]
			} else {
				ops = append(ops, op{Range: read[0], readable: a.Readable})
				read = read[1:]
			}
		}
	}

	res.Deferred = tracker.Normalize(deferred)
	done := make(chan struct{})
	defer close(done)
	free := make(chan []byte, readBuffers)
	defer keepBuffers(opt.Buffers, free)
	for b := range readAll(rd, ops, opt.Buffers, free, done) {
		if b.err != nil {
			return nil, fmt.Errorf("pre-dump round of %d: %w", pid, b.err)
		}
		if err := record(t, sink, b, res); err != nil {
			return nil, fmt.Errorf("pre-dump round of %d: %w", pid, err)
		}
		if b.buf != nil {
			free <- b.buf
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}
	if err := sink.Done(); err != nil {
		return nil, fmt.Errorf("pre-dump round of %d: %w", pid, err)
	}
	res.PagesGone = tracker.Subtract(opt.Previous, res.Recorded).Pages()
	res.BytesWritten = res.PagesWritten * PageSize
	res.Copy = time.Since(copyStart)
	res.Duration = time.Since(start)
	if res.Since > 0 {
		res.DirtyRate = float64(res.PagesDirty) / res.Since.Seconds()
	}
	return res, nil
}

// keepBuffers hands the buffers that came back through free to keep. The
// round's reader has stopped by then: its batches were all received, or
// the round failed (and a buffer it still holds is left to the garbage
// collector).
func keepBuffers(keep *Buffers, free chan []byte) {
	for {
		select {
		case buf := <-free:
			keep.put(buf)
		default:
			return
		}
	}
}

// readAll reads the pages of ops in a goroutine and returns the channel
// the batches come out of, in order. Buffers come from keep (when not
// nil) or are allocated, at most readBuffers of them, and come back
// through free. Closing done stops the goroutine.
func readAll(rd *pagereader.Reader, ops []op, keep *Buffers, free chan []byte, done <-chan struct{}) <-chan batch {
	out := make(chan batch, readBuffers-1)
	go func() {
		defer close(out)
		send := func(b batch) bool {
			select {
			case out <- b:
				return true
			case <-done:
				return false
			}
		}
		// Buffers no larger than what there is to read: a round that
		// reads a few pages should not clear megabytes.
		size := 0
		for _, o := range ops {
			if !o.keep && size < BatchSize {
				size += int(o.Pages()) * PageSize
			}
		}
		size = min(size, BatchSize)
		allocated := 0
		getBuf := func() []byte {
			select {
			case buf := <-free:
				return buf
			default:
			}
			if allocated < readBuffers {
				allocated++
				return keep.get(size)
			}
			select {
			case buf := <-free:
				return buf
			case <-done:
				return nil
			}
		}
		for i := 0; i < len(ops); {
			// The ranges to read up to the next change of readability,
			// with the kept ranges among them: one read fetches pages on
			// both sides of a kept range (scattered dirty pages, as in a
			// final round, make one batch, not one per page).
			var spans []pagereader.Span
			var keeps []tracker.Range
			readable := false
			for ; i < len(ops); i++ {
				o := ops[i]
				if o.keep {
					keeps = append(keeps, o.Range)
					continue
				}
				if len(spans) > 0 && o.readable != readable {
					break
				}
				readable = o.readable
				spans = append(spans, pagereader.Span{Addr: o.Start, Pages: o.Pages()})
			}
			for len(spans) > 0 {
				buf := getBuf()
				if buf == nil {
					return
				}
				runs, rest, err := rd.Batch(spans, readable, buf)
				spans = rest
				// The kept ranges before what is left go with this batch.
				n := len(keeps)
				if len(rest) > 0 {
					n = sort.Search(len(keeps), func(k int) bool { return keeps[k].Start >= rest[0].Addr })
				}
				if !send(batch{keeps: keeps[:n], runs: runs, buf: buf, err: err}) || err != nil {
					return
				}
				keeps = keeps[n:]
			}
			if len(keeps) > 0 && !send(batch{keeps: keeps}) {
				return
			}
		}
	}()
	return out
}

// record hands one batch to the sink, in address order.
func record(t tracker.Tracker, sink Sink, b batch, res *Result) error {
	keeps := b.keeps
	keepBefore := func(addr uint64) error {
		for len(keeps) > 0 && keeps[0].Start < addr {
			k := keeps[0]
			keeps = keeps[1:]
			if err := sink.KeepPages(k.Start, k.Pages()); err != nil {
				return err
			}
			res.PagesKept += k.Pages()
			res.Recorded.Add(k.Start, k.End)
		}
		return nil
	}
	for _, r := range b.runs {
		if err := keepBefore(r.Addr); err != nil {
			return err
		}
		// Split into zero and data pieces, page by page.
		for off := 0; off < len(r.Data); {
			zero := image.IsZero(r.Data[off : off+PageSize])
			end := off + PageSize
			for end < len(r.Data) && image.IsZero(r.Data[end:end+PageSize]) == zero {
				end += PageSize
			}
			addr := r.Addr + uint64(off)
			n := uint64(end-off) / PageSize
			var err error
			if zero {
				err = sink.ZeroPages(addr, n)
				res.PagesZero += n
			} else {
				err = sink.WritePages(addr, r.Data[off:end])
				res.PagesWritten += n
			}
			if err != nil {
				return err
			}
			t.Saved(addr, r.Data[off:end])
			off = end
		}
		res.Recorded.Add(r.Addr, r.Addr+uint64(len(r.Data)))
	}
	return keepBefore(^uint64(0))
}
