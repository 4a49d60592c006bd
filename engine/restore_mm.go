package engine

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sort"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// The restorer's scratch area in the new process: arguments of injected
// calls below scratchBatch, the code and table of batches above, then a
// slot per thread for threads set up side by side.
const (
	// Offsets of arguments that batches of calls need side by side.
	scratchGroups     = 4096  // supplementary groups (4 KiB)
	scratchSigactions = 8192  // one 32-byte sigaction per signal
	scratchClone      = 16384 // clone3 arguments and TID, per thread
	cloneArgsSize     = 96
	scratchBatch      = 32768 // ptrace.Injector.Batch's area, to scratchSlots
	scratchSlots      = 65536
	// A thread's slot: its arguments, then its batch's code and table,
	// large enough for every call threadCalls can make (a few, then up to
	// 64 capabilities to drop and 64 to raise).
	threadSlotSize     = 16384
	threadSlotBatch    = 256
	threadSlots        = 64
	restoreScratchSize = scratchSlots + threadSlots*threadSlotSize
)

// vdsoKinds are the mappings the kernel provides and the restorer moves
// instead of creating.
func isKernelVMA(k imagepb.VMAKind) bool {
	switch k {
	case imagepb.VMAKind_VMA_VDSO, imagepb.VMAKind_VMA_VVAR, imagepb.VMAKind_VMA_VVAR_VCLOCK, imagepb.VMAKind_VMA_VSYSCALL:
		return true
	}
	return false
}

type span struct{ start, end uint64 }

// findHole returns an address where size bytes overlap none of busy,
// searching down from the top of the usual mmap area.
func findHole(size uint64, busy []span) (uint64, error) {
	sort.Slice(busy, func(i, j int) bool { return busy[i].start < busy[j].start })
	for addr := uint64(0x7e0000000000); addr > 0x100000000; addr -= 0x10000000 {
		ok := true
		for _, b := range busy {
			if addr < b.end && b.start < addr+size {
				ok = false
				break
			}
		}
		if ok {
			return addr, nil
		}
	}
	return 0, errors.New("no free address range for the restorer")
}

// layout replaces the forked stub's address space by vmas: it moves the
// vDSO mappings to their dumped addresses, unmaps the stub, and maps every
// other VMA.
//
// Precondition: called on the Tracer thread.
func (r *restorer) layout(vmas []*imagepb.VMA) error {
	in, err := ptrace.NewInjector(r.pid, r.gadget)
	if err != nil {
		return err
	}
	r.main = in
	cur, err := proc.ReadMaps(r.pid)
	if err != nil {
		return err
	}
	var busy []span
	for _, v := range vmas {
		busy = append(busy, span{v.Start, v.End})
	}
	for _, m := range cur {
		busy = append(busy, span{m.Start, m.End})
	}
	// 1. Park the kernel's vDSO mappings at a temporary place, then unmap
	// everything else of the stub, then put them where the image had them.
	kernel := map[string]*proc.Mapping{}
	for i := range cur {
		switch cur[i].Path {
		case "[vvar]", "[vvar_vclock]", "[vdso]":
			kernel[cur[i].Path] = &cur[i]
		}
	}
	want := map[string]*imagepb.VMA{}
	for _, v := range vmas {
		switch v.Kind {
		case imagepb.VMAKind_VMA_VVAR:
			want["[vvar]"] = v
		case imagepb.VMAKind_VMA_VVAR_VCLOCK:
			want["[vvar_vclock]"] = v
		case imagepb.VMAKind_VMA_VDSO:
			want["[vdso]"] = v
		}
	}
	for name, v := range want {
		k := kernel[name]
		if k == nil {
			return fmt.Errorf("%w: the image has a %s mapping, this kernel gives processes none", ErrBadImage, name)
		}
		if k.Size() != v.End-v.Start {
			return fmt.Errorf("%w: %s is %d bytes here, %d in the image (a different kernel's vDSO)", ErrBadImage, name, k.Size(), v.End-v.Start)
		}
	}
	// Park at temp + (offset from the lowest kernel mapping).
	var low, high uint64 = ^uint64(0), 0
	for _, k := range kernel {
		low, high = min(low, k.Start), max(high, k.End)
	}
	temp, err := findHole(high-low, busy)
	if err != nil {
		return err
	}
	// Fixed order, [vdso] last: injection runs through a gadget in it.
	order := []string{"[vvar]", "[vvar_vclock]", "[vdso]"}
	moved := map[string]uint64{}
	for _, name := range order {
		k := kernel[name]
		if k == nil {
			continue
		}
		to := temp + (k.Start - low)
		if _, err := in.Syscall(sys.SYS_MREMAP, k.Start, k.Size(), k.Size(), sys.MREMAP_MAYMOVE|sys.MREMAP_FIXED, to); err != nil {
			return fmt.Errorf("move %s aside: %w", name, err)
		}
		moved[name] = to
	}
	// The stub's own code is about to go: inject through the vDSO.
	gadget, err := ptrace.FindGadget(r.pid, moved["[vdso]"], moved["[vdso]"]+kernel["[vdso]"].Size())
	if err != nil {
		return err
	}
	gadgetOff := gadget - moved["[vdso]"]
	in.SetGadget(gadget)
	for _, m := range cur {
		if _, isKernel := kernel[m.Path]; isKernel || m.Path == "[vsyscall]" {
			continue
		}
		if _, err := in.Syscall(sys.SYS_MUNMAP, m.Start, m.Size()); err != nil {
			return fmt.Errorf("unmap stub mapping %#x-%#x: %w", m.Start, m.End, err)
		}
	}
	if want["[vdso]"] == nil {
		// Injection needs a vDSO until the end; an image without one is
		// not something dump produces.
		return unsupported("image without a [vdso] mapping")
	}
	for _, name := range order {
		k := kernel[name]
		if k == nil {
			continue
		}
		v := want[name]
		if v == nil {
			if _, err := in.Syscall(sys.SYS_MUNMAP, moved[name], k.Size()); err != nil {
				return fmt.Errorf("unmap %s: %w", name, err)
			}
			continue
		}
		if _, err := in.Syscall(sys.SYS_MREMAP, moved[name], k.Size(), k.Size(), sys.MREMAP_MAYMOVE|sys.MREMAP_FIXED, v.Start); err != nil {
			return fmt.Errorf("move %s to %#x: %w", name, v.Start, err)
		}
	}
	r.gadget = want["[vdso]"].Start + gadgetOff
	in.SetGadget(r.gadget)

	// 2. Scratch memory for syscall arguments, in a hole of the layout.
	if err := r.placeScratch(vmas); err != nil {
		return err
	}

	// 3. Every other VMA.
	for _, v := range vmas {
		if isKernelVMA(v.Kind) {
			continue
		}
		if err := r.mapVMA(v, v.Start, v.End); err != nil {
			return err
		}
	}
	r.vmas = vmas
	return nil
}

// placeScratch maps the restorer's scratch area in a hole of vmas (moving
// it when the layout now covers it).
//
// Precondition: called on the Tracer thread.
func (r *restorer) placeScratch(vmas []*imagepb.VMA) error {
	in := r.main
	var busy []span
	clash := r.scratch == 0
	for _, v := range vmas {
		busy = append(busy, span{v.Start, v.End})
		if r.scratch != 0 && v.Start < r.scratch+restoreScratchSize && r.scratch < v.End {
			clash = true
		}
	}
	if !clash {
		return nil
	}
	if r.scratch != 0 {
		busy = append(busy, span{r.scratch, r.scratch + restoreScratchSize})
	}
	hole, err := findHole(restoreScratchSize, busy)
	if err != nil {
		return err
	}
	if _, err := in.Syscall(sys.SYS_MMAP, hole, restoreScratchSize, sys.PROT_READ|sys.PROT_WRITE|sys.PROT_EXEC,
		sys.MAP_PRIVATE|sys.MAP_ANONYMOUS|sys.MAP_FIXED_NOREPLACE, ^uint64(0), 0); err != nil {
		return fmt.Errorf("map restorer scratch at %#x: %w", hole, err)
	}
	if r.scratch != 0 {
		if _, err := in.Syscall(sys.SYS_MUNMAP, r.scratch, restoreScratchSize); err != nil {
			return fmt.Errorf("unmap old scratch: %w", err)
		}
	}
	r.scratch = hole
	in.UseScratch(hole, restoreScratchSize)
	in.UseBatchArea(hole+scratchBatch, scratchSlots-scratchBatch)
	return nil
}

// injector prepares thread tid of the new process for injection.
//
// Precondition: called on the Tracer thread; tid is in a ptrace stop.
func (r *restorer) injector(tid int) (*ptrace.Injector, error) {
	in, err := ptrace.NewInjector(tid, r.gadget)
	if err != nil {
		return nil, err
	}
	in.UseScratch(r.scratch, restoreScratchSize)
	in.UseBatchArea(r.scratch+scratchBatch, scratchSlots-scratchBatch)
	return in, nil
}

// calls is a batch of injected system calls, each named for errors.
type calls struct {
	list  []ptrace.Call
	names []string
}

func (c *calls) add(name string, nr uint64, args ...uint64) {
	var a [6]uint64
	copy(a[:], args)
	c.list = append(c.list, ptrace.Call{Nr: nr, Args: a})
	c.names = append(c.names, name)
}

// run runs the calls in the thread behind in, with one stop for all.
//
// Precondition: called on the Tracer thread.
func (c *calls) run(in *ptrace.Injector) ([]uint64, error) {
	if len(c.list) == 0 {
		return nil, nil
	}
	res, err := in.Batch(c.list)
	if err != nil && len(res) < len(c.names) {
		return res, fmt.Errorf("%s: %w", c.names[len(res)], err)
	}
	return res, err
}

// vmaAt returns the VMA of the current layout that holds addr, or nil.
func (r *restorer) vmaAt(addr uint64) *imagepb.VMA {
	i := sort.Search(len(r.vmas), func(i int) bool { return r.vmas[i].End > addr })
	if i < len(r.vmas) && r.vmas[i].Start <= addr {
		return r.vmas[i]
	}
	return nil
}

// widen reports whether v is mapped writable while the process is built,
// so its pages can be written: memory whose contents come from the image
// and whose own protection forbids writing.
func widen(v *imagepb.VMA) bool {
	return hasPages(v) && v.Prot&sys.PROT_WRITE == 0
}

// mapVMA maps the part [start, end) of v at its address. Memory whose
// contents come from the image is mapped writable until finish.
//
// Precondition: called on the Tracer thread.
func (r *restorer) mapVMA(v *imagepb.VMA, start, end uint64) error {
	in := r.main
	prot := uint64(v.Prot)
	if widen(v) {
		prot |= sys.PROT_READ | sys.PROT_WRITE
	}
	flags := uint64(sys.MAP_FIXED_NOREPLACE)
	if v.Flags&sys.MAP_GROWSDOWN != 0 {
		flags |= sys.MAP_GROWSDOWN
	}
	fd := ^uint64(0)
	switch v.Kind {
	case imagepb.VMAKind_VMA_ANON_PRIVATE, imagepb.VMAKind_VMA_HEAP, imagepb.VMAKind_VMA_STACK:
		flags |= sys.MAP_PRIVATE | sys.MAP_ANONYMOUS
	case imagepb.VMAKind_VMA_ANON_SHARED, imagepb.VMAKind_VMA_SHMEM:
		if v.Kind == imagepb.VMAKind_VMA_ANON_SHARED && v.Shmem == 0 {
			// Its own object, its pages written per address (a
			// migration's shadow, an image of an older version).
			flags |= sys.MAP_SHARED | sys.MAP_ANONYMOUS
			break
		}
		// A shared memory object of the image (restore_shmem.go).
		f, err := r.shmemMapFD(v)
		if err != nil {
			return err
		}
		flags |= sys.MAP_SHARED
		fd = f
		defer in.Syscall(sys.SYS_CLOSE, f)
	case imagepb.VMAKind_VMA_SYSV_SHM:
		if err := r.attachSysV(v, start, end); err != nil {
			return err
		}
		return r.madvise(v, start, end)
	case imagepb.VMAKind_VMA_FILE_PRIVATE, imagepb.VMAKind_VMA_FILE_SHARED:
		mode := uint64(sys.O_RDONLY)
		if v.Kind == imagepb.VMAKind_VMA_FILE_SHARED {
			flags |= sys.MAP_SHARED
			if v.Prot&sys.PROT_WRITE != 0 {
				mode = sys.O_RDWR
			}
		} else {
			flags |= sys.MAP_PRIVATE
		}
		if err := in.WriteMemory(r.scratch, ptrace.CString(v.Path)); err != nil {
			return err
		}
		f, err := in.Syscall(sys.SYS_OPENAT, atFDCWD, r.scratch, mode|sys.O_CLOEXEC)
		if err != nil {
			return fmt.Errorf("open %s to map it at %#x: %w", v.Path, v.Start, err)
		}
		fd = f
		defer in.Syscall(sys.SYS_CLOSE, f)
	default:
		return fmt.Errorf("%w: VMA %#x-%#x has kind %v", ErrBadImage, v.Start, v.End, v.Kind)
	}
	got, err := in.Syscall(sys.SYS_MMAP, start, end-start, prot, flags, fd, v.Pgoff+(start-v.Start))
	if err != nil {
		return fmt.Errorf("map %#x-%#x (%s): %w", start, end, vmaName(v), err)
	}
	if got != start {
		return fmt.Errorf("map %#x-%#x (%s): kernel placed it at %#x", start, end, vmaName(v), got)
	}
	return r.madvise(v, start, end)
}

// madvise gives [start, end) of v the advice it had.
//
// Precondition: called on the Tracer thread.
func (r *restorer) madvise(v *imagepb.VMA, start, end uint64) error {
	for _, adv := range v.Madvise {
		if _, err := r.main.Syscall(sys.SYS_MADVISE, start, end-start, uint64(adv)); err != nil {
			return fmt.Errorf("madvise(%d) %#x-%#x: %w", adv, start, end, err)
		}
	}
	return nil
}

func vmaName(v *imagepb.VMA) string {
	if v.Path != "" {
		return v.Path
	}
	return v.Kind.String()
}

// setMM restores the mm fields (code, data, brk, stack, arguments,
// environment, auxv) and the executable link with PR_SET_MM_MAP, which
// needs no CAP_SYS_RESOURCE.
//
// Precondition: called on the Tracer thread.
func (r *restorer) setMM() error {
	in, mm := r.main, r.img.Mm
	auxv := mm.Auxv
	if len(auxv) > 1024 {
		return fmt.Errorf("%w: auxv of %d bytes", ErrBadImage, len(auxv))
	}
	exeAt, auxvAt, mapAt := r.scratch+4096, r.scratch+8192, r.scratch+3*4096
	if err := errors.Join(in.WriteMemory(exeAt, ptrace.CString(r.img.Exe)), in.WriteMemory(auxvAt, auxv)); err != nil {
		return err
	}
	exe, err := in.Syscall(sys.SYS_OPENAT, atFDCWD, exeAt, sys.O_RDONLY|sys.O_CLOEXEC)
	if err != nil {
		return fmt.Errorf("open executable %s: %w", r.img.Exe, err)
	}
	defer in.Syscall(sys.SYS_CLOSE, exe)
	b := make([]byte, 104)
	for i, v := range []uint64{mm.StartCode, mm.EndCode, mm.StartData, mm.EndData, mm.StartBrk, mm.Brk,
		mm.StartStack, mm.ArgStart, mm.ArgEnd, mm.EnvStart, mm.EnvEnd, auxvAt} {
		binary.LittleEndian.PutUint64(b[8*i:], v)
	}
	binary.LittleEndian.PutUint32(b[96:], uint32(len(auxv)))
	binary.LittleEndian.PutUint32(b[100:], uint32(exe))
	if err := in.WriteMemory(mapAt, b); err != nil {
		return err
	}
	if _, err := in.Syscall(sys.SYS_PRCTL, sys.PR_SET_MM, sys.PR_SET_MM_MAP, mapAt, 104); err != nil {
		return fmt.Errorf("prctl(PR_SET_MM_MAP): %w", err)
	}
	return nil
}

// atFDCWD is AT_FDCWD (-100) as a syscall argument.
const atFDCWD = ^uint64(99)
