package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
	"github.com/phaul/phaul/tracker"
)

// FormatVersion is the image format this engine writes.
const FormatVersion = 1

// DumpOptions configures Dump.
type DumpOptions struct {
	// Pid is the process to dump.
	Pid int
	// Dir is the image directory; it is created if missing.
	Dir string
	// LeaveRunning resumes the process after the dump instead of killing it.
	LeaveRunning bool
	// ShellJob re-binds descriptors on a terminal to the restorer's stdio.
	ShellJob bool
	// TCPEstablished allows established TCP connections to be dumped (the
	// --tcp-established of CRIU); without it they are refused by name.
	TCPEstablished bool
	// ExtUnixSk allows unix sockets whose peer is outside the image (the
	// --ext-unix-sk of CRIU); restore connects them to the peer's name
	// again. Without it they are refused by name.
	ExtUnixSk ExtUnixSk
	// Parent is the last pre-dump of a chain (PreDump): only the pages
	// written since are saved, the others are recorded as in the parent.
	// Tracking is removed from the process before anything is collected.
	Parent string
	// Track, when set, is the tracking backend Parent must have used.
	Track string
	// Logger receives progress; nil discards it.
	Logger *slog.Logger
}

// DumpResult reports what a dump did.
type DumpResult struct {
	Pid     int `json:"pid"`
	Threads int `json:"threads"`
	// Processes counts the processes of the tree, zombies included.
	Processes    int           `json:"processes"`
	PagesScanned uint64        `json:"pages_scanned"`
	PagesWritten uint64        `json:"pages_written"`
	PagesZero    uint64        `json:"pages_zero"`
	BytesWritten uint64        `json:"bytes_written"`
	Frozen       time.Duration `json:"-"`
	Duration     time.Duration `json:"-"`
	FrozenMS     float64       `json:"frozen_ms"`
	DurationMS   float64       `json:"duration_ms"`
	Killed       bool          `json:"killed"`
	// PagesInParent counts the pages recorded as unchanged since Parent.
	PagesInParent uint64 `json:"pages_in_parent"`
	// ConnectionsLeftOut counts the connections that unix listeners had
	// not accepted yet from clients outside the image: they are not in
	// the image (their clients see them fail).
	ConnectionsLeftOut int `json:"connections_left_out,omitempty"`
	// Tracker is the tracking backend of the parent chain.
	Tracker string `json:"tracker,omitempty"`
}

// Dump checkpoints a process into an image directory. The process is frozen
// for the whole dump; afterwards it is killed, or resumed with LeaveRunning.
// On any error it is resumed untouched.
func Dump(ctx context.Context, opt DumpOptions) (*DumpResult, error) {
	log := opt.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "dump", "pid", opt.Pid)
	start := time.Now()
	if opt.Pid <= 0 {
		return nil, fmt.Errorf("dump: invalid PID %d", opt.Pid)
	}
	if _, err := checkProcess(opt.Pid, true); err != nil {
		return nil, fmt.Errorf("dump %d: %w", opt.Pid, err)
	}
	if err := os.MkdirAll(opt.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("dump %d: %w", opt.Pid, err)
	}

	var par *parentImage
	if opt.Parent != "" {
		var err error
		if par, err = openParent(opt.Parent, opt.Dir, opt.Pid); err != nil {
			return nil, fmt.Errorf("dump %d: %w", opt.Pid, err)
		}
	}
	var inParent tracker.Ranges
	var backend string
	fopt := FreezeOptions{Pid: opt.Pid, ShellJob: opt.ShellJob, TCPEstablished: opt.TCPEstablished, ExtUnixSk: opt.ExtUnixSk, Logger: log}
	if par != nil {
		fopt.TrackerDir = par.dir
		fopt.LastRound = func(ctx context.Context, t tracker.Tracker, _ []*imagepb.VMA) error {
			if t == nil {
				return nil // untracked parent: every page is saved
			}
			backend = t.Backend()
			if opt.Track != "" && opt.Track != tracker.Auto && opt.Track != backend {
				return fmt.Errorf("the parent image was tracked with %s, not %s", backend, opt.Track)
			}
			d, err := t.Round(ctx)
			if err != nil {
				return err
			}
			inParent = tracker.Intersect(par.recorded, d.Unchanged())
			log.Debug("last tracking round", "backend", backend, "dirty", d.Dirty.Pages(), "from_parent", inParent.Pages(), "reset", d.Reset)
			return nil
		}
	}
	fopt.Logger = log
	tree, err := freezeRetrying(ctx, fopt)
	if err != nil {
		return nil, fmt.Errorf("dump %d: %w", opt.Pid, err)
	}
	root := tree.procs[0]
	frozenAt := root.At
	// From here on, every failure resumes the tree.
	resume := func(cause error) error {
		if rerr := tree.resume(); rerr != nil {
			return fmt.Errorf("dump %d: %w (and resuming it failed: %v)", opt.Pid, cause, rerr)
		}
		log.Info("dump failed; process resumed", "err", cause)
		return fmt.Errorf("dump %d: %w (the process was resumed)", opt.Pid, cause)
	}
	log.Debug("state collected", "processes", len(tree.entries), "since_freeze", time.Since(frozenAt))
	leftOut, listeners := tree.files.leftOut()
	if leftOut > 0 {
		log.Warn("connections not accepted yet from clients outside the image are left out: their clients see them fail",
			"connections", leftOut, "listeners", listeners)
	}

	// Memory, read while the tree stays frozen.
	d := image.Dir{Path: opt.Dir}
	// Shared memory objects first: their pages are saved once, apart.
	if err := tree.dumpShmem(d); err != nil {
		return nil, resume(err)
	}
	var ms memStats
	threads := 0
	for i, fz := range tree.procs {
		w, err := d.NewPageWriter(fz.Pid)
		if err != nil {
			return nil, resume(err)
		}
		var fromParent func(addr uint64) bool
		if i == 0 && inParent != nil {
			fromParent = inParent.Contains
		}
		one, err := dumpMemory(fz.Pid, fz.State.Process.Vmas, w, fromParent)
		if err == nil {
			err = w.Close()
		} else {
			_ = w.Close()
		}
		if err != nil {
			return nil, resume(fmt.Errorf("memory of %d: %w", fz.Pid, err))
		}
		ms.add(one)
		threads += len(fz.State.Process.Threads)
	}
	log.Debug("memory written", "pages", ms.written, "zero", ms.zero, "since_freeze", time.Since(frozenAt))
	if err := ctx.Err(); err != nil {
		return nil, resume(err)
	}
	inv := &imagepb.Inventory{
		FormatVersion:   FormatVersion,
		PhaulVersion:    Version,
		KernelRelease:   sys.KernelRelease(),
		PageSize:        pageSize,
		CreatedUnixNano: time.Now().UnixNano(),
		RootPid:         int32(opt.Pid),
		Processes:       tree.entries,
		XsaveFeatures:   root.XsaveFeatures,
		ShellJob:        opt.ShellJob,
		Tracker:         backend,
	}
	if ms.parent > 0 {
		inv.Parent = par.rel
	}
	res := &DumpResult{
		Pid: opt.Pid, Threads: threads, Processes: len(tree.entries),
		PagesScanned: ms.scanned, PagesWritten: ms.written, PagesZero: ms.zero,
		BytesWritten: ms.written * pageSize, PagesInParent: ms.parent, Tracker: backend,
		ConnectionsLeftOut: leftOut,
	}
	inv.Stats = &imagepb.DumpStats{
		PagesScanned: res.PagesScanned, PagesWritten: res.PagesWritten, PagesZero: res.PagesZero,
		BytesWritten: res.BytesWritten, PagesInParent: res.PagesInParent,
		FrozenNs: uint64(time.Since(frozenAt)), DurationNs: uint64(time.Since(start)),
	}
	// Every image is on disk before the process may die; the inventory
	// goes last: a directory without one is not an image.
	errs := []error{d.WriteFiles(&tree.files.table)}
	for _, fz := range tree.procs {
		errs = append(errs, d.WriteProcess(fz.State.Process))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, resume(err)
	}
	if err := d.WriteInventory(inv); err != nil {
		return nil, resume(err)
	}

	// Phase 3: kill or resume.
	// Frozen ends when the process is resumed or killed; the kernel's
	// teardown of a killed process's memory is not a pause anyone sees.
	res.Frozen = time.Since(frozenAt)
	if opt.LeaveRunning {
		err = tree.resume()
	} else {
		err = tree.kill()
		res.Killed = true
	}
	res.Duration = time.Since(start)
	res.FrozenMS = float64(res.Frozen.Microseconds()) / 1000
	res.DurationMS = float64(res.Duration.Microseconds()) / 1000
	if err != nil {
		return res, fmt.Errorf("dump %d: images written, but: %w", opt.Pid, err)
	}
	log.Info("dumped", "pages", res.PagesWritten, "frozen", res.Frozen, "took", res.Duration)
	return res, nil
}

// pendingAttempts bounds how often freezeRetrying freezes the tree.
const pendingAttempts = 10

// freezeRetrying freezes the tree like freezeTree, and freezes it again
// when it was refused only because a listener of it had a connection not
// accepted yet (ErrPendingConnections), or a unix connection with a client
// outside (ErrBusy): a server under load has them now and then, and is done
// with them within milliseconds. Between attempts the tree
// runs; the wait grows from 5 ms to 200 ms, about a second in all.
func freezeRetrying(ctx context.Context, opt FreezeOptions) (*frozenTree, error) {
	delay := 5 * time.Millisecond
	for attempt := 1; ; attempt++ {
		t, err := freezeTree(ctx, opt)
		if err == nil || !errors.Is(err, ErrPendingConnections) && !errors.Is(err, ErrBusy) {
			return t, err
		}
		if attempt == pendingAttempts {
			return nil, fmt.Errorf("%w (the same after %d attempts)", err, attempt)
		}
		opt.Logger.Info("a connection waits to be accepted; the process runs and is frozen again shortly", "attempt", attempt, "err", err)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 200*time.Millisecond)
	}
}
