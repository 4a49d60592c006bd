package engine

import (
	"fmt"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/internal/pagereader"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

const pageSize = 4096

// pageRange is a run of pages.
type pageRange = pagereader.Span

// memStats counts what a memory dump did.
type memStats struct {
	scanned, written, zero, parent uint64
}

// add counts o too.
func (m *memStats) add(o memStats) {
	m.scanned += o.scanned
	m.written += o.written
	m.zero += o.zero
	m.parent += o.parent
}

// savedPages returns the runs of pages of v whose contents belong in the
// image, judged from the pagemap: present or swapped pages of anonymous
// memory, and of private file mappings only the copied-on-write ones.
func savedPages(pm *proc.Pagemap, v *imagepb.VMA, ents []uint64) ([]pageRange, []uint64, error) {
	n := (v.End - v.Start) / pageSize
	if uint64(cap(ents)) < n {
		ents = make([]uint64, n)
	}
	ents = ents[:n]
	if err := pm.Read(v.Start, ents); err != nil {
		return nil, ents, err
	}
	fileBacked := v.Kind == imagepb.VMAKind_VMA_FILE_PRIVATE
	var runs []pageRange
	for i := uint64(0); i < n; i++ {
		e := ents[i]
		keep := e&(proc.PMPresent|proc.PMSwapped) != 0
		if fileBacked && e&proc.PMPresent != 0 && e&proc.PMFile != 0 {
			keep = false // still the file's page: restored by mapping the file
		}
		if !keep {
			continue
		}
		addr := v.Start + i*pageSize
		if k := len(runs) - 1; k >= 0 && runs[k].Addr+runs[k].Pages*pageSize == addr {
			runs[k].Pages++
		} else {
			runs = append(runs, pageRange{Addr: addr, Pages: 1})
		}
	}
	return runs, ents, nil
}

// batchSize is how much memory one read moves.
const batchSize = 8 << 20

// batch is memory read from the process, ready to be written.
type batch struct {
	buf  []byte
	segs []segment
	err  error
}

// segment is part of a batch: data pages at addr, or n zero pages, or n
// pages found in the parent image.
type segment struct {
	addr   uint64
	data   []byte // nil for zero and parent pages
	zero   uint64
	parent uint64
}

// dumpMemory copies the saved pages of every VMA into w. Reading (with
// process_vm_readv, or /proc/PID/mem for unreadable mappings) and zero-page
// detection run in one goroutine, checksumming and writing in another.
// Pages for which inParent (when not nil) is true are not read: they are
// recorded as in the parent image.
func dumpMemory(pid int, vmas []*imagepb.VMA, w *image.PageWriter, inParent func(addr uint64) bool) (memStats, error) {
	var st memStats
	pm, err := proc.OpenPagemap(pid)
	if err != nil {
		return st, err
	}
	defer pm.Close()
	rd, err := pagereader.Open(pid)
	if err != nil {
		return st, err
	}
	defer rd.Close()

	free := make(chan []byte, 3)
	for i := 0; i < 3; i++ {
		free <- make([]byte, batchSize)
	}
	full := make(chan batch, 2)
	done := make(chan struct{})
	defer close(done)

	go func() {
		defer close(full)
		var ents []uint64
		for _, v := range vmas {
			if !hasPages(v) {
				continue
			}
			var runs []pageRange
			var err error
			runs, ents, err = savedPages(pm, v, ents)
			if err != nil {
				full <- batch{err: err}
				return
			}
			st.scanned += (v.End - v.Start) / pageSize
			readable := v.Prot&sys.PROT_READ != 0
			for len(runs) > 0 {
				var parent pageRange
				var read []pageRange
				read, parent, runs = nextFromParent(runs, inParent)
				for len(read) > 0 {
					var buf []byte
					select {
					case buf = <-free:
					case <-done:
						return
					}
					b, rest, err := readBatch(rd, readable, read, buf)
					read = rest
					if err != nil {
						full <- batch{err: fmt.Errorf("read memory of %d in %#x-%#x: %w", pid, v.Start, v.End, err)}
						return
					}
					full <- b
				}
				if parent.Pages > 0 {
					select {
					case full <- batch{segs: []segment{{addr: parent.Addr, parent: parent.Pages}}}:
					case <-done:
						return
					}
				}
			}
		}
	}()

	for b := range full {
		if b.err != nil {
			return st, b.err
		}
		for _, s := range b.segs {
			if s.parent > 0 {
				st.parent += s.parent
				if err := w.AddParentRun(s.addr, s.parent); err != nil {
					return st, err
				}
				continue
			}
			if s.data == nil {
				st.zero += s.zero
				if err := w.AddZeroRun(s.addr, s.zero); err != nil {
					return st, err
				}
				continue
			}
			st.written += uint64(len(s.data)) / pageSize
			if err := w.AddRun(s.addr, s.data); err != nil {
				return st, err
			}
		}
		if b.buf != nil {
			free <- b.buf
		}
	}
	return st, nil
}

// nextFromParent splits runs at the first page found in the parent image:
// it returns the pages before it (to read), the pages of the parent from
// it on, and the runs after those.
func nextFromParent(runs []pageRange, inParent func(addr uint64) bool) (read []pageRange, parent pageRange, rest []pageRange) {
	if inParent == nil {
		return runs, pageRange{}, nil
	}
	for i, r := range runs {
		for p := uint64(0); p < r.Pages; p++ {
			if !inParent(r.Addr + p*pageSize) {
				continue
			}
			read = append(runs[:i:i], pageRange{Addr: r.Addr, Pages: p})
			if p == 0 {
				read = read[:i]
			}
			q := p
			for q < r.Pages && inParent(r.Addr+q*pageSize) {
				q++
			}
			parent = pageRange{Addr: r.Addr + p*pageSize, Pages: q - p}
			rest = runs[i+1:]
			if q < r.Pages {
				rest = append([]pageRange{{Addr: r.Addr + q*pageSize, Pages: r.Pages - q}}, rest...)
			}
			return read, parent, rest
		}
	}
	return runs, pageRange{}, nil
}

// readBatch reads as many of runs as fit in buf and splits what it read
// into data and zero segments. It returns the runs left over. The process
// is frozen: every page asked for must be read.
func readBatch(rd *pagereader.Reader, readable bool, runs []pageRange, buf []byte) (batch, []pageRange, error) {
	b := batch{buf: buf}
	pages := func(rs []pageRange) (n uint64) {
		for _, r := range rs {
			n += r.Pages
		}
		return n
	}
	before := pages(runs) // Batch rewrites the run it splits
	got, rest, err := rd.Batch(runs, readable, buf)
	if err != nil {
		return b, rest, err
	}
	asked := before - pages(rest)
	read := uint64(0)
	for _, r := range got {
		read += uint64(len(r.Data)) / pageSize
	}
	if read != asked {
		return b, rest, fmt.Errorf("read %d of %d pages of the frozen process", read, asked)
	}
	// Split into data and zero segments, page by page.
	for _, r := range got {
		for p := 0; p < len(r.Data)/pageSize; p++ {
			page := r.Data[p*pageSize : (p+1)*pageSize]
			addr := r.Addr + uint64(p)*pageSize
			zero := image.IsZero(page)
			last := len(b.segs) - 1
			switch {
			case zero && last >= 0 && b.segs[last].data == nil && b.segs[last].addr+b.segs[last].zero*pageSize == addr:
				b.segs[last].zero++
			case zero:
				b.segs = append(b.segs, segment{addr: addr, zero: 1})
			case last >= 0 && b.segs[last].data != nil && b.segs[last].addr+uint64(len(b.segs[last].data)) == addr:
				// Address-adjacent pages of one batch are adjacent in buf too.
				b.segs[last].data = b.segs[last].data[:len(b.segs[last].data)+pageSize]
			default:
				b.segs = append(b.segs, segment{addr: addr, data: page})
			}
		}
	}
	return b, rest, nil
}
