package image

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/phaul/phaul/protocol/imagepb"
	"google.golang.org/protobuf/proto"
)

// The fuzzers feed corrupt input to every decoder. Message fuzzers take
// (data, framed): with framed, data is a payload the fuzzer framed with
// good checksums, so that mutations reach the protobuf decoder and the
// validation; without, data is the whole file. Seeds are valid images
// written by the package itself.

var fuzzKinds = map[Kind]proto.Message{
	KindInventory: sampleInventory(),
	KindFiles:     sampleFiles(),
	KindProcess:   sampleProcess(100),
}

func marshal(tb testing.TB, m proto.Message) []byte {
	tb.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// seedSample adds the files of a sample checkpoint to f: for each kind,
// the payload (framed=true) and the whole file (framed=false).
func seedSample(f *testing.F, path string) {
	whole := readFile(f, path)
	f.Add(whole, false)
	_, payload, err := DecodeFrame(whole)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(payload, true)
	f.Add(whole[:len(whole)/2], false)
	f.Add([]byte{}, true)
}

// fuzzFile returns the bytes to write for (data, framed) of kind k.
func fuzzFile(k Kind, data []byte, framed bool) []byte {
	if framed {
		return EncodeFrame(k, data)
	}
	return data
}

// checkReadError checks that a failed read names the file and matches one
// of the sentinels.
func checkReadError(t *testing.T, err error, path string) {
	t.Helper()
	if !bytes.Contains([]byte(err.Error()), []byte(path)) {
		t.Fatalf("error %q does not name %s", err, path)
	}
	for _, s := range []error{ErrBadMagic, ErrVersion, ErrChecksum, ErrTruncated, ErrKind, ErrCorrupt} {
		if errors.Is(err, s) {
			return
		}
	}
	t.Fatalf("error %q matches no sentinel", err)
}

func FuzzDecodeFrame(f *testing.F) {
	d := writeSample(f)
	for _, p := range []string{d.InventoryPath(), d.FilesPath(), d.ProcessPath(100), d.PageMapPath(100)} {
		b := readFile(f, p)
		f.Add(b)
		f.Add(b[:HeaderSize])
	}
	f.Add([]byte("PHAULIMG"))
	f.Fuzz(func(t *testing.T, data []byte) {
		k, payload, err := DecodeFrame(data)
		if err != nil {
			return
		}
		// A frame that decodes is exactly what EncodeFrame makes of it.
		if !bytes.Equal(EncodeFrame(k, payload), data) {
			t.Fatalf("re-encoded frame differs")
		}
	})
}

func FuzzReadInventory(f *testing.F) {
	d := writeSample(f)
	seedSample(f, d.InventoryPath())
	dir := Dir{Path: f.TempDir()}
	out := Dir{Path: f.TempDir()}
	f.Fuzz(func(t *testing.T, data []byte, framed bool) {
		if err := os.WriteFile(dir.InventoryPath(), fuzzFile(KindInventory, data, framed), 0o600); err != nil {
			t.Fatal(err)
		}
		inv, err := dir.ReadInventory()
		if err != nil {
			checkReadError(t, err, dir.InventoryPath())
			return
		}
		if err := out.WriteInventory(inv); err != nil {
			t.Fatalf("a valid inventory does not write back: %v", err)
		}
		again, err := out.ReadInventory()
		if err != nil || !proto.Equal(inv, again) {
			t.Fatalf("round trip: %v", err)
		}
	})
}

func FuzzReadFiles(f *testing.F) {
	d := writeSample(f)
	seedSample(f, d.FilesPath())
	dir := Dir{Path: f.TempDir()}
	out := Dir{Path: f.TempDir()}
	f.Fuzz(func(t *testing.T, data []byte, framed bool) {
		if err := os.WriteFile(dir.FilesPath(), fuzzFile(KindFiles, data, framed), 0o600); err != nil {
			t.Fatal(err)
		}
		ft, err := dir.ReadFiles()
		if err != nil {
			checkReadError(t, err, dir.FilesPath())
			return
		}
		if err := out.WriteFiles(ft); err != nil {
			t.Fatalf("a valid file table does not write back: %v", err)
		}
		again, err := out.ReadFiles()
		if err != nil || !proto.Equal(ft, again) {
			t.Fatalf("round trip: %v", err)
		}
	})
}

func FuzzReadProcess(f *testing.F) {
	d := writeSample(f)
	seedSample(f, d.ProcessPath(100))
	dir := Dir{Path: f.TempDir()}
	out := Dir{Path: f.TempDir()}
	f.Fuzz(func(t *testing.T, data []byte, framed bool) {
		if err := os.WriteFile(dir.ProcessPath(100), fuzzFile(KindProcess, data, framed), 0o600); err != nil {
			t.Fatal(err)
		}
		p, err := dir.ReadProcess(100)
		if err != nil {
			checkReadError(t, err, dir.ProcessPath(100))
			return
		}
		if err := ValidateFDs(p, sampleFiles()); err == nil {
			// Rendering a valid process must work.
			var b bytes.Buffer
			writeProcess(&b, p, sampleFiles(), &imagepb.PageMap{})
		}
		if err := out.WriteProcess(p); err != nil {
			t.Fatalf("a valid process does not write back: %v", err)
		}
		again, err := out.ReadProcess(100)
		if err != nil || !proto.Equal(p, again) {
			t.Fatalf("round trip: %v", err)
		}
	})
}

// FuzzReadPageMap reads a fuzzed page map against a pages file of
// dataPages pages, then reads every run it accepted.
func FuzzReadPageMap(f *testing.F) {
	d := writeSample(f)
	whole := readFile(f, d.PageMapPath(100))
	_, payload, err := DecodeFrame(whole)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(payload, true, uint8(8))
	f.Add(payload, true, uint8(2))
	f.Add(whole, false, uint8(8))
	f.Add(marshal(f, &imagepb.PageMap{Runs: []*imagepb.PageRun{here(0x1000, 2, 4096), zero(0x3000, 1), parent(0x9000, 5)}}), true, uint8(2))
	dir := Dir{Path: f.TempDir()}
	out := Dir{Path: f.TempDir()}
	f.Fuzz(func(t *testing.T, data []byte, framed bool, dataPages uint8) {
		pages := append(encodePagesHeader(100), fill(1, int(dataPages))...)
		if err := os.WriteFile(dir.PagesPath(100), pages, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dir.PageMapPath(100), fuzzFile(KindPageMap, data, framed), 0o600); err != nil {
			t.Fatal(err)
		}
		p, err := OpenPages(dir.Path, 100)
		if err != nil {
			checkReadError(t, err, dir.Path)
			return
		}
		defer p.Close()
		buf := make([]byte, MaxRunPages*PageSize/64)
		for _, r := range p.Runs {
			if r.GetSource() != imagepb.PageSource_PAGES_HERE || RunBytes(r) > len(buf) {
				continue
			}
			if err := p.ReadRun(r, buf); err != nil && !errors.Is(err, ErrChecksum) {
				t.Fatalf("reading an accepted run: %v", err)
			}
		}
		if err := os.WriteFile(out.PagesPath(100), pages, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := out.WritePageMap(100, &imagepb.PageMap{Runs: p.Runs}); err != nil {
			t.Fatalf("a valid page map does not write back: %v", err)
		}
	})
}

// FuzzValidatePageMap checks that a page map ValidatePageMap accepts has
// the properties restore relies on, computed here independently.
func FuzzValidatePageMap(f *testing.F) {
	f.Add(marshal(f, &imagepb.PageMap{Runs: []*imagepb.PageRun{here(0x1000, 2, 4096), zero(0x3000, 1), parent(0x9000, 5)}}), int64(3*PageSize))
	f.Add(marshal(f, &imagepb.PageMap{Runs: []*imagepb.PageRun{zero(0xffffffffffffe000, 1)}}), int64(-1))
	f.Fuzz(func(t *testing.T, data []byte, size int64) {
		pm := new(imagepb.PageMap)
		if proto.Unmarshal(data, pm) != nil {
			return
		}
		if ValidatePageMap(pm, size) != nil {
			return
		}
		var prevEnd uint64
		for i, r := range pm.GetRuns() {
			n := r.GetNrPages()
			end := r.GetAddr() + n*PageSize
			if n == 0 || r.GetAddr()%PageSize != 0 || end <= r.GetAddr() || end/PageSize-r.GetAddr()/PageSize != n {
				t.Fatalf("run %d accepted: %v", i, r)
			}
			if i > 0 && r.GetAddr() < prevEnd {
				t.Fatalf("run %d overlaps", i)
			}
			prevEnd = end
			if r.GetSource() == imagepb.PageSource_PAGES_HERE {
				off := r.GetFileOffset()
				if off < PagesHeaderSize || off%PageSize != 0 || n > MaxRunPages || off+n*PageSize < off ||
					(size >= 0 && off+n*PageSize > uint64(size)) {
					t.Fatalf("run %d accepted: %v (size %d)", i, r, size)
				}
			}
		}
	})
}

// FuzzResolveChain resolves a fuzzed page map against a fuzzed parent (and,
// with loop, a parent whose parent is the child) without files.
func FuzzResolveChain(f *testing.F) {
	f.Add(
		marshal(f, &imagepb.PageMap{Runs: []*imagepb.PageRun{parent(0x10000, 4), zero(0x20000, 1), here(0x30000, 1, 4096), parent(0x40000, 1)}}),
		marshal(f, &imagepb.PageMap{Runs: []*imagepb.PageRun{here(0x10000, 2, 4096), zero(0x12000, 2), here(0x40000, 1, 3*4096)}}),
		false)
	f.Add(
		marshal(f, &imagepb.PageMap{Runs: []*imagepb.PageRun{parent(0x10000, 4)}}),
		marshal(f, &imagepb.PageMap{Runs: []*imagepb.PageRun{parent(0x10000, 4)}}),
		true)
	f.Fuzz(func(t *testing.T, childData, parentData []byte, loop bool) {
		child, par := new(imagepb.PageMap), new(imagepb.PageMap)
		if proto.Unmarshal(childData, child) != nil || proto.Unmarshal(parentData, par) != nil ||
			ValidatePageMap(child, -1) != nil || ValidatePageMap(par, -1) != nil {
			return
		}
		images := map[string]*Pages{
			"/fuzz/child":  {Dir: "/fuzz/child", Runs: child.GetRuns()},
			"/fuzz/parent": {Dir: "/fuzz/parent", Runs: par.GetRuns()},
		}
		parents := map[string]string{"/fuzz/child": "/fuzz/parent", "/fuzz/parent": ""}
		if loop {
			parents["/fuzz/parent"] = "/fuzz/child"
		}
		c := &Chain{pid: 1, open: func(dir string, pid int) (*Pages, string, error) {
			return images[dir], parents[dir], nil
		}}
		if err := c.push("/fuzz/child"); err != nil {
			t.Fatal(err)
		}
		if err := c.resolve(); err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("resolve: %v", err)
			}
			return
		}
		// The extents cover exactly the child's runs, in order.
		var want, got, prevEnd uint64
		for _, r := range child.GetRuns() {
			want += r.GetNrPages()
		}
		for i, e := range c.Extents {
			if e.NrPages == 0 || (i > 0 && e.Addr < prevEnd) {
				t.Fatalf("extent %d: %+v", i, e)
			}
			if in := runsAt(child.GetRuns(), e.Addr, e.End()); len(in) == 0 || in[0].GetAddr() > e.Addr {
				t.Fatalf("extent %d outside the child's runs: %+v", i, e)
			}
			if !e.Zero && (e.Pages == nil || e.Offset < PagesHeaderSize) {
				t.Fatalf("extent %d: %+v", i, e)
			}
			prevEnd = e.End()
			got += e.NrPages
		}
		if got != want {
			t.Fatalf("extents hold %d pages, the child %d", got, want)
		}
	})
}

func FuzzPagesHeader(f *testing.F) {
	f.Add(encodePagesHeader(100))
	f.Add(encodePagesHeader(1)[:20])
	f.Fuzz(func(t *testing.T, data []byte) {
		pid, err := parsePagesHeader(data)
		if err != nil {
			return
		}
		if !bytes.Equal(encodePagesHeader(pid), data[:PagesHeaderSize]) {
			t.Fatal("re-encoded header differs")
		}
	})
}

// FuzzDescribeFile renders fuzzed files of every kind, valid or not.
func FuzzDescribeFile(f *testing.F) {
	d := writeSample(f)
	for k, m := range fuzzKinds {
		f.Add(marshal(f, m), true, uint8(k), false)
	}
	f.Add(readFile(f, d.PageMapPath(100)), false, uint8(0), true)
	f.Add(readFile(f, d.PagesPath(100)), false, uint8(0), false)
	path := filepath.Join(f.TempDir(), "x.img")
	f.Fuzz(func(t *testing.T, data []byte, framed bool, kind uint8, json bool) {
		if err := os.WriteFile(path, fuzzFile(Kind(kind), data, framed), 0o600); err != nil {
			t.Fatal(err)
		}
		DescribeFile(io.Discard, path, Options{JSON: json})
	})
}
