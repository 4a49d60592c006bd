package image

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"strings"
	"testing"

	"github.com/phaul/phaul/protocol/imagepb"
	"google.golang.org/protobuf/proto"
)

// Sample shared memory: object 1, shared anonymous memory of 6 pages with
// data in pages 0-1 and 4 (pages 2-3 and 5 are holes), mapped by process
// 100 at shmStart with offset 0; object 2, a SysV segment of 5000 bytes
// (2 pages, the second one partly past its size, and holding data there)
// attached by process 100 in two pieces of different protection.
const (
	shmStart  = 0x7f0000000000
	sysvStart = 0x7f0000100000
)

func sampleShmem() []*imagepb.Shmem {
	return []*imagepb.Shmem{
		{Id: 1, Kind: imagepb.ShmemKind_SHMEM_ANON, Size: 6 * PageSize, Dev: 1, Inode: 5998, Mode: 0o777},
		{Id: 2, Kind: imagepb.ShmemKind_SHMEM_SYSV, Size: 5000, Dev: 1, Inode: 32769, Mode: 0o640,
			Sysv: &imagepb.SysVShm{Key: 0x1234, Shmid: 32769, Attaches: 2}},
	}
}

// writeShmemSample writes the sample checkpoint with the sample objects in
// its file table and their mappings in process 100. It returns the objects
// as written (with their runs).
func writeShmemSample(t testing.TB) (Dir, []*imagepb.Shmem) {
	t.Helper()
	d := writeSample(t)
	objs := sampleShmem()
	writeObj := func(o *imagepb.Shmem, parts ...[]byte) {
		t.Helper()
		w, err := d.NewShmemWriter(o)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < len(parts); i += 2 {
			off := uint64(parts[i][0]) * PageSize
			if err := w.Add(off, parts[i+1]); err != nil {
				w.Abort()
				t.Fatal(err)
			}
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	writeObj(objs[0], []byte{0}, fill(1, 2), []byte{4}, fill(9, 1))
	writeObj(objs[1], []byte{0}, fill(20, 2))
	ft := sampleFiles()
	ft.Shmem = objs
	if err := d.WriteFiles(ft); err != nil {
		t.Fatal(err)
	}
	p := sampleProcess(100)
	p.Vmas = append(p.Vmas[:1],
		&imagepb.VMA{Start: shmStart, End: shmStart + 6*PageSize, Prot: 3, Flags: 1, Kind: imagepb.VMAKind_VMA_ANON_SHARED, Shmem: 1},
		&imagepb.VMA{Start: sysvStart, End: sysvStart + PageSize, Prot: 1, Flags: 1, Kind: imagepb.VMAKind_VMA_SYSV_SHM, Shmem: 2, Shmid: 32769},
		&imagepb.VMA{Start: sysvStart + PageSize, End: sysvStart + 2*PageSize, Pgoff: PageSize, Prot: 3, Flags: 1, Kind: imagepb.VMAKind_VMA_SYSV_SHM, Shmem: 2, Shmid: 32769},
		p.Vmas[1])
	if err := d.WriteProcess(p); err != nil {
		t.Fatal(err)
	}
	return d, objs
}

// readObject reads the whole contents of o back, holes as zeros.
func readObject(t *testing.T, dir string, o *imagepb.Shmem) []byte {
	t.Helper()
	s, err := OpenShmem(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	out := make([]byte, pageRound(o.GetSize()))
	for _, r := range o.GetRuns() {
		if err := s.ReadRun(r, out[r.GetOffset():]); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

func TestShmemRoundTrip(t *testing.T) {
	d, objs := writeShmemSample(t)
	assertNoTempFiles(t, d.Path)
	cp, err := Load(d.Path)
	if err != nil {
		t.Fatal(err)
	}
	if got := cp.Files.GetShmem(); len(got) != 2 || !proto.Equal(got[0], objs[0]) || !proto.Equal(got[1], objs[1]) {
		t.Fatalf("objects differ after load: %v", got)
	}
	// Object 1: pages 0-1 merged into one run, page 4 another; holes stay out.
	if runs := objs[0].GetRuns(); len(runs) != 2 || runs[0].GetNrPages() != 2 || runs[1].GetOffset() != 4*PageSize {
		t.Fatalf("runs of object 1: %v", runs)
	}
	want := make([]byte, 6*PageSize)
	copy(want, fill(1, 2))
	copy(want[4*PageSize:], fill(9, 1))
	if got := readObject(t, d.Path, cp.Files.GetShmem()[0]); !bytes.Equal(got, want) {
		t.Error("object 1 reads back different")
	}
	// Object 2 keeps the bytes of its last page past its size.
	if got := readObject(t, d.Path, cp.Files.GetShmem()[1]); !bytes.Equal(got, fill(20, 2)) {
		t.Error("object 2 reads back different")
	}
	var out bytes.Buffer
	if err := Describe(&out, cp, Options{}); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{`shmem 1: anon "", 24576 bytes, 3 pages saved`, `shmem 2: sysv "", 5000 bytes, 2 pages saved, mode 0640, seals 0x0, key 0x1234 shmid 32769 removed false`, `sysv_shm`} {
		if !strings.Contains(out.String(), s) {
			t.Errorf("phaul show lacks %q:\n%s", s, out.String())
		}
	}
	out.Reset()
	if err := DescribeFile(&out, d.ShmemPath(1), Options{}); err != nil || !strings.Contains(out.String(), "shared memory object 1, 12.0 KiB") {
		t.Errorf("DescribeFile: %v\n%s", err, out.String())
	}
	out.Reset()
	if err := DescribeFile(&out, d.ShmemPath(2), Options{JSON: true}); err != nil || !strings.Contains(out.String(), `"object": 2`) {
		t.Errorf("DescribeFile --json: %v\n%s", err, out.String())
	}
}

func TestShmemWriterMisuse(t *testing.T) {
	d := Dir{Path: t.TempDir()}
	o := &imagepb.Shmem{Id: 3, Kind: imagepb.ShmemKind_SHMEM_MEMFD, Size: 3*PageSize + 1}
	w, err := d.NewShmemWriter(o)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Add(PageSize, fill(1, 1)); err != nil {
		t.Fatal(err)
	}
	for name, add := range map[string]func() error{
		"unaligned offset": func() error { return w.Add(PageSize+1, fill(1, 1)) },
		"partial page":     func() error { return w.Add(2*PageSize, make([]byte, 100)) },
		"going back":       func() error { return w.Add(0, fill(1, 1)) },
		"past the object":  func() error { return w.Add(3*PageSize, fill(1, 2)) },
	} {
		if err := add(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// The last page, partly past the size, is fine.
	if err := w.Add(3*PageSize, fill(2, 1)); err != nil {
		t.Fatal(err)
	}
	w.Abort()
	assertNoTempFiles(t, d.Path)
	if _, err := os.Stat(d.ShmemPath(3)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("aborted writer left %s: %v", d.ShmemPath(3), err)
	}
	if _, err := d.NewShmemWriter(&imagepb.Shmem{Kind: imagepb.ShmemKind_SHMEM_ANON}); err == nil {
		t.Error("object id 0 accepted")
	}
}

func TestShmemFileCorruption(t *testing.T) {
	good := func(t *testing.T) (Dir, []byte) {
		d, _ := writeShmemSample(t)
		return d, readFile(t, d.ShmemPath(1))
	}
	cases := []struct {
		name string
		edit func(b []byte) []byte
		want error
	}{
		{"bad magic", func(b []byte) []byte { return flipByte(b, 3) }, ErrBadMagic},
		{"pages magic", func(b []byte) []byte { return append([]byte("PHAULPGS"), b[8:]...) }, ErrBadMagic},
		{"version", func(b []byte) []byte { return flipByte(b, 8) }, ErrVersion},
		{"header crc", func(b []byte) []byte { return flipByte(b, 13) }, ErrChecksum},
		{"reserved", func(b []byte) []byte { return flipByte(b, 3000) }, ErrCorrupt},
		{"empty", func([]byte) []byte { return nil }, ErrTruncated},
		{"in header", func(b []byte) []byte { return b[:100] }, ErrTruncated},
		{"partial page", func(b []byte) []byte { return b[:len(b)-1] }, ErrTruncated},
		{"missing pages", func(b []byte) []byte { return b[:PagesHeaderSize+PageSize] }, ErrCorrupt},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d, b := good(t)
			if err := os.WriteFile(d.ShmemPath(1), tc.edit(b), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := Load(d.Path)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), d.ShmemPath(1)) {
				t.Fatalf("Load: got %v, want %v naming %s", err, tc.want, d.ShmemPath(1))
			}
		})
	}
	t.Run("other object", func(t *testing.T) {
		d, _ := good(t)
		if err := os.Rename(d.ShmemPath(2), d.ShmemPath(1)); err != nil {
			t.Fatal(err)
		}
		if _, err := Load(d.Path); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "object 2") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("missing", func(t *testing.T) {
		d, _ := good(t)
		os.Remove(d.ShmemPath(2))
		if _, err := Load(d.Path); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("data", func(t *testing.T) {
		d, b := good(t)
		if err := os.WriteFile(d.ShmemPath(1), flipByte(b, PagesHeaderSize+PageSize+5), 0o600); err != nil {
			t.Fatal(err)
		}
		cp, err := Load(d.Path) // data is checked when read
		if err != nil {
			t.Fatal(err)
		}
		o := cp.Files.GetShmem()[0]
		s, err := OpenShmem(d.Path, o)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		buf := make([]byte, 2*PageSize)
		if err := s.ReadRun(o.Runs[0], buf); !errors.Is(err, ErrChecksum) || !strings.Contains(err.Error(), "offset 0x0") {
			t.Fatalf("got %v, want ErrChecksum naming the run", err)
		}
		if err := s.ReadRun(o.Runs[0], buf[:10]); err == nil {
			t.Error("short buffer accepted")
		}
		if err := s.ReadRun(&imagepb.ShmemRun{Offset: 6 * PageSize, NrPages: 1, FileOffset: PagesHeaderSize}, buf); !errors.Is(err, ErrCorrupt) {
			t.Errorf("run past the object: got %v", err)
		}
	})
}

func TestValidateShmem(t *testing.T) {
	run := func(off, n, fo uint64) *imagepb.ShmemRun {
		return &imagepb.ShmemRun{Offset: off * PageSize, NrPages: n, FileOffset: fo * PageSize}
	}
	cases := []struct {
		name string
		edit func(o *imagepb.Shmem)
		want string
	}{
		{"valid", func(*imagepb.Shmem) {}, ""},
		{"no id", func(o *imagepb.Shmem) { o.Id = 0 }, "id 0"},
		{"no kind", func(o *imagepb.Shmem) { o.Kind = 0 }, "kind 0"},
		{"unknown kind", func(o *imagepb.Shmem) { o.Kind = 99 }, "kind 99"},
		{"huge", func(o *imagepb.Shmem) { o.Size = MaxShmemSize + 1 }, "more than"},
		{"sysv without details", func(o *imagepb.Shmem) { o.Kind = imagepb.ShmemKind_SHMEM_SYSV }, "SysV details false"},
		{"details without sysv", func(o *imagepb.Shmem) { o.Sysv = &imagepb.SysVShm{} }, "SysV details true"},
		{"unaligned run", func(o *imagepb.Shmem) { o.Runs[0].Offset = 1 }, "not page aligned"},
		{"empty run", func(o *imagepb.Shmem) { o.Runs[0].NrPages = 0 }, "0 pages"},
		{"run past the end", func(o *imagepb.Shmem) { o.Runs = append(o.Runs, run(5, 2, 9)) }, "beyond the object"},
		{"run far past the end", func(o *imagepb.Shmem) { o.Runs[1].Offset = 1 << 62 }, "beyond the object"},
		{"overlap", func(o *imagepb.Shmem) { o.Runs[1].Offset = PageSize }, "overlaps"},
		{"file offset in header", func(o *imagepb.Shmem) { o.Runs[0].FileOffset = 0 }, "inside the header"},
		{"file offset unaligned", func(o *imagepb.Shmem) { o.Runs[0].FileOffset = PagesHeaderSize + 3 }, "not page aligned"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o := &imagepb.Shmem{Id: 7, Kind: imagepb.ShmemKind_SHMEM_MEMFD, Size: 6 * PageSize,
				Runs: []*imagepb.ShmemRun{run(0, 2, 1), run(4, 1, 3)}}
			tc.edit(o)
			checkValidation(t, ValidateShmem(o), tc.want)
		})
	}
	ft := sampleFiles()
	ft.Shmem = sampleShmem()
	checkValidation(t, ValidateFileTable(ft), "")
	ft.Shmem[1].Id = 1
	checkValidation(t, ValidateFileTable(ft), "id 1 used twice")
	ft = sampleFiles()
	ft.Files[1].Kind = imagepb.FileKind_FILE_MEMFD
	checkValidation(t, ValidateFileTable(ft), "memfd without its shared memory object")
	ft.Files[1].Shmem = 9
	checkValidation(t, ValidateFileTable(ft), "object 9 is not in the file table")
}

func TestValidateShmemRefs(t *testing.T) {
	ft := sampleFiles()
	ft.Shmem = sampleShmem()
	vma := func(start, pages, pgoff uint64, kind imagepb.VMAKind, shmem uint32) *imagepb.VMA {
		return &imagepb.VMA{Start: start, End: start + pages*PageSize, Pgoff: pgoff * PageSize, Kind: kind, Shmem: shmem}
	}
	const sysv, anon = imagepb.VMAKind_VMA_SYSV_SHM, imagepb.VMAKind_VMA_ANON_SHARED
	cases := []struct {
		name string
		vmas []*imagepb.VMA
		want string
	}{
		{"whole attachment", []*imagepb.VMA{vma(sysvStart, 2, 0, sysv, 2)}, ""},
		{"two pieces", []*imagepb.VMA{vma(sysvStart, 1, 0, sysv, 2), vma(sysvStart+PageSize, 1, 1, sysv, 2)}, ""},
		{"two attachments", []*imagepb.VMA{vma(sysvStart, 2, 0, sysv, 2), vma(sysvStart+2*PageSize, 2, 0, sysv, 2)}, ""},
		{"anon at an offset", []*imagepb.VMA{vma(shmStart, 2, 3, anon, 1)}, ""},
		{"legacy anon", []*imagepb.VMA{vma(shmStart, 2, 0, anon, 0)}, ""},
		{"missing object", []*imagepb.VMA{vma(shmStart, 2, 0, anon, 5)}, "object 5 is not in the file table"},
		{"wrong kind", []*imagepb.VMA{vma(shmStart, 2, 0, anon, 2)}, "names object 2 of kind SHMEM_SYSV"},
		{"memfd without object", []*imagepb.VMA{vma(shmStart, 2, 0, imagepb.VMAKind_VMA_SHMEM, 0)}, "without its shared memory object"},
		{"private with object", []*imagepb.VMA{vma(shmStart, 2, 0, imagepb.VMAKind_VMA_ANON_PRIVATE, 1)}, "names shared memory object 1"},
		{"partial attachment", []*imagepb.VMA{vma(sysvStart, 1, 0, sysv, 2)}, "before the end of its segment"},
		{"partial, then other", []*imagepb.VMA{vma(sysvStart, 1, 0, sysv, 2), vma(shmStart, 1, 0, anon, 1)}, "before the end"},
		{"tail only", []*imagepb.VMA{vma(sysvStart+PageSize, 1, 1, sysv, 2)}, "not with its attachment"},
		{"gap", []*imagepb.VMA{vma(sysvStart, 1, 0, sysv, 2), vma(sysvStart+2*PageSize, 1, 1, sysv, 2)}, "does not continue"},
		{"too long", []*imagepb.VMA{vma(sysvStart, 3, 0, sysv, 2)}, "longer than its segment"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := sampleProcess(100)
			p.Vmas = tc.vmas
			checkValidation(t, ValidateFDs(p, ft), tc.want)
		})
	}
}

// FuzzShmemFile feeds corrupt contents files to OpenShmem and ReadRun: a
// good file whose start is replaced by head, cut to cut bytes (when
// smaller) and with the byte at flip changed.
func FuzzShmemFile(f *testing.F) {
	d, objs := writeShmemSample(f)
	good := readFile(f, d.ShmemPath(1))
	f.Add(good[:32], uint32(len(good)), uint32(0))
	f.Add([]byte("PHAULSHM"), uint32(len(good)), uint32(PagesHeaderSize+7))
	f.Add([]byte{}, uint32(PagesHeaderSize), uint32(1<<31))
	f.Add([]byte("PHAULPGS"), uint32(100), uint32(3))
	f.Fuzz(func(t *testing.T, head []byte, cut, flip uint32) {
		data := bytes.Clone(good)
		copy(data, head)
		if int(cut) < len(data) {
			data = data[:cut]
		}
		if int(flip) < len(data) {
			data[flip] ^= 0x5a
		}
		dir := t.TempDir()
		path := Dir{Path: dir}.ShmemPath(1)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		var b bytes.Buffer
		_ = describeShmemFile(&b, path, Options{})
		s, err := OpenShmem(dir, objs[0])
		if err != nil {
			checkReadError(t, err, path)
			return
		}
		defer s.Close()
		buf := make([]byte, 2*PageSize)
		for _, r := range objs[0].GetRuns() {
			if err := s.ReadRun(r, buf); err != nil {
				checkReadError(t, err, path)
			}
		}
	})
}
