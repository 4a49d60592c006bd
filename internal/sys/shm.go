package sys

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Shared memory objects: memfds, tmpfs files, shared anonymous memory and
// System V segments, created and filled by phaul itself.

// Constants for shared memory objects.
const (
	SYS_SHMAT = unix.SYS_SHMAT

	SHM_RDONLY = unix.SHM_RDONLY
	// SHM_DEST is the mode bit of a segment marked for destruction.
	SHM_DEST = 0o1000

	MFD_ALLOW_SEALING = unix.MFD_ALLOW_SEALING
	MFD_EXEC          = unix.MFD_EXEC
	MFD_HUGETLB       = unix.MFD_HUGETLB

	F_ADD_SEALS         = unix.F_ADD_SEALS
	F_GET_SEALS         = unix.F_GET_SEALS
	F_SEAL_SEAL         = unix.F_SEAL_SEAL
	F_SEAL_SHRINK       = unix.F_SEAL_SHRINK
	F_SEAL_GROW         = unix.F_SEAL_GROW
	F_SEAL_WRITE        = unix.F_SEAL_WRITE
	F_SEAL_FUTURE_WRITE = unix.F_SEAL_FUTURE_WRITE
	F_SEAL_EXEC         = unix.F_SEAL_EXEC

	O_TMPFILE = unix.O_TMPFILE
	O_EXCL    = unix.O_EXCL

	SEEK_DATA = unix.SEEK_DATA
	SEEK_HOLE = unix.SEEK_HOLE

	// Filesystem magics (statfs f_type).
	TMPFS_MAGIC     = unix.TMPFS_MAGIC
	HUGETLBFS_MAGIC = unix.HUGETLBFS_MAGIC
	SECRETMEM_MAGIC = unix.SECRETMEM_MAGIC

	// S_IFREG is the file type of a regular file in Stat_t.Mode.
	S_IFREG = unix.S_IFREG
)

// ENXIO is what SEEK_DATA answers past the last data; EIDRM what IPC_STAT
// answers for a segment being destroyed.
const (
	ENXIO = unix.ENXIO
	EIDRM = unix.EIDRM
)

// Stat_t is struct stat.
type Stat_t = unix.Stat_t

// Stat returns the status of the file at path, following links (also the
// magic links of /proc).
func Stat(path string) (Stat_t, error) {
	var st unix.Stat_t
	for {
		err := unix.Stat(path, &st)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return st, wrap("stat", err)
	}
}

// Fstat returns the status of fd.
func Fstat(fd int) (Stat_t, error) {
	var st unix.Stat_t
	return st, wrap("fstat", unix.Fstat(fd, &st))
}

// FsType returns the filesystem magic (statfs f_type) of the file at path.
func FsType(path string) (int64, error) {
	var st unix.Statfs_t
	for {
		err := unix.Statfs(path, &st)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return st.Type, wrap("statfs", err)
	}
}

// OpenMode opens path with flags, creating it with perm when flags ask
// for it; it retries EINTR.
func OpenMode(path string, flags int, perm uint32) (int, error) {
	for {
		fd, err := unix.Open(path, flags, perm)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return fd, wrap("open", err)
	}
}

// Unlink removes the name path.
func Unlink(path string) error { return wrap("unlink", unix.Unlink(path)) }

// Ftruncate sets the size of fd.
func Ftruncate(fd int, size int64) error {
	for {
		err := unix.Ftruncate(fd, size)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return wrap("ftruncate", err)
	}
}

// Fchmod sets the permission bits of fd.
func Fchmod(fd int, mode uint32) error { return wrap("fchmod", unix.Fchmod(fd, mode)) }

// Fchown sets the owner and group of fd.
func Fchown(fd, uid, gid int) error { return wrap("fchown", unix.Fchown(fd, uid, gid)) }

// Seek moves the offset of fd (whence SEEK_SET, SEEK_DATA, SEEK_HOLE, ...).
func Seek(fd int, off int64, whence int) (int64, error) {
	n, err := unix.Seek(fd, off, whence)
	return n, wrap("lseek", err)
}

// MapShared maps length bytes of fd from offset 0, MAP_SHARED, into this
// process.
func MapShared(fd int, length int, prot int) ([]byte, error) {
	b, err := unix.Mmap(fd, 0, length, prot, unix.MAP_SHARED)
	return b, wrap("mmap", err)
}

// AnonSharedFile creates size bytes of shared anonymous memory (what
// mmap(MAP_SHARED|MAP_ANONYMOUS) makes, which the kernel calls
// "/dev/zero (deleted)") and returns a read-write descriptor of it, taken
// through /proc/self/map_files (which needs CAP_SYS_ADMIN); the memory is
// no longer mapped in this process.
func AnonSharedFile(size int) (int, error) {
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		return -1, wrap("mmap", err)
	}
	start := uintptr(unsafe.Pointer(&b[0]))
	path := fmt.Sprintf("/proc/self/map_files/%x-%x", start, start+uintptr(len(b)))
	fd, err := OpenMode(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if uerr := unix.Munmap(b); err == nil && uerr != nil {
		_ = unix.Close(fd)
		return -1, wrap("munmap", uerr)
	}
	if err != nil {
		return -1, fmt.Errorf("shared anonymous memory: %w", err)
	}
	return fd, nil
}

// ShmidDS is struct shmid64_ds, what IPC_STAT reports of a segment.
type ShmidDS = unix.SysvShmDesc

// ShmStat returns the state of System V segment shmid (IPC_STAT).
func ShmStat(shmid int) (ShmidDS, error) {
	var ds unix.SysvShmDesc
	_, err := unix.SysvShmCtl(shmid, unix.IPC_STAT, &ds)
	return ds, wrap("shmctl(IPC_STAT)", err)
}

// ShmSetOwner sets the owner, group and permission bits of segment shmid
// (IPC_SET).
func ShmSetOwner(shmid int, uid, gid, mode uint32) error {
	ds, err := ShmStat(shmid)
	if err != nil {
		return err
	}
	ds.Perm.Uid, ds.Perm.Gid, ds.Perm.Mode = uid, gid, mode&0o777
	_, err = unix.SysvShmCtl(shmid, unix.IPC_SET, &ds)
	return wrap("shmctl(IPC_SET)", err)
}

// ShmRemove marks segment shmid for destruction (IPC_RMID): it goes when
// its last attachment does.
func ShmRemove(shmid int) error {
	_, err := unix.SysvShmCtl(shmid, unix.IPC_RMID, nil)
	return wrap("shmctl(IPC_RMID)", err)
}

// ShmGetWithID creates a System V segment of size bytes with key and
// permission bits mode that gets the identifier shmid, through
// /proc/sys/kernel/shm_next_id (which the kernel resets once it used it).
// The kernel may still choose another identifier (another creator raced
// us): the caller checks the result and removes a wrong one.
func ShmGetWithID(shmid, key int, size int, mode uint32) (int, error) {
	const next = "/proc/sys/kernel/shm_next_id"
	if err := os.WriteFile(next, []byte(strconv.Itoa(shmid)), 0); err != nil {
		return -1, fmt.Errorf("ask for SysV shmid %d: %w", shmid, err)
	}
	id, err := unix.SysvShmGet(key, size, unix.IPC_CREAT|unix.IPC_EXCL|int(mode&0o777))
	if err != nil {
		// Leave no request behind for the next creator.
		_ = os.WriteFile(next, []byte("-1"), 0)
		return -1, wrap("shmget", err)
	}
	return id, nil
}

// ShmGet creates (with IPC_CREAT in flags) or finds a System V segment.
func ShmGet(key, size, flags int) (int, error) {
	id, err := unix.SysvShmGet(key, size, flags)
	return id, wrap("shmget", err)
}

// ShmAttach attaches segment shmid to this process; it returns the memory
// of the attachment: the segment's whole pages, also the bytes of its last
// page past its size.
func ShmAttach(shmid int, flags int) ([]byte, error) {
	b, err := unix.SysvShmAttach(shmid, 0, flags)
	if err != nil {
		return nil, wrap("shmat", err)
	}
	if len(b) == 0 {
		return b, nil
	}
	n := (len(b) + Pagesize - 1) &^ (Pagesize - 1)
	return unsafe.Slice(&b[0], n), nil
}

// ShmDetach detaches memory that ShmAttach returned.
func ShmDetach(b []byte) error {
	if len(b) == 0 {
		return wrap("shmdt", unix.EINVAL)
	}
	_, _, e := unix.Syscall(unix.SYS_SHMDT, uintptr(unsafe.Pointer(&b[0])), 0, 0)
	if e != 0 {
		return wrap("shmdt", e)
	}
	return nil
}
