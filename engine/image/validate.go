package image

import (
	"fmt"
	"math"

	"github.com/phaul/phaul/protocol/imagepb"
)

const (
	// PageSize is the page size of every image (x86_64 base pages).
	PageSize = 4096
	// MaxXStateSize bounds a thread's NT_X86_XSTATE blob.
	MaxXStateSize = 64 << 10
	// MaxRunPages bounds a PAGES_HERE run, so that a reader can check a
	// run's checksum with a buffer of at most 64 MiB.
	MaxRunPages = (64 << 20) / PageSize
	// SigInfoSize is the size of the kernel's siginfo_t.
	SigInfoSize = 128
	// maxSignal is the highest signal number on Linux.
	maxSignal = 64
	// maxGroups is NGROUPS_MAX.
	maxGroups = 65536
	// nrRlimits is RLIM_NLIMITS.
	nrRlimits = 16
)

func pageAligned(v uint64) bool { return v%PageSize == 0 }

// runEnd returns the end address of a run that passed ValidatePageMap.
func runEnd(r *imagepb.PageRun) uint64 { return r.GetAddr() + r.GetNrPages()*PageSize }

// ValidateInventory checks that inv is an inventory phaul can restore from:
// the format version is Version, the page size is PageSize, the root pid is
// positive and listed, pids are positive and unique, and a process whose
// parent is listed comes after it.
func ValidateInventory(inv *imagepb.Inventory) error {
	if v := inv.GetFormatVersion(); v != Version {
		return fmt.Errorf("%w: inventory format version %d, this phaul reads version %d", ErrVersion, v, Version)
	}
	if ps := inv.GetPageSize(); ps != PageSize {
		return corruptf("page size %d, want %d", ps, PageSize)
	}
	if inv.GetRootPid() <= 0 {
		return corruptf("root pid %d", inv.GetRootPid())
	}
	procs := inv.GetProcesses()
	if len(procs) == 0 {
		return corruptf("no processes")
	}
	index := make(map[int32]int, len(procs))
	for i, p := range procs {
		if p.GetPid() <= 0 {
			return corruptf("process %d: pid %d", i, p.GetPid())
		}
		if _, dup := index[p.GetPid()]; dup {
			return corruptf("pid %d listed twice", p.GetPid())
		}
		index[p.GetPid()] = i
	}
	if _, ok := index[inv.GetRootPid()]; !ok {
		return corruptf("root pid %d is not among the processes", inv.GetRootPid())
	}
	for i, p := range procs {
		if j, ok := index[p.GetPpid()]; ok && j >= i && p.GetPid() != inv.GetRootPid() {
			return corruptf("pid %d is listed before its parent %d", p.GetPid(), p.GetPpid())
		}
	}
	return nil
}

// ValidateFileTable checks that file ids are unique, kinds are known, and an
// inherited file names one of the restorer's stdio descriptors; and the
// shared memory objects (ValidateShmem), with unique ids, that the files
// name.
func ValidateFileTable(ft *imagepb.FileTable) error {
	seen := make(map[uint32]bool, len(ft.GetFiles()))
	for _, f := range ft.GetFiles() {
		if seen[f.GetId()] {
			return corruptf("file id %d used twice", f.GetId())
		}
		seen[f.GetId()] = true
		if _, ok := imagepb.FileKind_name[int32(f.GetKind())]; !ok {
			return corruptf("file %d: unknown kind %d", f.GetId(), f.GetKind())
		}
		if f.GetKind() == imagepb.FileKind_FILE_INHERITED && (f.GetInheritFd() < 0 || f.GetInheritFd() > 2) {
			return corruptf("file %d: inherited fd %d is not 0, 1 or 2", f.GetId(), f.GetInheritFd())
		}
		if f.GetPos() < 0 {
			return corruptf("file %d: position %d", f.GetId(), f.GetPos())
		}
	}
	return validateShmemTable(ft)
}

// ValidateProcess checks the parts of a process restore relies on: a
// positive pid; threads present, with unique positive tids, the main thread
// (tid == pid) among them, registers present and xstate at most
// MaxXStateSize bytes; mappings with start < end, page aligned, sorted and
// not overlapping, of a known kind; signal numbers in 1..64 and unique per
// table, siginfo of SigInfoSize bytes; descriptor numbers non-negative and
// unique; credentials, when present, with four uids and gids; auxv made of
// whole (type, value) pairs; rlimit and itimer numbers in range.
//
// Whether descriptors name existing files is checked by ValidateFDs.
func ValidateProcess(p *imagepb.Process) error {
	pid := p.GetPid()
	if pid <= 0 {
		return corruptf("pid %d", pid)
	}
	if p.GetUmask() > 0o777 {
		return corruptf("pid %d: umask %#o", pid, p.GetUmask())
	}
	if c := p.GetCreds(); c != nil {
		if len(c.GetUid()) != 4 || len(c.GetGid()) != 4 {
			return corruptf("pid %d: credentials have %d uids and %d gids, want 4 each", pid, len(c.GetUid()), len(c.GetGid()))
		}
		if len(c.GetGroups()) > maxGroups {
			return corruptf("pid %d: %d supplementary groups", pid, len(c.GetGroups()))
		}
	}
	if n := len(p.GetMm().GetAuxv()); n%16 != 0 {
		return corruptf("pid %d: auxv is %d bytes, not whole pairs", pid, n)
	}
	if err := validateVMAs(p); err != nil {
		return err
	}
	if err := validateThreads(p); err != nil {
		return err
	}
	signos := make(map[int32]bool, len(p.GetSigactions()))
	for _, sa := range p.GetSigactions() {
		if s := sa.GetSigno(); s < 1 || s > maxSignal || signos[s] {
			return corruptf("pid %d: sigaction for signal %d (out of range or repeated)", pid, s)
		}
		signos[sa.GetSigno()] = true
	}
	if err := validateSigInfo(pid, p.GetSharedPending()); err != nil {
		return err
	}
	fds := make(map[int32]bool, len(p.GetFds()))
	for _, fd := range p.GetFds() {
		if n := fd.GetFd(); n < 0 || fds[n] {
			return corruptf("pid %d: descriptor %d (negative or repeated)", pid, n)
		}
		fds[fd.GetFd()] = true
	}
	for _, rl := range p.GetRlimits() {
		if r := rl.GetResource(); r < 0 || r >= nrRlimits {
			return corruptf("pid %d: rlimit resource %d", pid, r)
		}
	}
	for _, it := range p.GetItimers() {
		if w := it.GetWhich(); w < 0 || w > 2 {
			return corruptf("pid %d: itimer %d", pid, w)
		}
	}
	return nil
}

func validateVMAs(p *imagepb.Process) error {
	var prevEnd uint64
	for i, v := range p.GetVmas() {
		start, end := v.GetStart(), v.GetEnd()
		if start >= end || !pageAligned(start) || !pageAligned(end) {
			return corruptf("pid %d: mapping %#x-%#x is empty or not page aligned", p.GetPid(), start, end)
		}
		if i > 0 && start < prevEnd {
			return corruptf("pid %d: mapping %#x-%#x overlaps or precedes the one ending at %#x", p.GetPid(), start, end, prevEnd)
		}
		if _, ok := imagepb.VMAKind_name[int32(v.GetKind())]; !ok {
			return corruptf("pid %d: mapping %#x-%#x: unknown kind %d", p.GetPid(), start, end, v.GetKind())
		}
		prevEnd = end
	}
	return nil
}

func validateThreads(p *imagepb.Process) error {
	pid := p.GetPid()
	if len(p.GetThreads()) == 0 {
		return corruptf("pid %d: no threads", pid)
	}
	tids := make(map[int32]bool, len(p.GetThreads()))
	for _, t := range p.GetThreads() {
		tid := t.GetTid()
		if tid <= 0 || tids[tid] {
			return corruptf("pid %d: thread %d (not positive or repeated)", pid, tid)
		}
		tids[tid] = true
		if t.GetRegs() == nil {
			return corruptf("pid %d: thread %d has no registers", pid, tid)
		}
		if n := len(t.GetXstate()); n > MaxXStateSize {
			return corruptf("pid %d: thread %d: xstate is %d bytes, more than %d", pid, tid, n, MaxXStateSize)
		}
		if err := validateSigInfo(pid, t.GetPending()); err != nil {
			return err
		}
	}
	if !tids[pid] {
		return corruptf("pid %d: main thread missing", pid)
	}
	return nil
}

func validateSigInfo(pid int32, sis []*imagepb.SigInfo) error {
	for _, si := range sis {
		if s := si.GetSigno(); s < 1 || s > maxSignal {
			return corruptf("pid %d: pending signal %d", pid, s)
		}
		if n := len(si.GetRaw()); n != SigInfoSize {
			return corruptf("pid %d: pending signal %d: siginfo is %d bytes, want %d", pid, si.GetSigno(), n, SigInfoSize)
		}
	}
	return nil
}

// ValidateFDs checks that every descriptor of p names a file of ft, and
// that the mappings of p name shared memory objects of ft correctly
// (validateShmemRefs).
func ValidateFDs(p *imagepb.Process, ft *imagepb.FileTable) error {
	ids := make(map[uint32]bool, len(ft.GetFiles()))
	for _, f := range ft.GetFiles() {
		ids[f.GetId()] = true
	}
	for _, fd := range p.GetFds() {
		if !ids[fd.GetFileId()] {
			return corruptf("pid %d: descriptor %d names file %d, which the file table lacks", p.GetPid(), fd.GetFd(), fd.GetFileId())
		}
	}
	return validateShmemRefs(p, ft)
}

// ValidatePageMap checks that the runs of pm are sorted by address and do
// not overlap, start page aligned, hold at least one page and do not wrap
// around the address space, and have a known source. A PAGES_HERE run holds
// at most MaxRunPages pages at a page-aligned offset after the pages-file
// header, and, unless pagesSize is negative (unknown), inside the pages
// file of pagesSize bytes. Other runs have no offset and no checksum.
func ValidatePageMap(pm *imagepb.PageMap, pagesSize int64) error {
	var prevEnd uint64
	for i, r := range pm.GetRuns() {
		addr, n := r.GetAddr(), r.GetNrPages()
		if !pageAligned(addr) {
			return corruptf("run at %#x: address not page aligned", addr)
		}
		if n == 0 {
			return corruptf("run at %#x: no pages", addr)
		}
		if n > (math.MaxUint64-addr)/PageSize {
			return corruptf("run at %#x: %d pages wrap around the address space", addr, n)
		}
		if i > 0 && addr < prevEnd {
			return corruptf("run at %#x overlaps or precedes the run ending at %#x", addr, prevEnd)
		}
		prevEnd = runEnd(r)
		switch r.GetSource() {
		case imagepb.PageSource_PAGES_HERE:
			off := r.GetFileOffset()
			if n > MaxRunPages {
				return corruptf("run at %#x: %d pages, more than %d in one run", addr, n, MaxRunPages)
			}
			if !pageAligned(off) || off < PagesHeaderSize {
				return corruptf("run at %#x: file offset %#x not page aligned or inside the header", addr, off)
			}
			if off > math.MaxInt64-n*PageSize {
				return corruptf("run at %#x: file offset %#x too large", addr, off)
			}
			if pagesSize >= 0 && off+n*PageSize > uint64(pagesSize) {
				return corruptf("run at %#x: file bytes %#x-%#x beyond the pages file's %d bytes", addr, off, off+n*PageSize, pagesSize)
			}
		case imagepb.PageSource_PAGES_ZERO, imagepb.PageSource_PAGES_IN_PARENT:
			if r.GetFileOffset() != 0 || r.GetCrc32C() != 0 {
				return corruptf("run at %#x: %v run with a file offset or checksum", addr, r.GetSource())
			}
		default:
			return corruptf("run at %#x: unknown source %d", addr, r.GetSource())
		}
	}
	return nil
}

// validatePagesInVMAs checks that every page of pm lies in a mapping of p.
// A run may span adjacent mappings. Both must be valid.
func validatePagesInVMAs(pm *imagepb.PageMap, p *imagepb.Process) error {
	vmas := p.GetVmas()
	i := 0
	for _, r := range pm.GetRuns() {
		addr, end := r.GetAddr(), runEnd(r)
		for addr < end {
			for i < len(vmas) && vmas[i].GetEnd() <= addr {
				i++
			}
			if i == len(vmas) || vmas[i].GetStart() > addr {
				return corruptf("pid %d: pages at %#x lie outside every mapping", p.GetPid(), addr)
			}
			addr = min(end, vmas[i].GetEnd())
		}
	}
	return nil
}
