package ptrace

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/phaul/phaul/internal/sys"
)

// Call is one system call of a Batch.
type Call struct {
	Nr   uint64
	Args [6]uint64
}

// batchCode runs the calls of a table, in order, in the tracee and traps
// after the last one or at the first that fails. On entry rbx points at the
// table, r12 holds the number of entries and r14 the place for a struct
// sigaction; each entry is eight words: the call number, six arguments,
// and the slot its result is stored in. Before the trap it saves the
// SIGTRAP disposition at r14 (the trap resets an ignored one; Batch puts
// it back) and keeps the last call's result in r13. Only rax, rcx, r11
// (the system call's), the argument registers, rbx, r12 and r13 change;
// no stack is used.
var batchCode = []byte{
	0x4d, 0x85, 0xe4, // loop: test r12, r12
	0x74, 0x32, //        je done
	0x48, 0x8b, 0x03, //  mov rax, [rbx]
	0x48, 0x8b, 0x7b, 0x08, // mov rdi, [rbx+8]
	0x48, 0x8b, 0x73, 0x10, // mov rsi, [rbx+16]
	0x48, 0x8b, 0x53, 0x18, // mov rdx, [rbx+24]
	0x4c, 0x8b, 0x53, 0x20, // mov r10, [rbx+32]
	0x4c, 0x8b, 0x43, 0x28, // mov r8, [rbx+40]
	0x4c, 0x8b, 0x4b, 0x30, // mov r9, [rbx+48]
	0x0f, 0x05, //        syscall
	0x48, 0x89, 0x43, 0x38, // mov [rbx+56], rax
	0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, // cmp rax, -4095
	0x73, 0x09, //        jae done
	0x48, 0x83, 0xc3, 0x40, // add rbx, 64
	0x49, 0xff, 0xcc, //  dec r12
	0xeb, 0xc9, //        jmp loop
	0x49, 0x89, 0xc5, //  done: mov r13, rax
	0xb8, 0x0d, 0x00, 0x00, 0x00, // mov eax, SYS_rt_sigaction
	0xbf, 0x05, 0x00, 0x00, 0x00, // mov edi, SIGTRAP
	0x31, 0xf6, //        xor esi, esi
	0x4c, 0x89, 0xf2, //  mov rdx, r14
	0x41, 0xba, 0x08, 0x00, 0x00, 0x00, // mov r10d, 8
	0x0f, 0x05, //        syscall
	0xcc, //              int3
}

const (
	batchSaved = 96  // offset of the saved SIGTRAP disposition in the area
	batchTable = 128 // offset of the table in the area
	batchEntry = 64  // bytes per table entry
	sigIgn     = 1   // SIG_IGN
)

// BatchCapacity returns how many calls a batch area of size bytes holds
// in one table: the most Batches runs in a thread.
func BatchCapacity(size uint64) int {
	if size < batchTable {
		return 0
	}
	return int((size - batchTable) / batchEntry)
}

// UseBatchArea declares size bytes of tracee memory at addr, mapped
// readable, writable and executable, as the place Batch writes its code
// and table to. Threads of one process may share it: a batch runs in one
// thread at a time.
func (in *Injector) UseBatchArea(addr, size uint64) { in.batch, in.batchSize = addr, size }

// Batch runs calls in the tracee with one stop for all of them instead of
// two per call, and returns their results. It stops at the first call
// that fails and returns the results before it with an error naming the
// failed call (a sys.Errno inside). Processes or threads the calls create
// are reported in Children, as with Syscall.
//
// The trap that ends a batch would reset a SIGTRAP disposition of SIG_IGN
// (the kernel does so for a forced signal); Batch puts it back.
//
// Precondition: called on the Tracer thread, with a batch area declared.
func (in *Injector) Batch(calls []Call) ([]uint64, error) {
	if in.batch == 0 {
		return nil, fmt.Errorf("batch in %d: no batch area", in.Tid)
	}
	max := int((in.batchSize - batchTable) / batchEntry)
	out := make([]uint64, 0, len(calls))
	in.Children = in.Children[:0]
	for len(calls) > 0 {
		n := min(len(calls), max)
		res, err := in.batchOnce(calls[:n])
		out = append(out, res...)
		if err != nil {
			return out, err
		}
		calls = calls[n:]
	}
	return out, nil
}

func (in *Injector) batchOnce(calls []Call) ([]uint64, error) {
	if err := in.startBatch(calls); err != nil {
		return nil, err
	}
	return in.finishBatch(calls)
}

// Batches runs one batch in each injector's thread (threads of one
// process, or of several), calls[i] in ins[i]: every thread is set going
// before any is waited for, so that their runs, and the scheduling of
// each, overlap instead of adding up. Each injector needs a batch area of
// its own that holds its calls in one table. It returns the results per
// injector; on error, the threads that were set going have all stopped
// again, and the results are those of the batches that completed.
//
// Precondition: called on the Tracer thread.
func Batches(ins []*Injector, calls [][]Call) ([][]uint64, error) {
	if len(ins) != len(calls) {
		return nil, fmt.Errorf("batches: %d injectors for %d call lists", len(ins), len(calls))
	}
	out := make([][]uint64, len(ins))
	var errs []error
	started := 0
	for i, in := range ins {
		if in.batch == 0 {
			errs = append(errs, fmt.Errorf("batch in %d: no batch area", in.Tid))
			break
		}
		if max := BatchCapacity(in.batchSize); len(calls[i]) > max {
			errs = append(errs, fmt.Errorf("batch in %d: %d calls, the area holds %d", in.Tid, len(calls[i]), max))
			break
		}
		in.Children = in.Children[:0]
		if err := in.startBatch(calls[i]); err != nil {
			errs = append(errs, err)
			break
		}
		started++
	}
	for i, in := range ins[:started] {
		res, err := in.finishBatch(calls[i])
		out[i] = res
		if err != nil {
			errs = append(errs, err)
		}
	}
	return out, errors.Join(errs...)
}

// startBatch writes the code and the table of calls (one table's worth)
// into the batch area and sets the thread going through them.
func (in *Injector) startBatch(calls []Call) error {
	buf := make([]byte, batchTable+batchEntry*len(calls))
	copy(buf, batchCode)
	for i, c := range calls {
		e := buf[batchTable+batchEntry*i:]
		binary.LittleEndian.PutUint64(e, c.Nr)
		for j, a := range c.Args {
			binary.LittleEndian.PutUint64(e[8+8*j:], a)
		}
		binary.LittleEndian.PutUint64(e[56:], ^uint64(0))
	}
	if err := in.WriteMemory(in.batch, buf); err != nil {
		return fmt.Errorf("batch in %d: %w", in.Tid, err)
	}
	r := in.saved
	r.Rip = in.batch
	r.Orig_rax = ^uint64(0)
	r.Rbx = in.batch + batchTable
	r.R12 = uint64(len(calls))
	r.R14 = in.batch + batchSaved
	r.Eflags &^= 1 << 8 // no single-stepping
	if err := sys.PtraceSetRegs(in.Tid, &r); err != nil {
		return fmt.Errorf("batch in %d: set regs: %w", in.Tid, err)
	}
	if err := sys.PtraceCont(in.Tid, 0); err != nil {
		return fmt.Errorf("batch in %d: %w", in.Tid, err)
	}
	return nil
}

// finishBatch waits for the trap that ends the batch startBatch set going
// and reads the results of calls.
func (in *Injector) finishBatch(calls []Call) ([]uint64, error) {
	trap := in.batch + uint64(len(batchCode))
	for {
		st, err := Wait(in.Tid)
		if err != nil {
			return nil, fmt.Errorf("batch in %d: %w", in.Tid, err)
		}
		if st.Exited() {
			return nil, fmt.Errorf("batch in %d: thread %s: %w", in.Tid, st, ErrProcessGone)
		}
		resume := false
		switch st.Event() {
		case sys.PTRACE_EVENT_CLONE, sys.PTRACE_EVENT_FORK, sys.PTRACE_EVENT_VFORK:
			msg, err := sys.PtraceGetEventMsg(in.Tid)
			if err != nil {
				return nil, fmt.Errorf("batch in %d: event message: %w", in.Tid, err)
			}
			in.Children = append(in.Children, int(msg))
			resume = true
		case sys.PTRACE_EVENT_STOP:
			resume = true
		default:
			resume = !st.IsSignalDelivery()
		}
		if resume {
			if err := sys.PtraceCont(in.Tid, 0); err != nil {
				return nil, fmt.Errorf("batch in %d: %w", in.Tid, err)
			}
			continue
		}
		var got sys.Regs
		if err := sys.PtraceGetRegs(in.Tid, &got); err != nil {
			return nil, fmt.Errorf("batch in %d: %w", in.Tid, err)
		}
		if st.Signal() != int(sys.SIGTRAP) || got.Rip != trap {
			return nil, fmt.Errorf("batch in %d: signal %d at rip %#x during injection", in.Tid, st.Signal(), got.Rip)
		}
		// The trap is taken: the SIGTRAP is never delivered (the next
		// resume passes no signal). An ignored SIGTRAP was reset by it.
		if ret := int64(got.Rax); ret < 0 && ret >= -4095 {
			return nil, fmt.Errorf("batch in %d: save SIGTRAP disposition: %w", in.Tid, sys.Errno(-ret))
		}
		left := int(got.R12)
		done := len(calls) - left
		res := make([]byte, batchTable-batchSaved+batchEntry*len(calls))
		if err := in.ReadMemory(in.batch+batchSaved, res); err != nil {
			return nil, fmt.Errorf("batch in %d: %w", in.Tid, err)
		}
		if binary.LittleEndian.Uint64(res) == sigIgn {
			if _, err := in.Syscall(sys.SYS_RT_SIGACTION, uint64(sys.SIGTRAP), in.batch+batchSaved, 0, 8); err != nil {
				return nil, fmt.Errorf("batch in %d: ignore SIGTRAP again: %w", in.Tid, err)
			}
		}
		table := res[batchTable-batchSaved:]
		out := make([]uint64, done)
		for i := range out {
			out[i] = binary.LittleEndian.Uint64(table[batchEntry*i+56:])
		}
		if left > 0 {
			c := calls[done]
			if ret := int64(got.R13); ret < 0 && ret >= -4095 {
				return out, fmt.Errorf("batch in %d: call %d (syscall %d): %w", in.Tid, done, c.Nr, sys.Errno(-ret))
			}
			return out, fmt.Errorf("batch in %d: stopped at call %d with %#x", in.Tid, done, got.R13)
		}
		return out, nil
	}
}
