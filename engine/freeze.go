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
	"github.com/phaul/phaul/protocol/imagepb"
	"github.com/phaul/phaul/tracker"
)

// FreezeOptions configures Freeze.
type FreezeOptions struct {
	Pid int
	// ShellJob re-binds descriptors on a terminal to the restorer's stdio.
	ShellJob bool
	// TrackerDir holds tracking state parked by earlier rounds
	// (tracker.Tracker.Park); empty when the process was not tracked.
	TrackerDir string
	// LastRound, when set, runs on the frozen process before its state is
	// collected, with the tracker resumed from TrackerDir (nil when there
	// was none): the final round of a pre-copy, exact because nothing
	// runs. It runs on the tracer thread. Tracking is removed from the
	// process after it returns.
	LastRound func(ctx context.Context, t tracker.Tracker) error
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
	// At is when every thread was stopped.
	At time.Time

	tr   *ptrace.Tracer
	c    *collector
	done bool
}

// Freeze stops every thread of a process and collects its state except
// memory contents. On error the process runs again as before.
func Freeze(ctx context.Context, opt FreezeOptions) (*Frozen, error) {
	log := opt.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opt.Pid <= 0 {
		return nil, fmt.Errorf("freeze: invalid PID %d", opt.Pid)
	}
	status, err := checkProcess(opt.Pid)
	if err != nil {
		return nil, fmt.Errorf("freeze %d: %w", opt.Pid, err)
	}
	fz := &Frozen{Pid: opt.Pid, tr: ptrace.NewTracer(), c: &collector{pid: opt.Pid, status: status}}
	c := fz.c
	var p *imagepb.Process
	err = fz.tr.Do(func() error {
		f, err := ptrace.Freeze(opt.Pid)
		if err != nil {
			return err
		}
		fz.At = time.Now()
		c.frozen = f
		if opt.TrackerDir != "" || opt.LastRound != nil {
			// Before mappings and descriptors are collected: tracking leaves
			// registered mappings and a descriptor behind.
			if err := lastRound(ctx, f, opt, log); err != nil {
				return err
			}
		}
		if c.maps, err = proc.ReadSmaps(opt.Pid); err != nil {
			return err
		}
		if c.stat, err = proc.ReadStat(opt.Pid); err != nil {
			return err
		}
		if v := findMapping(c.maps, "[vdso]"); v != nil {
			if c.gadget, err = ptrace.FindGadget(opt.Pid, v.Start, v.End); err != nil {
				return err
			}
		}
		p, err = c.process()
		return err
	})
	if err == nil {
		err = ctx.Err()
	}
	ft := &fileTable{shellJob: opt.ShellJob}
	if err == nil {
		p.Fds, err = ft.dumpFDs(opt.Pid)
	}
	if err != nil {
		if rerr := fz.Resume(); rerr != nil {
			return nil, fmt.Errorf("freeze %d: %w (and resuming it failed: %v)", opt.Pid, err, rerr)
		}
		return nil, fmt.Errorf("freeze %d: %w", opt.Pid, err)
	}
	log.Debug("frozen and collected", "threads", len(c.frozen.Tids), "vmas", len(c.maps), "since_freeze", time.Since(fz.At))
	fz.State = State{
		Process: p,
		Files:   &ft.table,
		Entry: &imagepb.ProcessEntry{Pid: int32(opt.Pid), Ppid: int32(c.stat.Ppid),
			Pgid: int32(c.stat.Pgrp), Sid: int32(c.stat.Session)},
		ShellJob: opt.ShellJob,
	}
	fz.XsaveFeatures = hostinfo.XCR0()
	return fz, nil
}

// lastRound resumes parked tracking on the frozen process, lets the caller
// run the final round, and removes tracking from the process.
//
// Precondition: called on the Tracer thread, with the process frozen as f.
func lastRound(ctx context.Context, f *ptrace.Frozen, opt FreezeOptions, log *slog.Logger) error {
	var t tracker.Tracker
	if opt.TrackerDir != "" {
		ctl := tracker.StoppedControl(f.Pid, f.Tids[0], 0)
		var err error
		t, err = tracker.Resume(ctx, f.Pid, opt.TrackerDir, tracker.Options{Control: ctl, Logger: log})
		if errors.Is(err, tracker.ErrNoState) {
			log.Warn("no tracking state: every page counts as written", "dir", opt.TrackerDir)
			t, err = nil, nil
		}
		if err != nil {
			return err
		}
	}
	var err error
	if opt.LastRound != nil {
		err = opt.LastRound(ctx, t)
	}
	if t != nil {
		err = errors.Join(err, t.Stop())
	}
	return err
}

// Resume lets the process run again as it was (signals taken off it while
// freezing are queued again).
func (f *Frozen) Resume() error {
	if f.done {
		return nil
	}
	f.done = true
	defer f.tr.Close()
	if f.c.frozen == nil {
		return nil
	}
	return f.tr.Do(func() error { return f.c.frozen.Resume(f.c.gadget) })
}

// Kill kills the process and waits until its threads are gone.
func (f *Frozen) Kill() error {
	if f.done {
		return errors.New("process already resumed or killed")
	}
	f.done = true
	defer f.tr.Close()
	return f.tr.Do(func() error { return f.c.frozen.Kill() })
}

// Close resumes the process unless Resume or Kill was called.
func (f *Frozen) Close() error { return f.Resume() }
