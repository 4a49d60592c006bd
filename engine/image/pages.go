package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"os"
	"path/filepath"

	"github.com/phaul/phaul/protocol/imagepb"
)

// PagesHeaderSize is the size of the header block of a pages file; page
// data starts after it.
const PagesHeaderSize = 4096

var pagesMagic = []byte("PHAULPGS")

// encodePagesHeader returns the header block of the pages file of pid.
func encodePagesHeader(pid int) []byte { return encodeDataHeader(pagesMagic, uint32(pid)) }

// parsePagesHeader checks the header block b (the first bytes of a pages
// file, possibly fewer than PagesHeaderSize) and returns the pid it names.
func parsePagesHeader(b []byte) (int, error) {
	v, err := parseDataHeader(b, pagesMagic)
	if err != nil {
		return 0, err
	}
	if pid := int32(v); pid <= 0 {
		return 0, corruptf("pid %d in header", pid)
	}
	return int(v), nil
}

// encodeDataHeader returns the header block of a data file (pages, or a
// shared memory object's contents): magic, version, the number naming what
// the file holds, and a CRC-32C of them, padded to PagesHeaderSize.
func encodeDataHeader(magic []byte, id uint32) []byte {
	b := make([]byte, PagesHeaderSize)
	le := binary.LittleEndian
	copy(b, magic)
	le.PutUint16(b[8:], Version)
	le.PutUint32(b[12:], id)
	le.PutUint32(b[16:], crc32.Checksum(b[:16], castagnoli))
	return b
}

// parseDataHeader checks the header block b of a data file with magic
// (possibly fewer than PagesHeaderSize bytes) and returns its number.
func parseDataHeader(b, magic []byte) (uint32, error) {
	n := min(len(b), len(magic))
	if !bytes.Equal(b[:n], magic[:n]) {
		return 0, fmt.Errorf("%w: file starts with %q, want %q", ErrBadMagic, b[:n], magic)
	}
	if len(b) < PagesHeaderSize {
		return 0, fmt.Errorf("%w: %d bytes, the header block alone is %d", ErrTruncated, len(b), PagesHeaderSize)
	}
	le := binary.LittleEndian
	if v := le.Uint16(b[8:]); v != Version {
		return 0, fmt.Errorf("%w: version %d, this phaul reads version %d", ErrVersion, v, Version)
	}
	if got, want := crc32.Checksum(b[:16], castagnoli), le.Uint32(b[16:]); got != want {
		return 0, fmt.Errorf("%w: header CRC-32C is %#08x, header says %#08x", ErrChecksum, got, want)
	}
	if le.Uint16(b[10:]) != 0 || !IsZero(b[20:PagesHeaderSize]) {
		return 0, corruptf("reserved header bytes are not zero")
	}
	return le.Uint32(b[12:]), nil
}

var zeroBlock [PageSize]byte

// IsZero reports whether every byte of b is zero. It runs at memory speed
// (bytes.Equal against a zero block), so the dumper can test every page.
func IsZero(b []byte) bool {
	for len(b) >= len(zeroBlock) {
		if !bytes.Equal(b[:len(zeroBlock)], zeroBlock[:]) {
			return false
		}
		b = b[len(zeroBlock):]
	}
	return bytes.Equal(b, zeroBlock[:len(b)])
}

// PageStats counts what a PageWriter recorded.
type PageStats struct {
	PagesWritten  uint64 // pages stored in the pages file
	PagesZero     uint64 // pages recorded as zero
	PagesInParent uint64 // pages recorded as in the parent image
	Runs          int    // runs in the page map
}

// writeBufferSize is the size of the buffer that gathers small AddRun
// calls into large writes; larger data is written directly.
const writeBufferSize = 4 << 20

// PageWriter streams the pages of one process into pages-PID.img of a
// directory and, when closed, writes the matching pagemap-PID.img. Runs
// must come in increasing address order and must not overlap. Contiguous
// runs of the same source are merged (PAGES_HERE runs up to MaxRunPages).
// Until Close returns nil, neither file of the directory is replaced.
//
// A PageWriter is not safe for concurrent use.
type PageWriter struct {
	dir   Dir
	pid   int
	f     *os.File
	tmp   string
	buf   []byte // small data waiting to be written
	off   uint64 // file offset of the next page, buffered data included
	next  uint64 // lowest address the next run may start at
	runs  []*imagepb.PageRun
	stats PageStats
	err   error // sticky: a write failed or the writer is closed
}

var errWriterClosed = errors.New("page writer closed")

// NewPageWriter starts writing the pages of pid into d.
func (d Dir) NewPageWriter(pid int) (*PageWriter, error) {
	path := d.PagesPath(pid)
	if pid <= 0 || pid > math.MaxInt32 {
		return nil, fmt.Errorf("write %s: pid %d out of range", path, pid)
	}
	f, err := os.CreateTemp(d.Path, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("write %s: %w", path, bare(err))
	}
	w := &PageWriter{dir: d, pid: pid, f: f, tmp: f.Name(), off: PagesHeaderSize}
	if _, err := f.Write(encodePagesHeader(pid)); err != nil {
		w.Abort()
		return nil, fmt.Errorf("write %s: %w", path, err)
	}
	return w, nil
}

// checkRun checks that a run of n pages at addr may come next.
func (w *PageWriter) checkRun(addr, n uint64) error {
	if w.err != nil {
		return fmt.Errorf("pages of pid %d: %w", w.pid, w.err)
	}
	if !pageAligned(addr) {
		return fmt.Errorf("pages of pid %d: address %#x not page aligned", w.pid, addr)
	}
	if addr < w.next {
		return fmt.Errorf("pages of pid %d: run at %#x overlaps or precedes the previous run ending at %#x", w.pid, addr, w.next)
	}
	if n > (math.MaxUint64-addr)/PageSize {
		return fmt.Errorf("pages of pid %d: run at %#x of %d pages wraps around", w.pid, addr, n)
	}
	return nil
}

// AddRun appends the pages in data, which start at address addr. data must
// be whole pages; it is not retained after AddRun returns.
func (w *PageWriter) AddRun(addr uint64, data []byte) error {
	if len(data)%PageSize != 0 {
		return fmt.Errorf("pages of pid %d: run at %#x is %d bytes, not whole pages", w.pid, addr, len(data))
	}
	if err := w.checkRun(addr, uint64(len(data))/PageSize); err != nil {
		return err
	}
	for len(data) > 0 {
		r := w.extendable(addr, imagepb.PageSource_PAGES_HERE)
		if r == nil || r.NrPages == MaxRunPages {
			r = &imagepb.PageRun{Addr: addr, Source: imagepb.PageSource_PAGES_HERE, FileOffset: w.off}
			w.runs = append(w.runs, r)
		}
		n := min(uint64(len(data))/PageSize, MaxRunPages-r.NrPages)
		chunk := data[:n*PageSize]
		crc, err := w.writeSum(r.Crc32C, chunk)
		if err != nil {
			w.err = fmt.Errorf("write %s: %w", w.dir.PagesPath(w.pid), err)
			return w.err
		}
		r.Crc32C = crc
		r.NrPages += n
		w.off += n * PageSize
		w.stats.PagesWritten += n
		addr += n * PageSize
		data = data[len(chunk):]
	}
	w.next = addr
	return nil
}

// AddZeroRun records nrPages zero pages at addr.
func (w *PageWriter) AddZeroRun(addr, nrPages uint64) error {
	if err := w.addEmptyRun(addr, nrPages, imagepb.PageSource_PAGES_ZERO); err != nil {
		return err
	}
	w.stats.PagesZero += nrPages
	return nil
}

// AddParentRun records nrPages pages at addr as found in the parent image
// (a pre-dump chain); the inventory of the directory must name the parent.
func (w *PageWriter) AddParentRun(addr, nrPages uint64) error {
	if err := w.addEmptyRun(addr, nrPages, imagepb.PageSource_PAGES_IN_PARENT); err != nil {
		return err
	}
	w.stats.PagesInParent += nrPages
	return nil
}

func (w *PageWriter) addEmptyRun(addr, n uint64, src imagepb.PageSource) error {
	if err := w.checkRun(addr, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if r := w.extendable(addr, src); r != nil {
		r.NrPages += n
	} else {
		w.runs = append(w.runs, &imagepb.PageRun{Addr: addr, NrPages: n, Source: src})
	}
	w.next = addr + n*PageSize
	return nil
}

// extendable returns the last run if a run of source src at addr may be
// merged into it.
func (w *PageWriter) extendable(addr uint64, src imagepb.PageSource) *imagepb.PageRun {
	if len(w.runs) == 0 {
		return nil
	}
	r := w.runs[len(w.runs)-1]
	if r.Source != src || runEnd(r) != addr {
		return nil
	}
	if src == imagepb.PageSource_PAGES_HERE && r.FileOffset+r.NrPages*PageSize != w.off {
		return nil
	}
	return r
}

// writeSum appends b to the pages file and returns crc updated with b.
// Small writes are gathered in w.buf. A large one is written directly
// while another goroutine computes its checksum: the two take comparable
// time, so doing them at once nearly halves the cost.
func (w *PageWriter) writeSum(crc uint32, b []byte) (uint32, error) {
	direct := len(b) >= writeBufferSize/2
	if direct || len(w.buf)+len(b) > writeBufferSize {
		if err := w.flush(); err != nil {
			return 0, err
		}
	}
	if !direct {
		if w.buf == nil {
			w.buf = make([]byte, 0, writeBufferSize)
		}
		w.buf = append(w.buf, b...)
		return crc32.Update(crc, castagnoli, b), nil
	}
	sum := make(chan uint32, 1)
	go func() { sum <- crc32.Update(crc, castagnoli, b) }()
	_, err := w.f.Write(b)
	return <-sum, err
}

func (w *PageWriter) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	_, err := w.f.Write(w.buf)
	w.buf = w.buf[:0]
	return err
}

// Stats returns what has been recorded so far.
func (w *PageWriter) Stats() PageStats {
	s := w.stats
	s.Runs = len(w.runs)
	return s
}

// Close finishes the pages file, renames it into place and writes the page
// map. After an earlier write error it cleans up and returns that error.
func (w *PageWriter) Close() error {
	if w.err != nil {
		err := w.err
		w.Abort()
		return err
	}
	path := w.dir.PagesPath(w.pid)
	err := w.flush()
	if err == nil && w.dir.Sync {
		err = w.f.Sync()
	}
	if cerr := w.f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(w.tmp, path)
	}
	if err != nil {
		os.Remove(w.tmp)
		w.err = errWriterClosed
		return fmt.Errorf("write %s: %w", path, err)
	}
	w.err = errWriterClosed
	// The directory is synced by WritePageMap, after both renames.
	return w.dir.WritePageMap(w.pid, &imagepb.PageMap{Runs: w.runs})
}

// Abort discards what was written. It does nothing after Close.
func (w *PageWriter) Abort() {
	if w.err == errWriterClosed {
		return
	}
	w.f.Close()
	os.Remove(w.tmp)
	w.err = errWriterClosed
}
