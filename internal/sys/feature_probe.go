package sys

import (
	"errors"
	"unsafe"

	"golang.org/x/sys/unix"
)

// PR_SET_MM_MAP_SIZE asks the kernel for the size of struct prctl_mm_map.
const PR_SET_MM_MAP_SIZE = unix.PR_SET_MM_MAP_SIZE

// PrctlMMMapSize returns the size of struct prctl_mm_map the kernel expects
// in prctl(PR_SET_MM, PR_SET_MM_MAP). It fails on kernels built without
// CONFIG_CHECKPOINT_RESTORE.
func PrctlMMMapSize() (uint32, error) {
	var size uint32
	err := unix.Prctl(unix.PR_SET_MM, PR_SET_MM_MAP_SIZE, uintptr(unsafe.Pointer(&size)), 0, 0)
	return size, wrap("prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE)", err)
}

// errAddrEmpty is returned by BufferAddr for an empty slice.
var errAddrEmpty = errors.New("empty buffer has no address")

// BufferAddr is the address of b's first byte, for calls that take
// addresses of this process's memory as integers (UFFDIO_REGISTER,
// PAGEMAP_SCAN, pagemap offsets). b must stay mapped while it is used.
func BufferAddr(b []byte) (uint64, error) {
	if len(b) == 0 {
		return 0, errAddrEmpty
	}
	return uint64(uintptr(unsafe.Pointer(&b[0]))), nil
}
