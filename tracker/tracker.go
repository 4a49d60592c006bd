package tracker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/internal/feature"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// Backend names.
const (
	SoftDirty = "softdirty"
	UffdWP    = "uffdwp"
	Hash      = "hash"
	// Auto picks the best backend this kernel supports.
	Auto = "auto"
)

// Backends lists the backend names, best first.
var Backends = []string{SoftDirty, UffdWP, Hash}

var (
	// ErrNotSupported reports a backend this kernel cannot run. It is
	// feature.ErrNotSupported.
	ErrNotSupported = feature.ErrNotSupported
	// ErrProcessGone reports that the tracked process exited. It is
	// ptrace.ErrProcessGone (and matches ESRCH).
	ErrProcessGone = ptrace.ErrProcessGone
	// ErrUnknownBackend reports a backend name that is none of Backends.
	ErrUnknownBackend = errors.New("unknown tracking backend")
	// ErrAlreadyTracked reports a process whose memory is already
	// registered for write-protect tracking (a pre-dump chain that was
	// neither continued nor ended, or the process's own userfaultfd).
	ErrAlreadyTracked = errors.New("memory already tracked")
	// ErrOtherProcess reports tracker state written for another process
	// (another PID, or an earlier process that had the same PID).
	ErrOtherProcess = errors.New("tracker state belongs to another process")
)

var errESRCH = sys.ESRCH

// Tracker answers, round after round, which pages of a running process
// were written since the previous round.
//
// Its methods are not safe for concurrent use.
type Tracker interface {
	// Backend returns the backend's name.
	Backend() string
	// Pid returns the tracked process.
	Pid() int
	// Round reports the pages written since the previous round (or since
	// Start), and re-arms tracking for the next one. The answer may hold
	// more pages than were written, never fewer; see the package
	// documentation for what each backend reports.
	Round(ctx context.Context) (*Delta, error)
	// FinalRound is the last round, of a stopped process whose tracking
	// ends after it (or who dies). It covers maps, the mappings as the
	// caller read them, instead of those /proc/PID/maps shows by the time
	// the round looks: memory the caller maps into the process meanwhile
	// (to inject system calls) stays out of the round; nil maps is
	// /proc/PID/maps. It does not re-arm tracking for what it reports
	// (write-protecting pages again, clearing soft-dirty bits: page-table
	// work inside the downtime), so a round after it reports those pages
	// again.
	FinalRound(ctx context.Context, maps []proc.Mapping) (*Delta, error)
	// Saved tells the tracker which bytes were recorded for the pages at
	// addr after a round. The hash backend keeps their digests (so that
	// the next round compares with what was recorded); the others ignore
	// it.
	Saved(addr uint64, data []byte)
	// Park writes what a later Resume needs into the pre-dump directory
	// dir and releases what the tracker holds in this process; tracking
	// goes on in the kernel (and, for uffdwp, in the process) meanwhile.
	Park(dir string) error
	// Stop ends tracking and removes every trace of it from the process
	// (registrations, the parked userfaultfd). It also releases what Close
	// releases. After the process exited it only releases.
	Stop() error
	// Close releases what the tracker holds in this process, leaving the
	// process as it is.
	Close() error
	// ProcessFD returns the descriptor that tracking keeps open inside the
	// process (the parked userfaultfd), or -1 when it keeps none.
	ProcessFD() int
	// CloseProcessFD closes the descriptor ProcessFD returns inside the
	// process, by one injected close(2) (not if the process closed the
	// number itself since), and changes nothing else: the registrations
	// stay while the tracker holds its own copy, until Stop removes them or
	// Close releases that last reference (the kernel then unregisters
	// every mapping, walking its page tables). It is for a process to be
	// let go with no descriptor it never opened, at the cost of one
	// system call. ProcessFD returns -1 after it; Park can no longer be
	// called. It does nothing for a backend that keeps no descriptor.
	CloseProcessFD() error
}

// Delta is the answer of one round.
type Delta struct {
	// Round counts the rounds since tracking started, 1 for the first.
	Round int
	// Areas are the mappings whose pages a dump saves, in address order,
	// as they were at this round.
	Areas []Area
	// Dirty holds the pages of Areas written since the previous round.
	// Pages that are no longer present in it were dropped (MADV_DONTNEED,
	// MADV_FREE reclaimed) and are gone: a dump must not record them.
	Dirty Ranges
	// At is when the round looked; Since is the time since the previous
	// round (0 when unknown).
	At    time.Time
	Since time.Duration
	// Took is how long the round took.
	Took time.Duration
	// Reset says why every page counts as written this round (tracking was
	// lost or restarted); empty normally.
	Reset string
	// DropsReported says that a page dropped from private anonymous memory
	// since the previous round (MADV_DONTNEED, a reclaimed MADV_FREE page)
	// is in Dirty: its page table entry is gone with no write-protect
	// marker left (the kernel keeps markers only for file and shared
	// memory), which uffdwp sees as written, and the hash backend as new
	// contents. A page there that is not in Dirty is then still the one
	// recorded, with no need to look at it.
	DropsReported bool
	// Seen, when not nil, holds pages of Dirty whose presence the round
	// saw on its way (the uffdwp backend asks its scan for it): of them,
	// those in Present are present or swapped out, the others were
	// dropped. Pages of Dirty outside Seen (mappings new this round, or
	// untracked) need a look at the page tables.
	Seen, Present Ranges
}

// Scanned returns the number of pages the round covered.
func (d *Delta) Scanned() uint64 { return AreaRanges(d.Areas).Pages() }

// Unchanged returns the pages of Areas not written since the previous
// round: their contents are what the previous round recorded.
func (d *Delta) Unchanged() Ranges { return Subtract(AreaRanges(d.Areas), d.Dirty) }

// Options configure Start and Resume.
type Options struct {
	// Backend is the backend's name; "" or Auto picks the best one the
	// kernel supports (see Choose). Resume ignores it.
	Backend string
	// Control stops the process when a backend needs it stopped; nil
	// means FreezeControl(pid).
	Control Control
	// Logger receives progress; nil discards it.
	Logger *slog.Logger
}

func (o *Options) control(pid int) Control {
	if o.Control != nil {
		return o.Control
	}
	return FreezeControl(pid)
}

func (o *Options) logger(pid int, backend string) *slog.Logger {
	l := o.Logger
	if l == nil {
		l = slog.New(slog.DiscardHandler)
	}
	return l.With("tracker", backend)
}

// Supported reports whether this kernel can run backend name: nil, an
// error matching ErrNotSupported, or one matching ErrUnknownBackend.
func Supported(name string) error {
	switch name {
	case SoftDirty:
		return feature.SoftDirty()
	case UffdWP:
		if err := feature.UffdWPAsync(); err != nil {
			return err
		}
		return feature.PagemapScan()
	case Hash:
		return nil
	}
	return fmt.Errorf("%w %q (want one of %s, %s, %s or %s)", ErrUnknownBackend, name, Auto, SoftDirty, UffdWP, Hash)
}

// Choose resolves a backend name: "" and Auto give the first of Backends
// this kernel supports; another name is checked with Supported.
func Choose(name string) (string, error) {
	if name != "" && name != Auto {
		if err := Supported(name); err != nil {
			return "", fmt.Errorf("tracking backend %s: %w", name, err)
		}
		return name, nil
	}
	for _, b := range Backends {
		if Supported(b) == nil {
			return b, nil
		}
	}
	return Hash, nil
}

// backend is what each backend implements beyond Tracker.
type backend interface {
	Tracker
	// start arms tracking of a process not tracked yet.
	start(ctx context.Context) error
	// resume takes tracking over from st; it sets reset when the state
	// cannot be trusted (consumed already, or the kernel side is gone).
	resume(ctx context.Context, st *imagepb.TrackerState) error
}

func newBackend(name string, b *base) (backend, error) {
	switch name {
	case SoftDirty:
		return &softDirtyTracker{base: b}, nil
	case UffdWP:
		return &uffdTracker{base: b, uffd: -1, parked: -1}, nil
	case Hash:
		return &hashTracker{base: b}, nil
	}
	return nil, fmt.Errorf("%w %q", ErrUnknownBackend, name)
}

// Start starts tracking pid with the backend opt.Backend names. The first
// Round reports what was written since Start (the hash backend, which has
// no digests yet, reports every present page).
func Start(ctx context.Context, pid int, opt Options) (Tracker, error) {
	name, err := Choose(opt.Backend)
	if err != nil {
		return nil, err
	}
	b, err := newBase(pid, name, opt)
	if err != nil {
		return nil, err
	}
	t, err := newBackend(name, b)
	if err != nil {
		return nil, err
	}
	if err := t.start(ctx); err != nil {
		_ = t.Close()
		return nil, fmt.Errorf("start %s tracking of %d: %w", name, pid, err)
	}
	b.log.Debug("tracking started")
	return t, nil
}

// Resume continues the tracking that a Park left in the pre-dump directory
// dir. The state there is marked consumed at once: continuing twice from
// one directory would lose the writes the first continuation saw. A state
// that was consumed already, or whose kernel side is gone (the process
// closed the parked userfaultfd, exec'd, ...), still gives a Tracker, whose
// first Round reports every page as written (Delta.Reset says why). A
// directory without state gives an error matching ErrNoState; state of
// another process, one matching ErrOtherProcess.
func Resume(ctx context.Context, pid int, dir string, opt Options) (Tracker, error) {
	st, err := ReadState(dir)
	if err != nil {
		return nil, err
	}
	if int(st.GetPid()) != pid {
		return nil, fmt.Errorf("resume tracking of %d from %s: %w (PID %d)", pid, dir, ErrOtherProcess, st.GetPid())
	}
	if err := Supported(st.GetBackend()); err != nil {
		return nil, fmt.Errorf("resume tracking of %d from %s: %w", pid, dir, err)
	}
	b, err := newBase(pid, st.GetBackend(), opt)
	if err != nil {
		return nil, err
	}
	if st.GetStartTime() != b.startTime {
		return nil, fmt.Errorf("resume tracking of %d from %s: %w (an earlier process with this PID)", pid, dir, ErrOtherProcess)
	}
	wasConsumed := st.GetConsumed()
	if !wasConsumed {
		mark := stateHeader(st)
		mark.Consumed = true // and the digests, of no use any more, are dropped
		if err := writeState(dir, mark); err != nil {
			return nil, fmt.Errorf("resume tracking of %d: %w", pid, err)
		}
	}
	t, err := newBackend(st.GetBackend(), b)
	if err != nil {
		return nil, err
	}
	b.round = int(st.GetRound())
	if st.GetRoundUnixNano() != 0 {
		b.last = time.Unix(0, st.GetRoundUnixNano())
	}
	if wasConsumed {
		b.reset = "the tracker state in " + dir + " was used by an earlier run already"
	}
	if err := t.resume(ctx, st); err != nil {
		_ = t.Close()
		return nil, fmt.Errorf("resume %s tracking of %d from %s: %w", st.GetBackend(), pid, dir, err)
	}
	b.log.Debug("tracking resumed", "dir", dir, "round", b.round, "reset", b.reset)
	return t, nil
}

// stateHeader copies the fields of st but the digests.
func stateHeader(st *imagepb.TrackerState) *imagepb.TrackerState {
	return &imagepb.TrackerState{
		Backend: st.GetBackend(), Pid: st.GetPid(), StartTime: st.GetStartTime(),
		Round: st.GetRound(), RoundUnixNano: st.GetRoundUnixNano(), Consumed: st.GetConsumed(),
		Uffd: st.GetUffd(), UffdInode: st.GetUffdInode(),
	}
}

// base is what every backend shares.
type base struct {
	name      string
	pid       int
	startTime uint64
	ctl       Control
	log       *slog.Logger
	round     int
	last      time.Time // when the previous round looked
	reset     string    // non-empty: the next round reports everything
}

func newBase(pid int, name string, opt Options) (*base, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("track: invalid PID %d", pid)
	}
	st, err := startTime(pid)
	if err != nil {
		return nil, err
	}
	return &base{name: name, pid: pid, startTime: st, ctl: opt.control(pid), log: opt.logger(pid, name), last: time.Now()}, nil
}

func (b *base) Backend() string { return b.name }
func (b *base) Pid() int        { return b.pid }
func (b *base) ProcessFD() int  { return -1 }

// CloseProcessFD is a no-op for the backends that keep no descriptor in
// the process.
func (b *base) CloseProcessFD() error { return nil }

// Saved is a no-op for the backends that track writes, not contents.
func (b *base) Saved(uint64, []byte) {}

// state returns the common part of the state to park.
func (b *base) state() *imagepb.TrackerState {
	return &imagepb.TrackerState{
		Backend: b.name, Pid: int32(b.pid), StartTime: b.startTime,
		Round: uint32(b.round), RoundUnixNano: b.last.UnixNano(),
	}
}

// newDelta starts the answer of a round that looked at the process at now.
func (b *base) newDelta(now time.Time, areas []Area) *Delta {
	b.round++
	d := &Delta{Round: b.round, Areas: areas, At: now, DropsReported: b.name != SoftDirty}
	if !b.last.IsZero() {
		d.Since = now.Sub(b.last)
	}
	b.last = now
	return d
}

// finish completes d: a pending reset makes every page dirty.
func (b *base) finish(d *Delta, start time.Time) *Delta {
	if b.reset != "" {
		d.Reset = b.reset
		d.Dirty = AreaRanges(d.Areas)
		b.log.Info("every page counts as written this round", "why", b.reset)
		b.reset = ""
	}
	d.Took = time.Since(start)
	return d
}

// gone turns err into ErrProcessGone when the process is no longer the one
// tracked (exited, or its PID reused).
func (b *base) gone(err error) error {
	if err == nil || errors.Is(err, ErrProcessGone) {
		return err
	}
	if st, serr := startTime(b.pid); serr != nil || st != b.startTime {
		return fmt.Errorf("process %d exited: %w (%w)", b.pid, ErrProcessGone, err)
	}
	return err
}
