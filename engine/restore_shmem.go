package engine

import (
	"errors"
	"fmt"
	"path/filepath"
	"strconv"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// Restore of shared memory objects (see shmem.go for what they are).
//
// The first mapping or descriptor of an object that a restore meets, in
// whichever process of the tree, creates it: phaul makes the object
// itself, fills it with the contents of shmem-ID.img, and keeps its
// descriptor in the restore's sharedFiles pool (sharedKey{sharedMemory,
// Shmem.Id}). Every mapping of the object, in that process or another,
// maps a copy of that descriptor (MAP_SHARED|MAP_FIXED_NOREPLACE, at its
// address and offset), and every descriptor is a new open file
// description of it (its own flags and offset), so that all of them share
// one object again.
//
//   - Shared anonymous memory is made as such, MAP_SHARED|MAP_ANONYMOUS in
//     phaul, and taken as a descriptor through /proc/self/map_files: the
//     processes map the same kind of object as before, which /proc still
//     shows as "/dev/zero (deleted)" with its size, and which a later dump
//     again finds to be shared anonymous memory. (A memfd would do as
//     well, but /proc would show a memfd in its place.) Unlike memory a
//     process got from mmap itself, its mappings cannot be named with
//     PR_SET_VMA_ANON_NAME.
//   - A memfd is made with memfd_create under its name, with its size,
//     mode and owner, then sealed like the original.
//   - A deleted tmpfs file is made again under its old path (O_EXCL) and
//     unlinked at once, so that /proc shows the same deleted path; if that
//     path is taken, as an unnamed file in the same directory (O_TMPFILE),
//     or if that directory is gone, as a memfd.
//   - A SysV segment is the kernel's object, known by its shmid: if a
//     segment with that shmid, key and size exists (the dumped process was
//     killed and its segment lived on), it is the one, taken as it is;
//     otherwise it is made again with the same shmid (through
//     /proc/sys/kernel/shm_next_id), key, size, mode and owner and filled.
//     Each attachment is an injected shmat at its address, followed by
//     mprotect of each of its mappings. A segment that was removed
//     (IPC_RMID) while attached is removed again once all its mappings of
//     the image are attached.
//
// Objects are created and filled by phaul, so their memory is charged to
// phaul's memory cgroup, not to the restored processes'.

// shmemObject returns object id of the image's file table.
func (r *restorer) shmemObject(id uint32) (*imagepb.Shmem, error) {
	for _, o := range r.files.GetShmem() {
		if o.GetId() == id {
			return o, nil
		}
	}
	return nil, fmt.Errorf("%w: shared memory object %d is not in the file table", ErrBadImage, id)
}

// shmemFD returns phaul's descriptor of object o (read-write), creating
// the object on first use; the pool owns it.
//
// Precondition: called on the Tracer thread.
func (r *restorer) shmemFD(o *imagepb.Shmem) (int, error) {
	key := sharedKey{sharedMemory, uint64(o.Id)}
	if fd, ok := r.shared.get(key); ok {
		return fd, nil
	}
	if r.chain == nil || len(r.chain.Images) == 0 {
		return -1, fmt.Errorf("shared memory object %d: no image to restore its contents from", o.Id)
	}
	fd, err := createShmem(r.chain.Images[0].Dir, o)
	if err != nil {
		return -1, fmt.Errorf("shared memory object %d (%s %q): %w", o.Id, o.Kind, o.Name, err)
	}
	r.log.Debug("shared memory object created", "id", o.Id, "kind", o.Kind, "name", o.Name, "size", o.Size)
	r.shared.put(key, fd)
	return fd, nil
}

// createShmem makes object o (not a SysV segment) in phaul, with the
// contents saved in the image directory dir, and returns a read-write
// descriptor of it.
func createShmem(dir string, o *imagepb.Shmem) (int, error) {
	var fd int
	var err error
	switch o.Kind {
	case imagepb.ShmemKind_SHMEM_ANON:
		if o.Size == 0 || o.Size%pageSize != 0 {
			return -1, fmt.Errorf("%w: shared anonymous memory of %d bytes", ErrBadImage, o.Size)
		}
		fd, err = sys.AnonSharedFile(int(o.Size))
	case imagepb.ShmemKind_SHMEM_MEMFD:
		fd, err = createMemfd(o.Name, o.Mode)
	case imagepb.ShmemKind_SHMEM_DELETED_FILE:
		fd, err = createDeleted(o.Name)
	default:
		return -1, fmt.Errorf("%w: shared memory object of kind %v", ErrBadImage, o.Kind)
	}
	if err != nil {
		return -1, err
	}
	if err := fillShmem(fd, dir, o); err != nil {
		sys.Close(fd)
		return -1, err
	}
	return fd, nil
}

// fillShmem gives the new object behind fd its size, contents, owner,
// mode and seals.
func fillShmem(fd int, dir string, o *imagepb.Shmem) error {
	if o.Kind != imagepb.ShmemKind_SHMEM_ANON {
		if err := sys.Ftruncate(fd, int64(o.Size)); err != nil {
			return err
		}
	}
	if len(o.Runs) > 0 {
		mem, err := sys.MapShared(fd, int(pageUp(o.Size)), sys.PROT_READ|sys.PROT_WRITE)
		if err != nil {
			return err
		}
		err = readShmem(dir, o, mem)
		if uerr := sys.Munmap(mem); err == nil {
			err = uerr
		}
		if err != nil {
			return err
		}
	}
	if err := errors.Join(sys.Fchown(fd, int(o.Uid), int(o.Gid)), sys.Fchmod(fd, o.Mode&0o7777)); err != nil {
		return err
	}
	if o.Seals != 0 {
		if _, err := sys.FcntlInt(fd, sys.F_ADD_SEALS, int(o.Seals)); err != nil {
			return fmt.Errorf("seals %#x: %w", o.Seals, err)
		}
	}
	return nil
}

// readShmem copies the saved pages of o from the image directory dir into
// mem, the object's memory (whole pages), checking their checksums.
func readShmem(dir string, o *imagepb.Shmem, mem []byte) error {
	data, err := image.OpenShmem(dir, o)
	if err != nil {
		return err
	}
	defer data.Close()
	var buf []byte
	for _, run := range o.Runs {
		n := int(run.NrPages) * pageSize
		if cap(buf) < n {
			buf = make([]byte, n)
		}
		if err := data.ReadRun(run, buf[:n]); err != nil {
			return err
		}
		copy(mem[run.Offset:], buf[:n]) // validated: inside the object's pages
	}
	return nil
}

// createMemfd makes a memfd called name that may be sealed, executable if
// mode says so.
func createMemfd(name string, mode uint32) (int, error) {
	flags := sys.MFD_CLOEXEC | sys.MFD_ALLOW_SEALING
	if mode&0o111 != 0 {
		// Needed when vm.memfd_noexec makes memfds non-executable by
		// default; kernels before 6.3 do not know it.
		fd, err := sys.MemfdCreate(name, flags|sys.MFD_EXEC)
		if !errors.Is(err, sys.EINVAL) {
			return fd, err
		}
	}
	return sys.MemfdCreate(name, flags)
}

// createDeleted makes an empty file for a deleted file that was at path:
// at path itself, unlinked at once; if that cannot be (path is taken), an
// unnamed file in its directory; if that cannot be either (the directory
// is gone), a memfd with its name.
func createDeleted(path string) (int, error) {
	fd, err := sys.OpenMode(path, sys.O_RDWR|sys.O_CREAT|sys.O_EXCL|sys.O_NOFOLLOW|sys.O_CLOEXEC, 0o600)
	if err == nil {
		// Unlink what we made, not what another could have put there.
		st, serr := sys.Fstat(fd)
		now, lerr := sys.Stat(path)
		if serr == nil && lerr == nil && st.Ino == now.Ino && st.Dev == now.Dev {
			err = sys.Unlink(path)
		} else {
			err = fmt.Errorf("%s changed while it was made", path)
		}
		if err != nil {
			sys.Close(fd)
			return -1, err
		}
		return fd, nil
	}
	fd, err = sys.OpenMode(filepath.Dir(path), sys.O_RDWR|sys.O_TMPFILE|sys.O_CLOEXEC, 0o600)
	if err == nil {
		return fd, nil
	}
	return sys.MemfdCreate(filepath.Base(path), sys.MFD_CLOEXEC)
}

// shmemMapFD installs in the process a descriptor of the object that
// mapping v maps: read-only when v can never be made writable, so that
// it cannot after restore either. The caller closes it.
//
// Precondition: called on the Tracer thread.
func (r *restorer) shmemMapFD(v *imagepb.VMA) (uint64, error) {
	if v.Shmem == 0 {
		// A migration's layout: the shadow's pages come per address.
		return 0, unsupported("mapping %#x-%#x (%s): migrating memfds, deleted files and SysV shared memory", v.Start, v.End, vmaName(v))
	}
	o, err := r.shmemObject(v.Shmem)
	if err != nil {
		return 0, err
	}
	fd, err := r.shmemFD(o)
	if err != nil {
		return 0, err
	}
	if !v.SharedReadOnly {
		return r.install(fd)
	}
	ro, err := reopen(fd, sys.O_RDONLY)
	if err != nil {
		return 0, fmt.Errorf("shared memory object %d: %w", o.Id, err)
	}
	defer sys.Close(ro)
	return r.install(ro)
}

// reopen opens the file behind phaul's descriptor fd again, as a new open
// file description with flags.
func reopen(fd int, flags int) (int, error) {
	return sys.Open("/proc/self/fd/"+strconv.Itoa(fd), flags|sys.O_CLOEXEC)
}

// openShmemFile returns a new descriptor of the process for f, a
// descriptor of a shared memory object: an open file description of its
// own, with f's flags and offset (close-on-exec).
//
// Precondition: called on the Tracer thread.
func (r *restorer) openShmemFile(f *imagepb.File) (uint64, error) {
	if f.Shmem == 0 {
		return 0, unsupported("descriptor of %s: migrating memfds and deleted files", f.Path)
	}
	o, err := r.shmemObject(f.Shmem)
	if err != nil {
		return 0, err
	}
	fd, err := r.shmemFD(o)
	if err != nil {
		return 0, err
	}
	ours, err := reopen(fd, int(f.Flags&openFlags))
	if err != nil {
		return 0, fmt.Errorf("shared memory object %d: %w", o.Id, err)
	}
	defer sys.Close(ours)
	if f.Pos != 0 {
		if _, err := sys.Seek(ours, f.Pos, 0); err != nil {
			return 0, fmt.Errorf("seek to %d: %w", f.Pos, err)
		}
	}
	return r.install(ours)
}

// attachSysV maps v, a mapping of a SysV segment: the first mapping of an
// attachment (offset 0) attaches the whole segment with shmat, each
// mapping gets its protection with mprotect.
//
// Precondition: called on the Tracer thread.
func (r *restorer) attachSysV(v *imagepb.VMA, start, end uint64) error {
	in := r.main
	if v.Shmem == 0 {
		return unsupported("mapping %#x-%#x (%s): migrating SysV shared memory", v.Start, v.End, vmaName(v))
	}
	if start != v.Start || end != v.End {
		return fmt.Errorf("SysV mapping %#x-%#x cannot be mapped in part (%#x-%#x)", v.Start, v.End, start, end)
	}
	o, err := r.shmemObject(v.Shmem)
	if err != nil {
		return err
	}
	seg := o.GetSysv()
	if seg == nil {
		return fmt.Errorf("%w: mapping %#x-%#x: shared memory object %d is no SysV segment", ErrBadImage, v.Start, v.End, o.Id)
	}
	shmid := int(seg.Shmid)
	if v.Pgoff == 0 {
		if err := r.sysvSegment(o); err != nil {
			return fmt.Errorf("SysV segment %d: %w", shmid, err)
		}
		var flags uint64
		if v.SharedReadOnly {
			flags = sys.SHM_RDONLY
		}
		got, err := in.Syscall(sys.SYS_SHMAT, uint64(shmid), v.Start, flags)
		if err != nil {
			return fmt.Errorf("shmat of SysV segment %d at %#x: %w", shmid, v.Start, err)
		}
		if got != v.Start {
			return fmt.Errorf("shmat of SysV segment %d at %#x: attached at %#x", shmid, v.Start, got)
		}
	}
	// Validated: the attachment made for the mapping at offset 0 covers it.
	if _, err := in.Syscall(sys.SYS_MPROTECT, v.Start, v.End-v.Start, uint64(v.Prot)); err != nil {
		return fmt.Errorf("mprotect SysV mapping %#x-%#x: %w", v.Start, v.End, err)
	}
	if !seg.Removed {
		return nil
	}
	ds, err := sys.ShmStat(shmid)
	if err != nil {
		return err
	}
	if ds.Perm.Mode&sys.SHM_DEST == 0 && ds.Nattch >= uint64(seg.Attaches) {
		return sys.ShmRemove(shmid)
	}
	return nil
}

// sysvSegment makes sure the segment of object o exists with its shmid:
// an existing segment with the same shmid, key and size is taken as it
// is; a missing one is made again and filled.
func (r *restorer) sysvSegment(o *imagepb.Shmem) error {
	seg := o.Sysv
	shmid := int(seg.Shmid)
	ds, err := sys.ShmStat(shmid)
	switch {
	case err == nil && ds.Perm.Key == seg.Key && ds.Segsz == o.Size:
		return nil
	case err == nil:
		return fmt.Errorf("the shmid is taken by another segment (key %#x, %d bytes; the image's had key %#x, %d bytes)",
			uint32(ds.Perm.Key), ds.Segsz, uint32(seg.Key), o.Size)
	case !errors.Is(err, sys.EINVAL) && !errors.Is(err, sys.EIDRM):
		return err
	}
	key := int(seg.Key)
	if seg.Removed {
		key = 0 // IPC_PRIVATE, as a removed segment has
	}
	id, err := sys.ShmGetWithID(shmid, key, int(o.Size), o.Mode)
	if errors.Is(err, sys.EEXIST) {
		return fmt.Errorf("key %#x is taken by another segment: %w", uint32(seg.Key), err)
	}
	if err != nil {
		return err
	}
	if id != shmid {
		_ = sys.ShmRemove(id)
		return fmt.Errorf("the kernel made the segment with shmid %d (another segment was made at the same time?)", id)
	}
	if err := sys.ShmSetOwner(id, o.Uid, o.Gid, o.Mode); err != nil {
		_ = sys.ShmRemove(id)
		return err
	}
	if err := fillSysV(id, r.chain, o); err != nil {
		_ = sys.ShmRemove(id)
		return err
	}
	r.log.Debug("SysV segment made again", "shmid", id, "key", seg.Key, "size", o.Size)
	return nil
}

// fillSysV writes the saved contents of o into segment shmid, attached to
// phaul for that.
func fillSysV(shmid int, chain *image.Chain, o *imagepb.Shmem) error {
	if len(o.Runs) == 0 {
		return nil
	}
	if chain == nil || len(chain.Images) == 0 {
		return fmt.Errorf("no image to restore its contents from")
	}
	mem, err := sys.ShmAttach(shmid, 0)
	if err != nil {
		return err
	}
	if uint64(len(mem)) < pageUp(o.Size) {
		_ = sys.ShmDetach(mem)
		return fmt.Errorf("attached %d bytes of a segment of %d", len(mem), o.Size)
	}
	err = readShmem(chain.Images[0].Dir, o, mem)
	return errors.Join(err, sys.ShmDetach(mem))
}
