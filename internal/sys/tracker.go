package sys

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Write-protect modes of UFFDIO_WRITEPROTECT (include/uapi/linux/userfaultfd.h).
const (
	UFFDIO_WRITEPROTECT_MODE_WP       = 1 << 0
	UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1
)

// ioctl numbers of the userfaultfd calls dirty tracking adds to uffd.go's.
const (
	uffdioWriteProtect = 0xc018aa06 // _IOWR(0xaa, 0x06, struct uffdio_writeprotect)
	uffdioUnregister   = 0x8010aa01 // _IOR(0xaa, 0x01, struct uffdio_range)
)

// UffdioWriteProtect is struct uffdio_writeprotect.
type UffdioWriteProtect struct {
	Range UffdioRange
	Mode  uint64
}

// UffdWriteProtect write-protects (mode UFFDIO_WRITEPROTECT_MODE_WP) or
// unprotects (mode 0) [start, start+length), which must be registered with
// fd in write-protect mode.
func UffdWriteProtect(fd int, start, length, mode uint64) error {
	wp := UffdioWriteProtect{Range: UffdioRange{Start: start, Len: length}, Mode: mode}
	_, err := Ioctl("UFFDIO_WRITEPROTECT", fd, uffdioWriteProtect, unsafe.Pointer(&wp))
	return err
}

// UffdUnregister removes the userfaultfd registration of every mapping in
// [start, start+length); write-protection is dropped with it.
func UffdUnregister(fd int, start, length uint64) error {
	r := UffdioRange{Start: start, Len: length}
	_, err := Ioctl("UFFDIO_UNREGISTER", fd, uffdioUnregister, unsafe.Pointer(&r))
	return err
}

// FdInode returns the inode number of the file open as fd. Every
// userfaultfd has an inode of its own, so the number identifies one.
func FdInode(fd int) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, wrap("fstat", err)
	}
	return st.Ino, nil
}

// EBADF is returned for a descriptor number with no open file behind it.
const EBADF = unix.EBADF
