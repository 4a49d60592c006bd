package sys

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// OpenPTY opens a new pseudo-terminal pair: the master side (/dev/ptmx) and
// the slave side (/dev/pts/N), both read-write, close-on-exec and without
// becoming a controlling terminal. name is the slave's path.
//
// The master is left in non-blocking (poller) mode, so closing it unblocks a
// goroutine reading from it.
func OpenPTY() (master, slave *os.File, name string, err error) {
	master, err = os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, "", err
	}
	n, err := PtyNumber(master)
	if err == nil {
		err = ptyControl(master, func(fd int) error {
			return wrap("ioctl(TIOCSPTLCK)", unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0))
		})
	}
	if err != nil {
		master.Close()
		return nil, nil, "", err
	}
	name = "/dev/pts/" + strconv.Itoa(n)
	slave, err = os.OpenFile(name, os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		master.Close()
		return nil, nil, "", err
	}
	return master, slave, name, nil
}

// PtyNumber returns N of the slave /dev/pts/N that belongs to master.
func PtyNumber(master *os.File) (int, error) {
	var n int
	err := ptyControl(master, func(fd int) error {
		v, err := unix.IoctlGetUint32(fd, unix.TIOCGPTN)
		n = int(v)
		return wrap("ioctl(TIOCGPTN)", err)
	})
	return n, err
}

// IsPTYSlave reports whether path names a pseudo-terminal slave (/dev/pts/N).
func IsPTYSlave(path string) bool {
	rest, ok := strings.CutPrefix(path, "/dev/pts/")
	if !ok {
		return false
	}
	_, err := strconv.Atoi(rest)
	return err == nil
}

// ptyControl runs fn on f's descriptor without switching the file to blocking
// mode (which os.File.Fd would do).
func ptyControl(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("%s: %w", f.Name(), err)
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return fmt.Errorf("%s: %w", f.Name(), err)
	}
	return ferr
}
