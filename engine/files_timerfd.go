package engine

import (
	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// Timerfds
//
// fdinfo shows a timerfd's clock, settime flags, unread expirations
// ("ticks") and the time left; but the time left reads 0 for a periodic
// timer that expired and was not read since (the kernel moves such a timer
// on only when it is read or queried). Dump therefore asks
// timerfd_gettime, on a copy of the descriptor taken with pidfd_getfd: it
// moves the timer on and adds the periods missed to the ticks, exactly as
// the process's own next read or timerfd_gettime would, so the process
// sees no difference. The ticks are read from fdinfo around that call
// until no expiration slipped in between.
//
// Restore arms the new timer so that it expires when the old one would
// have: the time that passed since the dump is measured on CLOCK_REALTIME
// (the sample is in the image), which holds across hosts whose clocks are
// synchronised, unlike CLOCK_MONOTONIC or CLOCK_BOOTTIME. A timer due while
// the process was away expires at once on restore; a periodic one counts
// every period missed and keeps its phase. An absolute CLOCK_REALTIME
// timer (TFD_TIMER_ABSTIME) keeps its absolute expiry.
//
// Unread expirations are set back with the TFD_IOC_SET_TICKS ioctl
// (kernels built with CONFIG_CHECKPOINT_RESTORE, see
// feature.TimerfdSetTicks). Without it they can only be reproduced by
// letting the new timer expire once at once: the process then reads 1
// where it would have read more, and the timer keeps its period and phase
// (it is armed with TFD_TIMER_ABSTIME at a time in the past, so a
// relative timer shows settime flags 01 in fdinfo afterwards).
//
// Left out: a TFD_TIMER_CANCEL_ON_SET timer whose clock was set before the
// dump (its next read would fail with ECANCELED) is restored armed again;
// and clock offsets of a time namespace are not looked at.

// timerfdClocks names the clocks timerfd_create accepts.
var timerfdClocks = map[int]string{
	sys.CLOCK_REALTIME:       "CLOCK_REALTIME",
	sys.CLOCK_MONOTONIC:      "CLOCK_MONOTONIC",
	sys.CLOCK_BOOTTIME:       "CLOCK_BOOTTIME",
	sys.CLOCK_REALTIME_ALARM: "CLOCK_REALTIME_ALARM",
	sys.CLOCK_BOOTTIME_ALARM: "CLOCK_BOOTTIME_ALARM",
}

// timerfdSettimeFlags are the settime flags restore knows how to apply.
const timerfdSettimeFlags = sys.TFD_TIMER_ABSTIME | sys.TFD_TIMER_CANCEL_ON_SET

// timerfdState reads the timerfd behind descriptor fd of pid.
func timerfdState(pid, fd int, info *proc.FDInfo) (*imagepb.TimerFD, error) {
	t, err := proc.ParseTimerFD(info)
	if err != nil {
		return nil, err
	}
	if _, ok := timerfdClocks[t.Clock]; !ok {
		return nil, unsupported("timerfd with clock id %d, which phaul does not know", t.Clock)
	}
	if t.SettimeFlags&^timerfdSettimeFlags != 0 {
		return nil, unsupported("timerfd with settime flags %#o, which phaul does not know", t.SettimeFlags)
	}
	cp, err := sys.CopyFD(pid, fd)
	if err != nil {
		return nil, err
	}
	defer sys.Close(cp)
	// Move a due periodic timer on first, so that the loop below only
	// sees expirations that happen while it runs.
	if _, _, err := sys.TimerfdGettime(cp); err != nil {
		return nil, err
	}
	st := &imagepb.TimerFD{Clockid: int32(t.Clock), SettimeFlags: int32(t.SettimeFlags)}
	for try := 0; ; try++ {
		before, err := proc.ReadFDInfo(sys.Getpid(), cp)
		if err != nil {
			return nil, err
		}
		tb, err := proc.ParseTimerFD(before)
		if err != nil {
			return nil, err
		}
		if st.ValueNs, st.IntervalNs, err = sys.TimerfdGettime(cp); err != nil {
			return nil, err
		}
		if st.SampledRealtimeNs, err = sys.ClockGettime(sys.CLOCK_REALTIME); err != nil {
			return nil, err
		}
		after, err := proc.ReadFDInfo(sys.Getpid(), cp)
		if err != nil {
			return nil, err
		}
		ta, err := proc.ParseTimerFD(after)
		if err != nil {
			return nil, err
		}
		st.Ticks = ta.Ticks
		// Unchanged ticks: no expiration between the two reads, so the
		// time left and the ticks describe the same moment. A timer
		// firing every few microseconds may never hold still; then the
		// count may be one off.
		if tb.Ticks == ta.Ticks || try == 8 {
			return st, nil
		}
	}
}

// signalfdState reads the signal mask of a signalfd.
func signalfdState(info *proc.FDInfo) (*imagepb.SignalFD, error) {
	m, err := proc.ParseSignalFD(info)
	if err != nil {
		return nil, err
	}
	return &imagepb.SignalFD{Sigmask: m}, nil
}

// timerPlan is how restore arms one timerfd.
type timerPlan struct {
	settime  bool  // call timerfd_settime
	flags    int   // its flags
	value    int64 // it_value in ns: relative, or absolute with TFD_TIMER_ABSTIME; 0 disarms
	interval int64 // it_interval in ns
	// ticks, when non-zero, is set with TFD_IOC_SET_TICKS after settime.
	ticks uint64
	// collapsed counts unread expirations that are lost because the
	// ticks cannot be set: they are reproduced as a single one.
	collapsed uint64
}

// planTimer decides how to arm a restored timerfd. nowReal is
// CLOCK_REALTIME and nowClock the timer's own clock, both read right before
// the timer is armed; canSetTicks says whether TFD_IOC_SET_TICKS works.
func planTimer(t *imagepb.TimerFD, nowReal, nowClock int64, canSetTicks bool) timerPlan {
	flags := int(t.GetSettimeFlags()) & timerfdSettimeFlags
	abs := flags&sys.TFD_TIMER_ABSTIME != 0
	interval := max(t.GetIntervalNs(), 0)
	ticks := t.GetTicks()
	p := timerPlan{flags: flags, interval: interval}
	// at turns an expiry on the timer's clock into the settime value.
	at := func(expiry int64) int64 {
		if abs {
			return expiry
		}
		return expiry - nowClock
	}
	elapsed := int64(0)
	if t.GetSampledRealtimeNs() > 0 && nowReal > t.GetSampledRealtimeNs() {
		elapsed = nowReal - t.GetSampledRealtimeNs()
	}
	armed := t.GetValueNs() > 0
	var expiry int64
	if armed {
		expiry = nowClock - elapsed + t.GetValueNs()
		if expiry <= nowClock {
			// Due while the process was away.
			if interval == 0 {
				ticks++
				armed, p.interval = false, 0
			} else {
				k := 1 + (nowClock-expiry)/interval
				expiry += k * interval
				ticks += uint64(k)
			}
		}
	}
	switch {
	case ticks == 0 || canSetTicks:
		if armed {
			p.settime, p.value = true, at(expiry)
		} else if flags != 0 || interval != 0 {
			p.settime = true // disarmed, but with its flags or period
		}
		p.ticks = ticks
	case !armed:
		// Expire once, now: absolute 1 ns is in the past on every clock.
		p.settime, p.flags, p.value, p.interval = true, flags|sys.TFD_TIMER_ABSTIME, 1, 0
		p.collapsed = ticks - 1
	default:
		// Expire once, now, keeping the phase: one period before the next
		// expiry, which is in the past (unread ticks mean the timer
		// expired at most one period ago).
		e0 := min(expiry-interval, nowClock)
		p.settime, p.flags, p.value = true, flags|sys.TFD_TIMER_ABSTIME, max(e0, 1)
		p.collapsed = ticks - 1
	}
	return p
}
