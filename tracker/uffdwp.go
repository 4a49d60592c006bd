package tracker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// uffdFeatures are the userfaultfd features write-protect tracking needs:
// faults resolved by the kernel itself (the process never blocks, no
// message is ever queued), and protection of pages not populated yet.
const uffdFeatures = sys.UFFD_FEATURE_WP_ASYNC | sys.UFFD_FEATURE_WP_UNPOPULATED

// uffdLink is what /proc/PID/fd/N shows for a userfaultfd.
const uffdLink = "anon_inode:[userfaultfd]"

// uffdTracker tracks writes with a userfaultfd created inside the process
// (so that its memory can be registered) and PAGEMAP_SCAN: every private
// mapping is registered for asynchronous write-protect; a write to a
// protected page is resolved by the kernel, which clears the page's
// protection; a scan with PM_SCAN_WP_MATCHING reports the unprotected
// (written) pages and protects them again, atomically per page.
type uffdTracker struct {
	*base
	uffd   int    // this process's copy of the userfaultfd; -1 when none
	parked int    // its descriptor number in the tracked process; -1 when none
	ino    uint64 // its inode number
	pm     *Pagemap
}

func (t *uffdTracker) start(ctx context.Context) error {
	if err := Supported(UffdWP); err != nil {
		return err
	}
	if err := t.open(); err != nil {
		return err
	}
	areas, err := readAreas(t.pid)
	if err != nil {
		return err
	}
	reg, err := t.registered(areas)
	if err != nil {
		return t.gone(err)
	}
	if len(reg) > 0 {
		return fmt.Errorf("%w: %d pages at %v are registered with a userfaultfd for write-protect: "+
			"continue the pre-dump chain that did it (--prev DIR) or end it (phaul pre-dump --stop-tracking)",
			ErrAlreadyTracked, reg.Pages(), reg[0])
	}
	if err := t.inject(); err != nil {
		return t.gone(err)
	}
	t.arm(areas, AreaRanges(private(areas)))
	t.last = time.Now()
	return nil
}

func (t *uffdTracker) resume(ctx context.Context, st *imagepb.TrackerState) error {
	if err := t.open(); err != nil {
		return err
	}
	if t.adopt(int(st.GetUffd()), st.GetUffdInode()) {
		return nil
	}
	// The parked descriptor is gone: start over with a new one.
	t.reset = "the userfaultfd parked in the process is gone (closed by the process, or it ran exec)"
	areas, err := readAreas(t.pid)
	if err != nil {
		return err
	}
	if err := t.inject(); err != nil {
		return t.gone(err)
	}
	t.arm(areas, AreaRanges(private(areas)))
	return nil
}

func (t *uffdTracker) open() error {
	pm, err := OpenPagemap(t.pid)
	if err != nil {
		return err
	}
	t.pm = pm
	return nil
}

// isParked reports whether descriptor fd of the process is the userfaultfd
// with inode ino.
func (t *uffdTracker) isParked(fd int, ino uint64) bool {
	if fd < 0 || ino == 0 {
		return false
	}
	link, err := proc.ReadFDLink(t.pid, fd)
	if err != nil || link != uffdLink {
		return false
	}
	info, err := proc.ReadFDInfo(t.pid, fd)
	return err == nil && info.Ino == ino
}

// adopt takes a copy of the userfaultfd parked as fd in the process, if it
// is still the one with inode ino.
func (t *uffdTracker) adopt(fd int, ino uint64) bool {
	if !t.isParked(fd, ino) {
		return false
	}
	ours, err := sys.CopyFD(t.pid, fd)
	if err != nil {
		return false
	}
	if got, err := sys.FdInode(ours); err != nil || got != ino {
		sys.Close(ours)
		return false
	}
	t.uffd, t.parked, t.ino = ours, fd, ino
	return true
}

// inject creates a userfaultfd inside the (stopped) process, takes a copy
// of it with pidfd_getfd and enables asynchronous write-protect on it. The
// process's own descriptor stays open, parked: it keeps the registrations
// alive between separate runs of phaul. A process that is not root gets a
// userfaultfd limited to user-mode faults, the only kind it may create
// with vm.unprivileged_userfaultfd=0; write-protect faults of the kernel
// (read() into a tracked buffer) are resolved asynchronously all the same.
func (t *uffdTracker) inject() error {
	flags := uint64(sys.O_CLOEXEC | sys.O_NONBLOCK)
	if uid, err := effectiveUID(t.pid); err != nil || uid != 0 {
		flags |= sys.UFFD_USER_MODE_ONLY
	}
	pidfd, err := sys.PidfdOpen(t.pid)
	if err != nil {
		return fmt.Errorf("inject userfaultfd: %w", err)
	}
	defer sys.Close(pidfd)
	err = t.ctl.Stopped(func(sc Syscaller) error {
		r, err := sc.Syscall(sys.SYS_USERFAULTFD, flags)
		if errors.Is(err, sys.EPERM) && flags&sys.UFFD_USER_MODE_ONLY == 0 {
			flags |= sys.UFFD_USER_MODE_ONLY
			r, err = sc.Syscall(sys.SYS_USERFAULTFD, flags)
		}
		if err != nil {
			return fmt.Errorf("inject userfaultfd(%#x): %w", flags, err)
		}
		remote := int(r)
		fd, ino, err := takeUffd(pidfd, remote)
		if err != nil {
			if _, cerr := sc.Syscall(sys.SYS_CLOSE, r); cerr != nil {
				err = errors.Join(err, fmt.Errorf("close injected userfaultfd %d: %w", remote, cerr))
			}
			return err
		}
		t.uffd, t.parked, t.ino = fd, remote, ino
		return nil
	})
	if err != nil && t.uffd >= 0 {
		// Set up, but the process could not be resumed cleanly: keep the
		// descriptor so that Stop can still remove it.
		t.log.Warn("userfaultfd injected, but", "err", err)
	}
	if err == nil {
		t.log.Debug("userfaultfd injected", "fd", t.parked, "inode", t.ino, "flags", fmt.Sprintf("%#x", flags))
	}
	return err
}

// takeUffd copies descriptor remote of the process behind pidfd and
// enables asynchronous write-protect on it.
func takeUffd(pidfd, remote int) (int, uint64, error) {
	fd, err := sys.PidfdGetfd(pidfd, remote)
	if err != nil {
		return -1, 0, fmt.Errorf("take injected userfaultfd %d: %w", remote, err)
	}
	ino, err := sys.FdInode(fd)
	if err == nil {
		var api sys.UffdioAPI
		api, err = sys.UffdAPI(fd, uffdFeatures)
		if err == nil && api.Features&uffdFeatures != uffdFeatures {
			err = fmt.Errorf("UFFDIO_API granted features %#x, without WP_ASYNC|WP_UNPOPULATED: %w", api.Features, ErrNotSupported)
		}
	}
	if err != nil {
		sys.Close(fd)
		return -1, 0, fmt.Errorf("set up injected userfaultfd: %w", err)
	}
	return fd, ino, nil
}

// private returns the areas a userfaultfd is registered on: all but shared
// memory, whose pages other processes (or other mappings) may write
// without going through this process's page tables.
func private(areas []Area) []Area {
	out := make([]Area, 0, len(areas))
	for _, a := range areas {
		if !a.Shared {
			out = append(out, a)
		}
	}
	return out
}

// arm registers the pages of rs for write-protect and protects them. A
// range the kernel refuses (registered with another userfaultfd, gone in
// the meantime, ...) is marked Untracked in areas: it counts as written
// until a later round manages to register it.
func (t *uffdTracker) arm(areas []Area, rs Ranges) {
	for _, r := range rs {
		_, err := sys.UffdRegister(t.uffd, r.Start, r.End-r.Start, sys.UFFDIO_REGISTER_MODE_WP)
		if err == nil {
			err = sys.UffdWriteProtect(t.uffd, r.Start, r.End-r.Start, sys.UFFDIO_WRITEPROTECT_MODE_WP)
		}
		if err != nil {
			t.log.Debug("range not tracked", "range", r, "err", err)
			for i := range areas {
				if areas[i].Start < r.End && r.Start < areas[i].End {
					areas[i].Untracked = true
				}
			}
		}
	}
}

// registered returns the pages of areas registered for asynchronous
// write-protect (with any userfaultfd).
func (t *uffdTracker) registered(areas []Area) (Ranges, error) {
	return t.byRegistration(areas, 0)
}

// unregistered returns the pages of areas not registered.
func (t *uffdTracker) unregistered(areas []Area) (Ranges, error) {
	return t.byRegistration(areas, sys.PAGE_IS_WPALLOWED)
}

// byRegistration scans areas for pages whose PAGE_IS_WPALLOWED category,
// inverted by inv, is set. PAGE_IS_WPALLOWED is a property of the mapping:
// the kernel decides it without walking the page tables of mappings
// without it.
func (t *uffdTracker) byRegistration(areas []Area, inv uint64) (Ranges, error) {
	var out Ranges
	var regs []sys.PageRegion
	for _, r := range AreaRanges(areas) {
		var err error
		regs, err = t.pm.Scan(r.Start, r.End, sys.PmScanArg{
			CategoryInvMask: inv,
			CategoryMask:    sys.PAGE_IS_WPALLOWED,
			ReturnMask:      sys.PAGE_IS_WPALLOWED,
		}, regs[:0])
		if err != nil {
			return nil, err
		}
		for _, g := range regs {
			out.Add(g.Start, g.End)
		}
	}
	return out, nil
}

// scanWritten returns the written pages of r and, with rearm,
// write-protects them again. PM_SCAN_CHECK_WPASYNC makes the kernel
// refuse a mapping that is not registered (the process replaced one since
// the round began): what was reported before the refusal is kept, the
// rest of r is scanned without the check, and the unregistered pages are
// returned as new.
//
// The same walk tells which written pages are still there (present), so
// that a round need not walk them again: the regions of present or
// swapped-out pages are returned in present, those swapped only after a
// look at their entries (a write-protect marker reads as swapped too).
// A written page in neither was dropped.
func (t *uffdTracker) scanWritten(r Range, rearm bool) (written, fresh, present Ranges, err error) {
	arg := sys.PmScanArg{
		Flags:        sys.PM_SCAN_CHECK_WPASYNC,
		CategoryMask: sys.PAGE_IS_WRITTEN,
		ReturnMask:   sys.PAGE_IS_WRITTEN | sys.PAGE_IS_PRESENT | sys.PAGE_IS_SWAPPED,
	}
	if rearm {
		arg.Flags |= sys.PM_SCAN_WP_MATCHING
	}
	regs, err := t.pm.Scan(r.Start, r.End, arg, nil)
	if errors.Is(err, sys.EPERM) {
		arg.Flags &^= sys.PM_SCAN_CHECK_WPASYNC
		regs, err = t.pm.Scan(r.Start, r.End, arg, regs)
		if err == nil {
			fresh, err = t.unregistered([]Area{{Range: r}})
		}
	}
	if err != nil {
		return nil, nil, nil, err
	}
	for _, g := range regs {
		written = append(written, Range{g.Start, g.End})
		switch {
		case g.Categories&sys.PAGE_IS_PRESENT != 0:
			present = append(present, Range{g.Start, g.End})
		case g.Categories&sys.PAGE_IS_SWAPPED != 0:
			err := t.pm.Entries(Range{g.Start, g.End}, func(addr, e uint64) {
				if e&proc.PMSwapped != 0 && !isUffdMarker(e) {
					present = append(present, Range{addr, addr + PageSize})
				}
			})
			if err != nil {
				return nil, nil, nil, err
			}
		}
	}
	return Normalize(written), fresh, Normalize(present), nil
}

func (t *uffdTracker) Round(ctx context.Context) (*Delta, error) { return t.round(ctx, nil, true) }

func (t *uffdTracker) FinalRound(ctx context.Context, maps []proc.Mapping) (*Delta, error) {
	return t.round(ctx, maps, false)
}

// round scans for the written pages; with rearm, it write-protects them
// again and registers the mappings not registered yet.
func (t *uffdTracker) round(ctx context.Context, maps []proc.Mapping, rearm bool) (*Delta, error) {
	start := time.Now()
	if t.uffd < 0 || t.pm == nil {
		return nil, fmt.Errorf("tracking round of %d: tracker closed", t.pid)
	}
	areas, err := areasIn(t.pid, maps)
	if err != nil {
		return nil, fmt.Errorf("tracking round of %d: %w", t.pid, t.gone(err))
	}
	d := t.newDelta(time.Now(), areas)
	priv := private(areas)
	for i := range areas {
		if areas[i].Shared {
			areas[i].Untracked = true // counted written whole, below
		}
	}
	// Mappings not registered: new since the previous round, moved by
	// mremap (which drops the registration), or refused before. Register
	// them now; what they hold counts as written.
	fresh, err := t.unregistered(priv)
	if err != nil {
		return nil, fmt.Errorf("tracking round of %d: %w", t.pid, t.gone(err))
	}
	if rearm {
		t.arm(areas, fresh)
	}
	// Gathered, then made a set once: thousands of scattered pages, merged
	// into the set mapping by mapping, cost milliseconds.
	found := append([]Range(nil), fresh...)
	var seen, present []Range
	for _, r := range AreaRanges(priv) {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		written, late, there, err := t.scanWritten(r, rearm)
		if err != nil {
			return nil, fmt.Errorf("tracking round of %d: %w", t.pid, t.gone(err))
		}
		if len(late) > 0 && rearm {
			t.arm(areas, late)
		}
		found = append(append(found, late...), written...)
		seen = append(seen, Subtract(written, late)...)
		present = append(present, there...)
	}
	for _, a := range areas {
		if a.Untracked {
			found = append(found, a.Range)
		}
	}
	d.Dirty = Intersect(Normalize(found), AreaRanges(areas))
	// What counts as written whole (untracked, fresh) was not seen.
	d.Seen = Subtract(Intersect(Normalize(seen), d.Dirty), Normalize(found[:len(fresh)]))
	for _, a := range areas {
		if a.Untracked {
			d.Seen = Subtract(d.Seen, Ranges{a.Range})
		}
	}
	if d.Seen == nil {
		d.Seen = Ranges{}
	}
	d.Present = Intersect(Normalize(present), d.Seen)
	if _, err := startTime(t.pid); err != nil {
		return nil, fmt.Errorf("tracking round of %d: %w", t.pid, err)
	}
	return t.finish(d, start), nil
}

func (t *uffdTracker) Park(dir string) error {
	if t.uffd < 0 || t.parked < 0 {
		return fmt.Errorf("park tracking of %d: no userfaultfd", t.pid)
	}
	st := t.state()
	st.Uffd, st.UffdInode = int32(t.parked), t.ino
	if err := writeState(dir, st); err != nil {
		return fmt.Errorf("park tracking of %d: %w", t.pid, err)
	}
	t.log.Debug("tracking parked", "dir", dir, "fd", t.parked)
	return t.Close()
}

func (t *uffdTracker) Stop() error {
	var errs []error
	if _, err := startTime(t.pid); err == nil && t.pm != nil {
		errs = append(errs, t.unregisterAll(), t.closeParked())
	}
	errs = append(errs, t.Close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("stop tracking of %d: %w", t.pid, t.gone(err))
	}
	t.log.Debug("tracking stopped")
	return nil
}

// closeParked closes the parked userfaultfd inside the process, with the
// process stopped by t.ctl.
func (t *uffdTracker) closeParked() error {
	if t.parked < 0 {
		return nil
	}
	return t.ctl.Stopped(func(sc Syscaller) error {
		// The number may have been closed and reused by the process
		// since: close it only if it is still ours.
		if !t.isParked(t.parked, t.ino) {
			t.log.Info("parked userfaultfd already closed by the process", "fd", t.parked)
			t.parked = -1
			return nil
		}
		if _, err := sc.Syscall(sys.SYS_CLOSE, uint64(t.parked)); err != nil {
			return fmt.Errorf("close parked userfaultfd %d: %w", t.parked, err)
		}
		t.log.Debug("parked userfaultfd closed", "fd", t.parked)
		t.parked = -1
		return nil
	})
}

func (t *uffdTracker) CloseProcessFD() error { return t.gone(t.closeParked()) }

// unregisterAll removes the write-protect registration from every mapping
// of the process that has one.
func (t *uffdTracker) unregisterAll() error {
	if t.uffd < 0 {
		return nil
	}
	areas, err := readAreas(t.pid)
	if err != nil {
		return err
	}
	reg, err := t.registered(areas)
	if err != nil {
		return err
	}
	var errs []error
	for _, r := range reg {
		if err := sys.UffdUnregister(t.uffd, r.Start, r.End-r.Start); err != nil {
			errs = append(errs, fmt.Errorf("unregister %v: %w", r, err))
		}
	}
	return errors.Join(errs...)
}

func (t *uffdTracker) ProcessFD() int { return t.parked }

func (t *uffdTracker) Close() error {
	var err error
	if t.uffd >= 0 {
		err = sys.Close(t.uffd)
		t.uffd = -1
	}
	if perr := t.pm.Close(); err == nil {
		err = perr
	}
	t.pm = nil
	return err
}
