package engine

import (
	"encoding/binary"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/internal/feature"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

const (
	ms  = int64(time.Millisecond)
	sec = int64(time.Second)
)

func TestPlanTimer(t *testing.T) {
	const real, mono = 5000 * sec, 1000 * sec
	abs := int32(sys.TFD_TIMER_ABSTIME)
	for _, tc := range []struct {
		name        string
		t           *imagepb.TimerFD
		canSetTicks bool
		want        timerPlan
	}{
		{"disarmed", &imagepb.TimerFD{Clockid: 1, SampledRealtimeNs: real - sec}, true, timerPlan{}},
		{"disarmed-with-flags", &imagepb.TimerFD{Clockid: 0, SettimeFlags: abs, SampledRealtimeNs: real},
			true, timerPlan{settime: true, flags: 1}},
		{"disarmed-with-period", &imagepb.TimerFD{Clockid: 1, IntervalNs: sec},
			true, timerPlan{settime: true, interval: sec}},
		{"one-shot", &imagepb.TimerFD{Clockid: 1, ValueNs: 2 * sec, SampledRealtimeNs: real - 500*ms},
			true, timerPlan{settime: true, value: 1500 * ms}},
		{"one-shot-unknown-sample", &imagepb.TimerFD{Clockid: 1, ValueNs: 2 * sec},
			true, timerPlan{settime: true, value: 2 * sec}},
		{"one-shot-clock-went-back", &imagepb.TimerFD{Clockid: 1, ValueNs: 2 * sec, SampledRealtimeNs: real + sec},
			true, timerPlan{settime: true, value: 2 * sec}},
		{"one-shot-due", &imagepb.TimerFD{Clockid: 1, ValueNs: sec, SampledRealtimeNs: real - 3*sec},
			true, timerPlan{ticks: 1}},
		{"one-shot-due-no-ioctl", &imagepb.TimerFD{Clockid: 1, ValueNs: sec, SampledRealtimeNs: real - 3*sec},
			false, timerPlan{settime: true, flags: 1, value: 1}},
		{"expired-unread", &imagepb.TimerFD{Clockid: 7, Ticks: 3, SampledRealtimeNs: real - sec},
			true, timerPlan{ticks: 3}},
		{"expired-unread-no-ioctl", &imagepb.TimerFD{Clockid: 7, Ticks: 3, SampledRealtimeNs: real - sec},
			false, timerPlan{settime: true, flags: 1, value: 1, collapsed: 2}},
		{"periodic", &imagepb.TimerFD{Clockid: 1, ValueNs: 50 * ms, IntervalNs: 100 * ms, Ticks: 2, SampledRealtimeNs: real - 20*ms},
			true, timerPlan{settime: true, value: 30 * ms, interval: 100 * ms, ticks: 2}},
		// Expiries at 0.05, 0.15, ..., 0.95 s after the sample are missed;
		// the next one is at 1.05 s, 30 ms from now.
		{"periodic-missed", &imagepb.TimerFD{Clockid: 1, ValueNs: 50 * ms, IntervalNs: 100 * ms, Ticks: 2, SampledRealtimeNs: real - 1020*ms},
			true, timerPlan{settime: true, value: 30 * ms, interval: 100 * ms, ticks: 12}},
		{"periodic-missed-no-ioctl", &imagepb.TimerFD{Clockid: 1, ValueNs: 50 * ms, IntervalNs: 100 * ms, Ticks: 2, SampledRealtimeNs: real - 1020*ms},
			false, timerPlan{settime: true, flags: 1, value: mono - 70*ms, interval: 100 * ms, collapsed: 11}},
		{"periodic-no-ticks-no-ioctl", &imagepb.TimerFD{Clockid: 1, ValueNs: 50 * ms, IntervalNs: 100 * ms, SampledRealtimeNs: real - 20*ms},
			false, timerPlan{settime: true, value: 30 * ms, interval: 100 * ms}},
		{"absolute-monotonic", &imagepb.TimerFD{Clockid: 1, SettimeFlags: abs, ValueNs: 2 * sec, SampledRealtimeNs: real - 500*ms},
			true, timerPlan{settime: true, flags: 1, value: mono + 1500*ms}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			now := int64(mono)
			if tc.t.Clockid == sys.CLOCK_REALTIME {
				now = real
			}
			if got := planTimer(tc.t, real, now, tc.canSetTicks); got != tc.want {
				t.Errorf("plan %+v, want %+v", got, tc.want)
			}
		})
	}
	// An absolute CLOCK_REALTIME timer keeps its absolute expiry.
	tf := &imagepb.TimerFD{Clockid: 0, SettimeFlags: abs | sys.TFD_TIMER_CANCEL_ON_SET, ValueNs: 2 * sec, SampledRealtimeNs: real - 500*ms}
	want := timerPlan{settime: true, flags: 3, value: real + 1500*ms}
	if got := planTimer(tf, real, real, true); got != want {
		t.Errorf("absolute realtime: plan %+v, want %+v", got, want)
	}
}

// TestPlanTimerKernel arms real timerfds by the plans of a periodic timer
// that missed three periods (1 s period, 0.5 s left, sampled 3.2 s ago):
// the next expiry must come 0.3 s from now, and the first read must count
// the missed periods (all of them with TFD_IOC_SET_TICKS, one without).
func TestPlanTimerKernel(t *testing.T) {
	modes := []bool{false}
	if err := feature.TimerfdSetTicks(); err == nil {
		modes = append(modes, true)
	} else {
		t.Logf("only the fallback: %v", err)
	}
	for _, canSetTicks := range modes {
		fd, err := sys.TimerfdCreate(sys.CLOCK_MONOTONIC, sys.TFD_CLOEXEC|sys.TFD_NONBLOCK)
		if err != nil {
			t.Fatal(err)
		}
		defer sys.Close(fd)
		real, err1 := sys.ClockGettime(sys.CLOCK_REALTIME)
		mono, err2 := sys.ClockGettime(sys.CLOCK_MONOTONIC)
		if err := errors.Join(err1, err2); err != nil {
			t.Fatal(err)
		}
		img := &imagepb.TimerFD{Clockid: sys.CLOCK_MONOTONIC, ValueNs: 500 * ms, IntervalNs: sec, Ticks: 1, SampledRealtimeNs: real - 3200*ms}
		p := planTimer(img, real, mono, canSetTicks)
		if err := sys.TimerfdSettime(fd, p.flags, p.value, p.interval); err != nil {
			t.Fatal(err)
		}
		if p.ticks > 0 {
			if err := sys.TimerfdSetTicks(fd, p.ticks); err != nil {
				t.Fatal(err)
			}
		}
		wantTicks := uint64(4) // the unread one and three missed
		if !canSetTicks {
			wantTicks = 1
		}
		time.Sleep(10 * time.Millisecond) // let an expiry in the past fire
		b := make([]byte, 8)
		if n, err := sys.Read(fd, b); err != nil || n != 8 || binary.LittleEndian.Uint64(b) != wantTicks {
			t.Errorf("set ticks %v: read %d bytes (%v): %d expirations, want %d", canSetTicks, n, err, binary.LittleEndian.Uint64(b), wantTicks)
		}
		left, interval, err := sys.TimerfdGettime(fd)
		if err != nil {
			t.Fatal(err)
		}
		elapsed, _ := sys.ClockGettime(sys.CLOCK_MONOTONIC)
		elapsed -= mono
		if want := 300*ms - elapsed; left > want+ms || left < want-20*ms || interval != sec {
			t.Errorf("set ticks %v: next expiry in %v, period %v; want %v, 1s", canSetTicks, time.Duration(left), time.Duration(interval), time.Duration(want))
		}
	}
}

// TestTimerfdState dumps a timerfd of this process that expired at least
// twice unread: the ticks and the time left must describe the same moment,
// and the process must still read every expiration.
func TestTimerfdState(t *testing.T) {
	fd, err := sys.TimerfdCreate(sys.CLOCK_MONOTONIC, sys.TFD_CLOEXEC|sys.TFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close(fd)
	start, err := sys.ClockGettime(sys.CLOCK_REALTIME)
	if err != nil {
		t.Fatal(err)
	}
	if err := sys.TimerfdSettime(fd, 0, 20*ms, 100*ms); err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond) // expiries at 20, 120, 220, ... ms
	info, err := proc.ReadFDInfo(os.Getpid(), fd)
	if err != nil {
		t.Fatal(err)
	}
	st, err := timerfdState(os.Getpid(), fd, info)
	if err != nil {
		t.Fatal(err)
	}
	if st.Clockid != sys.CLOCK_MONOTONIC || st.Ticks < 2 || st.IntervalNs != 100*ms ||
		st.ValueNs <= 0 || st.ValueNs > 100*ms || st.SampledRealtimeNs == 0 {
		t.Fatalf("dumped %v", st)
	}
	// After the ticks counted, the next expiry is the one the time left
	// points at.
	next := start + 20*ms + int64(st.Ticks)*100*ms
	if d := st.SampledRealtimeNs + st.ValueNs - next; d < -5*ms || d > 5*ms {
		t.Errorf("dumped %v: %d expirations, but the next one is %v from the %d+1st", st, st.Ticks, time.Duration(d), st.Ticks)
	}
	b := make([]byte, 8)
	if n, err := sys.Read(fd, b); err != nil || n != 8 || binary.LittleEndian.Uint64(b) < st.Ticks {
		t.Errorf("the process reads %d expirations (%d bytes, %v), want at least %d", binary.LittleEndian.Uint64(b), n, err, st.Ticks)
	}
}

func TestTimerfdStateRefusesUnknownFlags(t *testing.T) {
	info, err := proc.ParseFDInfo([]byte("flags:\t02\nclockid: 1\nticks: 0\nsettime flags: 04\nit_value: (0, 0)\nit_interval: (0, 0)\n"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := timerfdState(os.Getpid(), 0, info); !errors.Is(err, ErrUnsupported) {
		t.Errorf("settime flags 04: %v, want ErrUnsupported", err)
	}
	info, err = proc.ParseFDInfo([]byte("flags:\t02\nclockid: 11\nticks: 0\nsettime flags: 0\nit_value: (0, 0)\nit_interval: (0, 0)\n"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := timerfdState(os.Getpid(), 0, info); !errors.Is(err, ErrUnsupported) {
		t.Errorf("clock 11: %v, want ErrUnsupported", err)
	}
}
