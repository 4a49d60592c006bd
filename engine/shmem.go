package engine

import (
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// Shared memory objects are memory that mappings and descriptors share,
// in one process or across the processes of a tree:
//
//   - shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, which the kernel
//     backs with a shmem file it shows as "/dev/zero (deleted)");
//   - memfds, mapped and/or held as descriptors;
//   - deleted tmpfs files, mapped shared and/or held as descriptors (glibc's
//     sem_open makes /dev/shm/sem.NAME, which Python's multiprocessing
//     unlinks at once; shm_unlink'ed POSIX shared memory);
//   - System V shared memory segments attached by a process.
//
// A POSIX shared memory object that still has its name in /dev/shm is a
// plain file and is mapped (and opened) again by path: its contents stay
// in the file, like those of any shared file mapping.
//
// An object is known by its device and inode (a SysV segment by its shmid).
// Dump lists every object once in the file table (FileTable.Shmem) and
// saves its contents once, in shmem-ID.img, however many mappings and
// descriptors share it; the mappings (VMA.Shmem) and descriptors
// (File.Shmem) name it. Its pages are not saved with the processes that
// map it (hasPages). The contents are read through a descriptor of the
// object (/proc/PID/map_files/START-END, /proc/PID/fd/N), mapped into
// phaul: holes stay holes (SEEK_DATA/SEEK_HOLE), zero pages are left out,
// and the bytes of the last page past the object's size (which a mapping
// shows) are kept. Restore is restore_shmem.go.
//
// What is refused at dump, by name: private mappings of memfds and deleted
// files, deleted files elsewhere than on tmpfs or with other links still
// there, hugetlbfs memfds and memfd_secret areas, a memfd sealed with
// F_SEAL_FUTURE_WRITE that still has a writable mapping (restore could not
// make the mapping after sealing), SysV segments mapped only in part or not
// in phaul's IPC namespace. Migration (Layout, the shadow process) takes
// only shared anonymous memory, each mapping as its own object, and
// refuses the other kinds and anonymous memory mapped twice.

// shmemKey identifies a shared memory object while dumping.
type shmemKey struct {
	sysv     bool
	dev, ino uint64
}

// shmemDumper collects the shared memory objects of the processes of one
// dump and writes their contents.
type shmemDumper struct {
	files *imagepb.FileTable
	byKey map[shmemKey]*imagepb.Shmem
	// src is where the contents of each object (by id) are read from.
	src  map[uint32]string
	sysv map[int]*sysvSegment // /proc/sysvipc/shm, read on first need
}

// dumpShmem finds the shared memory objects behind the mappings and
// descriptors of procs (frozen processes of one dump, whose descriptors
// files describes), records them in files.Shmem and in the mappings and
// files that use them, and writes the contents of each to d.
func dumpShmem(d image.Dir, procs []*imagepb.Process, files *imagepb.FileTable) error {
	s := &shmemDumper{files: files, byKey: map[shmemKey]*imagepb.Shmem{}, src: map[uint32]string{}}
	for _, p := range procs {
		if err := s.collect(p); err != nil {
			return err
		}
	}
	for _, o := range files.Shmem {
		if err := writeShmem(d, o, s.src[o.Id]); err != nil {
			return err
		}
	}
	return nil
}

// dumpShmem is dumpShmem for the processes of the tree.
func (t *frozenTree) dumpShmem(d image.Dir) error {
	procs := make([]*imagepb.Process, 0, len(t.procs))
	for _, fz := range t.procs {
		procs = append(procs, fz.State.Process)
	}
	return dumpShmem(d, procs, &t.files.table)
}

// shmemKindOf tells which kind of object a mapping or descriptor of the
// deleted file shown as path (without " (deleted)") is.
func shmemKindOf(path string, sysvMapping bool) imagepb.ShmemKind {
	switch {
	case sysvMapping:
		return imagepb.ShmemKind_SHMEM_SYSV
	case path == "/dev/zero":
		return imagepb.ShmemKind_SHMEM_ANON
	case strings.HasPrefix(path, "/memfd:"):
		return imagepb.ShmemKind_SHMEM_MEMFD
	}
	return imagepb.ShmemKind_SHMEM_DELETED_FILE
}

// isSysVPath reports the name the kernel gives an attached SysV segment,
// "/SYSV" and its key in 8 hex digits.
func isSysVPath(p string) bool {
	if len(p) != 13 || !strings.HasPrefix(p, "/SYSV") {
		return false
	}
	_, err := strconv.ParseUint(p[5:], 16, 32)
	return err == nil
}

// collect records the objects of p's mappings and descriptors.
func (s *shmemDumper) collect(p *imagepb.Process) error {
	pid := int(p.Pid)
	for _, v := range p.Vmas {
		var kind imagepb.ShmemKind
		switch v.Kind {
		case imagepb.VMAKind_VMA_ANON_SHARED:
			kind = imagepb.ShmemKind_SHMEM_ANON
		case imagepb.VMAKind_VMA_SHMEM:
			kind = shmemKindOf(v.Path, false)
		case imagepb.VMAKind_VMA_SYSV_SHM:
			kind = imagepb.ShmemKind_SHMEM_SYSV
		default:
			continue
		}
		what := fmt.Sprintf("mapping %#x-%#x (%s)", v.Start, v.End, vmaName(v))
		o, err := s.object(kind, fmt.Sprintf("/proc/%d/map_files/%x-%x", pid, v.Start, v.End), v.Path, what)
		if err != nil {
			return fmt.Errorf("process %d: %w", pid, err)
		}
		if o.Seals&sys.F_SEAL_FUTURE_WRITE != 0 && !v.SharedReadOnly {
			return unsupported("process %d: %s is writable, and its memfd is sealed with F_SEAL_FUTURE_WRITE", pid, what)
		}
		if o.Sysv != nil {
			o.Sysv.Attaches++
		}
		v.Shmem = o.Id
	}
	if err := checkSysVAttachments(pid, p.Vmas, s.files.Shmem); err != nil {
		return err
	}
	files := make(map[uint32]*imagepb.File, len(s.files.Files))
	for _, f := range s.files.Files {
		files[f.Id] = f
	}
	for _, fd := range p.Fds {
		f := files[fd.FileId]
		if f == nil || f.Kind != imagepb.FileKind_FILE_MEMFD || f.Shmem != 0 {
			continue
		}
		path := strings.TrimSuffix(f.Path, " (deleted)")
		what := fmt.Sprintf("descriptor %d (%s)", fd.Fd, f.Path)
		o, err := s.object(shmemKindOf(path, false), fmt.Sprintf("/proc/%d/fd/%d", pid, fd.Fd), path, what)
		if err != nil {
			return fmt.Errorf("process %d: %w", pid, err)
		}
		f.Shmem = o.Id
	}
	return nil
}

// object returns the object behind src (a /proc link to it), recording it
// when it is new; shown is the name /proc shows for it (without
// " (deleted)"), what names the mapping or descriptor for errors.
func (s *shmemDumper) object(kind imagepb.ShmemKind, src, shown, what string) (*imagepb.Shmem, error) {
	st, err := sys.Stat(src)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	key := shmemKey{kind == imagepb.ShmemKind_SHMEM_SYSV, st.Dev, st.Ino}
	if o := s.byKey[key]; o != nil {
		return o, nil
	}
	if st.Mode&sys.S_IFMT != sys.S_IFREG {
		return nil, unsupported("%s: a deleted %#o file, not a regular one", what, st.Mode&sys.S_IFMT)
	}
	fs, err := sys.FsType(src)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	switch fs {
	case sys.TMPFS_MAGIC:
	case sys.HUGETLBFS_MAGIC:
		return nil, unsupported("%s is on hugetlbfs (a hugetlb memfd)", what)
	case sys.SECRETMEM_MAGIC:
		return nil, unsupported("%s is a memfd_secret area", what)
	default:
		return nil, unsupported("%s: a deleted file on a filesystem other than tmpfs (magic %#x)", what, fs)
	}
	o := &imagepb.Shmem{
		Id: uint32(len(s.files.Shmem) + 1), Kind: kind, Size: uint64(st.Size), Dev: st.Dev, Inode: st.Ino,
		Mode: st.Mode & 0o7777, Uid: st.Uid, Gid: st.Gid,
	}
	switch kind {
	case imagepb.ShmemKind_SHMEM_MEMFD:
		o.Name = strings.TrimPrefix(shown, "/memfd:")
		if o.Seals, err = readSeals(src); err != nil {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
	case imagepb.ShmemKind_SHMEM_DELETED_FILE:
		o.Name = shown
		if st.Nlink != 0 {
			return nil, unsupported("%s: the deleted file still has %d other links", what, st.Nlink)
		}
	case imagepb.ShmemKind_SHMEM_SYSV:
		seg, err := s.sysvSegment(int(st.Ino))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
		o.Size, o.Mode, o.Uid, o.Gid = seg.size, seg.mode&0o777, seg.uid, seg.gid
		o.Sysv = &imagepb.SysVShm{Key: seg.key, Shmid: int32(st.Ino), Removed: seg.mode&sys.SHM_DEST != 0, Cuid: seg.cuid, Cgid: seg.cgid}
	}
	if o.Size > image.MaxShmemSize {
		return nil, unsupported("%s: an object of %d bytes", what, o.Size)
	}
	s.byKey[key] = o
	s.src[o.Id] = src
	s.files.Shmem = append(s.files.Shmem, o)
	return o, nil
}

// readSeals returns the seals of the memfd behind the /proc link src.
func readSeals(src string) (uint32, error) {
	fd, err := sys.Open(src, sys.O_RDONLY|sys.O_CLOEXEC)
	if err != nil {
		return 0, err
	}
	defer sys.Close(fd)
	seals, err := sys.FcntlInt(fd, sys.F_GET_SEALS, 0)
	if err != nil {
		return 0, fmt.Errorf("F_GET_SEALS: %w", err)
	}
	return uint32(seals), nil
}

// checkSysVAttachments refuses SysV segments that a process maps only in
// part: restore attaches a segment whole (shmat), at the address of its
// first page, and then gives each mapping of it its protection.
func checkSysVAttachments(pid int, vmas []*imagepb.VMA, objs []*imagepb.Shmem) error {
	sizes := map[uint32]uint64{}
	for _, o := range objs {
		sizes[o.Id] = o.Size
	}
	var start, end uint64 // the attachment followed, and where its mappings reach
	var id uint32
	partial := func() error {
		return unsupported("process %d: SysV segment mapped at %#x-%#x is only partly mapped (segment of %d bytes)", pid, start, end, sizes[id])
	}
	for _, v := range vmas {
		if id != 0 && (v.Kind != imagepb.VMAKind_VMA_SYSV_SHM || v.Shmem != id || v.Start != end || v.Pgoff != end-start) {
			return partial()
		}
		if v.Kind != imagepb.VMAKind_VMA_SYSV_SHM {
			continue
		}
		if id == 0 {
			if v.Pgoff != 0 {
				return unsupported("process %d: SysV segment mapped at %#x-%#x from offset %#x, not whole", pid, v.Start, v.End, v.Pgoff)
			}
			id, start = v.Shmem, v.Start
		}
		end = v.End
		if full := start + pageUp(sizes[id]); end >= full {
			if end > full {
				return partial()
			}
			id = 0
		}
	}
	if id != 0 {
		return partial()
	}
	return nil
}

func pageUp(n uint64) uint64 { return (n + pageSize - 1) &^ (pageSize - 1) }

// sysvSegment is a line of /proc/sysvipc/shm.
type sysvSegment struct {
	key                        int32
	size                       uint64
	mode, uid, gid, cuid, cgid uint32
}

// sysvSegment returns segment shmid of phaul's IPC namespace.
func (s *shmemDumper) sysvSegment(shmid int) (*sysvSegment, error) {
	if s.sysv == nil {
		b, err := os.ReadFile("/proc/sysvipc/shm")
		if err != nil {
			return nil, err
		}
		if s.sysv, err = parseSysvShm(string(b)); err != nil {
			return nil, err
		}
	}
	seg := s.sysv[shmid]
	if seg == nil {
		return nil, unsupported("SysV segment %d is not in phaul's IPC namespace", shmid)
	}
	return seg, nil
}

// parseSysvShm parses /proc/sysvipc/shm: a header line, then per segment
// key shmid perms size cpid lpid nattch uid gid cuid cgid ...
func parseSysvShm(text string) (map[int]*sysvSegment, error) {
	out := map[int]*sysvSegment{}
	lines := strings.Split(strings.TrimSpace(text), "\n")
	for _, line := range lines[1:] {
		f := strings.Fields(line)
		if len(f) < 11 {
			return nil, fmt.Errorf("/proc/sysvipc/shm: line %q", line)
		}
		key, err1 := strconv.ParseInt(f[0], 10, 32)
		id, err2 := strconv.Atoi(f[1])
		mode, err3 := strconv.ParseUint(f[2], 8, 32)
		size, err4 := strconv.ParseUint(f[3], 10, 64)
		var ids [4]uint64
		var errs []error
		for i := range ids {
			var err error
			ids[i], err = strconv.ParseUint(f[7+i], 10, 32)
			errs = append(errs, err)
		}
		if err := errors.Join(append(errs, err1, err2, err3, err4)...); err != nil {
			return nil, fmt.Errorf("/proc/sysvipc/shm: line %q: %w", line, err)
		}
		out[id] = &sysvSegment{key: int32(key), size: size, mode: uint32(mode),
			uid: uint32(ids[0]), gid: uint32(ids[1]), cuid: uint32(ids[2]), cgid: uint32(ids[3])}
	}
	return out, nil
}

// shmemDescriptor describes descriptor fd of pid, whose link says it is
// the deleted file link: a descriptor of a shared memory object (a memfd,
// a deleted tmpfs file, shared anonymous memory), or refused.
func shmemDescriptor(pid, fd int, link string, f *imagepb.File) error {
	src := fmt.Sprintf("/proc/%d/fd/%d", pid, fd)
	st, err := sys.Stat(src)
	if err != nil {
		return fmt.Errorf("descriptor %d of %d: %w", fd, pid, err)
	}
	fs, err := sys.FsType(src)
	if err != nil {
		return fmt.Errorf("descriptor %d of %d: %w", fd, pid, err)
	}
	name := strings.TrimSuffix(link, " (deleted)")
	switch {
	case fs == sys.HUGETLBFS_MAGIC:
		return unsupported("descriptor %d (%s) is on hugetlbfs (a hugetlb memfd)", fd, link)
	case fs == sys.SECRETMEM_MAGIC:
		return unsupported("descriptor %d (%s) is a memfd_secret area", fd, link)
	case fs != sys.TMPFS_MAGIC:
		return unsupported("descriptor %d refers to the deleted file %s (not on tmpfs)", fd, name)
	case st.Mode&sys.S_IFMT != sys.S_IFREG:
		return unsupported("descriptor %d refers to the deleted %#o file %s, not a regular one", fd, st.Mode&sys.S_IFMT, name)
	case st.Nlink != 0:
		return unsupported("descriptor %d refers to the deleted file %s, which still has %d other links", fd, name, st.Nlink)
	}
	f.Kind = imagepb.FileKind_FILE_MEMFD
	f.Mode, f.Dev, f.Inode, f.Size = st.Mode, st.Dev, st.Ino, st.Size
	return nil
}

// shmemChunk is how much of an object writeShmem copies at a time.
const shmemChunk = 4 << 20

// writeShmem saves the contents of o, read through the /proc link src,
// into shmem-ID.img of d.
func writeShmem(d image.Dir, o *imagepb.Shmem, src string) error {
	fd, err := sys.Open(src, sys.O_RDONLY|sys.O_CLOEXEC)
	if err != nil {
		return fmt.Errorf("contents of shared memory object %d (%s): %w", o.Id, src, err)
	}
	defer sys.Close(fd)
	w, err := d.NewShmemWriter(o)
	if err != nil {
		return err
	}
	if err := copyShmem(fd, o.Size, w.Add); err != nil {
		w.Abort()
		return fmt.Errorf("contents of shared memory object %d (%s): %w", o.Id, src, err)
	}
	return w.Close()
}

// copyShmem passes the pages of the size bytes behind fd that hold data to
// add, in order, without its holes and zero pages. An object that a
// process outside the dump truncates meanwhile makes the copy fail (the
// fault of reading past its end is turned into an error).
func copyShmem(fd int, size uint64, add func(off uint64, data []byte) error) (err error) {
	if size == 0 {
		return nil
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("the object shrank while it was read: %v", p)
		}
	}()
	total := pageUp(size)
	mem, err := sys.MapShared(fd, int(total), sys.PROT_READ)
	if err != nil {
		return err
	}
	defer sys.Munmap(mem)
	for off := uint64(0); off < size; {
		data, err := sys.Seek(fd, int64(off), sys.SEEK_DATA)
		if errors.Is(err, sys.ENXIO) {
			return nil // only holes from off
		}
		if err != nil {
			return err
		}
		hole, err := sys.Seek(fd, data, sys.SEEK_HOLE)
		if err != nil {
			return err
		}
		start, end := uint64(data)&^(pageSize-1), min(pageUp(uint64(hole)), total)
		for p := start; p < end; {
			n := min(end-p, shmemChunk)
			if err := addNonZero(p, mem[p:p+n], add); err != nil {
				return err
			}
			p += n
		}
		off = max(end, off+pageSize)
	}
	return nil
}

// addNonZero passes the runs of non-zero pages of data (at offset off) to
// add.
func addNonZero(off uint64, data []byte, add func(off uint64, data []byte) error) error {
	run := -1 // start of the current run of non-zero pages in data
	for i := 0; i <= len(data); i += pageSize {
		zero := i == len(data) || image.IsZero(data[i:i+pageSize])
		switch {
		case !zero && run < 0:
			run = i
		case zero && run >= 0:
			if err := add(off+uint64(run), data[run:i]); err != nil {
				return err
			}
			run = -1
		}
	}
	return nil
}
