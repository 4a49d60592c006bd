package image

import (
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"

	"github.com/phaul/phaul/protocol/imagepb"
)

// Shared memory objects (memfds, deleted tmpfs files, shared anonymous
// memory, System V segments) are listed in the file table
// (FileTable.Shmem); the contents of object ID are in shmem-ID.img, saved
// once however many mappings and descriptors share the object. The file
// has the layout of a pages file: one 4096-byte header block, then whole
// pages:
//
//	 offset  size
//	+-------+------+--------------------------------------------------+
//	|     0 |    8 | magic "PHAULSHM"                                 |
//	|     8 |    2 | format version (Version)                         |
//	|    10 |    2 | reserved: 0                                      |
//	|    12 |    4 | object id                                        |
//	|    16 |    4 | CRC-32C of bytes 0..15                           |
//	|    20 | 4076 | zero                                             |
//	+-------+------+--------------------------------------------------+
//	|  4096 |  ... | data, in whole 4096-byte pages                   |
//	+-------+------+--------------------------------------------------+
//
// The object's runs (Shmem.Runs) say where its pages are: each covers
// NrPages pages of the object from byte Offset and lies at FileOffset in
// the file, with the CRC-32C of those bytes. Pages of no run read as zero.

// ShmemFile names the contents of shared memory object id.
func ShmemFile(id uint32) string { return "shmem-" + strconv.FormatUint(uint64(id), 10) + ".img" }

// ShmemPath returns the path of the contents of shared memory object id.
func (d Dir) ShmemPath(id uint32) string { return filepath.Join(d.Path, ShmemFile(id)) }

// MaxShmemSize bounds the size of a shared memory object in an image.
const MaxShmemSize = 1 << 46

var shmemMagic = []byte("PHAULSHM")

func encodeShmemHeader(id uint32) []byte { return encodeDataHeader(shmemMagic, id) }

// parseShmemHeader checks the header block b (the first bytes of a
// shmem-ID.img, possibly fewer than PagesHeaderSize) and returns the
// object id it names.
func parseShmemHeader(b []byte) (uint32, error) {
	id, err := parseDataHeader(b, shmemMagic)
	if err == nil && id == 0 {
		err = corruptf("object id 0 in header")
	}
	return id, err
}

// ShmemWriter writes the contents of one shared memory object into
// shmem-ID.img of a directory. Pages come in increasing offset order;
// contiguous ones are merged into runs of up to MaxRunPages pages. Close
// sets the object's Runs; until it returns nil the directory is unchanged.
//
// A ShmemWriter is not safe for concurrent use.
type ShmemWriter struct {
	path string
	obj  *imagepb.Shmem
	f    *os.File
	tmp  string
	sync bool
	off  uint64 // file offset of the next page
	next uint64 // lowest object offset the next pages may start at
	runs []*imagepb.ShmemRun
	err  error // sticky
}

// NewShmemWriter starts writing the contents of obj (whose Id, Kind and
// Size are set) into d.
func (d Dir) NewShmemWriter(obj *imagepb.Shmem) (*ShmemWriter, error) {
	path := d.ShmemPath(obj.GetId())
	if obj.GetId() == 0 {
		return nil, fmt.Errorf("write %s: object id 0", path)
	}
	if obj.GetSize() > MaxShmemSize {
		return nil, fmt.Errorf("write %s: object of %d bytes, more than %d", path, obj.GetSize(), uint64(MaxShmemSize))
	}
	f, err := os.CreateTemp(d.Path, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("write %s: %w", path, bare(err))
	}
	w := &ShmemWriter{path: path, obj: obj, f: f, tmp: f.Name(), sync: d.Sync, off: PagesHeaderSize}
	if _, err := f.Write(encodeShmemHeader(obj.GetId())); err != nil {
		w.Abort()
		return nil, fmt.Errorf("write %s: %w", path, err)
	}
	return w, nil
}

// Add appends data, whole pages of the object from byte offset off.
func (w *ShmemWriter) Add(off uint64, data []byte) error {
	if w.err != nil {
		return fmt.Errorf("write %s: %w", w.path, w.err)
	}
	if len(data)%PageSize != 0 || !pageAligned(off) {
		return fmt.Errorf("write %s: %d bytes at offset %#x are not whole pages", w.path, len(data), off)
	}
	if off < w.next {
		return fmt.Errorf("write %s: pages at offset %#x overlap or precede those ending at %#x", w.path, off, w.next)
	}
	if end := off + uint64(len(data)); end < off || end > pageRound(w.obj.GetSize()) {
		return fmt.Errorf("write %s: pages at offset %#x-%#x beyond the object's %d bytes", w.path, off, end, w.obj.GetSize())
	}
	for len(data) > 0 {
		var r *imagepb.ShmemRun
		if k := len(w.runs) - 1; k >= 0 {
			last := w.runs[k]
			if last.Offset+last.NrPages*PageSize == off && last.FileOffset+last.NrPages*PageSize == w.off && last.NrPages < MaxRunPages {
				r = last
			}
		}
		if r == nil {
			r = &imagepb.ShmemRun{Offset: off, FileOffset: w.off}
			w.runs = append(w.runs, r)
		}
		n := min(uint64(len(data))/PageSize, MaxRunPages-r.NrPages)
		chunk := data[:n*PageSize]
		if _, err := w.f.Write(chunk); err != nil {
			w.err = err
			return fmt.Errorf("write %s: %w", w.path, err)
		}
		r.Crc32C = crc32.Update(r.Crc32C, castagnoli, chunk)
		r.NrPages += n
		w.off += n * PageSize
		off += n * PageSize
		data = data[len(chunk):]
	}
	w.next = off
	return nil
}

// Close renames the file into place and sets the object's Runs. After an
// earlier error it cleans up and returns that error.
func (w *ShmemWriter) Close() error {
	if w.err != nil {
		err := w.err
		w.Abort()
		return fmt.Errorf("write %s: %w", w.path, err)
	}
	err := error(nil)
	if w.sync {
		err = w.f.Sync()
	}
	if cerr := w.f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(w.tmp, w.path)
	}
	if err == nil && w.sync {
		err = syncDir(filepath.Dir(w.path))
	}
	if err != nil {
		os.Remove(w.tmp)
		w.err = errWriterClosed
		return fmt.Errorf("write %s: %w", w.path, err)
	}
	w.err = errWriterClosed
	w.obj.Runs = w.runs
	return nil
}

// Abort discards what was written. It does nothing after Close.
func (w *ShmemWriter) Abort() {
	if w.err == errWriterClosed {
		return
	}
	w.f.Close()
	os.Remove(w.tmp)
	w.err = errWriterClosed
}

// ShmemData is the open contents file of one shared memory object, checked
// against the object's runs.
type ShmemData struct {
	Path string
	Obj  *imagepb.Shmem
	f    *os.File
	size int64
}

// OpenShmem opens the contents of obj (an object of a validated file
// table) in the checkpoint directory dir: the header must name obj, the
// file hold whole pages, and every run lie inside it.
func OpenShmem(dir string, obj *imagepb.Shmem) (*ShmemData, error) {
	path := Dir{Path: dir}.ShmemPath(obj.GetId())
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, bare(err))
	}
	size, err := checkShmemFile(f, obj)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return &ShmemData{Path: path, Obj: obj, f: f, size: size}, nil
}

func checkShmemFile(f *os.File, obj *imagepb.Shmem) (int64, error) {
	hdr := make([]byte, PagesHeaderSize)
	n, err := f.ReadAt(hdr, 0)
	if err != nil && err != io.EOF {
		return 0, bare(err)
	}
	id, err := parseShmemHeader(hdr[:n])
	if err != nil {
		return 0, err
	}
	if id != obj.GetId() {
		return 0, corruptf("header is for object %d, want %d", id, obj.GetId())
	}
	st, err := f.Stat()
	if err != nil {
		return 0, bare(err)
	}
	if (st.Size()-PagesHeaderSize)%PageSize != 0 {
		return 0, fmt.Errorf("%w: %d bytes of data, not whole pages", ErrTruncated, st.Size()-PagesHeaderSize)
	}
	for _, r := range obj.GetRuns() {
		if r.GetFileOffset()+r.GetNrPages()*PageSize > uint64(st.Size()) {
			return 0, corruptf("run at offset %#x: file bytes %#x-%#x beyond the file's %d bytes",
				r.GetOffset(), r.GetFileOffset(), r.GetFileOffset()+r.GetNrPages()*PageSize, st.Size())
		}
	}
	return st.Size(), nil
}

// ReadRun reads the pages of run r (one of the object's runs) into the
// first r.NrPages*PageSize bytes of dst and checks their checksum.
func (s *ShmemData) ReadRun(r *imagepb.ShmemRun, dst []byte) error {
	if err := validateShmemRun(r, s.Obj.GetSize()); err != nil {
		return fmt.Errorf("read %s: %w", s.Path, err)
	}
	n := int(r.GetNrPages()) * PageSize
	if len(dst) < n {
		return fmt.Errorf("read %s: run at offset %#x is %d bytes, buffer holds %d", s.Path, r.GetOffset(), n, len(dst))
	}
	if int64(r.GetFileOffset())+int64(n) > s.size {
		return fmt.Errorf("read %s: run at offset %#x: %w: the file ends inside it", s.Path, r.GetOffset(), ErrTruncated)
	}
	if _, err := s.f.ReadAt(dst[:n], int64(r.GetFileOffset())); err != nil {
		if err == io.EOF {
			err = fmt.Errorf("%w: the file ends inside the run", ErrTruncated)
		}
		return fmt.Errorf("read %s: run at offset %#x: %w", s.Path, r.GetOffset(), bare(err))
	}
	if got := crc32.Checksum(dst[:n], castagnoli); got != r.GetCrc32C() {
		return fmt.Errorf("read %s: run at offset %#x: %w: CRC-32C is %#08x, file table says %#08x",
			s.Path, r.GetOffset(), ErrChecksum, got, r.GetCrc32C())
	}
	return nil
}

// Close closes the file.
func (s *ShmemData) Close() error { return s.f.Close() }

func pageRound(n uint64) uint64 { return (n + PageSize - 1) &^ (PageSize - 1) }

// maxShmemName bounds the name of an object (a path, or a memfd name).
const maxShmemName = 4096

// ValidateShmem checks an object of the file table: a positive id, a known
// kind, a size of at most MaxShmemSize, SysV details present exactly for
// a SysV segment, and runs sorted by offset, not overlapping, page aligned,
// of 1 to MaxRunPages pages, inside the object's pages and at page-aligned
// file offsets after the header.
func ValidateShmem(o *imagepb.Shmem) error {
	id := o.GetId()
	if id == 0 {
		return corruptf("shared memory object with id 0")
	}
	if _, ok := imagepb.ShmemKind_name[int32(o.GetKind())]; !ok || o.GetKind() == imagepb.ShmemKind_SHMEM_UNKNOWN {
		return corruptf("shared memory object %d: kind %d", id, o.GetKind())
	}
	if o.GetSize() > MaxShmemSize {
		return corruptf("shared memory object %d: %d bytes, more than %d", id, o.GetSize(), uint64(MaxShmemSize))
	}
	if len(o.GetName()) > maxShmemName {
		return corruptf("shared memory object %d: name of %d bytes", id, len(o.GetName()))
	}
	if (o.GetKind() == imagepb.ShmemKind_SHMEM_SYSV) != (o.GetSysv() != nil) {
		return corruptf("shared memory object %d: kind %v with SysV details %v", id, o.GetKind(), o.GetSysv() != nil)
	}
	if s := o.GetSysv(); s != nil && (s.GetShmid() < 0 || uint64(s.GetShmid()) != o.GetInode()) {
		return corruptf("shared memory object %d: SysV shmid %d, inode %d", id, s.GetShmid(), o.GetInode())
	}
	var prevEnd uint64
	for i, r := range o.GetRuns() {
		if err := validateShmemRun(r, o.GetSize()); err != nil {
			return fmt.Errorf("shared memory object %d: %w", id, err)
		}
		if i > 0 && r.GetOffset() < prevEnd {
			return corruptf("shared memory object %d: run at offset %#x overlaps or precedes the one ending at %#x", id, r.GetOffset(), prevEnd)
		}
		prevEnd = r.GetOffset() + r.GetNrPages()*PageSize
	}
	return nil
}

func validateShmemRun(r *imagepb.ShmemRun, size uint64) error {
	off, n, fo := r.GetOffset(), r.GetNrPages(), r.GetFileOffset()
	switch {
	case !pageAligned(off):
		return corruptf("run at offset %#x: not page aligned", off)
	case n == 0 || n > MaxRunPages:
		return corruptf("run at offset %#x: %d pages (1 to %d)", off, n, MaxRunPages)
	case off > pageRound(size) || n*PageSize > pageRound(size)-off:
		return corruptf("run at offset %#x of %d pages: beyond the object's %d bytes", off, n, size)
	case !pageAligned(fo) || fo < PagesHeaderSize || fo > math.MaxInt64-n*PageSize:
		return corruptf("run at offset %#x: file offset %#x not page aligned, inside the header or too large", off, fo)
	}
	return nil
}

// validateShmemTable checks every object of ft and that ids are unique.
func validateShmemTable(ft *imagepb.FileTable) error {
	seen := make(map[uint32]bool, len(ft.GetShmem()))
	for _, o := range ft.GetShmem() {
		if err := ValidateShmem(o); err != nil {
			return err
		}
		if seen[o.GetId()] {
			return corruptf("shared memory object id %d used twice", o.GetId())
		}
		seen[o.GetId()] = true
	}
	for _, f := range ft.GetFiles() {
		if f.GetShmem() != 0 && !seen[f.GetShmem()] {
			return corruptf("file %d: shared memory object %d is not in the file table", f.GetId(), f.GetShmem())
		}
		if f.GetKind() == imagepb.FileKind_FILE_MEMFD && f.GetShmem() == 0 {
			return corruptf("file %d: memfd without its shared memory object", f.GetId())
		}
	}
	return nil
}

// shmemKinds says which object kinds a mapping kind may refer to.
var shmemKinds = map[imagepb.VMAKind][]imagepb.ShmemKind{
	imagepb.VMAKind_VMA_ANON_SHARED: {imagepb.ShmemKind_SHMEM_ANON},
	imagepb.VMAKind_VMA_SHMEM:       {imagepb.ShmemKind_SHMEM_MEMFD, imagepb.ShmemKind_SHMEM_DELETED_FILE},
	imagepb.VMAKind_VMA_SYSV_SHM:    {imagepb.ShmemKind_SHMEM_SYSV},
}

// validateShmemRefs checks that every mapping of p that names a shared
// memory object names one of ft of a matching kind, that memfd and SysV
// mappings name one, that descriptors of objects name memfds or deleted
// files, and that the mappings of a SysV segment come in whole
// attachments: from offset 0, contiguous, to the end of the segment's
// last page.
func validateShmemRefs(p *imagepb.Process, ft *imagepb.FileTable) error {
	objs := make(map[uint32]*imagepb.Shmem, len(ft.GetShmem()))
	for _, o := range ft.GetShmem() {
		objs[o.GetId()] = o
	}
	pid := p.GetPid()
	var attach *imagepb.VMA // the SysV attachment being followed, nil between them
	var attachEnd uint64
	for _, v := range p.GetVmas() {
		if attach != nil && (v.GetKind() != imagepb.VMAKind_VMA_SYSV_SHM || v.GetPgoff() == 0) {
			return corruptf("pid %d: SysV attachment at %#x ends at %#x, before the end of its segment", pid, attach.GetStart(), attachEnd)
		}
		id := v.GetShmem()
		kinds, ok := shmemKinds[v.GetKind()]
		switch {
		case id == 0 && ok && v.GetKind() != imagepb.VMAKind_VMA_ANON_SHARED:
			return corruptf("pid %d: mapping %#x-%#x (%v) without its shared memory object", pid, v.GetStart(), v.GetEnd(), v.GetKind())
		case id == 0:
			continue
		case !ok:
			return corruptf("pid %d: mapping %#x-%#x of kind %v names shared memory object %d", pid, v.GetStart(), v.GetEnd(), v.GetKind(), id)
		}
		o := objs[id]
		if o == nil {
			return corruptf("pid %d: mapping %#x-%#x: shared memory object %d is not in the file table", pid, v.GetStart(), v.GetEnd(), id)
		}
		match := false
		for _, k := range kinds {
			match = match || o.GetKind() == k
		}
		if !match {
			return corruptf("pid %d: mapping %#x-%#x (%v) names object %d of kind %v", pid, v.GetStart(), v.GetEnd(), v.GetKind(), id, o.GetKind())
		}
		if v.GetKind() != imagepb.VMAKind_VMA_SYSV_SHM {
			continue
		}
		if attach == nil {
			if v.GetPgoff() != 0 {
				return corruptf("pid %d: SysV mapping %#x-%#x starts at offset %#x, not with its attachment", pid, v.GetStart(), v.GetEnd(), v.GetPgoff())
			}
			attach, attachEnd = v, v.GetStart()
		}
		if v.GetShmem() != attach.GetShmem() || v.GetStart() != attachEnd || v.GetPgoff() != v.GetStart()-attach.GetStart() {
			return corruptf("pid %d: SysV mapping %#x-%#x does not continue the attachment at %#x", pid, v.GetStart(), v.GetEnd(), attach.GetStart())
		}
		attachEnd = v.GetEnd()
		switch full := attach.GetStart() + pageRound(o.GetSize()); {
		case attachEnd == full:
			attach = nil
		case attachEnd > full:
			return corruptf("pid %d: SysV attachment at %#x is longer than its segment of %d bytes", pid, attach.GetStart(), o.GetSize())
		}
	}
	if attach != nil {
		return corruptf("pid %d: SysV attachment at %#x ends at %#x, before the end of its segment", pid, attach.GetStart(), attachEnd)
	}
	return nil
}

// checkShmemFiles checks that the contents file of every object of ft is
// there and fits its runs.
func checkShmemFiles(d Dir, ft *imagepb.FileTable) error {
	for _, o := range ft.GetShmem() {
		s, err := OpenShmem(d.Path, o)
		if err != nil {
			return err
		}
		s.Close()
	}
	return nil
}

// describeShmemFile writes what the contents file at path is.
func describeShmemFile(w io.Writer, path string, opt Options) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("read %s: %w", path, bare(err))
	}
	defer f.Close()
	hdr := make([]byte, PagesHeaderSize)
	n, err := f.ReadAt(hdr, 0)
	if err != nil && err != io.EOF {
		return fmt.Errorf("read %s: %w", path, bare(err))
	}
	id, err := parseShmemHeader(hdr[:n])
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("read %s: %w", path, bare(err))
	}
	data := uint64(max(st.Size()-PagesHeaderSize, 0))
	if opt.JSON {
		return writeJSON(w, struct {
			File   string `json:"file"`
			Kind   string `json:"kind"`
			Object uint32 `json:"object"`
			Bytes  uint64 `json:"bytes"`
		}{path, "shmem", id, data})
	}
	_, err = fmt.Fprintf(w, "%s: contents of shared memory object %d, %s of data (runs and checksums are in files.img)\n",
		path, id, sizeString(data))
	return err
}
