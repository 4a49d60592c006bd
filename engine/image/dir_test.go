package image

import (
	"errors"
	"io/fs"
	"os"
	"strings"
	"testing"

	"github.com/phaul/phaul/protocol/imagepb"
	"google.golang.org/protobuf/proto"
)

func TestLoad(t *testing.T) {
	d := writeSample(t)
	cp, err := Load(d.Path)
	if err != nil {
		t.Fatal(err)
	}
	if cp.Dir != d.Path || !proto.Equal(cp.Inventory, sampleInventory()) || !proto.Equal(cp.Files, sampleFiles()) {
		t.Fatalf("checkpoint header differs: %+v", cp)
	}
	if len(cp.Processes) != 3 {
		t.Fatalf("%d processes, want 3", len(cp.Processes))
	}
	for _, pid := range []int{100, 101} {
		p := cp.Process(pid)
		if p == nil || !proto.Equal(p.State, sampleProcess(int32(pid))) || len(p.PageMap.GetRuns()) != 5 {
			t.Errorf("process %d: %+v", pid, p)
		}
	}
	if z := cp.Process(102); z == nil || z.State != nil || z.PageMap != nil || !z.Entry.GetZombie() {
		t.Errorf("zombie: %+v", z)
	}
	if cp.Process(5) != nil {
		t.Error("Process(5) found a process")
	}
}

func TestLoadErrors(t *testing.T) {
	cases := []struct {
		name string
		edit func(t *testing.T, d Dir)
		want error
		msg  string
	}{
		{"no inventory", func(t *testing.T, d Dir) { os.Remove(d.InventoryPath()) }, fs.ErrNotExist, InventoryFile},
		{"no files", func(t *testing.T, d Dir) { os.Remove(d.FilesPath()) }, fs.ErrNotExist, FilesFile},
		{"no process", func(t *testing.T, d Dir) { os.Remove(d.ProcessPath(101)) }, fs.ErrNotExist, ProcessFile(101)},
		{"no pagemap", func(t *testing.T, d Dir) { os.Remove(d.PageMapPath(101)) }, fs.ErrNotExist, PageMapFile(101)},
		{"no pages", func(t *testing.T, d Dir) { os.Remove(d.PagesPath(100)) }, fs.ErrNotExist, PagesFile(100)},
		{"pid mismatch", func(t *testing.T, d Dir) {
			if err := os.Rename(d.ProcessPath(101), d.ProcessPath(100)); err != nil {
				t.Fatal(err)
			}
		}, ErrCorrupt, "holds pid 101"},
		{"fd names missing file", func(t *testing.T, d Dir) {
			ft := sampleFiles()
			ft.Files = ft.Files[:2]
			if err := d.WriteFiles(ft); err != nil {
				t.Fatal(err)
			}
		}, ErrCorrupt, "names file 3"},
		{"pages outside mappings", func(t *testing.T, d Dir) {
			p := sampleProcess(100)
			p.Vmas = p.Vmas[:1]
			if err := d.WriteProcess(p); err != nil {
				t.Fatal(err)
			}
		}, ErrCorrupt, "outside every mapping"},
		{"corrupt pagemap", func(t *testing.T, d Dir) {
			b := readFile(t, d.PageMapPath(100))
			if err := os.WriteFile(d.PageMapPath(100), flipByte(b, len(b)-2), 0o600); err != nil {
				t.Fatal(err)
			}
		}, ErrChecksum, PageMapFile(100)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := writeSample(t)
			tc.edit(t, d)
			_, err := Load(d.Path)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v, want %v saying %q", err, tc.want, tc.msg)
			}
		})
	}
}

func TestLoadPredump(t *testing.T) {
	// A pre-dump with page maps only: no file table, no process images.
	d := writeSample(t)
	inv := sampleInventory()
	inv.Predump = true
	if err := d.WriteInventory(inv); err != nil {
		t.Fatal(err)
	}
	os.Remove(d.FilesPath())
	os.Remove(d.ProcessPath(100))
	// A process image without a file table may not have descriptors.
	if _, err := Load(d.Path); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "no file table") {
		t.Fatalf("got %v", err)
	}
	p := sampleProcess(101)
	p.Fds = nil
	if err := d.WriteProcess(p); err != nil {
		t.Fatal(err)
	}
	cp, err := Load(d.Path)
	if err != nil {
		t.Fatal(err)
	}
	if cp.Files != nil || cp.Process(100).State != nil || cp.Process(100).PageMap == nil || cp.Process(101).State == nil {
		t.Errorf("got %+v", cp)
	}
	// Page maps stay required.
	os.Remove(d.PageMapPath(100))
	if _, err := Load(d.Path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("got %v", err)
	}
}

func TestWritePageMapNeedsPages(t *testing.T) {
	d := Dir{Path: t.TempDir()}
	err := d.WritePageMap(3, &imagepb.PageMap{})
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), PageMapFile(3)) {
		t.Fatalf("got %v", err)
	}
}
