package ptrace

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/phaul/phaul/internal/sys"
)

// ErrProcessGone reports that a tracee exited or was killed while phaul was
// working on it. It matches ESRCH.
var ErrProcessGone = &goneError{}

type goneError struct{}

func (*goneError) Error() string        { return "process is gone" }
func (*goneError) Is(target error) bool { return target == sys.ESRCH }

// Stop describes why a tracee stopped.
type Stop struct {
	Status sys.WaitStatus
}

// Exited reports whether the tracee is gone (exited or killed).
func (s Stop) Exited() bool { return s.Status.Exited() || s.Status.Signaled() }

// Event is the PTRACE_EVENT_* of the stop, 0 for none.
func (s Stop) Event() int {
	if !s.Status.Stopped() {
		return 0
	}
	return int(s.Status>>16) & 0xff
}

// Signal is the stop signal.
func (s Stop) Signal() int {
	if !s.Status.Stopped() {
		return 0
	}
	return int(s.Status.StopSignal())
}

// IsSyscallStop reports a syscall-entry or -exit stop (PTRACE_O_TRACESYSGOOD).
func (s Stop) IsSyscallStop() bool {
	return s.Status.Stopped() && s.Event() == 0 && s.Signal() == int(sys.SIGTRAP)|0x80
}

// IsEventStop reports a PTRACE_EVENT_STOP (interrupt or group stop).
func (s Stop) IsEventStop() bool { return s.Event() == sys.PTRACE_EVENT_STOP }

// IsSignalDelivery reports a signal-delivery-stop.
func (s Stop) IsSignalDelivery() bool {
	return s.Status.Stopped() && s.Event() == 0 && s.Signal() != int(sys.SIGTRAP)|0x80
}

func (s Stop) String() string {
	switch {
	case s.Status.Exited():
		return fmt.Sprintf("exited with status %d", s.Status.ExitStatus())
	case s.Status.Signaled():
		return fmt.Sprintf("killed by signal %d", s.Status.Signal())
	case s.IsSyscallStop():
		return "syscall stop"
	case s.Event() != 0:
		return fmt.Sprintf("event %d stop (signal %d)", s.Event(), s.Signal())
	default:
		return fmt.Sprintf("signal %d stop", s.Signal())
	}
}

// Wait waits for the next state change of tid.
//
// Precondition: called on the Tracer thread.
func Wait(tid int) (Stop, error) {
	_, ws, err := sys.Wait4(tid, sys.WALL)
	if err != nil {
		if errors.Is(err, sys.ECHILD) {
			return Stop{}, fmt.Errorf("wait for %d: %w", tid, ErrProcessGone)
		}
		return Stop{}, fmt.Errorf("wait for %d: %w", tid, err)
	}
	return Stop{Status: ws}, nil
}

// ErrStopTimeout reports a thread that did not stop in time (typically one
// in uninterruptible sleep: D state).
var ErrStopTimeout = errors.New("did not stop in time")

// WaitTimeout is Wait with a deadline. It polls with WNOHANG, sleeping a
// little longer each time (from 5 µs up to 1 ms), so a thread that stops
// at once costs no more than with Wait.
//
// Precondition: called on the Tracer thread.
func WaitTimeout(tid int, d time.Duration) (Stop, error) {
	deadline := time.Now().Add(d)
	nap := 5 * time.Microsecond
	for {
		wpid, ws, err := sys.Wait4(tid, sys.WALL|sys.WNOHANG)
		if err != nil {
			if errors.Is(err, sys.ECHILD) {
				return Stop{}, fmt.Errorf("wait for %d: %w", tid, ErrProcessGone)
			}
			return Stop{}, fmt.Errorf("wait for %d: %w", tid, err)
		}
		if wpid == tid {
			return Stop{Status: ws}, nil
		}
		if time.Now().After(deadline) {
			return Stop{}, fmt.Errorf("thread %d %w (%v; %s)", tid, ErrStopTimeout, d, threadState(tid))
		}
		time.Sleep(nap)
		nap = min(2*nap, time.Millisecond)
	}
}

// threadState describes what a thread is doing, from /proc.
func threadState(tid int) string {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", tid))
	state := "state unknown"
	if err == nil {
		if i := strings.LastIndexByte(string(st), ')'); i > 0 && i+2 < len(st) {
			state = "state " + string(st[i+2])
		}
	}
	if w, err := os.ReadFile(fmt.Sprintf("/proc/%d/wchan", tid)); err == nil && len(w) > 0 && string(w) != "0" {
		state += ", waiting in " + string(w)
	}
	return state
}
