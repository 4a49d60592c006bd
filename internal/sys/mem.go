package sys

import (
	"errors"
	"unsafe"

	"golang.org/x/sys/unix"
)

// RemoteIovec is one range of another process's memory.
type RemoteIovec = unix.RemoteIovec

// iovMax is the largest iovec count one process_vm_* call accepts.
const iovMax = 1024

// ProcessVMReadv reads remote ranges of pid into local buffers, returning
// the bytes read (which may be short: a range that is not mapped ends it).
func ProcessVMReadv(pid int, local [][]byte, remote []RemoteIovec) (int, error) {
	return processVM("process_vm_readv", unix.ProcessVMReadv, pid, local, remote)
}

// ProcessVMWritev writes local buffers to remote ranges of pid.
func ProcessVMWritev(pid int, local [][]byte, remote []RemoteIovec) (int, error) {
	return processVM("process_vm_writev", unix.ProcessVMWritev, pid, local, remote)
}

func processVM(name string, f func(int, []unix.Iovec, []unix.RemoteIovec, uint) (int, error),
	pid int, local [][]byte, remote []RemoteIovec) (int, error) {
	if len(local) > iovMax || len(remote) > iovMax {
		return 0, wrap(name, unix.EINVAL)
	}
	liov := make([]unix.Iovec, 0, len(local))
	for _, b := range local {
		if len(b) == 0 {
			continue
		}
		v := unix.Iovec{Base: &b[0]}
		v.SetLen(len(b))
		liov = append(liov, v)
	}
	for {
		n, err := f(pid, liov, remote, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return n, wrap(name, err)
	}
}

// Pread reads from fd at off, retrying EINTR.
func Pread(fd int, b []byte, off int64) (int, error) {
	for {
		n, err := unix.Pread(fd, b, off)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return n, wrap("pread64", err)
	}
}

// Mmap maps length bytes of fd at off into this process.
func Mmap(fd int, off int64, length int, prot, flags int) ([]byte, error) {
	b, err := unix.Mmap(fd, off, length, prot, flags)
	return b, wrap("mmap", err)
}

// Munmap unmaps b.
func Munmap(b []byte) error { return wrap("munmap", unix.Munmap(b)) }

// Madvise applies advice to b.
func Madvise(b []byte, advice int) error { return wrap("madvise", unix.Madvise(b, advice)) }

// Tee duplicates up to n bytes from pipe in to pipe out without consuming them.
func Tee(in, out int, n int, flags int) (int, error) {
	r, err := unix.Tee(in, out, n, flags)
	return int(r), wrap("tee", err)
}

// Pipe2 creates a pipe.
func Pipe2(flags int) (r, w int, err error) {
	var p [2]int
	err = unix.Pipe2(p[:], flags)
	return p[0], p[1], wrap("pipe2", err)
}

// Read reads from fd, retrying EINTR.
func Read(fd int, b []byte) (int, error) {
	for {
		n, err := unix.Read(fd, b)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return n, wrap("read", err)
	}
}

// Write writes to fd, retrying EINTR.
func Write(fd int, b []byte) (int, error) {
	for {
		n, err := unix.Write(fd, b)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return n, wrap("write", err)
	}
}

// Ioctl issues a pointer-argument ioctl on fd.
func Ioctl(name string, fd int, req uint, arg unsafe.Pointer) (int, error) {
	for {
		r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(arg))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 0, wrap("ioctl("+name+")", e)
		}
		return int(r), nil
	}
}

// SPLICE_F_NONBLOCK makes tee and splice return EAGAIN instead of blocking.
const SPLICE_F_NONBLOCK = unix.SPLICE_F_NONBLOCK

// FcntlInt runs fcntl(fd, cmd, arg).
func FcntlInt(fd int, cmd int, arg int) (int, error) {
	r, err := unix.FcntlInt(uintptr(fd), cmd, arg)
	return r, wrap("fcntl", err)
}
