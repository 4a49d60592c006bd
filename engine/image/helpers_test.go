package image

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/phaul/phaul/protocol/imagepb"
)

// Test images: a root process 100 with a child 101 and a zombie 102.

func sampleInventory() *imagepb.Inventory {
	return &imagepb.Inventory{
		FormatVersion:   Version,
		PhaulVersion:    "test",
		KernelRelease:   "6.18.0-test",
		PageSize:        PageSize,
		CreatedUnixNano: 1700000000_000000000,
		RootPid:         100,
		Processes: []*imagepb.ProcessEntry{
			{Pid: 100, Ppid: 1, Pgid: 100, Sid: 100},
			{Pid: 101, Ppid: 100, Pgid: 100, Sid: 100},
			{Pid: 102, Ppid: 100, Pgid: 100, Sid: 100, Zombie: true, ExitStatus: 3},
		},
		XsaveFeatures: 0x207,
		Stats:         &imagepb.DumpStats{PagesScanned: 10, PagesWritten: 6, PagesZero: 4, BytesWritten: 6 * PageSize},
	}
}

func sampleFiles() *imagepb.FileTable {
	return &imagepb.FileTable{Files: []*imagepb.File{
		{Id: 1, Kind: imagepb.FileKind_FILE_CHARDEV, Path: "/dev/null", Flags: 0o2},
		{Id: 2, Kind: imagepb.FileKind_FILE_REGULAR, Path: "/var/log/app.log", Flags: 0o2001, Pos: 4242},
		{Id: 3, Kind: imagepb.FileKind_FILE_PIPE, Flags: 0o4000, Pipe: &imagepb.Pipe{PipeId: 77, Data: []byte("hi"), Capacity: 65536}},
	}}
}

// Mappings of every sample process.
const (
	heapStart  = 0x555500000000
	heapPages  = 8
	stackStart = 0x7ffd00000000
	stackPages = 4
)

func sampleProcess(pid int32) *imagepb.Process {
	xstate := make([]byte, 2440)
	return &imagepb.Process{
		Pid:   pid,
		Comm:  "worker",
		Exe:   "/usr/bin/worker",
		Cwd:   "/srv",
		Root:  "/",
		Umask: 0o22,
		Creds: &imagepb.Credentials{
			Uid: []uint32{1000, 1000, 1000, 1000}, Gid: []uint32{1000, 1000, 1000, 1000},
			Groups: []uint32{27, 1000}, CapBnd: 0x1ffffffffff,
		},
		Mm: &imagepb.MM{StartBrk: heapStart, Brk: heapStart + heapPages*PageSize, Auxv: make([]byte, 32), Vdso: 0x7fff00002000},
		Vmas: []*imagepb.VMA{
			{Start: heapStart, End: heapStart + heapPages*PageSize, Prot: 3, Flags: 0x22, Kind: imagepb.VMAKind_VMA_HEAP, Path: "[heap]"},
			{Start: stackStart, End: stackStart + stackPages*PageSize, Prot: 3, Flags: 0x122, Kind: imagepb.VMAKind_VMA_STACK, Path: "[stack]"},
		},
		Threads: []*imagepb.Thread{
			{Tid: pid, Regs: &imagepb.X86Regs{Rip: 0x401000, Rsp: stackStart + 0x100}, Xstate: xstate, Sigmask: 1 << 12,
				Rseq: &imagepb.Rseq{Pointer: 0x7f0000000020, Size: 32, Signature: 0x53053053}, Comm: "worker"},
			{Tid: pid + 1000, Regs: &imagepb.X86Regs{Rip: 0x401234, Rsp: stackStart + 0x200}, Xstate: xstate, Comm: "helper"},
		},
		Sigactions: []*imagepb.SigAction{
			{Signo: 2, Handler: 0x401500, Flags: 0x04000000, Restorer: 0x401600},
			{Signo: 13, Handler: 1},
			{Signo: 15}, // SIG_DFL: not shown
		},
		Fds: []*imagepb.FD{
			{Fd: 0, FileId: 1}, {Fd: 1, FileId: 2}, {Fd: 2, FileId: 2}, {Fd: 5, FileId: 3, Cloexec: true},
		},
		Rlimits:  []*imagepb.RLimit{{Resource: 7, Cur: 1024, Max: 4096}},
		Dumpable: true,
	}
}

// fill returns n pages, each filled with a byte derived from seed and its
// index.
func fill(seed byte, n int) []byte {
	b := make([]byte, n*PageSize)
	for i := range n {
		for j := range PageSize {
			b[i*PageSize+j] = seed + byte(i) + byte(j>>8)
		}
	}
	return b
}

// writeSamplePages writes the pages of one sample process: heap pages 0-2
// and 5-7 saved, 3-4 zero; stack pages 2-3 saved, 0-1 zero.
func writeSamplePages(t testing.TB, d Dir, pid int) {
	t.Helper()
	w, err := d.NewPageWriter(pid)
	if err != nil {
		t.Fatal(err)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			w.Abort()
			t.Fatal(err)
		}
	}
	must(w.AddRun(heapStart, fill(byte(pid), 3)))
	must(w.AddZeroRun(heapStart+3*PageSize, 2))
	must(w.AddRun(heapStart+5*PageSize, fill(byte(pid)+5, 3)))
	must(w.AddZeroRun(stackStart, 2))
	must(w.AddRun(stackStart+2*PageSize, fill(byte(pid)+50, 2)))
	must(w.Close())
}

// writeSample writes a complete sample checkpoint into a new directory.
func writeSample(t testing.TB) Dir {
	t.Helper()
	d := Dir{Path: t.TempDir()}
	if err := d.WriteInventory(sampleInventory()); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteFiles(sampleFiles()); err != nil {
		t.Fatal(err)
	}
	for _, pid := range []int32{100, 101} {
		if err := d.WriteProcess(sampleProcess(pid)); err != nil {
			t.Fatal(err)
		}
		writeSamplePages(t, d, int(pid))
	}
	return d
}

// readFile returns the bytes of path.
func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// assertNoTempFiles checks that writes left no temporary files in dir.
func assertNoTempFiles(t *testing.T, dir string) {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, ".*tmp-*"))
	if len(m) > 0 {
		t.Errorf("temporary files left behind: %v", m)
	}
}

func flipByte(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i] ^= 0x40
	return c
}
