package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/internal/hostinfo"
	"github.com/phaul/phaul/netlock"
	"github.com/phaul/phaul/protocol/imagepb"
	"github.com/phaul/phaul/tracker"
)

// FreezeOptions configures Freeze.
type FreezeOptions struct {
	Pid int
	// ShellJob re-binds descriptors on a terminal to the restorer's stdio.
	ShellJob bool
	// TCPEstablished allows established TCP connections: they are left in
	// repair mode while frozen, behind a network lock (files_socket.go).
	TCPEstablished bool
	// ExtUnixSk allows unix sockets whose peer is outside the image
	// (files_unix.go).
	ExtUnixSk ExtUnixSk
	// TrackerDir holds tracking state parked by earlier rounds
	// (tracker.Tracker.Park); empty when the process was not tracked.
	TrackerDir string
	// LastRound, when set, runs on the frozen process, with the tracker
	// resumed from TrackerDir (nil when there was none) and the process's
	// mappings: the final round of a pre-copy, exact because nothing runs.
	// It runs on a goroutine of its own while the threads and descriptors
	// are collected, so it must not issue ptrace requests. The tracker's
	// Round is its FinalRound: over the mappings read at the freeze, not
	// the scratch memory the collection maps meanwhile, and leaving what
	// it reports unarmed (no round follows). Tracking is removed from
	// the process after LastRound returns, unless KeepTracking.
	LastRound func(ctx context.Context, t tracker.Tracker, vmas []*imagepb.VMA) error
	// KeepTracking leaves tracking registered in the process while it is
	// frozen, for a caller that reads no memory after the last round
	// (removing it walks every page table: time in the downtime). Resume
	// removes it; Kill lets it go with the process.
	KeepTracking bool
	// FlagsBeforeFreeze reads the mappings' VmFlags (madvise advice and
	// the like) from /proc/PID/smaps just before the freeze, while the
	// process runs, so that the frozen process's mappings come from
	// /proc/PID/maps: smaps walks every page table, about 12 ms per GiB
	// here, all of it downtime. A mapping changed in between (its range,
	// permissions, offset or file) sends the freeze back to smaps. What
	// it cannot see is advice given to a whole mapping in that moment
	// (about a millisecond); for a live migration's downtime.
	FlagsBeforeFreeze bool
	// Logger receives progress; nil discards it.
	Logger *slog.Logger
}

// Frozen is a process stopped by Freeze, its state collected. It stays
// stopped until Resume or Kill; Close resumes it if neither was called.
type Frozen struct {
	Pid   int
	State State
	// XsaveFeatures is this CPU's XCR0: the state components the process
	// may use (it chose its code paths by CPUID).
	XsaveFeatures uint64
	// At is when the first thread was told to stop: where the pause
	// began (every thread was stopped a moment later).
	At time.Time

	tr      *ptrace.Tracer
	c       *collector
	tracker tracker.Tracker // still registered in the process; nil if none
	done    bool
	// sockets are phaul's copies of the dumped sockets, netLock the lock
	// on the process's connections (nil if none).
	sockets []*dumpedSocket
	netLock *netlock.Lock
}

// Freeze stops every thread of a process and collects its state except
// memory contents. On error the process runs again as before. A process
// with children is refused (Dump takes trees: tree.go).
func Freeze(ctx context.Context, opt FreezeOptions) (*Frozen, error) {
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.DiscardHandler)
	}
	if opt.Pid <= 0 {
		return nil, fmt.Errorf("freeze: invalid PID %d", opt.Pid)
	}
	status, err := checkProcess(opt.Pid, false)
	if err != nil {
		return nil, fmt.Errorf("freeze %d: %w", opt.Pid, err)
	}
	fz := newFrozen(opt.Pid, status)
	ft := newFileTable(opt)
	if opt.FlagsBeforeFreeze {
		if fz.c.flagsFrom, err = proc.ReadSmaps(opt.Pid); err != nil {
			return nil, fmt.Errorf("freeze %d: %w", opt.Pid, err)
		}
	}
	t0 := time.Now()
	err = fz.stop()
	timing := []any{"stop", time.Since(t0)}
	if err == nil {
		var more []any
		more, err = fz.collect(ctx, opt, ft)
		timing = append(timing, more...)
	}
	fz.sockets, fz.netLock = ft.sockets, ft.lock // Resume gives them back
	if err != nil {
		if rerr := fz.Resume(); rerr != nil {
			return nil, fmt.Errorf("freeze %d: %w (and resuming it failed: %v)", opt.Pid, err, rerr)
		}
		return nil, fmt.Errorf("freeze %d: %w", opt.Pid, err)
	}
	opt.Logger.Debug("frozen and collected", append([]any{"threads", len(fz.c.frozen.Tids), "vmas", len(fz.c.maps), "since_freeze", time.Since(fz.At)}, timing...)...)
	fz.State.Files = &ft.table
	return fz, nil
}

// newFrozen prepares the freeze of process pid, whose status was checked.
func newFrozen(pid int, status *proc.Status) *Frozen {
	return &Frozen{Pid: pid, tr: ptrace.NewTracer(), c: &collector{pid: pid, status: status}}
}

// stop stops every thread of the process.
func (fz *Frozen) stop() error {
	return fz.tr.Do(func() error {
		f, err := ptrace.Freeze(fz.Pid)
		if err != nil {
			return err
		}
		fz.At = f.Stopping
		fz.c.frozen = f
		return nil
	})
}

// collect collects the stopped process's state but memory contents into
// fz.State, and its descriptors into ft unless ft is nil (a tree's
// processes share one table, finished after all of them), running
// opt.LastRound on the way; it returns the time each step took, for the
// log.
//
// The final round reads memory off the tracer thread while the threads
// and descriptors are collected on it: the two need different resources
// (page tables and memory; ptrace stops), and the round's tracker covers
// the mappings read before, not the scratch memory injection maps.
func (fz *Frozen) collect(ctx context.Context, opt FreezeOptions, ft *fileTable) ([]any, error) {
	c := fz.c
	var timing []any
	var t tracker.Tracker
	err := fz.tr.Do(func() error {
		// Tracking is resumed before mappings and descriptors are
		// collected: it registers mappings and keeps a descriptor.
		if opt.TrackerDir != "" {
			t1 := time.Now()
			var err error
			if t, err = resumeTracking(ctx, c, opt, opt.Logger); err != nil {
				return err
			}
			timing = append(timing, "tracker_resume", time.Since(t1))
		}
		fz.tracker, c.tracked = t, t != nil // from here Resume removes it
		t1 := time.Now()
		if err := c.readMaps(); err != nil {
			return err
		}
		timing = append(timing, "maps", time.Since(t1))
		var err error
		if c.stat, err = proc.ReadStat(fz.Pid); err != nil {
			return err
		}
		if v := findMapping(c.maps, "[vdso]"); v != nil {
			if c.gadget, err = ptrace.FindGadget(fz.Pid, v.Start, v.End); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return timing, err
	}
	var last chan error
	var lastTook time.Duration
	if opt.LastRound != nil {
		last = make(chan error, 1)
		var view tracker.Tracker
		if t != nil {
			view = frozenTracker{Tracker: t, maps: c.maps}
		}
		vmas := c.vmas
		go func() {
			t1 := time.Now()
			err := opt.LastRound(ctx, view, vmas)
			lastTook = time.Since(t1)
			last <- err
		}()
	}
	t1 := time.Now()
	err = fz.tr.Do(func() error {
		p, err := c.process()
		if err != nil {
			return err
		}
		fz.State = State{
			Process: p,
			Entry: &imagepb.ProcessEntry{Pid: int32(fz.Pid), Ppid: int32(c.stat.Ppid),
				Pgid: int32(c.stat.Pgrp), Sid: int32(c.stat.Session)},
			ShellJob: opt.ShellJob,
		}
		return nil
	})
	timing = append(timing, "threads", time.Since(t1))
	if err == nil && ft != nil {
		t1 := time.Now()
		err = fz.collectFDs(ft)
		if err == nil {
			err = ft.finish()
		}
		timing = append(timing, "fds", time.Since(t1))
	}
	if last != nil {
		// Always waited for: nothing may resume or stop tracking under
		// the round.
		if lerr := <-last; err == nil {
			err = lerr
		}
		timing = append(timing, "last_round", lastTook)
	}
	if err == nil && t != nil && !opt.KeepTracking {
		t1 := time.Now()
		err = fz.tr.Do(func() error {
			fz.tracker, c.tracked = nil, false
			if err := t.Stop(); err != nil {
				return err
			}
			// Unregistering changed the mappings' flags: read them anew.
			c.flagsFrom = nil
			if err := c.readMaps(); err != nil {
				return err
			}
			fz.State.Process.Vmas = c.vmas
			return nil
		})
		timing = append(timing, "tracker_stop", time.Since(t1))
	}
	if err == nil {
		err = ctx.Err()
	}
	fz.XsaveFeatures = hostinfo.XCR0()
	return timing, err
}

// frozenTracker is a tracker whose round is the final one, over the
// mappings the freeze read (see tracker.Tracker.FinalRound).
type frozenTracker struct {
	tracker.Tracker
	maps []proc.Mapping
}

func (f frozenTracker) Round(ctx context.Context) (*tracker.Delta, error) {
	return f.Tracker.FinalRound(ctx, f.maps)
}

// collectFDs describes the process's descriptors into ft.
func (fz *Frozen) collectFDs(ft *fileTable) error {
	skip := -1
	if fz.tracker != nil {
		skip = fz.tracker.ProcessFD()
	}
	var err error
	fz.State.Process.Fds, err = ft.dumpFDs(fz.Pid, skip)
	return err
}

// resumeTracking takes up the tracking parked in opt.TrackerDir on the
// process frozen as c.frozen; nil when there is no state to take up.
//
// Precondition: called on the Tracer thread.
func resumeTracking(ctx context.Context, c *collector, opt FreezeOptions, log *slog.Logger) (tracker.Tracker, error) {
	t, err := tracker.Resume(ctx, c.pid, opt.TrackerDir, tracker.Options{Control: trackerControl{c}, Logger: log})
	if errors.Is(err, tracker.ErrNoState) {
		log.Warn("no tracking state: every page counts as written", "dir", opt.TrackerDir)
		return nil, nil
	}
	return t, err
}

// trackerControl is the Control of the tracking on a frozen process: it
// injects through the collector's gadget once it is found (until then,
// the tracker looks for one in the [vdso] itself).
//
// Precondition: Stopped is called on the Tracer thread.
type trackerControl struct{ c *collector }

func (tc trackerControl) Stopped(fn func(sc tracker.Syscaller) error) error {
	return tracker.StoppedControl(tc.c.pid, tc.c.frozen.Tids[0], tc.c.gadget).Stopped(fn)
}

// Resume lets the process run again as it was (signals taken off it while
// freezing are queued again). Tracking still registered is removed first
// (after Hold too: the held process is stopped by then, and phaul's copy
// of the userfaultfd is released).
func (f *Frozen) Resume() error {
	if f.done {
		return nil
	}
	f.done = true
	defer f.tr.Close()
	serr := resumeSockets(f.sockets, f.netLock)
	if f.c.frozen == nil {
		return serr
	}
	return errors.Join(serr, f.tr.Do(func() error {
		var err error
		if f.tracker != nil {
			err = f.tracker.Stop()
			f.tracker = nil
		}
		err = errors.Join(err, f.c.unmapScratch())
		return errors.Join(err, f.c.frozen.Resume(f.c.gadget))
	}))
}

// Kill kills the process and waits until its threads are gone.
func (f *Frozen) Kill() error { return f.KillWhile(nil) }

// KillWhile kills the process and, unless fn is nil, runs fn on its own
// goroutine while the threads exit (freeing a large address space takes
// tens of milliseconds); it returns once they are gone and fn returned.
// fn runs after SIGKILL was sent, and also when sending it failed.
func (f *Frozen) KillWhile(fn func()) error {
	if f.done {
		return errors.New("process already resumed or killed")
	}
	f.done = true
	defer f.tr.Close()
	// Connections in repair mode close silently, after the process; the
	// network lock stays until Restore.
	defer closeSockets(f.sockets)
	return f.tr.Do(func() error {
		err := f.c.frozen.SendKill()
		if fn != nil {
			done := make(chan struct{})
			go func() {
				defer close(done)
				fn()
			}()
			defer func() { <-done }()
		}
		if err == nil {
			f.c.frozen.Reap()
		}
		if f.tracker != nil {
			// The registrations and the parked descriptor die with it;
			// phaul's copy is closed after, when there is no memory left
			// to unregister (after Hold, it is the last reference).
			err = errors.Join(err, f.tracker.Close())
			f.tracker = nil
		}
		return err
	})
}

// Unlock removes the network lock after Kill. Kill keeps it so that, on
// one host, the restore finds the connections' packets still held; after
// a migration it is for the caller to remove once the connections'
// address has left this host (else their peers get RST from here). It
// does nothing without a lock, and refuses before Kill (Resume removes
// the lock itself).
func (f *Frozen) Unlock() error {
	if f.netLock == nil {
		return nil
	}
	if !f.done {
		return errors.New("unlock: the process is still frozen")
	}
	err := f.netLock.Unlock()
	f.netLock = nil
	return err
}

// Close resumes the process unless Resume or Kill was called.
func (f *Frozen) Close() error { return f.Resume() }
