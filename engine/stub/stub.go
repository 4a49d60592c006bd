package stub

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/phaul/phaul/internal/sys"
)

// Base is the address the stub's only segment is loaded at: far from where
// the kernel places PIE programs, their heap and the mmap area.
const Base = 0x10000000

const (
	ehdrSize = 64
	phdrSize = 56
	codeOff  = ehdrSize + phdrSize
)

// code is the stub's text:
//
//	loop:   mov  $34, %eax   ; pause
//	        syscall
//	        jmp  loop
//	gadget: syscall
//	        int3
//	        int3
var code = []byte{
	0xb8, 0x22, 0x00, 0x00, 0x00,
	0x0f, 0x05,
	0xeb, 0xf7,
	0x0f, 0x05, 0xcc, 0xcc,
}

// GadgetOffset is the offset of the stub's own `syscall` instruction from
// Base.
const GadgetOffset = codeOff + 9

// LoopOffset is the offset of the stub's pause loop from Base.
const LoopOffset = codeOff

// ELF returns the stub executable.
func ELF() []byte {
	var b bytes.Buffer
	le := binary.LittleEndian
	total := uint64(codeOff + len(code))
	// ELF header.
	b.Write([]byte{0x7f, 'E', 'L', 'F', 2 /*64-bit*/, 1 /*LE*/, 1 /*version*/, 0 /*SYSV*/})
	b.Write(make([]byte, 8))
	_ = binary.Write(&b, le, uint16(2))  // ET_EXEC
	_ = binary.Write(&b, le, uint16(62)) // EM_X86_64
	_ = binary.Write(&b, le, uint32(1))  // EV_CURRENT
	_ = binary.Write(&b, le, uint64(Base+codeOff))
	_ = binary.Write(&b, le, uint64(ehdrSize)) // e_phoff
	_ = binary.Write(&b, le, uint64(0))        // e_shoff
	_ = binary.Write(&b, le, uint32(0))        // e_flags
	_ = binary.Write(&b, le, uint16(ehdrSize))
	_ = binary.Write(&b, le, uint16(phdrSize))
	_ = binary.Write(&b, le, uint16(1)) // e_phnum
	_ = binary.Write(&b, le, uint16(64))
	_ = binary.Write(&b, le, uint16(0))
	_ = binary.Write(&b, le, uint16(0))
	// Program header: one PT_LOAD, R+X, covering the whole file.
	_ = binary.Write(&b, le, uint32(1))    // PT_LOAD
	_ = binary.Write(&b, le, uint32(5))    // PF_R|PF_X
	_ = binary.Write(&b, le, uint64(0))    // p_offset
	_ = binary.Write(&b, le, uint64(Base)) // p_vaddr
	_ = binary.Write(&b, le, uint64(Base)) // p_paddr
	_ = binary.Write(&b, le, total)        // p_filesz
	_ = binary.Write(&b, le, total)        // p_memsz
	_ = binary.Write(&b, le, uint64(0x1000))
	b.Write(code)
	return b.Bytes()
}

var (
	memfdOnce sync.Once
	memfd     *os.File
	memfdErr  error
)

// executable returns a sealed-in-spirit memfd holding the stub, created once
// per phaul process.
func executable() (*os.File, error) {
	memfdOnce.Do(func() {
		fd, err := sys.MemfdCreate("phaul-stub", sys.MFD_CLOEXEC)
		if err != nil {
			memfdErr = fmt.Errorf("create restore stub: %w", err)
			return
		}
		f := os.NewFile(uintptr(fd), "phaul-stub")
		if _, err := f.Write(ELF()); err != nil {
			f.Close()
			memfdErr = fmt.Errorf("write restore stub: %w", err)
			return
		}
		memfd = f
	})
	return memfd, memfdErr
}

// Process is a running stub.
type Process struct {
	Pid int
}

// Start starts a stub with stdin, stdout and stderr as its descriptors 0-2
// (nil means /dev/null). The stub is a child of this process; the caller
// seizes it and is responsible for killing and reaping it (sys.Wait4).
func Start(stdio [3]*os.File) (*Process, error) {
	exe, err := executable()
	if err != nil {
		return nil, err
	}
	var null *os.File
	files := make([]*os.File, 4)
	for i, f := range stdio {
		if f == nil {
			if null == nil {
				if null, err = os.OpenFile(os.DevNull, os.O_RDWR, 0); err != nil {
					return nil, fmt.Errorf("start restore stub: %w", err)
				}
				defer null.Close()
			}
			f = null
		}
		files[i] = f
	}
	files[3] = exe
	// The child execs its descriptor 3, the memfd: /proc/self/fd/3 is
	// resolved in the child, after its descriptors are set up.
	p, err := os.StartProcess("/proc/self/fd/3", []string{"phaul-stub"}, &os.ProcAttr{
		Files: files,
		Env:   []string{},
	})
	if err != nil {
		return nil, fmt.Errorf("start restore stub: %w", err)
	}
	pid := p.Pid
	// The stub is reaped with wait4 by the restorer; drop Go's handle.
	_ = p.Release()
	return &Process{Pid: pid}, nil
}

// WaitPaused waits until the stub sits in pause(2), so that a seize stops
// it in its own code rather than in the runtime of the process that forked
// it.
func (p *Process) WaitPaused(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	path := "/proc/" + strconv.Itoa(p.Pid) + "/syscall"
	for {
		b, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("restore stub %d: %w", p.Pid, err)
		}
		if strings.HasPrefix(string(b), strconv.Itoa(sys.SYS_PAUSE)+" ") {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("restore stub %d did not start within %v (syscall: %q)", p.Pid, timeout, strings.TrimSpace(string(b)))
		}
		time.Sleep(50 * time.Microsecond)
	}
}
