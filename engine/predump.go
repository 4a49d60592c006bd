package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/predump"
	"github.com/phaul/phaul/protocol/imagepb"
	"github.com/phaul/phaul/tracker"
)

// PreDumpOptions configures PreDump.
type PreDumpOptions struct {
	// Pid is the process to pre-dump.
	Pid int
	// Dir is the image directory to write; it is created if missing. It
	// may be empty with StopTracking, to end tracking without a round.
	Dir string
	// Parent is the previous pre-dump of the chain; only pages written
	// since are copied. Empty starts tracking, and copies every page.
	Parent string
	// Track names the tracking backend (tracker.Backends) for a new chain;
	// "" or "auto" picks one. Continuing a chain with another backend
	// restarts tracking (and copies every page).
	Track string
	// StopTracking removes tracking from the process after the round (or
	// without a round when Dir is empty), instead of leaving it for the
	// next pre-dump.
	StopTracking bool
	// Logger receives progress; nil discards it.
	Logger *slog.Logger
}

// PreDumpResult reports what a pre-dump did.
type PreDumpResult struct {
	Pid     int    `json:"pid"`
	Tracker string `json:"tracker"`
	Parent  string `json:"parent,omitempty"`
	// Round counts the rounds of tracking, 1 for the first pre-dump.
	Round         int     `json:"round"`
	PagesScanned  uint64  `json:"pages_scanned"`
	PagesPresent  uint64  `json:"pages_present"`
	PagesDirty    uint64  `json:"pages_dirty"`
	PagesWritten  uint64  `json:"pages_written"`
	PagesZero     uint64  `json:"pages_zero"`
	PagesInParent uint64  `json:"pages_in_parent"`
	PagesGone     uint64  `json:"pages_gone"`
	BytesWritten  uint64  `json:"bytes_written"`
	DirtyRate     float64 `json:"dirty_pages_per_sec"`
	// Reset says why every page was copied again although there was a
	// parent (tracking lost or restarted).
	Reset           string        `json:"reset,omitempty"`
	TrackingStopped bool          `json:"tracking_stopped"`
	Frozen          time.Duration `json:"-"`
	Duration        time.Duration `json:"-"`
	// FrozenMS is how long the process was stopped: injection at the start
	// of tracking, and softdirty rounds; 0 for a round that never stopped it.
	FrozenMS   float64 `json:"frozen_ms"`
	DurationMS float64 `json:"duration_ms"`
}

// PreDump copies the memory of a running process into a pre-dump image
// while it keeps running: every page in the first image of a chain, then
// only the pages written since Parent, the others recorded as
// PAGES_IN_PARENT. Pages gone since Parent are left out, so that restore
// cannot bring them back. Tracking stays in place for the next pre-dump
// or the final dump (DumpOptions.Parent), which removes it.
//
// A pre-dump image holds the inventory (Predump set, Parent naming the
// previous image) and the page map and pages of the process; it is not
// restorable by itself.
func PreDump(ctx context.Context, opt PreDumpOptions) (*PreDumpResult, error) {
	log := opt.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "predump", "pid", opt.Pid)
	start := time.Now()
	if opt.Pid <= 0 {
		return nil, fmt.Errorf("pre-dump: invalid PID %d", opt.Pid)
	}
	if opt.Dir == "" && !opt.StopTracking {
		return nil, fmt.Errorf("pre-dump %d: no image directory", opt.Pid)
	}
	if _, err := checkProcess(opt.Pid, false); err != nil {
		return nil, fmt.Errorf("pre-dump %d: %w", opt.Pid, err)
	}
	ctl := &timedControl{inner: tracker.FreezeControl(opt.Pid)}
	res := &PreDumpResult{Pid: opt.Pid}
	finish := func() *PreDumpResult {
		res.Frozen = ctl.total()
		res.Duration = time.Since(start)
		res.FrozenMS = float64(res.Frozen.Microseconds()) / 1000
		res.DurationMS = float64(res.Duration.Microseconds()) / 1000
		return res
	}
	topt := tracker.Options{Backend: opt.Track, Control: ctl, Logger: log}

	var par *parentImage
	if opt.Parent != "" {
		var err error
		if par, err = openParent(opt.Parent, opt.Dir, opt.Pid); err != nil {
			return nil, fmt.Errorf("pre-dump %d: %w", opt.Pid, err)
		}
		if opt.Dir != "" && sameDir(opt.Dir, opt.Parent) {
			return nil, fmt.Errorf("pre-dump %d: the image directory is its own parent %s", opt.Pid, opt.Parent)
		}
	}

	if opt.Dir == "" {
		// --stop-tracking alone.
		if par == nil {
			return nil, fmt.Errorf("pre-dump %d: stopping tracking needs the last pre-dump of the chain (--prev)", opt.Pid)
		}
		t, err := tracker.Resume(ctx, opt.Pid, par.dir, topt)
		if err != nil {
			return nil, fmt.Errorf("pre-dump %d: stop tracking: %w", opt.Pid, err)
		}
		res.Tracker = t.Backend()
		if err := t.Stop(); err != nil {
			return nil, fmt.Errorf("pre-dump %d: %w", opt.Pid, err)
		}
		res.TrackingStopped = true
		log.Info("tracking stopped", "backend", res.Tracker)
		return finish(), nil
	}

	t, prev, restart, err := openTracking(ctx, opt, par, topt, log)
	if err != nil {
		return nil, fmt.Errorf("pre-dump %d: %w", opt.Pid, err)
	}
	res.Tracker = t.Backend()
	// From here on, a failure removes tracking: no state was parked that a
	// later run could use to clean up.
	fail := func(cause error) (*PreDumpResult, error) {
		if serr := t.Stop(); serr != nil && !errors.Is(serr, tracker.ErrProcessGone) {
			log.Warn("removing tracking after a failure", "err", serr)
		}
		return nil, fmt.Errorf("pre-dump %d: %w", opt.Pid, cause)
	}

	if err := os.MkdirAll(opt.Dir, 0o700); err != nil {
		return fail(err)
	}
	stat, err := proc.ReadStat(opt.Pid)
	if err != nil {
		return fail(err)
	}
	sink, err := predump.NewImageSink(opt.Dir, opt.Pid)
	if err != nil {
		return fail(err)
	}
	r, err := predump.Run(ctx, t, sink, predump.Options{Previous: prev})
	if err != nil {
		sink.Abort()
		return fail(err)
	}
	res.Round = r.Round
	res.PagesScanned, res.PagesPresent, res.PagesDirty = r.PagesScanned, r.PagesPresent, r.PagesDirty
	res.PagesWritten, res.PagesZero, res.PagesInParent = r.PagesWritten, r.PagesZero, r.PagesKept
	res.PagesGone, res.BytesWritten, res.DirtyRate, res.Reset = r.PagesGone, r.BytesWritten, r.DirtyRate, r.Reset
	if restart != "" {
		res.Reset = restart
	}
	inv := &imagepb.Inventory{
		FormatVersion:   FormatVersion,
		PhaulVersion:    Version,
		KernelRelease:   sys.KernelRelease(),
		PageSize:        pageSize,
		CreatedUnixNano: time.Now().UnixNano(),
		RootPid:         int32(opt.Pid),
		Processes: []*imagepb.ProcessEntry{{
			Pid: int32(opt.Pid), Ppid: int32(stat.Ppid), Pgid: int32(stat.Pgrp), Sid: int32(stat.Session),
		}},
		Predump: true,
		Tracker: res.Tracker,
	}
	if par != nil && prev != nil {
		inv.Parent = par.rel
		res.Parent = opt.Parent
	}
	finish()
	inv.Stats = &imagepb.DumpStats{
		PagesScanned: res.PagesScanned, PagesWritten: res.PagesWritten, PagesZero: res.PagesZero,
		BytesWritten: res.BytesWritten, PagesInParent: res.PagesInParent, PagesDirty: res.PagesDirty,
		FrozenNs: uint64(res.Frozen), DurationNs: uint64(time.Since(start)),
	}
	if err := (image.Dir{Path: opt.Dir}).WriteInventory(inv); err != nil {
		return fail(err)
	}
	// The image is complete; now the tracking state that continues it. If
	// parking fails, tracking is removed: the image stays usable as a
	// parent, and the next pre-dump starts tracking over.
	if opt.StopTracking {
		if err := t.Stop(); err != nil {
			return nil, fmt.Errorf("pre-dump %d: %w", opt.Pid, err)
		}
		res.TrackingStopped = true
	} else if err := t.Park(opt.Dir); err != nil {
		return fail(err)
	}
	finish()
	log.Info("pre-dumped", "round", res.Round, "dirty", res.PagesDirty, "written", res.PagesWritten,
		"in_parent", res.PagesInParent, "took", res.Duration)
	return res, nil
}

// openTracking continues the tracking of par, or starts it. It returns the
// pages the new image may take from its parent (nil: none), and why
// tracking was started over although there is a parent.
func openTracking(ctx context.Context, opt PreDumpOptions, par *parentImage, topt tracker.Options, log *slog.Logger) (tracker.Tracker, tracker.Ranges, string, error) {
	var restart string
	if par != nil {
		t, err := tracker.Resume(ctx, opt.Pid, par.dir, topt)
		switch {
		case errors.Is(err, tracker.ErrNoState):
			restart = "the parent image has no tracking state"
		case err != nil:
			return nil, nil, "", err
		case opt.Track != "" && opt.Track != tracker.Auto && opt.Track != t.Backend():
			restart = fmt.Sprintf("tracking switched from %s to %s", t.Backend(), opt.Track)
			if err := t.Stop(); err != nil {
				return nil, nil, "", err
			}
		default:
			return t, par.recorded, "", nil
		}
		log.Warn("tracking starts over: every page is copied", "why", restart)
	}
	t, err := tracker.Start(ctx, opt.Pid, topt)
	return t, nil, restart, err
}

// parentImage is the previous image of a chain.
type parentImage struct {
	dir string // as given
	rel string // as the child's inventory names it
	// recorded holds the pages of the process in the parent's page map.
	recorded tracker.Ranges
}

// openParent checks that dir is a pre-dump of pid and reads its page map.
// child is the directory of the image that names dir as its parent.
func openParent(dir, child string, pid int) (*parentImage, error) {
	inv, err := image.Dir{Path: dir}.ReadInventory()
	if err != nil {
		return nil, fmt.Errorf("parent image: %w", err)
	}
	if !inv.GetPredump() {
		return nil, fmt.Errorf("parent image %s: %w: not a pre-dump", dir, ErrBadImage)
	}
	if int(inv.GetRootPid()) != pid {
		return nil, fmt.Errorf("parent image %s: %w: it is of PID %d", dir, ErrBadImage, inv.GetRootPid())
	}
	rec, err := predump.Recorded(dir, pid)
	if err != nil {
		return nil, fmt.Errorf("parent image: %w", err)
	}
	return &parentImage{dir: dir, rel: relParent(child, dir), recorded: rec}, nil
}

// relParent returns how the image in child names its parent dir: relative
// to child when both are known, else absolute.
func relParent(child, dir string) string {
	ac, err1 := filepath.Abs(child)
	ad, err2 := filepath.Abs(dir)
	if err1 != nil || err2 != nil {
		return dir
	}
	if child == "" {
		return ad
	}
	if rel, err := filepath.Rel(ac, ad); err == nil {
		return rel
	}
	return ad
}

// sameDir reports whether a and b name one directory.
func sameDir(a, b string) bool {
	fa, err1 := os.Stat(a)
	fb, err2 := os.Stat(b)
	if err1 == nil && err2 == nil {
		return os.SameFile(fa, fb)
	}
	aa, _ := filepath.Abs(a)
	ab, _ := filepath.Abs(b)
	return aa == ab
}

// timedControl adds up how long the process was kept stopped.
type timedControl struct {
	inner tracker.Control
	mu    sync.Mutex
	sum   time.Duration
}

func (c *timedControl) Stopped(fn func(sc tracker.Syscaller) error) error {
	start := time.Now()
	err := c.inner.Stopped(fn)
	c.mu.Lock()
	c.sum += time.Since(start)
	c.mu.Unlock()
	return err
}

func (c *timedControl) total() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sum
}
