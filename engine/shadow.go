package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// Shadow is a process being rebuilt while the original still runs
// elsewhere: the target side of a live migration. It is created from the
// layout of the first pre-copy round, follows the layout of later rounds,
// receives pages as they arrive, and becomes the real process at Finish,
// when only the last pages and the non-memory state remain to apply. Until
// then it sits stopped under ptrace and never runs a single instruction of
// its own.
//
// Writing into fresh memory is the slow part of a restore (page faults), so
// doing it while the source still runs keeps it out of the downtime.
//
// WritePages may be called from several goroutines; the other methods are
// serialised by the Shadow.
type Shadow struct {
	mu    sync.Mutex
	r     *restorer
	ready bool // Ready succeeded: the process waits for Resume
	done  bool // resumed or discarded
}

// ShadowOptions configures NewShadow.
type ShadowOptions struct {
	// Pid is the PID the process must have (free in this PID namespace).
	Pid int
	// Vmas is the layout of the first round.
	Vmas []*imagepb.VMA
	// XsaveFeatures is the source CPU's xfeatures mask; the shadow refuses
	// to start on a CPU that lacks some of them.
	XsaveFeatures uint64
	// Stdio is what a shell job's terminal descriptors are re-bound to.
	Stdio [3]*os.File
	// Logger receives progress; nil discards it.
	Logger *slog.Logger
}

// NewShadow creates a stopped process with opt.Pid and the layout opt.Vmas.
func NewShadow(ctx context.Context, opt ShadowOptions) (*Shadow, error) {
	log := opt.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := validateLayout(opt.Vmas); err != nil {
		return nil, fmt.Errorf("shadow %d: %w", opt.Pid, err)
	}
	if err := pidFree(opt.Pid); err != nil {
		return nil, fmt.Errorf("shadow %d: %w", opt.Pid, err)
	}
	r := &restorer{
		stdio: opt.Stdio, xsave: opt.XsaveFeatures, pid: opt.Pid,
		log: log.With("component", "shadow", "pid", opt.Pid),
		tr:  ptrace.NewTracer(), shared: newSharedFiles(), ownsNetLock: true,
	}
	if err := r.start(opt.Vmas); err != nil {
		r.abort()
		r.tr.Close()
		return nil, fmt.Errorf("shadow %d: %w", opt.Pid, err)
	}
	if err := ctx.Err(); err != nil {
		r.abort()
		r.tr.Close()
		return nil, err
	}
	return &Shadow{r: r}, nil
}

// Pid returns the shadow's PID.
func (s *Shadow) Pid() int { return s.r.pid }

// validateLayout checks that vmas are sorted, page-aligned and disjoint,
// and hold no shared memory a migration cannot carry (migratable).
func validateLayout(vmas []*imagepb.VMA) error {
	var prev uint64
	for _, v := range vmas {
		if v.Start%pageSize != 0 || v.End%pageSize != 0 || v.End <= v.Start || v.Start < prev {
			return fmt.Errorf("%w: bad layout at VMA %#x-%#x", ErrBadImage, v.Start, v.End)
		}
		prev = v.End
	}
	return migratable(vmas)
}

// SetLayout brings the shadow's mappings to vmas, the layout of a later
// round: ranges no longer mapped are unmapped, new ones mapped, and memory
// that stays mapped with the same backing keeps the pages already written
// (a heap that grew keeps its old part).
func (s *Shadow) SetLayout(vmas []*imagepb.VMA) error {
	if err := validateLayout(vmas); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done || s.ready {
		return errShadowDone
	}
	return s.r.tr.Do(func() error { return s.r.relayout(vmas) })
}

// SetThreads creates the threads of tids, the TIDs of the process's
// threads in a round (the main thread's first), before the final state
// arrives, so that the restore after the freeze only creates those started
// since; threads it created before and no longer in tids exit. Like the
// process, they stay stopped and run nothing until Resume. A TID in use
// here is refused with ErrPidTaken.
func (s *Shadow) SetThreads(tids []int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done || s.ready {
		return errShadowDone
	}
	r := s.r
	for _, tid := range tids[min(1, len(tids)):] {
		if slices.Contains(r.created, tid) {
			continue
		}
		if err := pidFree(tid); err != nil {
			return fmt.Errorf("shadow %d: %w", r.pid, err)
		}
	}
	if err := r.tr.Do(func() error { return r.syncThreads(tids) }); err != nil {
		return fmt.Errorf("shadow %d: threads: %w", r.pid, err)
	}
	return nil
}

var errShadowDone = errors.New("shadow already finished or discarded")

// WritePages writes data (whole pages) at addr.
func (s *Shadow) WritePages(addr uint64, data []byte) error {
	if addr%pageSize != 0 || len(data)%pageSize != 0 {
		return fmt.Errorf("shadow %d: unaligned pages at %#x (%d bytes)", s.r.pid, addr, len(data))
	}
	return ptrace.WriteMemory(s.r.pid, addr, data)
}

// ZeroPages makes n pages at addr read as zero: pages whose contents were
// all zero at the source.
func (s *Shadow) ZeroPages(addr, n uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return errShadowDone
	}
	if v := s.r.vmaAt(addr); v != nil && v.Kind == imagepb.VMAKind_VMA_FILE_PRIVATE {
		// Dropping the page would show the file's page again: write zeros.
		zero := make([]byte, min(n*pageSize, maxWrite))
		for off := uint64(0); off < n*pageSize; off += uint64(len(zero)) {
			if err := ptrace.WriteMemory(s.r.pid, addr+off, zero[:min(uint64(len(zero)), n*pageSize-off)]); err != nil {
				return err
			}
		}
		return nil
	}
	return s.dontneed(addr, n)
}

// DropPages removes n pages at addr: pages the source no longer has
// (MADV_DONTNEED). Anonymous memory reads as zero again; a private file
// mapping shows the file's page.
func (s *Shadow) DropPages(addr, n uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return errShadowDone
	}
	// Pages of a mapping a later layout removed are gone with it: madvise
	// drops the mapped parts of the range and reports the holes (ENOMEM).
	if err := s.dontneed(addr, n); err != nil && !errors.Is(err, sys.ENOMEM) {
		return err
	}
	return nil
}

func (s *Shadow) dontneed(addr, n uint64) error {
	return s.r.tr.Do(func() error {
		if _, err := s.r.main.Syscall(sys.SYS_MADVISE, addr, n*pageSize, sys.MADV_DONTNEED); err != nil {
			return fmt.Errorf("shadow %d: drop pages at %#x: %w", s.r.pid, addr, err)
		}
		return nil
	})
}

// State is the non-memory state of a process that Finish applies.
type State struct {
	Process  *imagepb.Process
	Files    *imagepb.FileTable
	Entry    *imagepb.ProcessEntry
	ShellJob bool
}

// Finish is Ready followed by Resume.
func (s *Shadow) Finish(ctx context.Context, st State) (*RestoreResult, error) {
	res, err := s.Ready(ctx, st)
	if err != nil {
		return nil, err
	}
	if err := s.Resume(); err != nil {
		return nil, err
	}
	return res, nil
}

// Ready applies the final layout and state. The caller must have written
// the last pages first. The process stays stopped until Resume: a
// migration target answers "ready" here and resumes only on commit, so
// that two copies never run. On error the shadow is discarded.
func (s *Shadow) Ready(ctx context.Context, st State) (*RestoreResult, error) {
	start := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done || s.ready {
		return nil, errShadowDone
	}
	r := s.r
	if st.Process == nil || st.Process.GetPid() != int32(r.pid) || len(st.Process.Threads) == 0 || st.Process.Threads[0].GetTid() != int32(r.pid) {
		s.discardLocked()
		return nil, fmt.Errorf("shadow %d: %w: final state is not this process's", r.pid, ErrBadImage)
	}
	r.img, r.files, r.entry, r.shellJob = st.Process, st.Files, st.Entry, st.ShellJob
	if r.entry == nil {
		r.entry = &imagepb.ProcessEntry{Pid: int32(r.pid)}
	}
	err := ctx.Err()
	if err == nil {
		for _, th := range st.Process.Threads[1:] {
			if slices.Contains(r.created, int(th.Tid)) {
				continue // created by SetThreads
			}
			if err = pidFree(int(th.Tid)); err != nil {
				break
			}
		}
	}
	if err == nil {
		err = r.tr.Do(func() error {
			if err := r.relayout(st.Process.Vmas); err != nil {
				return err
			}
			defer r.shared.close()
			return r.prepare()
		})
	}
	if err != nil {
		s.discardLocked()
		return nil, fmt.Errorf("shadow %d: %w", r.pid, err)
	}
	s.ready = true
	res := &RestoreResult{Pid: r.pid, Threads: len(st.Process.Threads), Duration: time.Since(start)}
	res.DurationMS = float64(res.Duration.Microseconds()) / 1000
	return res, nil
}

// Resume lets a ready shadow run: it is now the process. If resuming
// fails the shadow is killed, so that it never runs half-resumed.
func (s *Shadow) Resume() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done || !s.ready {
		return errShadowDone
	}
	if err := s.r.tr.Do(s.r.resume); err != nil {
		s.discardLocked()
		return fmt.Errorf("shadow %d: %w", s.r.pid, err)
	}
	s.done = true
	s.r.tr.Close()
	s.r.closeSockets(false) // the process has its own descriptors
	// It runs: its connections may talk. A lock left in place would cut
	// them off, but the process is committed and must not be undone.
	if err := s.r.unlockNet(false); err != nil {
		s.r.log.Error("the process runs, but its connections stay locked", "err", err)
	}
	return nil
}

// Unlock removes the network lock of a discarded shadow. Discard keeps it,
// so that the peers of the connections it had restored get no RST while
// the caller moves their address back (a rollback action script); Unlock
// is for after that. It does nothing when there is no lock, and refuses
// while the shadow may still resume.
func (s *Shadow) Unlock() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.done {
		return errors.New("unlock: the shadow is not discarded")
	}
	return s.r.unlockNet(false)
}

// Discard kills the shadow and releases what it holds but its network
// lock (see Unlock). It is safe to call more than once and after Finish
// (then it does nothing).
func (s *Shadow) Discard() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.done {
		s.discardLocked()
	}
}

func (s *Shadow) discardLocked() {
	s.r.abort()
	s.r.closeSockets(true)
	_ = s.r.tr.Do(func() error { s.r.shared.close(); return nil })
	s.r.tr.Close()
	s.done = true
}

// sameBacking reports whether memory mapped as a stays valid as memory of b
// where the two overlap: both anonymous private, or the same file at the
// same file offset for each address.
func sameBacking(a, b *imagepb.VMA) bool {
	anon := func(k imagepb.VMAKind) bool {
		return k == imagepb.VMAKind_VMA_ANON_PRIVATE || k == imagepb.VMAKind_VMA_HEAP || k == imagepb.VMAKind_VMA_STACK
	}
	switch {
	case isKernelVMA(a.Kind) || isKernelVMA(b.Kind):
		return a.Kind == b.Kind && a.Start == b.Start && a.End == b.End
	case anon(a.Kind) && anon(b.Kind):
		return a.Flags&sys.MAP_GROWSDOWN == b.Flags&sys.MAP_GROWSDOWN && widen(a) == widen(b)
	case a.Kind == b.Kind && (a.Kind == imagepb.VMAKind_VMA_FILE_PRIVATE || a.Kind == imagepb.VMAKind_VMA_FILE_SHARED):
		return a.Path == b.Path && a.Inode == b.Inode && a.Pgoff-a.Start == b.Pgoff-b.Start &&
			a.Flags == b.Flags && widen(a) == widen(b)
	default:
		// Shared anonymous memory is one object per mapping: only the very
		// same mapping keeps it.
		return a.Kind == b.Kind && a.Start == b.Start && a.End == b.End && a.Shmid == b.Shmid
	}
}

// subtract returns [start, end) minus the spans in cut (sorted, disjoint).
func subtract(start, end uint64, cut []span) []span {
	out := []span{}
	at := start
	for _, c := range cut {
		if c.end <= at || c.start >= end {
			continue
		}
		if c.start > at {
			out = append(out, span{at, c.start})
		}
		at = max(at, c.end)
	}
	if at < end {
		out = append(out, span{at, end})
	}
	return out
}

// kept returns the mappings of list that v keeps memory of: those it
// overlaps with the same backing.
func kept(v *imagepb.VMA, list []*imagepb.VMA) []*imagepb.VMA {
	var out []*imagepb.VMA
	for _, o := range list {
		if o.End > v.Start && o.Start < v.End && sameBacking(o, v) {
			out = append(out, o)
		}
	}
	return out
}

// overlaps returns the parts of the VMAs in list that overlap v and have the
// same backing, as sorted spans clipped to v.
func overlaps(v *imagepb.VMA, list []*imagepb.VMA) []span {
	var out []span
	for _, o := range kept(v, list) {
		out = append(out, span{max(o.Start, v.Start), min(o.End, v.End)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].start < out[j].start })
	return out
}

// relayout changes the current layout into vmas.
//
// Precondition: called on the Tracer thread.
func (r *restorer) relayout(vmas []*imagepb.VMA) error {
	in := r.main
	if err := migratable(vmas); err != nil {
		return err
	}
	// Kernel mappings cannot change within one process's life.
	for _, v := range vmas {
		if !isKernelVMA(v.Kind) || v.Kind == imagepb.VMAKind_VMA_VSYSCALL {
			continue
		}
		if o := r.vmaAt(v.Start); o == nil || o.Kind != v.Kind || o.Start != v.Start || o.End != v.End {
			return fmt.Errorf("%w: %v moved to %#x between rounds", ErrBadImage, v.Kind, v.Start)
		}
	}
	// Unmap what the new layout does not keep.
	for _, o := range r.vmas {
		if isKernelVMA(o.Kind) {
			continue
		}
		for _, gone := range subtract(o.Start, o.End, overlaps(o, vmas)) {
			if _, err := in.Syscall(sys.SYS_MUNMAP, gone.start, gone.end-gone.start); err != nil {
				return fmt.Errorf("unmap %#x-%#x: %w", gone.start, gone.end, err)
			}
		}
	}
	old := r.vmas
	r.vmas = nil // vmaAt must not see a half-changed layout
	if err := r.placeScratch(vmas); err != nil {
		return err
	}
	// Map what is new; what is kept takes the advice the process gave
	// or took back since.
	for _, v := range vmas {
		if isKernelVMA(v.Kind) {
			continue
		}
		for _, add := range subtract(v.Start, v.End, overlaps(v, old)) {
			if err := r.mapVMA(v, add.start, add.end); err != nil {
				return err
			}
		}
		for _, o := range kept(v, old) {
			if err := r.readvise(o, v); err != nil {
				return err
			}
		}
	}
	r.vmas = vmas
	return nil
}

// readvise changes the advice of the memory v keeps of o, an earlier
// round's mapping, from o's to v's.
//
// Precondition: called on the Tracer thread.
func (r *restorer) readvise(o, v *imagepb.VMA) error {
	if slices.Equal(o.Madvise, v.Madvise) {
		return nil
	}
	start, end := max(o.Start, v.Start), min(o.End, v.End)
	for _, f := range madviseFlags {
		if !slices.Contains(o.Madvise, f.advice) || slices.Contains(v.Madvise, f.advice) {
			continue
		}
		if f.undo == 0 {
			if f.advice == sys.MADV_HUGEPAGE && slices.Contains(v.Madvise, sys.MADV_NOHUGEPAGE) ||
				f.advice == sys.MADV_NOHUGEPAGE && slices.Contains(v.Madvise, sys.MADV_HUGEPAGE) {
				continue // v's own advice replaces it
			}
			return unsupported("mapping %#x-%#x lost its transparent huge page advice between rounds (remapped in place): it cannot be taken back", start, end)
		}
		if _, err := r.main.Syscall(sys.SYS_MADVISE, start, end-start, uint64(f.undo)); err != nil {
			return fmt.Errorf("madvise(%d) %#x-%#x: %w", f.undo, start, end, err)
		}
	}
	return r.madvise(v, start, end)
}
