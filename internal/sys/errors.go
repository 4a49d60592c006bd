package sys

import (
	"os"

	"golang.org/x/sys/unix"
)

// Errno values callers compare with errors.Is.
const (
	EPERM   = unix.EPERM
	ESRCH   = unix.ESRCH
	EINTR   = unix.EINTR
	EAGAIN  = unix.EAGAIN
	EEXIST  = unix.EEXIST
	ENOENT  = unix.ENOENT
	EINVAL  = unix.EINVAL
	ENOSYS  = unix.ENOSYS
	EBUSY   = unix.EBUSY
	EFAULT  = unix.EFAULT
	ECHILD  = unix.ECHILD
	ENOMEM  = unix.ENOMEM
	EIO     = unix.EIO
	ENOTTY  = unix.ENOTTY
	ENOTSUP = unix.ENOTSUP
	EACCES  = unix.EACCES
)

// Errno is a system error number.
type Errno = unix.Errno

func wrap(name string, err error) error {
	if err == nil {
		return nil
	}
	return os.NewSyscallError(name, err)
}
