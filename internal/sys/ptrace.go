package sys

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Regs is the x86_64 general register set (struct user_regs_struct).
type Regs = unix.PtraceRegs

// ptrace requests and options beyond what x/sys names.
const (
	PTRACE_SEIZE                  = 0x4206
	PTRACE_INTERRUPT              = 0x4207
	PTRACE_LISTEN                 = 0x4208
	PTRACE_PEEKSIGINFO            = 0x4209
	PTRACE_GETSIGMASK             = 0x420a
	PTRACE_SETSIGMASK             = 0x420b
	PTRACE_GET_RSEQ_CONFIGURATION = 0x420f
	PTRACE_GETREGSET              = 0x4204
	PTRACE_SETREGSET              = 0x4205
	PTRACE_GETSIGINFO             = 0x4202
	PTRACE_GETEVENTMSG            = 0x4201

	PTRACE_O_TRACESYSGOOD = unix.PTRACE_O_TRACESYSGOOD
	PTRACE_O_TRACECLONE   = unix.PTRACE_O_TRACECLONE
	PTRACE_O_TRACEFORK    = unix.PTRACE_O_TRACEFORK
	PTRACE_O_TRACEVFORK   = unix.PTRACE_O_TRACEVFORK
	PTRACE_O_TRACEEXIT    = unix.PTRACE_O_TRACEEXIT
	PTRACE_O_EXITKILL     = unix.PTRACE_O_EXITKILL

	PTRACE_EVENT_FORK  = unix.PTRACE_EVENT_FORK
	PTRACE_EVENT_VFORK = unix.PTRACE_EVENT_VFORK
	PTRACE_EVENT_CLONE = unix.PTRACE_EVENT_CLONE
	PTRACE_EVENT_EXIT  = unix.PTRACE_EVENT_EXIT
	PTRACE_EVENT_STOP  = 128

	PTRACE_PEEKSIGINFO_SHARED = 1

	NT_PRSTATUS   = 1
	NT_X86_XSTATE = 0x202
)

// RseqConfig is struct ptrace_rseq_configuration.
type RseqConfig struct {
	Pointer   uint64
	Size      uint32
	Signature uint32
	Flags     uint32
	Pad       uint32
}

// SiginfoSize is the size of the kernel's siginfo_t.
const SiginfoSize = 128

func ptrace(name string, req int, pid int, addr, data uintptr) (uintptr, error) {
	r, _, e := unix.Syscall6(unix.SYS_PTRACE, uintptr(req), uintptr(pid), addr, data, 0, 0)
	if e != 0 {
		return 0, wrap(name, e)
	}
	return r, nil
}

// PtraceSeize attaches to tid without stopping it.
func PtraceSeize(tid int, options int) error {
	_, err := ptrace("ptrace(PTRACE_SEIZE)", PTRACE_SEIZE, tid, 0, uintptr(options))
	return err
}

// PtraceInterrupt asks a seized tid to stop.
func PtraceInterrupt(tid int) error {
	_, err := ptrace("ptrace(PTRACE_INTERRUPT)", PTRACE_INTERRUPT, tid, 0, 0)
	return err
}

// PtraceCont resumes tid, delivering sig (0 for none).
func PtraceCont(tid int, sig int) error {
	_, err := ptrace("ptrace(PTRACE_CONT)", unix.PTRACE_CONT, tid, 0, uintptr(sig))
	return err
}

// PtraceSyscall resumes tid until the next syscall entry or exit.
func PtraceSyscall(tid int, sig int) error {
	_, err := ptrace("ptrace(PTRACE_SYSCALL)", unix.PTRACE_SYSCALL, tid, 0, uintptr(sig))
	return err
}

// PtraceDetach detaches from tid, delivering sig (0 for none).
func PtraceDetach(tid int, sig int) error {
	_, err := ptrace("ptrace(PTRACE_DETACH)", unix.PTRACE_DETACH, tid, 0, uintptr(sig))
	return err
}

// PtraceSetOptions sets the ptrace options of tid.
func PtraceSetOptions(tid int, options int) error {
	_, err := ptrace("ptrace(PTRACE_SETOPTIONS)", unix.PTRACE_SETOPTIONS, tid, 0, uintptr(options))
	return err
}

// PtraceGetRegs reads the general registers of tid.
func PtraceGetRegs(tid int, regs *Regs) error {
	_, err := ptrace("ptrace(PTRACE_GETREGS)", unix.PTRACE_GETREGS, tid, 0, uintptr(unsafe.Pointer(regs)))
	return err
}

// PtraceSetRegs writes the general registers of tid.
func PtraceSetRegs(tid int, regs *Regs) error {
	_, err := ptrace("ptrace(PTRACE_SETREGS)", unix.PTRACE_SETREGS, tid, 0, uintptr(unsafe.Pointer(regs)))
	return err
}

// PtraceGetRegSet reads register set nt of tid into buf and returns how many
// bytes the kernel filled.
func PtraceGetRegSet(tid int, nt int, buf []byte) (int, error) {
	iov := unix.Iovec{Base: &buf[0]}
	iov.SetLen(len(buf))
	_, err := ptrace("ptrace(PTRACE_GETREGSET)", PTRACE_GETREGSET, tid, uintptr(nt), uintptr(unsafe.Pointer(&iov)))
	return int(iov.Len), err
}

// PtraceSetRegSet writes register set nt of tid from buf.
func PtraceSetRegSet(tid int, nt int, buf []byte) error {
	iov := unix.Iovec{Base: &buf[0]}
	iov.SetLen(len(buf))
	_, err := ptrace("ptrace(PTRACE_SETREGSET)", PTRACE_SETREGSET, tid, uintptr(nt), uintptr(unsafe.Pointer(&iov)))
	return err
}

// PtraceGetSigmask reads the blocked-signal mask of tid.
func PtraceGetSigmask(tid int) (uint64, error) {
	var m uint64
	_, err := ptrace("ptrace(PTRACE_GETSIGMASK)", PTRACE_GETSIGMASK, tid, 8, uintptr(unsafe.Pointer(&m)))
	return m, err
}

// PtraceSetSigmask sets the blocked-signal mask of tid.
func PtraceSetSigmask(tid int, m uint64) error {
	_, err := ptrace("ptrace(PTRACE_SETSIGMASK)", PTRACE_SETSIGMASK, tid, 8, uintptr(unsafe.Pointer(&m)))
	return err
}

// PtraceGetRseq reads the rseq registration of tid.
func PtraceGetRseq(tid int) (RseqConfig, error) {
	var c RseqConfig
	_, err := ptrace("ptrace(PTRACE_GET_RSEQ_CONFIGURATION)", PTRACE_GET_RSEQ_CONFIGURATION, tid,
		unsafe.Sizeof(c), uintptr(unsafe.Pointer(&c)))
	return c, err
}

// PtraceGetEventMsg returns the message of the last ptrace event of tid.
func PtraceGetEventMsg(tid int) (uint64, error) {
	var m uint64
	_, err := ptrace("ptrace(PTRACE_GETEVENTMSG)", PTRACE_GETEVENTMSG, tid, 0, uintptr(unsafe.Pointer(&m)))
	return m, err
}

// PtraceGetSiginfo returns the raw siginfo of the signal that stopped tid.
func PtraceGetSiginfo(tid int) ([SiginfoSize]byte, error) {
	var si [SiginfoSize]byte
	_, err := ptrace("ptrace(PTRACE_GETSIGINFO)", PTRACE_GETSIGINFO, tid, 0, uintptr(unsafe.Pointer(&si)))
	return si, err
}

type peekSiginfoArgs struct {
	Off   uint64
	Flags uint32
	Nr    int32
}

// PtracePeekSiginfo copies, without dequeuing, the pending signals of tid
// (its own queue, or the process-wide one when shared is true) into out,
// starting at index off, and returns how many it copied.
func PtracePeekSiginfo(tid int, off uint64, shared bool, out [][SiginfoSize]byte) (int, error) {
	if len(out) == 0 {
		return 0, nil
	}
	a := peekSiginfoArgs{Off: off, Nr: int32(len(out))}
	if shared {
		a.Flags = PTRACE_PEEKSIGINFO_SHARED
	}
	n, err := ptrace("ptrace(PTRACE_PEEKSIGINFO)", PTRACE_PEEKSIGINFO, tid,
		uintptr(unsafe.Pointer(&a)), uintptr(unsafe.Pointer(&out[0])))
	return int(n), err
}

// PtracePeekData reads one word of tid's memory.
func PtracePeekData(tid int, addr uint64) (uint64, error) {
	var w uint64
	_, err := ptrace("ptrace(PTRACE_PEEKDATA)", unix.PTRACE_PEEKDATA, tid, uintptr(addr), uintptr(unsafe.Pointer(&w)))
	return w, err
}
