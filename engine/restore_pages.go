package engine

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// writeWorkers is how many goroutines read, verify and write pages into
// the new process. Writing into fresh memory is bound by page faults, which
// the kernel handles on the writing thread: two workers use both cores.
const writeWorkers = 2

// maxWrite bounds one process_vm_writev call (and the zero buffer).
const maxWrite = 16 << 20

// pageJob is one stored run of an image and the extents of the restore that
// take their pages from it.
type pageJob struct {
	pages   *image.Pages
	run     *imagepb.PageRun
	extents []image.Extent
}

// writePages writes the pages of the image chain into the new process. Each
// stored run is read into a buffer the worker reuses (no mapping of the
// image: in a VM, setting up a page table entry for every page of a
// mapped file costs as much as the copy), its CRC-32C is checked, and the
// extents that come from it are written with process_vm_writev. Nothing of
// the process runs before every run was checked.
func (r *restorer) writePages(ctx context.Context) error {
	jobs, zeros, err := r.pageJobs()
	if err != nil {
		return err
	}
	queue := make(chan pageJob)
	errs := make([]error, writeWorkers)
	var wg sync.WaitGroup
	for w := 0; w < writeWorkers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			var buf []byte
			for j := range queue {
				if errs[w] != nil {
					continue // drain
				}
				n := image.RunBytes(j.run)
				if cap(buf) < n {
					buf = make([]byte, n)
				}
				if err := j.pages.ReadRun(j.run, buf[:n]); err != nil {
					errs[w] = err
					continue
				}
				for _, e := range j.extents {
					off := e.Offset - int64(j.run.GetFileOffset())
					if err := r.writeRange(e.Addr, buf[off:off+int64(e.NrPages)*pageSize]); err != nil {
						errs[w] = err
						break
					}
				}
			}
		}(w)
	}
	var cerr error
	for _, j := range jobs {
		if cerr = ctx.Err(); cerr != nil {
			break
		}
		queue <- j
	}
	close(queue)
	wg.Wait()
	if err := errors.Join(append(errs, cerr)...); err != nil {
		return err
	}
	// Zero pages need writing only where the mapping does not start zeroed:
	// private file mappings, whose unwritten pages show the file.
	zero := make([]byte, maxWrite)
	for _, e := range zeros {
		if v := r.vmaAt(e.Addr); v == nil || v.Kind != imagepb.VMAKind_VMA_FILE_PRIVATE {
			continue
		}
		for off := uint64(0); off < e.NrPages*pageSize; off += maxWrite {
			if err := r.writeRange(e.Addr+off, zero[:min(maxWrite, e.NrPages*pageSize-off)]); err != nil {
				return err
			}
		}
	}
	for _, e := range r.chain.Extents {
		r.pagesRestored += e.NrPages
	}
	return nil
}

// writeRange writes data at addr of the new process.
func (r *restorer) writeRange(addr uint64, data []byte) error {
	for len(data) > 0 {
		chunk := data[:min(len(data), maxWrite)]
		n, err := sys.ProcessVMWritev(r.pid, [][]byte{chunk}, []sys.RemoteIovec{{Base: uintptr(addr), Len: len(chunk)}})
		if err == nil && n != len(chunk) {
			err = fmt.Errorf("short write: %d of %d bytes", n, len(chunk))
		}
		if err != nil {
			return fmt.Errorf("write pages at %#x: %w", addr, err)
		}
		data, addr = data[len(chunk):], addr+uint64(len(chunk))
	}
	return nil
}

// pageJobs groups the data extents of the chain by the stored run they
// come from, and returns the zero extents apart.
func (r *restorer) pageJobs() ([]pageJob, []image.Extent, error) {
	var jobs []pageJob
	index := map[*imagepb.PageRun]int{}
	var zeros []image.Extent
	// Per image, its stored runs in file order.
	stored := map[*image.Pages][]*imagepb.PageRun{}
	for _, p := range r.chain.Images {
		for _, run := range p.Runs {
			if run.GetSource() == imagepb.PageSource_PAGES_HERE {
				stored[p] = append(stored[p], run)
			}
		}
		sort.Slice(stored[p], func(i, j int) bool { return stored[p][i].GetFileOffset() < stored[p][j].GetFileOffset() })
	}
	for _, e := range r.chain.Extents {
		if e.Zero {
			zeros = append(zeros, e)
			continue
		}
		runs := stored[e.Pages]
		// An extent may span adjacent runs: split it at run boundaries.
		// The first run is the last one starting at or before its offset.
		i := sort.Search(len(runs), func(i int) bool { return int64(runs[i].GetFileOffset()) > e.Offset }) - 1
		for e.NrPages > 0 {
			if i < 0 || i >= len(runs) {
				return nil, nil, fmt.Errorf("%w: pages at %#x lie outside the runs of %s", ErrBadImage, e.Addr, e.Pages.Path())
			}
			run := runs[i]
			runEnd := int64(run.GetFileOffset()) + int64(image.RunBytes(run))
			if e.Offset < int64(run.GetFileOffset()) || e.Offset >= runEnd {
				return nil, nil, fmt.Errorf("%w: pages at %#x lie outside the runs of %s", ErrBadImage, e.Addr, e.Pages.Path())
			}
			part := e
			part.NrPages = min(e.NrPages, uint64(runEnd-e.Offset)/pageSize)
			k, ok := index[run]
			if !ok {
				k = len(jobs)
				index[run] = k
				jobs = append(jobs, pageJob{pages: e.Pages, run: run})
			}
			jobs[k].extents = append(jobs[k].extents, part)
			e.Addr += part.NrPages * pageSize
			e.Offset += int64(part.NrPages) * pageSize
			e.NrPages -= part.NrPages
			i++
		}
	}
	return jobs, zeros, nil
}
