package feature

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/phaul/phaul/internal/sys"
)

// probePtraceSeize seizes and interrupts a child and checks its registers
// can be read in the stop.
func probePtraceSeize() (string, error) {
	return withStoppedChild(func(pid int) (string, error) {
		var regs sys.Regs
		if err := sys.PtraceGetRegs(pid, &regs); err != nil {
			return "", absent("PTRACE_GETREGS in the interrupt stop refused", err)
		}
		return "seized, interrupted and read registers of a child", nil
	})
}

// rseqSignature is the signature glibc registers rseq areas with on x86.
const rseqSignature = 0x53053053

// probeRseqConfig asks the kernel for a seized child's rseq registration.
// The request is the feature; whether the child registered rseq at all
// (glibc >= 2.35 does, unless tuned off) is reported as detail.
func probeRseqConfig() (string, error) {
	return withStoppedChild(func(pid int) (string, error) {
		c, err := sys.PtraceGetRseq(pid)
		if err != nil {
			return "", absent("PTRACE_GET_RSEQ_CONFIGURATION refused (kernel < 5.13)", err)
		}
		if c.Pointer == 0 {
			return "request works; the probe child has no rseq registered", nil
		}
		sig := ""
		if c.Signature != rseqSignature {
			sig = " (not glibc's)"
		}
		return fmt.Sprintf("child rseq area %d B, signature %#x%s", c.Size, c.Signature, sig), nil
	})
}

// probeProcessVM reads the top word of a child's stack with
// process_vm_readv, overwrites it with process_vm_writev, reads the new
// value back and restores the old one. The top word is the terminating NULL
// above the exec file name, which the child never touches.
func probeProcessVM() (string, error) {
	return onLockedThread(func() (string, error) {
		c, err := startChild()
		if err != nil {
			return "", err
		}
		defer c.stop()
		_, end, err := findMapping(c.pid, "[stack]")
		if err != nil {
			return "", err
		}
		addr := end - 8
		remote := []sys.RemoteIovec{{Base: uintptr(addr), Len: 8}}
		orig := make([]byte, 8)
		if n, err := sys.ProcessVMReadv(c.pid, [][]byte{orig}, remote); err != nil || n != 8 {
			return "", absent("process_vm_readv of a child's stack failed", shortIO(n, err))
		}
		pattern := []byte("phaul\x00ck")
		if n, err := sys.ProcessVMWritev(c.pid, [][]byte{pattern}, remote); err != nil || n != 8 {
			return "", absent("process_vm_writev to a child's stack failed", shortIO(n, err))
		}
		back := make([]byte, 8)
		if n, err := sys.ProcessVMReadv(c.pid, [][]byte{back}, remote); err != nil || n != 8 {
			return "", absent("process_vm_readv after a write failed", shortIO(n, err))
		}
		if !bytes.Equal(back, pattern) {
			return "", absent(fmt.Sprintf("process_vm_writev reported success but memory reads %q", back), nil)
		}
		if _, err := sys.ProcessVMWritev(c.pid, [][]byte{orig}, remote); err != nil {
			return "", absent("process_vm_writev to restore a word failed", err)
		}
		return "read, wrote and re-read a word of a child's stack", nil
	})
}

// shortIO turns a short transfer without an error into one.
func shortIO(n int, err error) error {
	if err != nil {
		return err
	}
	return fmt.Errorf("transferred %d of 8 bytes", n)
}

// probePidfdGetfd duplicates the child's stdin (our pipe) into this process
// and checks it is the same pipe.
func probePidfdGetfd() (string, error) {
	return onLockedThread(func() (string, error) {
		c, err := startChild()
		if err != nil {
			return "", err
		}
		defer c.stop()
		pidfd, err := sys.PidfdOpen(c.pid)
		if err != nil {
			return "", absent("pidfd_open refused (kernel < 5.3)", err)
		}
		defer sys.Close(pidfd)
		fd, err := sys.PidfdGetfd(pidfd, 0)
		if err != nil {
			return "", absent("pidfd_getfd refused (kernel < 5.6, or ptrace access denied)", err)
		}
		defer sys.Close(fd)
		want, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/0", c.pid))
		if err != nil {
			return "", fmt.Errorf("read child's fd 0: %w", err)
		}
		got, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
		if err != nil {
			return "", fmt.Errorf("read duplicated fd: %w", err)
		}
		if got != want {
			return "", absent(fmt.Sprintf("pidfd_getfd returned %s, the child's fd 0 is %s", got, want), nil)
		}
		return "took a child's fd 0 (" + got + ")", nil
	})
}

// findMapping returns the first mapping of pid whose name is name.
func findMapping(pid int, name string) (start, end uint64, err error) {
	path := fmt.Sprintf("/proc/%d/maps", pid)
	f, err := os.Open(path)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 6 || fields[5] != name {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			break
		}
		if start, err = strconv.ParseUint(lo, 16, 64); err == nil {
			end, err = strconv.ParseUint(hi, 16, 64)
		}
		if err != nil {
			return 0, 0, fmt.Errorf("parse %s: %w", path, err)
		}
		return start, end, nil
	}
	if err := s.Err(); err != nil {
		return 0, 0, fmt.Errorf("read %s: %w", path, err)
	}
	return 0, 0, fmt.Errorf("%s: no %s mapping", path, name)
}
