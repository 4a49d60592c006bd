package engine

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// maxXstate bounds the NT_X86_XSTATE buffer (the kernel fills what the
// CPU's XCR0 needs: 2440 bytes here, at most a few KiB with AMX).
const maxXstate = 16 << 10

// The tracee memory mapped for injected calls: the process-wide calls'
// results below collectBatch, the code and table of their batch above,
// then a slot per thread.
const (
	scratchSize  = 16 * 4096
	collectBatch = 8 * 4096
	// Offsets of the results.
	outSigactions = 0    // 32 bytes per signal
	outItimers    = 2048 // 32 bytes per timer
	// A thread's slot at scratchSize + threadSlot*i: the code and table
	// of its batch, then its results (the clear-child-tid address, then
	// stack_t).
	threadSlot  = 512
	threadBatch = 384
)

// collector gathers the state of one frozen process.
type collector struct {
	pid    int
	frozen *ptrace.Frozen
	gadget uint64
	maps   []proc.Mapping
	// flagsFrom, when set, is an smaps read taken before the freeze:
	// readMaps reads /proc/PID/maps and takes the VmFlags from it.
	flagsFrom []proc.Mapping
	stat      *proc.Stat
	status    *proc.Status
	// tracked: write tracking is still registered on the mappings (it
	// goes away with the process, or is removed before it resumes).
	tracked bool
	vmas    []*imagepb.VMA // maps as image VMAs
	// regs holds each thread's registers as collected, for injecting.
	regs map[int]sys.Regs
	// scratch is memory the collection mapped in the process, left there
	// (a process that is killed needs no unmapping, which would cost the
	// downtime an injected call): unmapScratch removes it before the
	// process runs again.
	scratch, scratchSize uint64
}

// unmapScratch removes the collection's scratch memory, if any.
//
// Precondition: called on the Tracer thread.
func (c *collector) unmapScratch() error {
	if c.scratch == 0 {
		return nil
	}
	in, err := ptrace.NewInjector(c.frozen.Tids[0], c.gadget)
	if err != nil {
		return err
	}
	in.UseScratch(c.scratch, c.scratchSize)
	c.scratch, c.scratchSize = 0, 0
	return errors.Join(in.UnmapScratch(), in.Close())
}

// readMaps reads the process's mappings, refusing what cannot be restored.
func (c *collector) readMaps() error {
	var maps []proc.Mapping
	var err error
	if c.flagsFrom != nil {
		if maps, err = proc.ReadMaps(c.pid); err != nil {
			return err
		}
		if !proc.TakeFlags(maps, c.flagsFrom) {
			maps = nil // changed since: smaps it is
		}
	}
	if maps == nil {
		if maps, err = proc.ReadSmaps(c.pid); err != nil {
			return err
		}
	}
	vmas, err := convertVMAs(maps, c.tracked)
	if err != nil {
		return err
	}
	c.maps, c.vmas = maps, vmas
	return nil
}

// findVDSO returns the [vdso] mapping, or nil.
func findMapping(maps []proc.Mapping, name string) *proc.Mapping {
	for i := range maps {
		if maps[i].Path == name {
			return &maps[i]
		}
	}
	return nil
}

// checkProcess refuses, before anything is frozen, what phaul cannot
// checkpoint about pid as a whole; children too, unless inTree (the
// caller takes them along).
func checkProcess(pid int, inTree bool) (*proc.Status, error) {
	st, err := proc.ReadStatus(pid, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("process %d: %w", pid, ErrNoProcess)
		}
		return nil, err
	}
	if pid == sys.Getpid() {
		return nil, fmt.Errorf("process %d is phaul itself", pid)
	}
	if strings.HasPrefix(st.State, "Z") {
		return nil, unsupported("process %d is a zombie", pid)
	}
	if st.Seccomp == 2 {
		return nil, unsupported("process %d uses a seccomp filter", pid)
	}
	if len(st.NSpid) > 1 {
		return nil, unsupported("process %d lives in a nested PID namespace (PIDs %v)", pid, st.NSpid)
	}
	if !inTree {
		kids, err := children(pid)
		if err != nil {
			return nil, err
		}
		if len(kids) > 0 {
			return nil, unsupported("process %d has child processes (%v); phaul dump takes process trees, a live migration does not yet", pid, kids)
		}
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/timers", pid)); err == nil && len(strings.TrimSpace(string(b))) > 0 {
		return nil, unsupported("process %d has POSIX timers (timer_create)", pid)
	}
	return st, nil
}

// children returns the child processes of pid, of all its threads.
func children(pid int) ([]int, error) {
	tids, err := ptrace.ListThreads(pid)
	if err != nil {
		return nil, err
	}
	var kids []int
	for _, tid := range tids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, tid))
		if err != nil {
			continue // the thread exited
		}
		for _, f := range strings.Fields(string(b)) {
			kid, err := strconv.Atoi(f)
			if err != nil {
				return nil, fmt.Errorf("children of %d: %q", pid, f)
			}
			kids = append(kids, kid)
		}
	}
	return kids, nil
}

// process collects everything but memory contents and descriptors.
//
// Precondition: called on the Tracer thread with the process frozen.
func (c *collector) process() (*imagepb.Process, error) {
	pid := c.pid
	p := &imagepb.Process{Pid: int32(pid)}
	var err error
	if p.Comm, err = proc.ReadComm(pid, 0); err != nil {
		return nil, err
	}
	if p.Exe, err = proc.ReadLink(pid, "exe"); err != nil {
		return nil, err
	}
	if strings.HasSuffix(p.Exe, " (deleted)") {
		return nil, unsupported("executable %s was deleted", p.Exe)
	}
	if p.Cwd, err = proc.ReadLink(pid, "cwd"); err != nil {
		return nil, err
	}
	if p.Root, err = proc.ReadLink(pid, "root"); err != nil {
		return nil, err
	}
	st := c.status
	p.Umask = st.Umask
	p.NoNewPrivs = st.NoNewPrivs
	p.Creds = &imagepb.Credentials{
		Uid: st.Uid[:], Gid: st.Gid[:], Groups: st.Groups,
		CapInh: st.CapInh, CapPrm: st.CapPrm, CapEff: st.CapEff, CapBnd: st.CapBnd, CapAmb: st.CapAmb,
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/personality", pid)); err == nil {
		v, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 16, 32)
		p.Personality = uint32(v)
	}
	limits, err := proc.ReadLimits(pid)
	if err != nil {
		return nil, err
	}
	for _, l := range limits {
		p.Rlimits = append(p.Rlimits, &imagepb.RLimit{Resource: int32(l.Resource), Cur: l.Soft, Max: l.Max})
	}
	p.Mm = &imagepb.MM{
		StartCode: c.stat.StartCode, EndCode: c.stat.EndCode,
		StartData: c.stat.StartData, EndData: c.stat.EndData,
		StartBrk: c.stat.StartBrk, StartStack: c.stat.StartStack,
		ArgStart: c.stat.ArgStart, ArgEnd: c.stat.ArgEnd,
		EnvStart: c.stat.EnvStart, EnvEnd: c.stat.EnvEnd,
	}
	if p.Mm.Auxv, err = proc.ReadAuxv(pid); err != nil {
		return nil, err
	}
	if v := findMapping(c.maps, "[vdso]"); v != nil {
		p.Mm.Vdso = v.Start
	}
	if v := findMapping(c.maps, "[vvar]"); v != nil {
		p.Mm.Vvar = v.Start
	}
	p.Vmas = c.vmas

	// Per-thread state readable through ptrace.
	for _, tid := range c.frozen.Tids {
		th, err := c.thread(tid)
		if err != nil {
			return nil, err
		}
		p.Threads = append(p.Threads, th)
	}
	// Process-wide pending signals.
	if p.SharedPending, err = peekSignals(c.frozen.Tids[0], true); err != nil {
		return nil, err
	}

	// State only the process itself can tell: injected system calls.
	if err := c.injected(p); err != nil {
		return nil, err
	}
	return p, nil
}

// thread collects one thread's ptrace-visible state.
//
// Precondition: called on the Tracer thread.
func (c *collector) thread(tid int) (*imagepb.Thread, error) {
	th := &imagepb.Thread{Tid: int32(tid)}
	var regs sys.Regs
	if err := sys.PtraceGetRegs(tid, &regs); err != nil {
		return nil, fmt.Errorf("registers of thread %d: %w", tid, err)
	}
	if c.regs == nil {
		c.regs = map[int]sys.Regs{}
	}
	c.regs[tid] = regs
	th.Regs = regsToImage(&regs)
	buf := make([]byte, maxXstate)
	n, err := sys.PtraceGetRegSet(tid, sys.NT_X86_XSTATE, buf)
	if err != nil {
		return nil, fmt.Errorf("xstate of thread %d: %w", tid, err)
	}
	th.Xstate = buf[:n]
	if th.Sigmask, err = sys.PtraceGetSigmask(tid); err != nil {
		return nil, fmt.Errorf("signal mask of thread %d: %w", tid, err)
	}
	rs, err := sys.PtraceGetRseq(tid)
	if err != nil {
		return nil, fmt.Errorf("rseq of thread %d: %w", tid, err)
	}
	if rs.Pointer != 0 {
		th.Rseq = &imagepb.Rseq{Pointer: rs.Pointer, Size: rs.Size, Signature: rs.Signature}
	}
	if th.Pending, err = peekSignals(tid, false); err != nil {
		return nil, err
	}
	// Signals phaul took off the thread while freezing it are still
	// pending from the process's point of view.
	for _, s := range c.frozen.Stolen[tid] {
		th.Pending = append(th.Pending, &imagepb.SigInfo{Signo: int32(s.Signo()), Raw: append([]byte(nil), s.Info[:]...)})
	}
	if th.RobustList, th.RobustListLen, err = sys.GetRobustList(tid); err != nil {
		return nil, fmt.Errorf("robust futex list of thread %d: %w", tid, err)
	}
	if th.Comm, err = proc.ReadComm(c.pid, tid); err != nil {
		return nil, err
	}
	return th, nil
}

// peekSignals returns the signals queued for tid (or, when shared, for its
// whole process) without dequeuing them.
//
// Precondition: called on the Tracer thread.
func peekSignals(tid int, shared bool) ([]*imagepb.SigInfo, error) {
	var out []*imagepb.SigInfo
	buf := make([][sys.SiginfoSize]byte, 32)
	for off := uint64(0); ; {
		n, err := sys.PtracePeekSiginfo(tid, off, shared, buf)
		if err != nil {
			return nil, fmt.Errorf("pending signals of %d: %w", tid, err)
		}
		for _, si := range buf[:n] {
			signo := int32(binary.LittleEndian.Uint32(si[:4]))
			out = append(out, &imagepb.SigInfo{Signo: signo, Raw: append([]byte(nil), si[:]...)})
		}
		if n < len(buf) {
			return out, nil
		}
		off += uint64(n)
	}
}

// injected collects, by running system calls inside the process, what no
// /proc file or ptrace request exposes: brk, signal handlers, interval
// timers, and per thread the clear-child-tid address and alternate signal
// stack.
//
// Precondition: called on the Tracer thread.
func (c *collector) injected(p *imagepb.Process) (err error) {
	if c.gadget == 0 {
		return unsupported("process %d has no [vdso] mapping to run system calls through", c.pid)
	}
	// Every thread's registers and signal mask were just collected.
	injector := func(th *imagepb.Thread) (*ptrace.Injector, error) {
		return ptrace.NewInjectorAt(int(th.Tid), c.gadget, c.regs[int(th.Tid)], th.Sigmask)
	}
	main, err := injector(p.Threads[0])
	if err != nil {
		return err
	}
	defer func() {
		err = errors.Join(err, main.Close())
	}()
	size := scratchSize + (uint64(len(p.Threads))*threadSlot+4095)&^4095
	scratch, err := main.MapScratch(size)
	if err != nil {
		return err
	}
	c.scratch, c.scratchSize = scratch, size
	defer func() {
		if err != nil {
			err = errors.Join(err, main.UnmapScratch())
			c.scratch, c.scratchSize = 0, 0
		}
	}()

	// One batch in the main thread: brk, the signal dispositions (every
	// signal that is caught or ignored, and SIGCHLD, whose flags matter
	// even at the default disposition), the interval timers. And in every
	// thread, the main one too, what only the thread itself can report:
	// its clear-child-tid address and alternate signal stack. The
	// threads' batches all run at once.
	whole := []ptrace.Call{{Nr: sys.SYS_BRK}}
	interesting := c.status.SigCgt | c.status.SigIgn | 1<<(uint(sys.SIGCHLD)-1)
	var sigs []int
	for sig := 1; sig <= 64; sig++ {
		if interesting&(1<<uint(sig-1)) == 0 || sig == int(sys.SIGKILL) || sig == int(sys.SIGSTOP) {
			continue
		}
		sigs = append(sigs, sig)
		whole = append(whole, ptrace.Call{Nr: sys.SYS_RT_SIGACTION,
			Args: [6]uint64{uint64(sig), 0, scratch + outSigactions + 32*uint64(sig-1), 8}})
	}
	for which := uint64(0); which < 3; which++ {
		whole = append(whole, ptrace.Call{Nr: sys.SYS_GETITIMER, Args: [6]uint64{which, scratch + outItimers + 32*which}})
	}
	ins := make([]*ptrace.Injector, len(p.Threads))
	defer func() {
		for _, in := range ins[1:] {
			if in != nil {
				err = errors.Join(err, in.Close())
			}
		}
	}()
	calls := make([][]ptrace.Call, len(p.Threads))
	for i, th := range p.Threads {
		slot := scratch + scratchSize + threadSlot*uint64(i)
		out := slot + threadBatch
		calls[i] = []ptrace.Call{
			{Nr: sys.SYS_PRCTL, Args: [6]uint64{sys.PR_GET_TID_ADDRESS, out}},
			{Nr: sys.SYS_SIGALTSTACK, Args: [6]uint64{0, out + 8}},
		}
		if i == 0 {
			ins[i] = main
			main.UseBatchArea(scratch+collectBatch, scratchSize-collectBatch)
			calls[i] = append(whole, calls[i]...)
			continue
		}
		if ins[i], err = injector(th); err != nil {
			return err
		}
		ins[i].UseBatchArea(slot, threadBatch)
	}
	res, err := ptrace.Batches(ins, calls)
	if err != nil {
		return fmt.Errorf("signal handlers, timers, brk and per-thread state of %d: %w", c.pid, err)
	}
	p.Mm.Brk = res[0][0]
	out := make([]byte, outItimers+32*3)
	if err := main.ReadMemory(scratch, out); err != nil {
		return err
	}
	for _, sig := range sigs {
		sa := out[outSigactions+32*(sig-1):]
		act := &imagepb.SigAction{
			Signo:    int32(sig),
			Handler:  binary.LittleEndian.Uint64(sa[0:]),
			Flags:    binary.LittleEndian.Uint64(sa[8:]),
			Restorer: binary.LittleEndian.Uint64(sa[16:]),
			Mask:     binary.LittleEndian.Uint64(sa[24:]),
		}
		if act.Handler != 0 || act.Flags != 0 || act.Mask != 0 {
			p.Sigactions = append(p.Sigactions, act)
		}
	}
	// struct itimerval: interval then value, as timevals.
	for which := 0; which < 3; which++ {
		it := out[outItimers+32*which:]
		tv := func(o int) int64 {
			return int64(binary.LittleEndian.Uint64(it[o:]))*1e6 + int64(binary.LittleEndian.Uint64(it[o+8:]))
		}
		if iv, v := tv(0), tv(16); iv != 0 || v != 0 {
			p.Itimers = append(p.Itimers, &imagepb.ITimer{Which: int32(which), IntervalUs: iv, ValueUs: v})
		}
	}
	slots := make([]byte, threadSlot*len(p.Threads))
	if err := main.ReadMemory(scratch+scratchSize, slots); err != nil {
		return err
	}
	for i, th := range p.Threads {
		b := slots[threadSlot*i+threadBatch:]
		th.ClearChildTid = binary.LittleEndian.Uint64(b)
		// stack_t: void *ss_sp; int ss_flags; size_t ss_size.
		th.Altstack = &imagepb.SigAltStack{
			Sp:    binary.LittleEndian.Uint64(b[8:]),
			Flags: int32(binary.LittleEndian.Uint32(b[16:])),
			Size:  binary.LittleEndian.Uint64(b[24:]),
		}
	}
	return nil
}

func regsToImage(r *sys.Regs) *imagepb.X86Regs {
	return &imagepb.X86Regs{
		R15: r.R15, R14: r.R14, R13: r.R13, R12: r.R12, Rbp: r.Rbp, Rbx: r.Rbx,
		R11: r.R11, R10: r.R10, R9: r.R9, R8: r.R8, Rax: r.Rax, Rcx: r.Rcx,
		Rdx: r.Rdx, Rsi: r.Rsi, Rdi: r.Rdi, OrigRax: r.Orig_rax, Rip: r.Rip,
		Cs: r.Cs, Eflags: r.Eflags, Rsp: r.Rsp, Ss: r.Ss, FsBase: r.Fs_base,
		GsBase: r.Gs_base, Ds: r.Ds, Es: r.Es, Fs: r.Fs, Gs: r.Gs,
	}
}

func regsFromImage(x *imagepb.X86Regs) sys.Regs {
	return sys.Regs{
		R15: x.R15, R14: x.R14, R13: x.R13, R12: x.R12, Rbp: x.Rbp, Rbx: x.Rbx,
		R11: x.R11, R10: x.R10, R9: x.R9, R8: x.R8, Rax: x.Rax, Rcx: x.Rcx,
		Rdx: x.Rdx, Rsi: x.Rsi, Rdi: x.Rdi, Orig_rax: x.OrigRax, Rip: x.Rip,
		Cs: x.Cs, Eflags: x.Eflags, Rsp: x.Rsp, Ss: x.Ss, Fs_base: x.FsBase,
		Gs_base: x.GsBase, Ds: x.Ds, Es: x.Es, Fs: x.Fs, Gs: x.Gs,
	}
}
