package sys

import (
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// userfaultfd(2) flags, UFFDIO_API features and register modes
// (include/uapi/linux/userfaultfd.h).
const (
	UFFD_USER_MODE_ONLY = 1
	UFFD_API            = 0xaa

	UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
	UFFD_FEATURE_WP_UNPOPULATED     = 1 << 13
	UFFD_FEATURE_WP_ASYNC           = 1 << 15

	UFFDIO_REGISTER_MODE_MISSING = 1 << 0
	UFFDIO_REGISTER_MODE_WP      = 1 << 1
)

// ioctl numbers: _IOWR(UFFDIO, nr, struct) and _IO(UFFDIO, 0) for
// /dev/userfaultfd.
const (
	uffdioAPI         = 0xc018aa3f // _IOWR(0xaa, 0x3f, struct uffdio_api)
	uffdioRegister    = 0xc020aa00 // _IOWR(0xaa, 0x00, struct uffdio_register)
	userfaultfdIocNew = 0xaa00     // _IO(0xaa, 0x00)
)

// UffdioAPI is struct uffdio_api.
type UffdioAPI struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

// UffdioRange is struct uffdio_range.
type UffdioRange struct {
	Start uint64
	Len   uint64
}

// UffdioRegister is struct uffdio_register.
type UffdioRegister struct {
	Range  UffdioRange
	Mode   uint64
	Ioctls uint64
}

// Userfaultfd creates a userfaultfd with flags (O_CLOEXEC, O_NONBLOCK,
// UFFD_USER_MODE_ONLY).
func Userfaultfd(flags int) (int, error) {
	r, _, e := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(flags), 0, 0)
	if e != 0 {
		return -1, wrap("userfaultfd", e)
	}
	return int(r), nil
}

// UserfaultfdFromDev creates a userfaultfd with flags through devfd, an open
// /dev/userfaultfd (USERFAULTFD_IOC_NEW). Access to the device node replaces
// the vm.unprivileged_userfaultfd policy of the system call.
func UserfaultfdFromDev(devfd int, flags int) (int, error) {
	for {
		r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(devfd), userfaultfdIocNew, uintptr(flags))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return -1, wrap("ioctl(USERFAULTFD_IOC_NEW)", e)
		}
		return int(r), nil
	}
}

// UffdAPI performs the UFFDIO_API handshake on fd, requesting features, and
// returns what the kernel answered (granted features, supported ioctls).
func UffdAPI(fd int, features uint64) (UffdioAPI, error) {
	a := UffdioAPI{API: UFFD_API, Features: features}
	_, err := Ioctl("UFFDIO_API", fd, uffdioAPI, unsafe.Pointer(&a))
	return a, err
}

// UffdRegister registers [start, start+length) with fd in mode and returns
// the ioctls now allowed on the range.
func UffdRegister(fd int, start, length, mode uint64) (uint64, error) {
	r := UffdioRegister{Range: UffdioRange{Start: start, Len: length}, Mode: mode}
	_, err := Ioctl("UFFDIO_REGISTER", fd, uffdioRegister, unsafe.Pointer(&r))
	return r.Ioctls, err
}

// PAGEMAP_SCAN page categories and flags (include/uapi/linux/fs.h).
const (
	PAGE_IS_WPALLOWED  = 1 << 0
	PAGE_IS_WRITTEN    = 1 << 1
	PAGE_IS_FILE       = 1 << 2
	PAGE_IS_PRESENT    = 1 << 3
	PAGE_IS_SWAPPED    = 1 << 4
	PAGE_IS_PFNZERO    = 1 << 5
	PAGE_IS_HUGE       = 1 << 6
	PAGE_IS_SOFT_DIRTY = 1 << 7

	PM_SCAN_WP_MATCHING   = 1 << 0
	PM_SCAN_CHECK_WPASYNC = 1 << 1
)

const pagemapScan = 0xc0606610 // _IOWR('f', 16, struct pm_scan_arg)

// PmScanArg is struct pm_scan_arg. PagemapScan sets Size, Vec and VecLen.
type PmScanArg struct {
	Size              uint64
	Flags             uint64
	Start             uint64
	End               uint64
	WalkEnd           uint64
	Vec               uint64
	VecLen            uint64
	MaxPages          uint64
	CategoryInvMask   uint64
	CategoryMask      uint64
	CategoryAnyofMask uint64
	ReturnMask        uint64
}

// PageRegion is struct page_region: a run of pages sharing Categories.
type PageRegion struct {
	Start      uint64
	End        uint64
	Categories uint64
}

// PagemapScan runs the PAGEMAP_SCAN ioctl on fd (an open /proc/PID/pagemap)
// with arg, filling vec, and returns how many regions it filled. arg.WalkEnd
// tells where the walk stopped.
func PagemapScan(fd int, arg *PmScanArg, vec []PageRegion) (int, error) {
	arg.Size = uint64(unsafe.Sizeof(*arg))
	arg.Vec, arg.VecLen = 0, 0
	if len(vec) > 0 {
		arg.Vec = uint64(uintptr(unsafe.Pointer(&vec[0])))
		arg.VecLen = uint64(len(vec))
	}
	n, err := Ioctl("PAGEMAP_SCAN", fd, pagemapScan, unsafe.Pointer(arg))
	runtime.KeepAlive(vec)
	return n, err
}
