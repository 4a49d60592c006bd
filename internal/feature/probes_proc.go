package feature

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/phaul/phaul/internal/sys"
)

// clone3 runs one clone3 probe call. The calls are built to be refused; if
// the kernel creates a child anyway (it exits at once, see sys.Clone3), the
// child is killed, reaped and the surprise reported.
func clone3(args *sys.CloneArgs, setTid []int32, size uintptr) error {
	pid, err := sys.Clone3(args, setTid, size)
	if err != nil {
		return err
	}
	_ = sys.Kill(pid, sys.SIGKILL)
	_, _, _ = sys.Wait4(pid, 0)
	return fmt.Errorf("clone3 created child %d where the kernel had to refuse", pid)
}

// probeClone3SetTid checks, in three calls that never create a process:
//
//  1. clone3 exists: a size below CLONE_ARGS_SIZE_VER0 is EINVAL where
//     clone3 exists, ENOSYS where it does not (kernel < 5.3, or seccomp).
//  2. The kernel knows set_tid: a CLONE_ARGS_SIZE_VER1 struct with set_tid
//     set and set_tid_size above MAX_PID_NS_LEVEL is EINVAL; a kernel with
//     only the VER0 struct (5.3, 5.4) answers E2BIG to the unknown non-zero
//     trailing fields before looking at them.
//  3. set_tid is honoured for us: set_tid = [our own PID], which is taken
//     while we run. The kernel checks CAP_CHECKPOINT_RESTORE (or
//     CAP_SYS_ADMIN) in our PID namespace's owner, then tries to allocate
//     exactly that PID: EEXIST proves the chosen PID was looked up, EPERM
//     means we lack the capability.
//
// Together these show clone3 would give a restored process the PID it asks
// for, which is all restore needs; a free PID would succeed where (3) got
// EEXIST. /proc/sys/kernel/ns_last_pid, the older way, is reported as
// detail.
func probeClone3SetTid() (string, error) {
	err := clone3(&sys.CloneArgs{}, nil, 0)
	if !errors.Is(err, sys.EINVAL) {
		return "", absent("clone3 unavailable (kernel < 5.3, or blocked by seccomp)", err)
	}
	self := []int32{int32(sys.Getpid())}
	err = clone3(&sys.CloneArgs{ExitSignal: uint64(sys.SIGCHLD), SetTidSize: sys.MAX_PID_NS_LEVEL + 1},
		self, sys.CLONE_ARGS_SIZE_VER1)
	switch {
	case errors.Is(err, sys.E2BIG):
		return "", absent("clone3 has no set_tid (kernel < 5.5)", err)
	case !errors.Is(err, sys.EINVAL):
		return "", absent("clone3 did not validate set_tid_size", err)
	}
	err = clone3(&sys.CloneArgs{ExitSignal: uint64(sys.SIGCHLD), SetTidSize: 1},
		self, sys.CLONE_ARGS_SIZE_VER1)
	switch {
	case errors.Is(err, sys.EPERM):
		return "", absent("clone3 set_tid refused: CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN missing", err)
	case !errors.Is(err, sys.EEXIST):
		return "", absent("clone3 set_tid of a taken PID did not fail with EEXIST", err)
	}
	detail := "clone3 set_tid checks the requested PID"
	if _, err := os.Stat("/proc/sys/kernel/ns_last_pid"); err == nil {
		detail += "; ns_last_pid present"
	} else {
		detail += "; no ns_last_pid"
	}
	return detail, nil
}

// prctlMMMapSize is the size of struct prctl_mm_map phaul fills.
const prctlMMMapSize = 104

// capSysResource is the bit of CAP_SYS_RESOURCE in capability sets.
const capSysResource = 24

// probePRSetMMMap asks for the size of struct prctl_mm_map, which only
// kernels with CONFIG_CHECKPOINT_RESTORE answer, and notes whether
// CAP_SYS_RESOURCE is effective: PR_SET_MM_MAP does not need it, the single
// PR_SET_MM_* options do.
func probePRSetMMMap() (string, error) {
	size, err := sys.PrctlMMMapSize()
	if err != nil {
		return "", absent("PR_SET_MM_MAP_SIZE refused (kernel without CONFIG_CHECKPOINT_RESTORE)", err)
	}
	if size != prctlMMMapSize {
		return "", absent(fmt.Sprintf("struct prctl_mm_map is %d bytes, phaul fills %d", size, prctlMMMapSize), nil)
	}
	detail := fmt.Sprintf("struct prctl_mm_map %d B", size)
	switch has, err := effectiveCap(capSysResource); {
	case err != nil:
		detail += "; CAP_SYS_RESOURCE unknown: " + err.Error()
	case has:
		detail += "; CAP_SYS_RESOURCE present (single PR_SET_MM_* options also work)"
	default:
		detail += "; CAP_SYS_RESOURCE absent (fine: PR_SET_MM_MAP does not need it, single PR_SET_MM_* options would)"
	}
	return detail, nil
}

// effectiveCap reports whether capability bit is in this process's
// effective set (CapEff in /proc/self/status).
func effectiveCap(bit uint) (bool, error) {
	v, err := statusField("CapEff")
	if err != nil {
		return false, err
	}
	mask, err := strconv.ParseUint(v, 16, 64)
	if err != nil {
		return false, fmt.Errorf("parse CapEff %q: %w", v, err)
	}
	return mask&(1<<bit) != 0, nil
}

// statusField returns the value of field key in /proc/self/status.
func statusField(key string) (string, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return "", err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if ok && k == key {
			return strings.TrimSpace(v), nil
		}
	}
	if err := s.Err(); err != nil {
		return "", fmt.Errorf("read /proc/self/status: %w", err)
	}
	return "", fmt.Errorf("/proc/self/status has no %s", key)
}

// probeMemfdCreate creates a memfd and writes to it.
func probeMemfdCreate() (string, error) {
	fd, err := sys.MemfdCreate("phaul-probe", sys.MFD_CLOEXEC)
	if err != nil {
		return "", absent("memfd_create refused (kernel < 3.17 or CONFIG_MEMFD_CREATE off)", err)
	}
	defer sys.Close(fd)
	if _, err := sys.Write(fd, []byte("phaul")); err != nil {
		return "", absent("write to a memfd failed", err)
	}
	return "created and wrote a memfd", nil
}

// readSysctl reads an integer sysctl from /proc/sys.
func readSysctl(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("parse %s: %w", path, err)
	}
	return v, nil
}

func probeUnprivilegedUserfaultfd() (string, error) {
	const path = "/proc/sys/vm/unprivileged_userfaultfd"
	v, err := readSysctl(path)
	if errors.Is(err, os.ErrNotExist) {
		return "", absent("no "+path, nil)
	}
	if err != nil {
		return "", err
	}
	if v == 0 {
		return "vm.unprivileged_userfaultfd=0: without CAP_SYS_PTRACE a userfaultfd needs UFFD_USER_MODE_ONLY (phaul sets it for non-root targets)", nil
	}
	return fmt.Sprintf("vm.unprivileged_userfaultfd=%d: any process may create a userfaultfd", v), nil
}

func probePidMax() (string, error) {
	const path = "/proc/sys/kernel/pid_max"
	v, err := readSysctl(path)
	if errors.Is(err, os.ErrNotExist) {
		return "", absent("no "+path, nil)
	}
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("kernel.pid_max=%d: a restored PID must be below the target's pid_max", v), nil
}
