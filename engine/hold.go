package engine

import (
	"errors"
	"fmt"

	"github.com/phaul/phaul/internal/sys"
)

// Hold readies the frozen process for the commit window of a migration,
// where it must never run again unless someone decides so: the signals
// taken off it are queued again (which runs code in the process), then it
// is sent SIGSTOP, which it takes as soon
// as it leaves phaul's hands. From then on Kill kills it as before, while
// Resume, or phaul dying (the kernel detaches it), leaves it stopped by job
// control, not running: SIGCONT resumes it. On error it is not sent
// SIGSTOP, and Resume resumes it. The scratch memory the collection left
// mapped is removed first.
//
// Tracking kept registered (FreezeOptions.KeepTracking) stays so, but the
// userfaultfd parked in the process is closed there: a process let go
// keeps no descriptor it never opened. Kill, Resume and Close release
// phaul's copy, the last one, after the commit window.
func (f *Frozen) Hold() error {
	if f.done {
		return errors.New("hold: process already resumed or killed")
	}
	return f.tr.Do(func() error {
		if f.c.frozen == nil {
			return fmt.Errorf("hold %d: not frozen", f.Pid)
		}
		if f.tracker != nil {
			// One injected close(2), and phaul's copy kept open: with the
			// last reference gone the kernel would unregister every
			// mapping, walking its page tables, inside the downtime.
			if err := f.tracker.CloseProcessFD(); err != nil {
				return fmt.Errorf("hold %d: %w", f.Pid, err)
			}
		}
		// Before the SIGSTOP: an injection would take it off the thread.
		if err := f.c.unmapScratch(); err != nil {
			return fmt.Errorf("hold %d: %w", f.Pid, err)
		}
		if err := f.c.frozen.Requeue(f.c.gadget); err != nil {
			return fmt.Errorf("hold %d: %w", f.Pid, err)
		}
		// Queued while every thread sits in a ptrace stop: nothing runs
		// until a thread is let go, and then the stop comes first.
		if err := sys.Kill(f.Pid, sys.SIGSTOP); err != nil {
			return fmt.Errorf("hold %d: %w", f.Pid, err)
		}
		return nil
	})
}

// ResumeHeld resumes a held process for good: Resume (which removes the
// tracking), then SIGCONT for the stop Hold queued. It is for a commit the
// target refused outright, when the process certainly runs nowhere else.
func (f *Frozen) ResumeHeld() error {
	err := f.Resume()
	return errors.Join(err, sys.Kill(f.Pid, sys.SIGCONT))
}
