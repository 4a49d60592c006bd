package tracker

import (
	"errors"
	"fmt"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/engine/ptrace"
)

// Syscaller runs system calls inside a stopped thread of the process.
type Syscaller interface {
	// Syscall runs system call nr with args and returns its result; a
	// failure is returned as a sys.Errno error.
	Syscall(nr uint64, args ...uint64) (uint64, error)
}

// Control gives a backend the process stopped, for what cannot be done
// while it runs: creating or closing a descriptor inside it by injection,
// and (softdirty) reading and clearing the dirty bits at one instant.
type Control interface {
	// Stopped runs fn while every thread of the process is stopped; sc
	// injects system calls into one of them. The process runs again
	// exactly as before once Stopped returns (unless the caller keeps it
	// frozen on purpose, see StoppedControl).
	Stopped(fn func(sc Syscaller) error) error
}

// FreezeControl returns the Control for a running process: each call of
// Stopped seizes every thread of pid with ptrace (on a Tracer of its own),
// runs fn, and resumes the process.
func FreezeControl(pid int) Control { return freezeControl{pid: pid} }

type freezeControl struct{ pid int }

func (c freezeControl) Stopped(fn func(sc Syscaller) error) error {
	tr := ptrace.NewTracer()
	defer tr.Close()
	return tr.Do(func() error {
		f, err := ptrace.Freeze(c.pid)
		if err != nil {
			return err
		}
		gadget, gerr := findGadget(c.pid)
		in := &lazyInjector{pid: c.pid, tid: f.Tids[0], gadget: gadget, gadgetErr: gerr}
		err = fn(in)
		if cerr := in.close(); err == nil {
			err = cerr
		}
		if rerr := f.Resume(gadget); rerr != nil {
			err = errors.Join(err, fmt.Errorf("resume %d: %w", c.pid, rerr))
		}
		return err
	})
}

// StoppedControl returns the Control for a caller that holds the process
// frozen already and runs on the ptrace Tracer thread that froze it (the
// final dump): Stopped runs fn at once, injecting into thread tid through
// the `syscall` instruction at gadget (0: find one in the [vdso]).
//
// Precondition: Stopped is called on the Tracer thread.
func StoppedControl(pid, tid int, gadget uint64) Control {
	return stoppedControl{pid: pid, tid: tid, gadget: gadget}
}

type stoppedControl struct {
	pid, tid int
	gadget   uint64
}

func (c stoppedControl) Stopped(fn func(sc Syscaller) error) error {
	in := &lazyInjector{pid: c.pid, tid: c.tid, gadget: c.gadget}
	if in.gadget == 0 {
		in.gadget, in.gadgetErr = findGadget(c.pid)
	}
	err := fn(in)
	if cerr := in.close(); err == nil {
		err = cerr
	}
	return err
}

// lazyInjector prepares the thread for injection at the first system call
// only: a Stopped function that injects nothing changes nothing.
type lazyInjector struct {
	pid, tid  int
	gadget    uint64
	gadgetErr error
	in        *ptrace.Injector
}

func (l *lazyInjector) Syscall(nr uint64, args ...uint64) (uint64, error) {
	if l.in == nil {
		if l.gadgetErr != nil {
			return 0, l.gadgetErr
		}
		in, err := ptrace.NewInjector(l.tid, l.gadget)
		if err != nil {
			return 0, err
		}
		l.in = in
	}
	return l.in.Syscall(nr, args...)
}

func (l *lazyInjector) close() error {
	if l.in == nil {
		return nil
	}
	return l.in.Close()
}

// findGadget finds a `syscall` instruction in the [vdso] of pid.
func findGadget(pid int) (uint64, error) {
	maps, err := proc.ReadMaps(pid)
	if err != nil {
		return 0, err
	}
	for _, m := range maps {
		if m.Path == "[vdso]" {
			return ptrace.FindGadget(pid, m.Start, m.End)
		}
	}
	return 0, fmt.Errorf("process %d has no [vdso] to inject system calls through", pid)
}
