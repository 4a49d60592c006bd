package ptrace

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/phaul/phaul/internal/sys"
)

// Options phaul seizes with.
const seizeOptions = sys.PTRACE_O_TRACESYSGOOD

// StopTimeout bounds the wait for one thread to stop when freezing.
var StopTimeout = 10 * time.Second

// ErrAlreadyTraced reports a tracee that another tracer holds.
var ErrAlreadyTraced = errors.New("already traced")

// ErrJobStopped reports a process stopped by job control (SIGSTOP, SIGTSTP).
var ErrJobStopped = errors.New("stopped by job control")

// StolenSignal is a signal that was about to be delivered when phaul froze
// the thread. phaul took it off the thread to keep the freeze exact; it must
// be queued again on resume or restore.
type StolenSignal struct {
	Info [sys.SiginfoSize]byte
}

// Signo is the signal number of the stolen signal.
func (s StolenSignal) Signo() int {
	return int(int32(uint32(s.Info[0]) | uint32(s.Info[1])<<8 | uint32(s.Info[2])<<16 | uint32(s.Info[3])<<24))
}

// Frozen is a thread group whose every thread is seized and stopped.
type Frozen struct {
	Pid  int
	Tids []int // Tids[0] == Pid when the leader is alive
	// Stolen holds the signals taken off each thread while freezing it.
	Stolen map[int][]StolenSignal
	// Stopping is when the first thread was told to stop: where the
	// process's pause begins.
	Stopping time.Time
}

// Freeze seizes and stops every thread of pid, re-reading the thread list
// until it is stable. On error every thread already stopped is released; a
// thread that did not stop within StopTimeout (ErrStopTimeout) stays
// attached until the Tracer is closed.
//
// Precondition: called on the Tracer thread.
func Freeze(pid int) (*Frozen, error) {
	f := &Frozen{Pid: pid, Stolen: map[int][]StolenSignal{}}
	seen := map[int]bool{}
	for {
		tids, err := ListThreads(pid)
		if err != nil {
			f.release()
			return nil, err
		}
		// Every new thread is told to stop before any is waited for:
		// they stop at once, not one after another.
		var started []int
		for _, tid := range tids {
			if seen[tid] {
				continue
			}
			seen[tid] = true
			ok, err := f.startStop(tid)
			if err != nil {
				f.settle(started)
				f.release()
				return nil, err
			}
			if ok {
				started = append(started, tid)
			}
		}
		if len(started) == 0 {
			break
		}
		for i, tid := range started {
			alive, err := f.waitStop(tid)
			if err != nil {
				f.settle(started[i+1:])
				f.release()
				return nil, err
			}
			if alive {
				f.Tids = append(f.Tids, tid)
			}
		}
	}
	if len(f.Tids) == 0 {
		return nil, fmt.Errorf("freeze %d: %w", pid, ErrProcessGone)
	}
	// Leader first: callers rely on Tids[0] being the thread-group leader.
	for i, tid := range f.Tids {
		if tid == pid {
			f.Tids[0], f.Tids[i] = f.Tids[i], f.Tids[0]
		}
	}
	return f, nil
}

// startStop attaches to tid and tells it to stop. It reports false when
// the thread exited first.
func (f *Frozen) startStop(tid int) (bool, error) {
	if err := sys.PtraceSeize(tid, seizeOptions); err != nil {
		if errors.Is(err, sys.ESRCH) {
			return false, nil
		}
		if errors.Is(err, sys.EPERM) {
			return false, diagnoseAttach(f.Pid, tid, err)
		}
		return false, fmt.Errorf("seize thread %d of %d: %w", tid, f.Pid, err)
	}
	if f.Stopping.IsZero() {
		f.Stopping = time.Now()
	}
	if err := sys.PtraceInterrupt(tid); err != nil && !errors.Is(err, sys.ESRCH) {
		return false, fmt.Errorf("interrupt thread %d: %w", tid, err)
	}
	return true, nil // gone meanwhile: waitStop sees it exit
}

// settle waits for threads told to stop by a Freeze that failed, so that
// release can let them go.
func (f *Frozen) settle(tids []int) {
	for _, tid := range tids {
		if alive, err := f.waitStop(tid); err == nil && alive {
			f.Tids = append(f.Tids, tid)
		}
	}
}

// waitStop waits until tid, told to stop by startStop, is in an interrupt
// stop. It reports false when the thread exited before it could be
// stopped.
func (f *Frozen) waitStop(tid int) (bool, error) {
	for {
		st, err := WaitTimeout(tid, StopTimeout)
		if err != nil {
			// PTRACE_DETACH needs a stopped tracee: this one stays attached
			// until the Tracer closes, when the kernel detaches it.
			return false, fmt.Errorf("freeze %d: %w", f.Pid, err)
		}
		switch {
		case st.Exited():
			return false, nil
		case st.IsEventStop():
			switch st.Signal() {
			case int(sys.SIGSTOP), 20, 21, 22: // SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU: group stop
				_ = sys.PtraceDetach(tid, 0)
				return false, fmt.Errorf("freeze %d: thread %d is %w (signal %d); resume it with SIGCONT first",
					f.Pid, tid, ErrJobStopped, st.Signal())
			}
			return true, nil
		case st.IsSignalDelivery():
			// A signal was being delivered: take it off the thread and keep
			// it, so that no handler runs while we freeze.
			si, err := sys.PtraceGetSiginfo(tid)
			if err != nil {
				return false, fmt.Errorf("siginfo of thread %d: %w", tid, err)
			}
			f.Stolen[tid] = append(f.Stolen[tid], StolenSignal{Info: si})
			if err := sys.PtraceCont(tid, 0); err != nil {
				return false, fmt.Errorf("continue thread %d: %w", tid, err)
			}
			if err := sys.PtraceInterrupt(tid); err != nil && !errors.Is(err, sys.ESRCH) {
				return false, fmt.Errorf("interrupt thread %d: %w", tid, err)
			}
		default:
			if err := sys.PtraceCont(tid, 0); err != nil {
				return false, fmt.Errorf("continue thread %d: %w", tid, err)
			}
		}
	}
}

// release detaches every thread seized so far, queuing stolen signals back
// with tgkill (their siginfo details are lost, the signal is not).
func (f *Frozen) release() {
	for _, tid := range f.Tids {
		_ = sys.PtraceDetach(tid, 0)
	}
	for tid, sigs := range f.Stolen {
		for _, s := range sigs {
			_ = sys.Tgkill(f.Pid, tid, sys.Signal(s.Signo()))
		}
	}
	f.Tids = nil
	f.Stolen = map[int][]StolenSignal{}
}

// Resume lets every thread run again, exactly as it was before Freeze:
// stolen signals are queued again (with their siginfo, by injection) before
// the threads are detached.
//
// Precondition: called on the Tracer thread.
func (f *Frozen) Resume(gadget uint64) error {
	var firstErr error
	for tid, sigs := range f.Stolen {
		if len(sigs) == 0 {
			continue
		}
		if err := requeue(f.Pid, tid, gadget, sigs); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	f.Stolen = map[int][]StolenSignal{}
	for _, tid := range f.Tids {
		if err := sys.PtraceDetach(tid, 0); err != nil && !errors.Is(err, sys.ESRCH) && firstErr == nil {
			firstErr = fmt.Errorf("detach thread %d: %w", tid, err)
		}
	}
	f.Tids = nil
	return firstErr
}

// Kill kills the frozen process with SIGKILL and waits until every thread
// is gone. The caller (or the process's parent) still reaps the leader if
// it is not phaul's child.
//
// Precondition: called on the Tracer thread.
func (f *Frozen) Kill() error {
	if err := f.SendKill(); err != nil {
		return err
	}
	f.Reap()
	return nil
}

// SendKill sends SIGKILL to the frozen process: from here on it never
// runs again, but its threads are still exiting (Reap waits for them).
// Any thread may call it.
func (f *Frozen) SendKill() error {
	if err := sys.Kill(f.Pid, sys.SIGKILL); err != nil && !errors.Is(err, sys.ESRCH) {
		return fmt.Errorf("kill %d: %w", f.Pid, err)
	}
	return nil
}

// Reap waits until every thread of the process killed by SendKill is
// gone.
//
// Precondition: called on the Tracer thread.
func (f *Frozen) Reap() {
	ReapThreads(f.Tids)
	f.Tids = nil
}

// ReapThreads waits until every thread in tids (the thread-group leader
// first in the slice) is gone. The kernel reports a traced leader's exit
// only once its other threads are released, and a traced thread is only
// released once its tracer has waited for it: the leader goes last.
//
// Precondition: called on the Tracer thread.
func ReapThreads(tids []int) {
	for i := len(tids) - 1; i >= 0; i-- {
		for {
			st, err := Wait(tids[i])
			if err != nil || st.Exited() {
				break
			}
			// A stop on the way out (PTRACE_EVENT_EXIT, a signal): go on.
			_ = sys.PtraceCont(tids[i], 0)
		}
	}
}

func requeue(pid, tid int, gadget uint64, sigs []StolenSignal) error {
	if gadget == 0 {
		for _, s := range sigs {
			if err := sys.Tgkill(pid, tid, sys.Signal(s.Signo())); err != nil {
				return err
			}
		}
		return nil
	}
	inj, err := NewInjector(tid, gadget)
	if err != nil {
		return err
	}
	defer inj.Close()
	scratch, err := inj.MapScratch(4096)
	if err != nil {
		return err
	}
	defer inj.UnmapScratch()
	for _, s := range sigs {
		if err := inj.WriteMemory(scratch, s.Info[:]); err != nil {
			return err
		}
		if _, err := inj.Syscall(sys.SYS_RT_TGSIGQUEUEINFO, uint64(pid), uint64(tid), uint64(s.Signo()), scratch); err != nil {
			return fmt.Errorf("requeue signal %d on thread %d: %w", s.Signo(), tid, err)
		}
	}
	return nil
}

// ListThreads returns the TIDs in /proc/PID/task.
func ListThreads(pid int) ([]int, error) {
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("process %d: %w", pid, ErrProcessGone)
		}
		return nil, fmt.Errorf("list threads of %d: %w", pid, err)
	}
	tids := make([]int, 0, len(ents))
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, tid)
		}
	}
	return tids, nil
}

// diagnoseAttach turns EPERM from PTRACE_SEIZE into something a user can act
// on: who traces the process already, or why we may not.
func diagnoseAttach(pid, tid int, err error) error {
	status, rerr := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/status", pid, tid))
	if rerr == nil {
		for _, line := range strings.Split(string(status), "\n") {
			v, ok := strings.CutPrefix(line, "TracerPid:")
			if !ok {
				continue
			}
			tracer, _ := strconv.Atoi(strings.TrimSpace(v))
			if tracer != 0 {
				comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", tracer))
				return fmt.Errorf("seize %d: %w by PID %d (%s); detach that tracer (debugger, strace) first: %w",
					pid, ErrAlreadyTraced, tracer, strings.TrimSpace(string(comm)), err)
			}
		}
	}
	return fmt.Errorf("seize %d: not permitted (phaul needs root or CAP_SYS_PTRACE, and no LSM denying ptrace): %w", pid, err)
}
