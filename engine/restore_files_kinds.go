package engine

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/internal/feature"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// Restore of timerfds, signalfds and inotify instances (see files_timerfd.go
// and files_inotify.go for what is kept and what is not). Each opener
// returns a new close-on-exec descriptor of the process, as openFile does.

// openTimerfd creates a timerfd with the image's clock and flags and arms
// it (planTimer).
//
// Precondition: called on the Tracer thread.
func (r *restorer) openTimerfd(f *imagepb.File) (uint64, error) {
	in := r.main
	t := f.GetTimerfd()
	if t == nil {
		return 0, fmt.Errorf("%w: timerfd without its state", ErrBadImage)
	}
	clock := int(t.GetClockid())
	if _, ok := timerfdClocks[clock]; !ok {
		return 0, fmt.Errorf("%w: timerfd clock %d", ErrBadImage, clock)
	}
	flags := uint64(sys.TFD_CLOEXEC)
	if f.Flags&sys.O_NONBLOCK != 0 {
		flags |= sys.TFD_NONBLOCK
	}
	fd, err := in.Syscall(sys.SYS_TIMERFD_CREATE, uint64(clock), flags)
	if err != nil {
		return 0, fmt.Errorf("timerfd_create(%s): %w", timerfdClocks[clock], err)
	}
	nowReal, err := sys.ClockGettime(sys.CLOCK_REALTIME)
	if err != nil {
		return 0, err
	}
	nowClock := nowReal
	if clock != sys.CLOCK_REALTIME && clock != sys.CLOCK_REALTIME_ALARM {
		if nowClock, err = sys.ClockGettime(clock); err != nil {
			return 0, err
		}
	}
	canSetTicks := feature.TimerfdSetTicks() == nil
	p := planTimer(t, nowReal, nowClock, canSetTicks)
	if p.settime {
		b := make([]byte, 32) // struct itimerspec: it_interval, it_value
		binary.LittleEndian.PutUint64(b[0:], uint64(p.interval/1e9))
		binary.LittleEndian.PutUint64(b[8:], uint64(p.interval%1e9))
		binary.LittleEndian.PutUint64(b[16:], uint64(p.value/1e9))
		binary.LittleEndian.PutUint64(b[24:], uint64(p.value%1e9))
		if err := in.WriteMemory(r.scratch, b); err != nil {
			return 0, err
		}
		if _, err := in.Syscall(sys.SYS_TIMERFD_SETTIME, fd, uint64(p.flags), r.scratch, 0); err != nil {
			return 0, fmt.Errorf("timerfd_settime: %w", err)
		}
	}
	if p.ticks > 0 {
		b := make([]byte, 8)
		binary.LittleEndian.PutUint64(b, p.ticks)
		if err := in.WriteMemory(r.scratch, b); err != nil {
			return 0, err
		}
		if _, err := in.Syscall(sys.SYS_IOCTL, fd, sys.TFD_IOC_SET_TICKS, r.scratch); err != nil {
			return 0, fmt.Errorf("timerfd: set %d unread expirations: %w", p.ticks, err)
		}
	}
	if p.collapsed > 0 {
		r.log.Warn("timerfd: unread expirations reduced to one (no TFD_IOC_SET_TICKS on this kernel)",
			"expirations", p.collapsed+1)
	}
	return fd, nil
}

// openSignalfd creates a signalfd for the image's signals.
//
// Precondition: called on the Tracer thread.
func (r *restorer) openSignalfd(f *imagepb.File) (uint64, error) {
	in := r.main
	flags := uint64(sys.SFD_CLOEXEC)
	if f.Flags&sys.O_NONBLOCK != 0 {
		flags |= sys.SFD_NONBLOCK
	}
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, f.GetSignalfd().GetSigmask())
	if err := in.WriteMemory(r.scratch, b); err != nil {
		return 0, err
	}
	fd, err := in.Syscall(sys.SYS_SIGNALFD4, ^uint64(0), r.scratch, 8, flags)
	if err != nil {
		return 0, fmt.Errorf("signalfd4(mask %#x): %w", f.GetSignalfd().GetSigmask(), err)
	}
	return fd, nil
}

// inotifySpares are the paths tried as the spare inode that fills the
// holes between watch descriptors.
var inotifySpares = []string{"/", "/proc", "/dev", "/sys", "/tmp", "/etc", "/usr", "/var"}

// inotifyMask are the mask bits inotify_add_watch takes back.
const inotifyMask = sys.IN_ALL_EVENTS | sys.IN_ONESHOT | sys.IN_EXCL_UNLINK

// openInotify creates an inotify instance with the image's watches, each
// with its watch descriptor.
//
// Precondition: called on the Tracer thread.
func (r *restorer) openInotify(f *imagepb.File) (uint64, error) {
	in := r.main
	flags := uint64(sys.IN_CLOEXEC)
	if f.Flags&sys.O_NONBLOCK != 0 {
		flags |= sys.IN_NONBLOCK
	}
	fd, err := in.Syscall(sys.SYS_INOTIFY_INIT1, flags)
	if err != nil {
		return 0, fmt.Errorf("inotify_init1: %w", err)
	}
	add := func(path string, mask uint32) (int, error) {
		if err := in.WriteMemory(r.scratch, ptrace.CString(path)); err != nil {
			return 0, err
		}
		wd, err := in.Syscall(sys.SYS_INOTIFY_ADD_WATCH, fd, r.scratch, uint64(mask|sys.IN_MASK_CREATE|sys.IN_DONT_FOLLOW))
		return int(wd), err
	}
	next, spare, skipped := 1, 0, 0
	for _, w := range f.GetInotify().GetWatches() {
		wd := int(w.GetWd())
		if wd < next || wd-next > maxInotifyGap-skipped {
			return 0, fmt.Errorf("%w: inotify watch descriptor %d after %d", ErrBadImage, wd, next-1)
		}
		for ; next < wd; next++ {
			// Use up number next with a watch on a spare inode, one this
			// instance does not watch yet (IN_MASK_CREATE: EEXIST if it does).
			var got int
			for {
				if spare == len(inotifySpares) {
					return 0, fmt.Errorf("inotify: no spare inode to skip watch descriptor %d with (tried %v)", next, inotifySpares)
				}
				got, err = add(inotifySpares[spare], sys.IN_DELETE_SELF)
				if err == nil {
					break
				}
				spare++
			}
			if got != next {
				return 0, fmt.Errorf("inotify: watch on %s got descriptor %d, expected %d", inotifySpares[spare], got, next)
			}
			if _, err := in.Syscall(sys.SYS_INOTIFY_RM_WATCH, fd, uint64(got)); err != nil {
				return 0, fmt.Errorf("inotify_rm_watch %d: %w", got, err)
			}
			skipped++
		}
		got, err := add(w.GetPath(), w.GetMask()&inotifyMask)
		if err != nil {
			return 0, fmt.Errorf("inotify watch %d on %s: %w", wd, w.GetPath(), err)
		}
		if got != wd {
			return 0, fmt.Errorf("inotify watch on %s got descriptor %d, it had %d", w.GetPath(), got, wd)
		}
		next++
	}
	if skipped > 0 {
		if err := r.drainInotify(fd, skipped); err != nil {
			return 0, err
		}
	}
	return fd, nil
}

// drainInotify reads away the n IN_IGNORED events that removing the spare
// watches queued on the new instance fd, from a copy of the descriptor.
func (r *restorer) drainInotify(fd uint64, n int) error {
	cp, err := sys.CopyFD(r.pid, int(fd))
	if err != nil {
		return err
	}
	defer sys.Close(cp)
	const eventSize = 16 // struct inotify_event without a name
	for n > 0 {
		ready, err := sys.Fionread(cp)
		if err != nil {
			return err
		}
		if ready == 0 {
			return fmt.Errorf("inotify: %d events of the spare watches missing", n)
		}
		buf := make([]byte, ready)
		got, err := sys.Read(cp, buf)
		if err != nil {
			return fmt.Errorf("inotify: read the spare watches' events: %w", err)
		}
		for b := buf[:got]; len(b) >= eventSize; {
			mask := binary.LittleEndian.Uint32(b[4:])
			nameLen := int(binary.LittleEndian.Uint32(b[12:]))
			if mask&sys.IN_IGNORED == 0 || nameLen > len(b)-eventSize {
				return errors.New("inotify: unexpected event on the new instance")
			}
			b = b[eventSize+nameLen:]
			n--
		}
	}
	return nil
}
