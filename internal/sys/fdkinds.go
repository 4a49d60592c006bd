package sys

import (
	"errors"
	"unsafe"

	"golang.org/x/sys/unix"
)

// System calls, flags and clocks of timerfd, signalfd and inotify.
const (
	SYS_INOTIFY_INIT1     = unix.SYS_INOTIFY_INIT1
	SYS_INOTIFY_ADD_WATCH = unix.SYS_INOTIFY_ADD_WATCH
	SYS_INOTIFY_RM_WATCH  = unix.SYS_INOTIFY_RM_WATCH

	CLOCK_REALTIME       = unix.CLOCK_REALTIME
	CLOCK_MONOTONIC      = unix.CLOCK_MONOTONIC
	CLOCK_BOOTTIME       = unix.CLOCK_BOOTTIME
	CLOCK_REALTIME_ALARM = unix.CLOCK_REALTIME_ALARM
	CLOCK_BOOTTIME_ALARM = unix.CLOCK_BOOTTIME_ALARM

	TFD_CLOEXEC             = unix.TFD_CLOEXEC
	TFD_NONBLOCK            = unix.TFD_NONBLOCK
	TFD_TIMER_ABSTIME       = unix.TFD_TIMER_ABSTIME
	TFD_TIMER_CANCEL_ON_SET = 2
	// TFD_IOC_SET_TICKS is _IOW('T', 0, u64): set the expiration count of
	// a timerfd (kernels built with CONFIG_CHECKPOINT_RESTORE).
	TFD_IOC_SET_TICKS = 0x40085400

	SFD_CLOEXEC  = unix.SFD_CLOEXEC
	SFD_NONBLOCK = unix.SFD_NONBLOCK

	IN_CLOEXEC     = unix.IN_CLOEXEC
	IN_NONBLOCK    = unix.IN_NONBLOCK
	IN_ALL_EVENTS  = unix.IN_ALL_EVENTS
	IN_ONESHOT     = unix.IN_ONESHOT
	IN_EXCL_UNLINK = unix.IN_EXCL_UNLINK
	IN_DONT_FOLLOW = unix.IN_DONT_FOLLOW
	IN_MASK_CREATE = 0x10000000
	IN_IGNORED     = unix.IN_IGNORED
	IN_DELETE_SELF = unix.IN_DELETE_SELF
	IN_CREATE      = unix.IN_CREATE
	IN_DELETE      = unix.IN_DELETE
	IN_MODIFY      = unix.IN_MODIFY
	IN_ATTRIB      = unix.IN_ATTRIB

	// FIONREAD is the ioctl asking how many bytes are ready to be read.
	FIONREAD = 0x541b

	O_NOCTTY = unix.O_NOCTTY
)

// ClockGettime returns the time of clock in nanoseconds.
func ClockGettime(clock int) (int64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(int32(clock), &ts); err != nil {
		return 0, wrap("clock_gettime", err)
	}
	return ts.Nano(), nil
}

// TimerfdCreate creates a timerfd on clock.
func TimerfdCreate(clock, flags int) (int, error) {
	fd, err := unix.TimerfdCreate(clock, flags)
	return fd, wrap("timerfd_create", err)
}

// TimerfdGettime returns the time left until the next expiration of the
// timerfd fd (0: disarmed) and its interval, in nanoseconds. For a periodic
// timer that expired unread, the kernel moves the timer on and adds the
// missed periods to its expiration count, as a read would.
func TimerfdGettime(fd int) (value, interval int64, err error) {
	var its unix.ItimerSpec
	if err := unix.TimerfdGettime(fd, &its); err != nil {
		return 0, 0, wrap("timerfd_gettime", err)
	}
	return its.Value.Nano(), its.Interval.Nano(), nil
}

// TimerfdSettime arms (or, with value 0, disarms) the timerfd fd.
func TimerfdSettime(fd, flags int, value, interval int64) error {
	its := unix.ItimerSpec{Value: unix.NsecToTimespec(value), Interval: unix.NsecToTimespec(interval)}
	return wrap("timerfd_settime", unix.TimerfdSettime(fd, flags, &its, nil))
}

// TimerfdSetTicks sets the expiration count of the timerfd fd
// (TFD_IOC_SET_TICKS); ENOTTY when the kernel lacks it.
func TimerfdSetTicks(fd int, ticks uint64) error {
	_, err := Ioctl("TFD_IOC_SET_TICKS", fd, TFD_IOC_SET_TICKS, unsafe.Pointer(&ticks))
	return err
}

// Fionread returns the number of bytes ready to be read from fd.
func Fionread(fd int) (int, error) {
	n, err := unix.IoctlGetInt(fd, FIONREAD)
	return n, wrap("ioctl(FIONREAD)", err)
}

// OpenByHandleAt opens the file of a file handle (as name_to_handle_at or
// fdinfo give it) on the filesystem of mountFd. It needs
// CAP_DAC_READ_SEARCH.
func OpenByHandleAt(mountFd int, handleType int32, handle []byte, flags int) (int, error) {
	h := unix.NewFileHandle(handleType, handle)
	for {
		fd, err := unix.OpenByHandleAt(mountFd, h, flags)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return fd, wrap("open_by_handle_at", err)
	}
}

// Open opens path, retrying EINTR.
func Open(path string, flags int) (int, error) {
	for {
		fd, err := unix.Open(path, flags, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return fd, wrap("open", err)
	}
}

// InotifyInit1 creates an inotify instance.
func InotifyInit1(flags int) (int, error) {
	fd, err := unix.InotifyInit1(flags)
	return fd, wrap("inotify_init1", err)
}

// InotifyAddWatch adds (or changes) a watch of the inotify instance fd.
func InotifyAddWatch(fd int, path string, mask uint32) (int, error) {
	wd, err := unix.InotifyAddWatch(fd, path, mask)
	return wd, wrap("inotify_add_watch", err)
}

// InotifyRmWatch removes watch wd of the inotify instance fd.
func InotifyRmWatch(fd int, wd int) error {
	_, err := unix.InotifyRmWatch(fd, uint32(wd))
	return wrap("inotify_rm_watch", err)
}

// Signalfd creates a signalfd for the signals of mask (bit n-1 for signal n).
func Signalfd(mask uint64, flags int) (int, error) {
	set := unix.Sigset_t{Val: [16]uint64{mask}}
	fd, err := unix.Signalfd(-1, &set, flags)
	return fd, wrap("signalfd", err)
}

// DevMajor returns the major number of a userspace device number.
func DevMajor(dev uint64) uint32 { return unix.Major(dev) }

// DevMinor returns the minor number of a userspace device number.
func DevMinor(dev uint64) uint32 { return unix.Minor(dev) }
