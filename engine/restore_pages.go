package engine

import (
	"context"
	"fmt"
	"hash/crc32"
	"sync"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// writeWorkers is how many goroutines write pages into the new process.
// Writing into fresh memory is bound by page faults, which the kernel
// handles on the writing thread: two writers use both cores.
const writeWorkers = 2

// maxWrite bounds one process_vm_writev call.
const maxWrite = 16 << 20

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// writePages verifies the checksums of the image's pages and writes them
// into the new process.
func (r *restorer) writePages(ctx context.Context) error {
	maps := make(map[*image.Pages][]byte)
	defer func() {
		for _, m := range maps {
			_ = sys.Munmap(m)
		}
	}()
	for _, p := range r.chain.Images {
		fi, err := p.File().Stat()
		if err != nil {
			return err
		}
		if fi.Size() == 0 {
			continue
		}
		m, err := sys.Mmap(int(p.File().Fd()), 0, int(fi.Size()), sys.PROT_READ, sys.MAP_SHARED)
		if err != nil {
			return fmt.Errorf("map %s: %w", p.Path(), err)
		}
		maps[p] = m
	}
	// Checksums first: a corrupt image must fail before the process runs.
	if err := r.verify(maps); err != nil {
		return err
	}
	// Zero pages need writing only where the mapping does not start zeroed:
	// private file mappings, whose unwritten pages show the file.
	fileVMA := func(addr uint64) bool {
		v := r.vmaAt(addr)
		return v != nil && v.Kind == imagepb.VMAKind_VMA_FILE_PRIVATE
	}
	zero := make([]byte, maxWrite)
	type job struct {
		local  [][]byte
		remote []sys.RemoteIovec
		size   int
	}
	jobs := make(chan job, 4)
	errc := make(chan error, writeWorkers)
	var wg sync.WaitGroup
	for i := 0; i < writeWorkers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				n, err := sys.ProcessVMWritev(r.pid, j.local, j.remote)
				if err == nil && n != j.size {
					err = fmt.Errorf("short write: %d of %d bytes", n, j.size)
				}
				if err != nil {
					errc <- fmt.Errorf("write pages at %#x: %w", j.remote[0].Base, err)
					for range jobs {
					}
					return
				}
			}
		}()
	}
	var cur job
	flush := func() {
		if cur.size > 0 {
			jobs <- cur
			cur = job{}
		}
	}
	add := func(data []byte, addr uint64) {
		for len(data) > 0 {
			chunk := min(len(data), maxWrite-cur.size)
			cur.local = append(cur.local, data[:chunk])
			cur.remote = append(cur.remote, sys.RemoteIovec{Base: uintptr(addr), Len: chunk})
			cur.size += chunk
			data, addr = data[chunk:], addr+uint64(chunk)
			if cur.size >= maxWrite || len(cur.remote) >= 1024 {
				flush()
			}
		}
	}
	var err error
	for _, e := range r.chain.Extents {
		if ctx.Err() != nil {
			err = ctx.Err()
			break
		}
		size := int(e.NrPages) * pageSize
		switch {
		case !e.Zero:
			m := maps[e.Pages]
			if e.Offset < 0 || e.Offset+int64(size) > int64(len(m)) {
				err = fmt.Errorf("%w: pages at %#x lie outside %s", ErrBadImage, e.Addr, e.Pages.Path())
			} else {
				add(m[e.Offset:e.Offset+int64(size)], e.Addr)
			}
		case fileVMA(e.Addr):
			for off := 0; off < size; off += maxWrite {
				add(zero[:min(maxWrite, size-off)], e.Addr+uint64(off))
			}
		}
		if err != nil {
			break
		}
		r.pagesRestored += e.NrPages
	}
	flush()
	close(jobs)
	wg.Wait()
	close(errc)
	if werr := <-errc; werr != nil {
		return werr
	}
	return err
}

// verify checks the CRC-32C of every run of data the restore will use,
// spreading the work over the write workers' cores.
func (r *restorer) verify(maps map[*image.Pages][]byte) error {
	type item struct {
		p   *image.Pages
		run *imagepb.PageRun
	}
	var items []item
	for _, p := range r.chain.Images {
		for _, run := range p.Runs {
			if run.GetSource() == imagepb.PageSource_PAGES_HERE {
				items = append(items, item{p, run})
			}
		}
	}
	errs := make([]error, writeWorkers)
	var wg sync.WaitGroup
	for w := 0; w < writeWorkers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; i < len(items); i += writeWorkers {
				it := items[i]
				m := maps[it.p]
				off, n := int64(it.run.GetFileOffset()), int64(it.run.GetNrPages())*pageSize
				if off < 0 || off+n > int64(len(m)) {
					errs[w] = fmt.Errorf("%w: run at %#x lies outside %s", ErrBadImage, it.run.GetAddr(), it.p.Path())
					return
				}
				if got := crc32.Checksum(m[off:off+n], castagnoli); got != it.run.GetCrc32C() {
					errs[w] = fmt.Errorf("%s: pages at %#x: %w (CRC-32C %#08x, expected %#08x)",
						it.p.Path(), it.run.GetAddr(), image.ErrChecksum, got, it.run.GetCrc32C())
					return
				}
			}
		}(w)
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
