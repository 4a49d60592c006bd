package image

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/phaul/phaul/protocol/imagepb"
)

// newPredumpDir writes a pre-dump inventory for pid (with parent) into a new
// directory path, and returns it.
func newPredumpDir(t testing.TB, path, parentPath string, pid int32) Dir {
	t.Helper()
	if err := os.MkdirAll(path, 0o755); err != nil {
		t.Fatal(err)
	}
	d := Dir{Path: path}
	inv := &imagepb.Inventory{RootPid: pid, Processes: []*imagepb.ProcessEntry{{Pid: pid, Ppid: 1}}, Parent: parentPath, Predump: true}
	if err := d.WriteInventory(inv); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestPageWriterRoundTrip(t *testing.T) {
	d := Dir{Path: t.TempDir()}
	w, err := d.NewPageWriter(7)
	if err != nil {
		t.Fatal(err)
	}
	type chunk struct {
		addr uint64
		data []byte // nil: zero run of n pages
		n    uint64
	}
	// Small runs (buffered), a large one (written directly), contiguous
	// runs to merge, zero runs to merge.
	chunks := []chunk{
		{addr: 0x10000, data: fill(1, 1)},
		{addr: 0x11000, data: fill(2, 2)},      // merges with the previous
		{addr: 0x13000, n: 1},                  // zero
		{addr: 0x14000, n: 3},                  // zero, merges
		{addr: 0x17000, data: fill(3, 1)},      // new run
		{addr: 0x20000, data: fill(4, 1024)},   // 4 MiB, direct write; new run (address gap)
		{addr: 0x420000, data: fill(5, 512)},   // merges: contiguous in address and file
		{addr: 0x1000000, data: fill(6, 1)},    // after a gap
		{addr: 0x1001000, data: []byte{}},      // empty: nothing
		{addr: 0x2000000, data: fill(7, 3)},    //
		{addr: 0x2003000, n: 0},                // empty zero run: nothing
		{addr: 0x2003000, data: fill(8, 300)},  // merges
		{addr: 0x3000000, data: fill(9, 1)},    // buffered,
		{addr: 0x3001000, data: fill(10, 512)}, // then a direct write: order kept
	}
	for _, c := range chunks {
		if c.data != nil {
			err = w.AddRun(c.addr, c.data)
		} else {
			err = w.AddZeroRun(c.addr, c.n)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := w.AddParentRun(0x4000000, 5); err != nil {
		t.Fatal(err)
	}
	st := w.Stats()
	if want := (PageStats{PagesWritten: 1 + 2 + 1 + 1024 + 512 + 1 + 3 + 300 + 1 + 512, PagesZero: 4, PagesInParent: 5, Runs: 8}); st != want {
		t.Errorf("stats %+v, want %+v", st, want)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err == nil {
		t.Error("second Close succeeded")
	}
	if err := w.AddZeroRun(0x5000000, 1); err == nil {
		t.Error("AddZeroRun after Close succeeded")
	}
	assertNoTempFiles(t, d.Path)

	p, err := OpenPages(d.Path, 7)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if len(p.Runs) != 8 {
		t.Fatalf("%d runs, want 8: %v", len(p.Runs), p.Runs)
	}
	got := readBack(t, p)
	for _, c := range chunks {
		for i := 0; i < len(c.data)/PageSize; i++ {
			addr := c.addr + uint64(i*PageSize)
			if !bytes.Equal(got[addr], c.data[i*PageSize:(i+1)*PageSize]) {
				t.Fatalf("page %#x differs", addr)
			}
		}
	}
	if err := p.Verify(); err != nil {
		t.Fatal(err)
	}
	// Page data stays page aligned.
	for _, r := range p.Runs {
		if r.GetSource() == imagepb.PageSource_PAGES_HERE && r.GetFileOffset()%PageSize != 0 {
			t.Errorf("run at %#x at offset %#x", r.GetAddr(), r.GetFileOffset())
		}
	}
}

// readBack reads every page of p: data pages and zero pages by address.
func readBack(t *testing.T, p *Pages) map[uint64][]byte {
	t.Helper()
	got := map[uint64][]byte{}
	for _, r := range p.Runs {
		switch r.GetSource() {
		case imagepb.PageSource_PAGES_HERE:
			buf := make([]byte, RunBytes(r))
			if err := p.ReadRun(r, buf); err != nil {
				t.Fatal(err)
			}
			for i := uint64(0); i < r.GetNrPages(); i++ {
				got[r.GetAddr()+i*PageSize] = buf[i*PageSize : (i+1)*PageSize]
			}
		case imagepb.PageSource_PAGES_ZERO:
			for i := uint64(0); i < r.GetNrPages(); i++ {
				got[r.GetAddr()+i*PageSize] = make([]byte, PageSize)
			}
		}
	}
	return got
}

// TestPageWriterRandom writes runs of random sizes (buffered and direct),
// zero runs and gaps, and reads every page back.
func TestPageWriterRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	d := Dir{Path: t.TempDir()}
	w, err := d.NewPageWriter(9)
	if err != nil {
		t.Fatal(err)
	}
	want := map[uint64][]byte{}
	addr := uint64(0x10000000)
	for i := range 200 {
		switch rng.IntN(4) {
		case 0: // a gap
			addr += uint64(1+rng.IntN(4)) * PageSize
		case 1:
			n := uint64(1 + rng.IntN(3))
			if err := w.AddZeroRun(addr, n); err != nil {
				t.Fatal(err)
			}
			for j := range n {
				want[addr+j*PageSize] = make([]byte, PageSize)
			}
			addr += n * PageSize
		default:
			n := 1 + rng.IntN(4)
			if rng.IntN(8) == 0 {
				n = 256 + rng.IntN(1024) // 1-5 MiB: written directly
			}
			data := fill(byte(i), n)
			if err := w.AddRun(addr, data); err != nil {
				t.Fatal(err)
			}
			for j := range n {
				want[addr+uint64(j*PageSize)] = data[j*PageSize : (j+1)*PageSize]
			}
			addr += uint64(n * PageSize)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	p, err := OpenPages(d.Path, 9)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	got := readBack(t, p)
	if len(got) != len(want) {
		t.Fatalf("%d pages read, %d written", len(got), len(want))
	}
	for a, b := range want {
		if !bytes.Equal(got[a], b) {
			t.Fatalf("page %#x differs", a)
		}
	}
}

func TestPageWriterSplitsLongRuns(t *testing.T) {
	d := Dir{Path: t.TempDir()}
	w, err := d.NewPageWriter(7)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, (MaxRunPages+3)*PageSize)
	data[len(data)-1] = 1
	if err := w.AddRun(0x100000, data[:PageSize]); err != nil {
		t.Fatal(err)
	}
	if err := w.AddRun(0x101000, data[PageSize:]); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	p, err := OpenPages(d.Path, 7)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if len(p.Runs) != 2 || p.Runs[0].GetNrPages() != MaxRunPages || p.Runs[1].GetNrPages() != 3 {
		t.Fatalf("runs %v, want %d pages then 3", p.Runs, MaxRunPages)
	}
	if err := p.Verify(); err != nil {
		t.Fatal(err)
	}
}

func TestPageWriterMisuse(t *testing.T) {
	d := Dir{Path: t.TempDir()}
	if _, err := d.NewPageWriter(0); err == nil {
		t.Error("pid 0 accepted")
	}
	w, err := d.NewPageWriter(7)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.AddRun(0x10000, fill(1, 2)); err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"unaligned addr": w.AddRun(0x20001, fill(1, 1)),
		"partial page":   w.AddRun(0x20000, make([]byte, 100)),
		"overlap":        w.AddRun(0x11000, fill(1, 1)),
		"before":         w.AddZeroRun(0x1000, 1),
		"wrap":           w.AddZeroRun(0xfffffffffffff000, 2),
	} {
		if err == nil {
			t.Errorf("%s accepted", name)
		}
	}
	// The writer is still usable after refused calls.
	if err := w.AddRun(0x12000, fill(2, 1)); err != nil {
		t.Fatal(err)
	}
	w.Abort()
	if _, err := os.Stat(d.PagesPath(7)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("aborted writer left a pages file: %v", err)
	}
	if err := w.Close(); err == nil {
		t.Error("Close after Abort succeeded")
	}
	assertNoTempFiles(t, d.Path)
}

func TestReadRunChecksum(t *testing.T) {
	d := writeSample(t)
	// Flip a byte of the second page of data (run 0 of pid 100).
	f, err := os.OpenFile(d.PagesPath(100), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0xee}, PagesHeaderSize+PageSize+17); err != nil {
		t.Fatal(err)
	}
	f.Close()
	p, err := OpenPages(d.Path, 100)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	buf := make([]byte, RunBytes(p.Runs[0]))
	err = p.ReadRun(p.Runs[0], buf)
	if !errors.Is(err, ErrChecksum) || !strings.Contains(err.Error(), d.PagesPath(100)) || !strings.Contains(err.Error(), "0x555500000000") {
		t.Fatalf("got %v, want ErrChecksum naming the file and address", err)
	}
	if err := p.Verify(); !errors.Is(err, ErrChecksum) {
		t.Fatalf("Verify: got %v", err)
	}
	if err := p.ReadRun(p.Runs[0], buf[:10]); err == nil {
		t.Error("short buffer accepted")
	}
	if err := p.ReadRun(p.Runs[1], buf); err == nil {
		t.Error("reading a zero run succeeded")
	}
}

func TestPagesFileErrors(t *testing.T) {
	good := readFile(t, writeSample(t).PagesPath(100))
	cases := []struct {
		name string
		data []byte
		want error
	}{
		{"bad magic", flipByte(good, 3), ErrBadMagic},
		{"framed magic", append([]byte("PHAULIMG"), good[8:]...), ErrBadMagic},
		{"version", flipByte(good, 8), ErrVersion},
		{"header crc", flipByte(good, 13), ErrChecksum},
		{"reserved", flipByte(good, 2000), ErrCorrupt},
		{"empty", nil, ErrTruncated},
		{"in header", good[:100], ErrTruncated},
		{"partial page", good[:len(good)-1], ErrTruncated},
		{"missing pages", good[:PagesHeaderSize+PageSize], ErrCorrupt}, // runs beyond the end
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := writeSample(t)
			if err := os.WriteFile(d.PagesPath(100), tc.data, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := OpenPages(d.Path, 100)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), d.Path) {
				t.Errorf("error %q does not name the image", err)
			}
		})
	}
	t.Run("other pid", func(t *testing.T) {
		d := writeSample(t)
		if err := os.Rename(d.PagesPath(101), d.PagesPath(100)); err != nil {
			t.Fatal(err)
		}
		if _, err := d.ReadPageMap(100); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "pid 101") {
			t.Fatalf("got %v", err)
		}
	})
}

func TestIsZero(t *testing.T) {
	for _, n := range []int{0, 1, 7, 8, 9, 63, 64, 65, PageSize - 1, PageSize, PageSize + 1, 3*PageSize + 5} {
		b := make([]byte, n)
		if !IsZero(b) {
			t.Fatalf("%d zero bytes: not zero", n)
		}
		for i := range n {
			b[i] = 1
			if IsZero(b) {
				t.Fatalf("%d bytes with byte %d set: zero", n, i)
			}
			b[i] = 0
		}
	}
}

// benchDir returns a directory on /dev/shm if there is one, so that the
// benchmark measures the writer rather than the disk.
func benchDir(b *testing.B) string {
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		dir, err := os.MkdirTemp("/dev/shm", "phaul-image-bench-")
		if err == nil {
			b.Cleanup(func() { os.RemoveAll(dir) })
			return dir
		}
	}
	return b.TempDir()
}

// BenchmarkPageWriter writes 256 MiB of pages in 4 MiB runs, contiguous
// except for a zero page elided every 64 MiB.
func BenchmarkPageWriter(b *testing.B) {
	const total, chunk = 256 << 20, 4 << 20
	data := fill(1, chunk/PageSize)
	d := Dir{Path: benchDir(b)}
	b.SetBytes(total)
	b.ResetTimer()
	for range b.N {
		w, err := d.NewPageWriter(7)
		if err != nil {
			b.Fatal(err)
		}
		addr := uint64(0x7f0000000000)
		for off := 0; off < total; off += chunk {
			if off > 0 && off%(64<<20) == 0 {
				if err := w.AddZeroRun(addr, 1); err != nil {
					b.Fatal(err)
				}
				addr += PageSize
			}
			if err := w.AddRun(addr, data); err != nil {
				b.Fatal(err)
			}
			addr += chunk
		}
		if err := w.Close(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkPageWriterSmallRuns writes 64 MiB one page per call, the worst
// case of a dumper that elides zero pages one by one.
func BenchmarkPageWriterSmallRuns(b *testing.B) {
	const total = 64 << 20
	page := fill(1, 1)
	d := Dir{Path: benchDir(b)}
	b.SetBytes(total)
	b.ResetTimer()
	for range b.N {
		w, err := d.NewPageWriter(7)
		if err != nil {
			b.Fatal(err)
		}
		for addr := uint64(0); addr < total; addr += PageSize {
			if err := w.AddRun(addr, page); err != nil {
				b.Fatal(err)
			}
		}
		if err := w.Close(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkIsZero(b *testing.B) {
	buf := make([]byte, 64<<20)
	for i := range buf { // fault in real pages, not the shared zero page
		buf[i] = 1
	}
	clear(buf)
	b.SetBytes(int64(len(buf)))
	b.ResetTimer()
	for range b.N {
		for off := 0; off < len(buf); off += PageSize {
			if !IsZero(buf[off : off+PageSize]) {
				b.Fatal("not zero")
			}
		}
	}
}

func BenchmarkIsZeroCached(b *testing.B) {
	buf := make([]byte, PageSize)
	b.SetBytes(int64(len(buf)))
	for range b.N {
		if !IsZero(buf) {
			b.Fatal("not zero")
		}
	}
}
