package sys

import (
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// CloneArgs is struct clone_args (CLONE_ARGS_SIZE_VER2). SetTid is filled
// by Clone3 from its setTid argument.
type CloneArgs struct {
	Flags      uint64
	Pidfd      uint64
	ChildTid   uint64
	ParentTid  uint64
	ExitSignal uint64
	Stack      uint64
	StackSize  uint64
	TLS        uint64
	SetTid     uint64
	SetTidSize uint64
	Cgroup     uint64
}

// Sizes of struct clone_args by version, and the deepest PID namespace
// nesting the kernel allows (the largest valid set_tid_size).
const (
	CLONE_ARGS_SIZE_VER0 = unix.CLONE_ARGS_SIZE_VER0 // up to tls
	CLONE_ARGS_SIZE_VER1 = unix.CLONE_ARGS_SIZE_VER1 // adds set_tid, set_tid_size
	CLONE_ARGS_SIZE_VER2 = unix.CLONE_ARGS_SIZE_VER2 // adds cgroup
	MAX_PID_NS_LEVEL     = 32
)

// E2BIG is returned by extensible-struct syscalls for non-zero bytes the
// kernel does not know.
const E2BIG = unix.E2BIG

// Clone3 calls clone3(args, size) with args.SetTid pointing at setTid (left
// as is when setTid is empty) and returns the new child's PID.
//
// It exists for feature probes, which pass arguments the kernel must reject:
// a Go process cannot safely run a forked child. Should the kernel create a
// child anyway, the child calls exit_group(0) at once without returning into
// Go; the caller then owns a child to reap (args.ExitSignal decides how).
func Clone3(args *CloneArgs, setTid []int32, size uintptr) (int, error) {
	if len(setTid) > 0 {
		args.SetTid = uint64(uintptr(unsafe.Pointer(&setTid[0])))
	}
	for {
		// RawSyscall: no scheduler hooks run between the clone and the
		// child's exit_group.
		r, _, e := unix.RawSyscall(unix.SYS_CLONE3, uintptr(unsafe.Pointer(args)), size, 0)
		if e == 0 && r == 0 {
			unix.RawSyscall(unix.SYS_EXIT_GROUP, 0, 0, 0)
		}
		if e == unix.EINTR {
			continue
		}
		runtime.KeepAlive(setTid)
		runtime.KeepAlive(args)
		if e != 0 {
			return 0, wrap("clone3", e)
		}
		return int(r), nil
	}
}
