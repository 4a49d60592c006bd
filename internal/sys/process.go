package sys

import (
	"errors"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// WaitStatus is the status reported by wait4.
type WaitStatus = unix.WaitStatus

// Rusage is struct rusage.
type Rusage = unix.Rusage

// Wait options.
const (
	WALL     = unix.WALL
	WNOHANG  = unix.WNOHANG
	WEXITED  = unix.WEXITED
	WSTOPPED = unix.WSTOPPED
)

// Signals used by name.
const (
	SIGKILL = unix.SIGKILL
	SIGSTOP = unix.SIGSTOP
	SIGCONT = unix.SIGCONT
	SIGTRAP = unix.SIGTRAP
	SIGCHLD = unix.SIGCHLD
	SIGTERM = unix.SIGTERM
	SIGUSR1 = unix.SIGUSR1
	SIGUSR2 = unix.SIGUSR2
)

// Wait4 waits for pid, retrying EINTR.
func Wait4(pid int, options int) (int, WaitStatus, error) {
	var ws WaitStatus
	for {
		wpid, err := unix.Wait4(pid, &ws, options, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return wpid, ws, wrap("wait4", err)
	}
}

// Kill sends sig to pid.
func Kill(pid int, sig unix.Signal) error { return wrap("kill", unix.Kill(pid, sig)) }

// Tgkill sends sig to thread tid of thread group tgid.
func Tgkill(tgid, tid int, sig unix.Signal) error {
	return wrap("tgkill", unix.Tgkill(tgid, tid, sig))
}

// PidfdOpen returns a pidfd for pid.
func PidfdOpen(pid int) (int, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	return fd, wrap("pidfd_open", err)
}

// PidfdGetfd duplicates descriptor targetfd of the process behind pidfd into
// this process.
func PidfdGetfd(pidfd, targetfd int) (int, error) {
	fd, err := unix.PidfdGetfd(pidfd, targetfd, 0)
	return fd, wrap("pidfd_getfd", err)
}

// CopyFD returns a copy of descriptor fd of process pid, the same open
// file description (pidfd_open and pidfd_getfd).
func CopyFD(pid, fd int) (int, error) {
	pidfd, err := PidfdOpen(pid)
	if err != nil {
		return -1, err
	}
	defer Close(pidfd)
	return PidfdGetfd(pidfd, fd)
}

// Close closes fd.
func Close(fd int) error { return wrap("close", unix.Close(fd)) }

// Getpid returns this process's PID.
func Getpid() int { return unix.Getpid() }

// Gettid returns the calling thread's TID.
func Gettid() int { return unix.Gettid() }

// Prlimit gets (and, when set is non-nil, sets) resource limit res of pid.
func Prlimit(pid, res int, set *unix.Rlimit) (unix.Rlimit, error) {
	var old unix.Rlimit
	err := unix.Prlimit(pid, res, set, &old)
	return old, wrap("prlimit64", err)
}

// Rlimit is struct rlimit.
type Rlimit = unix.Rlimit

// RLIM_NLIMITS is the number of resource limits.
const RLIM_NLIMITS = 16

// GetRobustList returns the robust futex list head of tid.
func GetRobustList(tid int) (head, length uint64, err error) {
	_, _, e := unix.Syscall(unix.SYS_GET_ROBUST_LIST, uintptr(tid),
		uintptr(unsafe.Pointer(&head)), uintptr(unsafe.Pointer(&length)))
	if e != 0 {
		return 0, 0, wrap("get_robust_list", e)
	}
	return head, length, nil
}

// SetChildSubreaper makes this process the reaper of orphaned descendants.
func SetChildSubreaper() error {
	return wrap("prctl(PR_SET_CHILD_SUBREAPER)", unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0))
}

// ChildSubreaper turns this process's child-subreaper attribute on or off.
func ChildSubreaper(on bool) error {
	v := uintptr(0)
	if on {
		v = 1
	}
	return wrap("prctl(PR_SET_CHILD_SUBREAPER)", unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, v, 0, 0, 0))
}

// MemfdCreate creates an anonymous file.
func MemfdCreate(name string, flags int) (int, error) {
	fd, err := unix.MemfdCreate(name, flags)
	return fd, wrap("memfd_create", err)
}

// MFD_CLOEXEC closes the memfd on exec.
const MFD_CLOEXEC = unix.MFD_CLOEXEC

// Uname returns the kernel release string.
func KernelRelease() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

// Pagesize is the system page size.
var Pagesize = unix.Getpagesize()

// Signal is a signal number.
type Signal = unix.Signal

// CloseOnExecFrom marks every descriptor from fd up close-on-exec, so that
// descriptors this process inherited do not leak into programs it starts.
func CloseOnExecFrom(fd int) error {
	return wrap("close_range", unix.CloseRange(uint(fd), ^uint(0), unix.CLOSE_RANGE_CLOEXEC))
}

// Kcmp types: two file descriptions, or the address spaces, descriptor
// tables and filesystem information (cwd, root, umask) of two processes.
const (
	KCMP_FILE  = 0
	KCMP_VM    = 1
	KCMP_FILES = 2
	KCMP_FS    = 3
)

// Kcmp compares kernel objects of two processes: 0 means the same object.
func Kcmp(pid1, pid2, typ int, idx1, idx2 uint64) (int, error) {
	r, _, e := unix.Syscall6(unix.SYS_KCMP, uintptr(pid1), uintptr(pid2), uintptr(typ), uintptr(idx1), uintptr(idx2), 0)
	if e != 0 {
		return 0, wrap("kcmp", e)
	}
	return int(r), nil
}

// SetnsNet moves the calling thread into the network namespace behind fd.
func SetnsNet(fd int) error { return wrap("setns", unix.Setns(fd, unix.CLONE_NEWNET)) }

// OnDiscardedThread runs fn on an OS thread of its own that is thrown away
// afterwards: fn may change what belongs to the thread (its network
// namespace, its fsuid) without that reaching any other goroutine.
// Descriptors fn creates may be used from anywhere.
func OnDiscardedThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the thread exits with this goroutine.
		runtime.LockOSThread()
		errc <- fn()
	}()
	return <-errc
}
