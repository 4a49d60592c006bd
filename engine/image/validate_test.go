package image

import (
	"errors"
	"math"
	"strings"
	"testing"

	"github.com/phaul/phaul/protocol/imagepb"
)

func here(addr, n, off uint64) *imagepb.PageRun {
	return &imagepb.PageRun{Addr: addr, NrPages: n, Source: imagepb.PageSource_PAGES_HERE, FileOffset: off}
}

func zero(addr, n uint64) *imagepb.PageRun {
	return &imagepb.PageRun{Addr: addr, NrPages: n, Source: imagepb.PageSource_PAGES_ZERO}
}

func parent(addr, n uint64) *imagepb.PageRun {
	return &imagepb.PageRun{Addr: addr, NrPages: n, Source: imagepb.PageSource_PAGES_IN_PARENT}
}

func TestValidatePageMap(t *testing.T) {
	const size = PagesHeaderSize + 16*PageSize
	cases := []struct {
		name string
		runs []*imagepb.PageRun
		size int64
		want string // "" for valid; else a substring of the error
	}{
		{"empty", nil, size, ""},
		{"valid", []*imagepb.PageRun{here(0x1000, 4, 4096), zero(0x5000, 10), parent(0x10000, 1), here(0x20000, 12, 4096+4*PageSize)}, size, ""},
		{"unknown size", []*imagepb.PageRun{here(0x1000, 4, 1<<40)}, -1, ""},
		{"same data twice", []*imagepb.PageRun{here(0x1000, 1, 4096), here(0x9000, 1, 4096)}, size, ""},
		{"top of address space", []*imagepb.PageRun{zero(math.MaxUint64-2*PageSize+1, 1)}, size, ""},
		{"unaligned addr", []*imagepb.PageRun{zero(0x1001, 1)}, size, "not page aligned"},
		{"no pages", []*imagepb.PageRun{zero(0x1000, 0)}, size, "no pages"},
		{"overflow", []*imagepb.PageRun{zero(0xfffffffffffff000, 1)}, size, "wrap"},
		{"huge count", []*imagepb.PageRun{zero(0x1000, math.MaxUint64)}, size, "wrap"},
		{"unsorted", []*imagepb.PageRun{zero(0x5000, 1), zero(0x1000, 1)}, size, "precedes"},
		{"overlap", []*imagepb.PageRun{zero(0x1000, 2), zero(0x2000, 1)}, size, "overlaps"},
		{"same addr", []*imagepb.PageRun{zero(0x1000, 1), parent(0x1000, 1)}, size, "overlaps"},
		{"unknown source", []*imagepb.PageRun{{Addr: 0x1000, NrPages: 1, Source: 9}}, size, "unknown source"},
		{"offset in header", []*imagepb.PageRun{here(0x1000, 1, 0)}, size, "inside the header"},
		{"unaligned offset", []*imagepb.PageRun{here(0x1000, 1, 4097)}, size, "not page aligned"},
		{"past end of file", []*imagepb.PageRun{here(0x1000, 2, size-PageSize)}, size, "beyond"},
		{"offset overflow", []*imagepb.PageRun{here(0x1000, 2, math.MaxUint64-PageSize+1)}, -1, "too large"},
		{"run too long", []*imagepb.PageRun{here(0x1000, MaxRunPages+1, 4096)}, -1, "in one run"},
		{"zero with offset", []*imagepb.PageRun{{Addr: 0x1000, NrPages: 1, Source: imagepb.PageSource_PAGES_ZERO, FileOffset: 4096}}, size, "file offset"},
		{"parent with crc", []*imagepb.PageRun{{Addr: 0x1000, NrPages: 1, Source: imagepb.PageSource_PAGES_IN_PARENT, Crc32C: 1}}, size, "checksum"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidatePageMap(&imagepb.PageMap{Runs: tc.runs}, tc.size)
			checkValidation(t, err, tc.want)
		})
	}
}

func checkValidation(t *testing.T, err error, want string) {
	t.Helper()
	if want == "" {
		if err != nil {
			t.Fatalf("got %v, want valid", err)
		}
		return
	}
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), want) {
		t.Fatalf("got %v, want ErrCorrupt saying %q", err, want)
	}
}

func TestValidateProcess(t *testing.T) {
	cases := []struct {
		name string
		edit func(p *imagepb.Process)
		want string
	}{
		{"valid", func(p *imagepb.Process) {}, ""},
		{"no creds", func(p *imagepb.Process) { p.Creds = nil }, ""},
		{"pid 0", func(p *imagepb.Process) { p.Pid = 0 }, "pid 0"},
		{"pid negative", func(p *imagepb.Process) { p.Pid = -4 }, "pid -4"},
		{"no threads", func(p *imagepb.Process) { p.Threads = nil }, "no threads"},
		{"no main thread", func(p *imagepb.Process) { p.Threads = p.Threads[1:] }, "main thread missing"},
		{"repeated tid", func(p *imagepb.Process) { p.Threads[1].Tid = p.Pid }, "repeated"},
		{"no regs", func(p *imagepb.Process) { p.Threads[1].Regs = nil }, "no registers"},
		{"xstate max", func(p *imagepb.Process) { p.Threads[0].Xstate = make([]byte, MaxXStateSize) }, ""},
		{"xstate too big", func(p *imagepb.Process) { p.Threads[0].Xstate = make([]byte, MaxXStateSize+1) }, "xstate"},
		{"vma empty", func(p *imagepb.Process) { p.Vmas[0].End = p.Vmas[0].Start }, "empty"},
		{"vma reversed", func(p *imagepb.Process) { p.Vmas[0].Start, p.Vmas[0].End = p.Vmas[0].End, p.Vmas[0].Start }, "empty"},
		{"vma unaligned", func(p *imagepb.Process) { p.Vmas[0].End++ }, "aligned"},
		{"vma unsorted", func(p *imagepb.Process) { p.Vmas[0], p.Vmas[1] = p.Vmas[1], p.Vmas[0] }, "precedes"},
		{"vma overlap", func(p *imagepb.Process) { p.Vmas[1].Start = p.Vmas[0].End - PageSize }, "overlaps"},
		{"vma kind", func(p *imagepb.Process) { p.Vmas[1].Kind = 99 }, "unknown kind"},
		{"fd repeated", func(p *imagepb.Process) { p.Fds[1].Fd = 0 }, "descriptor 0"},
		{"fd negative", func(p *imagepb.Process) { p.Fds[1].Fd = -1 }, "descriptor -1"},
		{"signal 0", func(p *imagepb.Process) { p.Sigactions[0].Signo = 0 }, "signal 0"},
		{"signal 65", func(p *imagepb.Process) { p.Sigactions[0].Signo = 65 }, "signal 65"},
		{"signal twice", func(p *imagepb.Process) { p.Sigactions[1].Signo = 2 }, "repeated"},
		{"siginfo size", func(p *imagepb.Process) {
			p.Threads[0].Pending = []*imagepb.SigInfo{{Signo: 10, Raw: make([]byte, 12)}}
		}, "siginfo"},
		{"siginfo ok", func(p *imagepb.Process) {
			p.SharedPending = []*imagepb.SigInfo{{Signo: 10, Raw: make([]byte, SigInfoSize)}}
		}, ""},
		{"short uids", func(p *imagepb.Process) { p.Creds.Uid = p.Creds.Uid[:1] }, "uids"},
		{"auxv", func(p *imagepb.Process) { p.Mm.Auxv = make([]byte, 12) }, "auxv"},
		{"umask", func(p *imagepb.Process) { p.Umask = 0o1000 }, "umask"},
		{"rlimit", func(p *imagepb.Process) { p.Rlimits[0].Resource = 16 }, "rlimit"},
		{"itimer", func(p *imagepb.Process) { p.Itimers = []*imagepb.ITimer{{Which: 3}} }, "itimer"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := sampleProcess(100)
			tc.edit(p)
			checkValidation(t, ValidateProcess(p), tc.want)
		})
	}
}

func TestValidateInventory(t *testing.T) {
	cases := []struct {
		name string
		edit func(inv *imagepb.Inventory)
		want string
	}{
		{"valid", func(inv *imagepb.Inventory) {}, ""},
		{"page size", func(inv *imagepb.Inventory) { inv.PageSize = 65536 }, "page size"},
		{"root pid", func(inv *imagepb.Inventory) { inv.RootPid = -1 }, "root pid"},
		{"root not listed", func(inv *imagepb.Inventory) { inv.RootPid = 7 }, "not among"},
		{"no processes", func(inv *imagepb.Inventory) { inv.Processes = nil }, "no processes"},
		{"pid 0", func(inv *imagepb.Inventory) { inv.Processes[1].Pid = 0 }, "pid 0"},
		{"pid twice", func(inv *imagepb.Inventory) { inv.Processes[2].Pid = 101 }, "twice"},
		{"child first", func(inv *imagepb.Inventory) {
			inv.Processes[0], inv.Processes[1] = inv.Processes[1], inv.Processes[0]
		}, "before its parent"},
		{"own parent", func(inv *imagepb.Inventory) { inv.Processes[1].Ppid = 101 }, "before its parent"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			inv := sampleInventory()
			tc.edit(inv)
			checkValidation(t, ValidateInventory(inv), tc.want)
		})
	}
	inv := sampleInventory()
	inv.FormatVersion = 2
	if err := ValidateInventory(inv); !errors.Is(err, ErrVersion) {
		t.Errorf("format version 2: got %v, want ErrVersion", err)
	}
}

func TestValidateFiles(t *testing.T) {
	ft := sampleFiles()
	checkValidation(t, ValidateFileTable(ft), "")
	checkValidation(t, ValidateFDs(sampleProcess(100), ft), "")

	ft.Files[2].Id = 1
	checkValidation(t, ValidateFileTable(ft), "file id 1 used twice")
	checkValidation(t, ValidateFDs(sampleProcess(100), ft), "names file 3")

	ft = sampleFiles()
	ft.Files[0].Kind = 200
	checkValidation(t, ValidateFileTable(ft), "unknown kind")

	ft = sampleFiles()
	ft.Files[0].Kind = imagepb.FileKind_FILE_INHERITED
	ft.Files[0].InheritFd = 3
	checkValidation(t, ValidateFileTable(ft), "inherited fd 3")

	ft = sampleFiles()
	ft.Files[1].Pos = -1
	checkValidation(t, ValidateFileTable(ft), "position")
}

func TestValidatePagesInVMAs(t *testing.T) {
	p := sampleProcess(100)
	// Two adjacent mappings, so a run may span them.
	p.Vmas = append(p.Vmas, &imagepb.VMA{Start: stackStart + stackPages*PageSize, End: stackStart + 8*PageSize, Kind: imagepb.VMAKind_VMA_ANON_PRIVATE})
	cases := []struct {
		name string
		runs []*imagepb.PageRun
		want string
	}{
		{"inside", []*imagepb.PageRun{zero(heapStart, heapPages), zero(stackStart, 1)}, ""},
		{"spanning adjacent", []*imagepb.PageRun{zero(stackStart+2*PageSize, 4)}, ""},
		{"below all", []*imagepb.PageRun{zero(0x1000, 1)}, "0x1000 lie outside"},
		{"in a gap", []*imagepb.PageRun{zero(heapStart+heapPages*PageSize, 1)}, "outside"},
		{"past the end", []*imagepb.PageRun{zero(heapStart+heapPages*PageSize-PageSize, 2)}, "outside"},
		{"above all", []*imagepb.PageRun{zero(stackStart+8*PageSize, 1)}, "outside"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			checkValidation(t, validatePagesInVMAs(&imagepb.PageMap{Runs: tc.runs}, p), tc.want)
		})
	}
}
