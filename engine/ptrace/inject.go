package ptrace

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/phaul/phaul/internal/sys"
)

// allSignals blocks every signal the kernel lets us block while injected
// code runs, so that no handler of the tracee runs in the middle of it;
// all but SIGTRAP, which ends a Batch: the kernel would reset the handler
// of a blocked SIGTRAP when the trap forces it (the trap's stop is taken
// by the tracer and the signal never delivered).
const allSignals = ^uint64(0) &^ (1 << (sys.SIGTRAP - 1))

// Injector runs system calls inside one stopped tracee thread. It uses an
// existing `syscall` instruction (a gadget, usually in the vDSO) and
// PTRACE_SYSCALL stops, so it never writes to the tracee's code.
//
// The thread's registers and signal mask are saved by NewInjector and put
// back by Close.
type Injector struct {
	Tid    int
	gadget uint64
	saved  sys.Regs
	mask   uint64
	// scratch is tracee memory mapped by MapScratch, for syscall arguments.
	scratch     uint64
	scratchSize uint64
	// batch is executable tracee memory for Batch (UseBatchArea).
	batch     uint64
	batchSize uint64
	// Children holds the TIDs/PIDs created by the last injected clone,
	// reported through PTRACE_EVENT_CLONE/FORK stops.
	Children []int
}

// NewInjector prepares tid (stopped) for injection through gadget.
//
// Precondition: called on the Tracer thread; tid is in a ptrace stop.
func NewInjector(tid int, gadget uint64) (*Injector, error) {
	var regs sys.Regs
	if err := sys.PtraceGetRegs(tid, &regs); err != nil {
		return nil, fmt.Errorf("inject into %d: %w", tid, err)
	}
	m, err := sys.PtraceGetSigmask(tid)
	if err != nil {
		return nil, fmt.Errorf("inject into %d: %w", tid, err)
	}
	return NewInjectorAt(tid, gadget, regs, m)
}

// NewInjectorAt is NewInjector for a caller that has just read the
// thread's registers and signal mask (regs and mask), which Close puts
// back.
//
// Precondition: called on the Tracer thread; tid is in a ptrace stop.
func NewInjectorAt(tid int, gadget uint64, regs sys.Regs, mask uint64) (*Injector, error) {
	in := &Injector{Tid: tid, gadget: gadget, saved: regs, mask: mask}
	if err := sys.PtraceSetSigmask(tid, allSignals); err != nil {
		return nil, fmt.Errorf("inject into %d: %w", tid, err)
	}
	return in, nil
}

// SetGadget changes the syscall instruction used from now on (after the
// tracee's code was moved, for instance).
func (in *Injector) SetGadget(g uint64) { in.gadget = g }

// SetBase replaces the registers restored by Close (the restorer sets the
// restored thread's registers this way).
func (in *Injector) SetBase(r sys.Regs) { in.saved = r }

// Base returns the registers Close restores.
func (in *Injector) Base() sys.Regs { return in.saved }

// SetMask replaces the signal mask restored by Close.
func (in *Injector) SetMask(m uint64) { in.mask = m }

// Close restores the thread's registers and signal mask.
//
// After injection the thread leaves the kernel through a syscall exit, where
// no restart logic runs, so a thread that was stopped inside an interrupted
// system call gets its restart applied here (RestartRegs).
//
// Precondition: called on the Tracer thread.
func (in *Injector) Close() error {
	r := RestartRegs(in.saved, true)
	err1 := sys.PtraceSetRegs(in.Tid, &r)
	err2 := sys.PtraceSetSigmask(in.Tid, in.mask)
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("restore thread %d after injection: %w", in.Tid, err)
	}
	return nil
}

// Syscall runs system call nr with args in the tracee and returns its result.
// A result in [-4095, -1] is returned as a sys.Errno error.
//
// Precondition: called on the Tracer thread.
func (in *Injector) Syscall(nr uint64, args ...uint64) (uint64, error) {
	var a [6]uint64
	copy(a[:], args)
	r := in.saved
	r.Rax = nr
	r.Orig_rax = ^uint64(0)
	r.Rip = in.gadget
	r.Rdi, r.Rsi, r.Rdx, r.R10, r.R8, r.R9 = a[0], a[1], a[2], a[3], a[4], a[5]
	// The kernel reads eflags.TF etc. from here; a clean value avoids
	// surprises from a thread stopped inside a signal frame.
	if err := sys.PtraceSetRegs(in.Tid, &r); err != nil {
		return 0, fmt.Errorf("syscall %d in %d: set regs: %w", nr, in.Tid, err)
	}
	in.Children = in.Children[:0]
	for phase := 0; phase < 2; phase++ {
		if err := sys.PtraceSyscall(in.Tid, 0); err != nil {
			return 0, fmt.Errorf("syscall %d in %d: %w", nr, in.Tid, err)
		}
		for {
			st, err := Wait(in.Tid)
			if err != nil {
				return 0, fmt.Errorf("syscall %d in %d: %w", nr, in.Tid, err)
			}
			if st.Exited() {
				return 0, fmt.Errorf("syscall %d in %d: thread %s: %w", nr, in.Tid, st, ErrProcessGone)
			}
			if st.IsSyscallStop() {
				break
			}
			switch st.Event() {
			case sys.PTRACE_EVENT_CLONE, sys.PTRACE_EVENT_FORK, sys.PTRACE_EVENT_VFORK:
				msg, err := sys.PtraceGetEventMsg(in.Tid)
				if err != nil {
					return 0, fmt.Errorf("syscall %d in %d: event message: %w", nr, in.Tid, err)
				}
				in.Children = append(in.Children, int(msg))
			case sys.PTRACE_EVENT_STOP:
			default:
				if st.IsSignalDelivery() {
					var got sys.Regs
					_ = sys.PtraceGetRegs(in.Tid, &got)
					return 0, fmt.Errorf("syscall %d in %d: signal %d at rip %#x during injection",
						nr, in.Tid, st.Signal(), got.Rip)
				}
			}
			if err := sys.PtraceSyscall(in.Tid, 0); err != nil {
				return 0, fmt.Errorf("syscall %d in %d: %w", nr, in.Tid, err)
			}
		}
		if phase == 0 {
			// Entry stop: make sure the kernel saw the syscall we asked for.
			var got sys.Regs
			if err := sys.PtraceGetRegs(in.Tid, &got); err != nil {
				return 0, fmt.Errorf("syscall %d in %d: %w", nr, in.Tid, err)
			}
			if got.Orig_rax != nr {
				return 0, fmt.Errorf("syscall %d in %d: entered syscall %d at rip %#x: bad gadget %#x",
					nr, in.Tid, int64(got.Orig_rax), got.Rip, in.gadget)
			}
		}
	}
	var out sys.Regs
	if err := sys.PtraceGetRegs(in.Tid, &out); err != nil {
		return 0, fmt.Errorf("syscall %d in %d: %w", nr, in.Tid, err)
	}
	if ret := int64(out.Rax); ret < 0 && ret >= -4095 {
		return 0, sys.Errno(-ret)
	}
	return out.Rax, nil
}

// MapScratch maps size bytes of private anonymous memory in the tracee for
// syscall arguments and returns its address. UnmapScratch removes it. It
// is executable too, so that part of it can be the area of Batch.
//
// Precondition: called on the Tracer thread.
func (in *Injector) MapScratch(size uint64) (uint64, error) {
	addr, err := in.Syscall(sys.SYS_MMAP, 0, size, sys.PROT_READ|sys.PROT_WRITE|sys.PROT_EXEC,
		sys.MAP_PRIVATE|sys.MAP_ANONYMOUS, ^uint64(0), 0)
	if err != nil {
		return 0, fmt.Errorf("map scratch memory in %d: %w", in.Tid, err)
	}
	in.scratch, in.scratchSize = addr, size
	return addr, nil
}

// UseScratch declares tracee memory at addr as scratch without mapping it.
func (in *Injector) UseScratch(addr, size uint64) { in.scratch, in.scratchSize = addr, size }

// UnmapScratch unmaps the area made by MapScratch.
//
// Precondition: called on the Tracer thread.
func (in *Injector) UnmapScratch() error {
	if in.scratch == 0 {
		return nil
	}
	_, err := in.Syscall(sys.SYS_MUNMAP, in.scratch, in.scratchSize)
	in.scratch, in.scratchSize = 0, 0
	if err != nil {
		return fmt.Errorf("unmap scratch memory in %d: %w", in.Tid, err)
	}
	return nil
}

// WriteMemory writes b at addr in the tracee.
func (in *Injector) WriteMemory(addr uint64, b []byte) error {
	return WriteMemory(in.Tid, addr, b)
}

// ReadMemory reads len(b) bytes at addr of the tracee.
func (in *Injector) ReadMemory(addr uint64, b []byte) error {
	return ReadMemory(in.Tid, addr, b)
}

// WriteMemory writes b at addr in process pid.
func WriteMemory(pid int, addr uint64, b []byte) error {
	n, err := sys.ProcessVMWritev(pid, [][]byte{b}, []sys.RemoteIovec{{Base: uintptr(addr), Len: len(b)}})
	if err != nil {
		return fmt.Errorf("write %d bytes at %#x of %d: %w", len(b), addr, pid, err)
	}
	if n != len(b) {
		return fmt.Errorf("write %d bytes at %#x of %d: short write (%d)", len(b), addr, pid, n)
	}
	return nil
}

// ReadMemory reads len(b) bytes at addr of process pid.
func ReadMemory(pid int, addr uint64, b []byte) error {
	n, err := sys.ProcessVMReadv(pid, [][]byte{b}, []sys.RemoteIovec{{Base: uintptr(addr), Len: len(b)}})
	if err != nil {
		return fmt.Errorf("read %d bytes at %#x of %d: %w", len(b), addr, pid, err)
	}
	if n != len(b) {
		return fmt.Errorf("read %d bytes at %#x of %d: short read (%d)", len(b), addr, pid, n)
	}
	return nil
}

// FindGadget returns the address of a `syscall` instruction (0f 05) in the
// code at [start, end) of pid (typically its [vdso]).
func FindGadget(pid int, start, end uint64) (uint64, error) {
	buf := make([]byte, end-start)
	if err := ReadMemory(pid, start, buf); err != nil {
		return 0, fmt.Errorf("find syscall gadget: %w", err)
	}
	if i := bytes.Index(buf, []byte{0x0f, 0x05}); i >= 0 {
		return start + uint64(i), nil
	}
	return 0, fmt.Errorf("find syscall gadget: no syscall instruction in %#x-%#x of %d", start, end, pid)
}

// CString returns s as a NUL-terminated byte slice.
func CString(s string) []byte { return append([]byte(s), 0) }

// Kernel-internal restart codes a thread stopped inside a syscall may show
// in rax.
const (
	errRestartSys          = -512
	errRestartNoIntr       = -513
	errRestartNoHand       = -514
	errRestartRestartBlock = -516
	errEINTR               = -4
	sysRestartSyscall      = 219
)

// RestartRegs applies the kernel's syscall-restart rules to the registers of
// a thread stopped inside an interrupted system call, as if it were about to
// return to user space with no signal handler to run: the system call is
// re-executed. An ERESTART_RESTARTBLOCK call continues through
// restart_syscall when sameTask is true (the kernel still holds its restart
// block), and otherwise returns EINTR, which every caller of such calls
// (nanosleep, poll with a timeout, futex waits) handles.
func RestartRegs(r sys.Regs, sameTask bool) sys.Regs {
	if int64(r.Orig_rax) < 0 {
		return r
	}
	switch int64(r.Rax) {
	case errRestartSys, errRestartNoIntr, errRestartNoHand:
		r.Rax = r.Orig_rax
		r.Rip -= 2
	case errRestartRestartBlock:
		if sameTask {
			r.Rax = sysRestartSyscall
			r.Rip -= 2
		} else {
			eintr := int64(errEINTR)
			r.Rax = uint64(eintr)
		}
	}
	r.Orig_rax = ^uint64(0)
	return r
}
