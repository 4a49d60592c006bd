package image

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"
)

const chainPID = 42

// op is one call on a PageWriter: data (n pages filled from seed), zero or
// parent.
type op struct {
	addr uint64
	kind byte // 'd' data, 'z' zero, 'p' parent
	n    uint64
	seed byte
}

func writeChainImage(t *testing.T, path, parentPath string, ops []op) Dir {
	t.Helper()
	d := newPredumpDir(t, path, parentPath, chainPID)
	w, err := d.NewPageWriter(chainPID)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range ops {
		switch o.kind {
		case 'd':
			err = w.AddRun(o.addr, fill(o.seed, int(o.n)))
		case 'z':
			err = w.AddZeroRun(o.addr, o.n)
		case 'p':
			err = w.AddParentRun(o.addr, o.n)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return d
}

// writeThreeLevels writes images 0 (oldest), 1 (parent ../0, relative) and
// 2 (parent: absolute path of 1) under root.
func writeThreeLevels(t *testing.T, root string) (img0, img1, img2 string) {
	img0, img1, img2 = filepath.Join(root, "0"), filepath.Join(root, "1"), filepath.Join(root, "2")
	writeChainImage(t, img0, "", []op{
		{0x10000, 'd', 4, 10}, // pages 0x10000-0x13fff
		{0x20000, 'z', 2, 0},
		{0x30000, 'd', 2, 30},
		{0x50000, 'd', 1, 50}, // never asked for
	})
	writeChainImage(t, img1, "../0", []op{
		{0x10000, 'd', 2, 110}, // overrides the first 2 pages of image 0
		{0x12000, 'p', 2, 0},
		{0x20000, 'p', 2, 0},
		{0x30000, 'z', 1, 0},
		{0x31000, 'p', 1, 0},
	})
	writeChainImage(t, img2, img1, []op{
		{0x10000, 'p', 4, 0},
		{0x20000, 'p', 2, 0},
		{0x30000, 'p', 2, 0},
		{0x40000, 'd', 1, 240},
	})
	return img0, img1, img2
}

func TestChainThreeLevels(t *testing.T) {
	img0, img1, img2 := writeThreeLevels(t, t.TempDir())
	c, err := OpenChain(img2, chainPID)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if len(c.Images) != 3 {
		t.Fatalf("%d images opened, want 3", len(c.Images))
	}
	type want struct {
		addr, n uint64
		dir     string
		depth   int
		zero    bool
		seed    byte // data: the pages were filled from seed, starting at page index first
		first   int
	}
	wants := []want{
		{0x10000, 2, img1, 1, false, 110, 0},
		{0x12000, 2, img0, 2, false, 10, 2},
		{0x20000, 2, img0, 2, true, 0, 0},
		{0x30000, 1, img1, 1, true, 0, 0},
		{0x31000, 1, img0, 2, false, 30, 1},
		{0x40000, 1, img2, 0, false, 240, 0},
	}
	if len(c.Extents) != len(wants) {
		t.Fatalf("extents %+v, want %d", c.Extents, len(wants))
	}
	for i, w := range wants {
		e := c.Extents[i]
		if e.Addr != w.addr || e.NrPages != w.n || e.Dir != w.dir || e.Depth != w.depth || e.Zero != w.zero {
			t.Errorf("extent %d: %+v, want %+v", i, e, w)
			continue
		}
		if e.Zero {
			if e.Pages != nil {
				t.Errorf("zero extent %d has pages", i)
			}
			continue
		}
		got := make([]byte, e.NrPages*PageSize)
		if _, err := e.Pages.File().ReadAt(got, e.Offset); err != nil {
			t.Fatal(err)
		}
		all := fill(w.seed, w.first+int(w.n))
		if !bytes.Equal(got, all[w.first*PageSize:]) {
			t.Errorf("extent %d at %#x: wrong data", i, e.Addr)
		}
	}
	if err := c.Verify(); err != nil {
		t.Fatal(err)
	}
}

func TestChainNoParentNeeded(t *testing.T) {
	// An image that names a missing parent but never needs it resolves.
	root := t.TempDir()
	d := writeChainImage(t, filepath.Join(root, "1"), "../missing", []op{{0x1000, 'd', 1, 1}, {0x2000, 'z', 1, 0}})
	c, err := OpenChain(d.Path, chainPID)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if len(c.Images) != 1 || len(c.Extents) != 2 {
		t.Fatalf("images %d extents %+v", len(c.Images), c.Extents)
	}
}

func TestChainErrors(t *testing.T) {
	t.Run("missing parent", func(t *testing.T) {
		root := t.TempDir()
		d := writeChainImage(t, filepath.Join(root, "1"), "../missing", []op{{0x7000, 'p', 1, 0}})
		_, err := OpenChain(d.Path, chainPID)
		if !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("got %v, want not exist", err)
		}
		for _, s := range []string{d.Path, "0x7000", "missing"} {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("error %q does not say %q", err, s)
			}
		}
	})
	t.Run("no parent", func(t *testing.T) {
		d := writeChainImage(t, t.TempDir(), "", []op{{0x7000, 'p', 1, 0}})
		_, err := OpenChain(d.Path, chainPID)
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "0x7000") || !strings.Contains(err.Error(), d.Path) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("parent lacks pages", func(t *testing.T) {
		root := t.TempDir()
		p := writeChainImage(t, filepath.Join(root, "0"), "", []op{{0x7000, 'd', 1, 1}, {0x9000, 'z', 1, 0}})
		d := writeChainImage(t, filepath.Join(root, "1"), "../0", []op{{0x7000, 'p', 3, 0}})
		_, err := OpenChain(d.Path, chainPID)
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "0x8000") || !strings.Contains(err.Error(), p.Path) {
			t.Fatalf("got %v, want the hole at 0x8000 in %s", err, p.Path)
		}
	})
	t.Run("parent without process", func(t *testing.T) {
		root := t.TempDir()
		newPredumpDir(t, filepath.Join(root, "0"), "", chainPID+1)
		d := writeChainImage(t, filepath.Join(root, "1"), "../0", []op{{0x7000, 'p', 1, 0}})
		_, err := OpenChain(d.Path, chainPID)
		if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), PagesFile(chainPID)) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("loop", func(t *testing.T) {
		root := t.TempDir()
		writeChainImage(t, filepath.Join(root, "a"), "../b", []op{{0x7000, 'p', 1, 0}})
		writeChainImage(t, filepath.Join(root, "b"), "../a", []op{{0x7000, 'p', 1, 0}})
		_, err := OpenChain(filepath.Join(root, "a"), chainPID)
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "loop") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("self", func(t *testing.T) {
		d := writeChainImage(t, t.TempDir(), ".", []op{{0x7000, 'p', 1, 0}})
		_, err := OpenChain(d.Path, chainPID)
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "loop") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("too deep", func(t *testing.T) {
		root := t.TempDir()
		writeChainImage(t, filepath.Join(root, "0"), "", []op{{0x7000, 'd', 1, 1}})
		for i := 1; i <= MaxChainDepth+1; i++ {
			writeChainImage(t, filepath.Join(root, fmt.Sprint(i)), fmt.Sprintf("../%d", i-1), []op{{0x7000, 'p', 1, 0}})
		}
		// MaxChainDepth parents resolve; one more does not.
		c, err := OpenChain(filepath.Join(root, fmt.Sprint(MaxChainDepth)), chainPID)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		_, err = OpenChain(filepath.Join(root, fmt.Sprint(MaxChainDepth+1)), chainPID)
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "deeper") {
			t.Fatalf("got %v", err)
		}
	})
}
