package engine

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

func TestParseSysvShm(t *testing.T) {
	const text = `       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap
1346939393          6   640                 12788 17699 17699      4     0     0     0     0 1795341920          0 1795341920                 16384                     0
         0      32769  1600                  5000  3194  3194      1  1000   100     0     0 1795341920          0 1795341920                     0                     0
`
	got, err := parseSysvShm(text)
	if err != nil {
		t.Fatal(err)
	}
	if s := got[6]; s == nil || s.key != 0x5048aa01 || s.size != 12788 || s.mode != 0o640 {
		t.Errorf("segment 6: %+v", s)
	}
	if s := got[32769]; s == nil || s.key != 0 || s.mode&sys.SHM_DEST == 0 || s.uid != 1000 || s.gid != 100 {
		t.Errorf("segment 32769: %+v", s)
	}
	if _, err := parseSysvShm("header\n1 2 3\n"); err == nil {
		t.Error("short line accepted")
	}
	if got, err := parseSysvShm("header only\n"); err != nil || len(got) != 0 {
		t.Errorf("no segments: %v %v", got, err)
	}
}

func sysvVMA(start, pages, pgoff uint64, id uint32) *imagepb.VMA {
	return &imagepb.VMA{Start: start, End: start + pages*pageSize, Pgoff: pgoff * pageSize, Kind: imagepb.VMAKind_VMA_SYSV_SHM, Shmem: id}
}

func TestCheckSysVAttachments(t *testing.T) {
	objs := []*imagepb.Shmem{{Id: 1, Size: 3*pageSize + 500}, {Id: 2, Size: pageSize}}
	const a = 0x7f0000000000
	cases := []struct {
		name string
		vmas []*imagepb.VMA
		want string
	}{
		{"whole", []*imagepb.VMA{sysvVMA(a, 4, 0, 1)}, ""},
		{"pieces", []*imagepb.VMA{sysvVMA(a, 2, 0, 1), sysvVMA(a+2*pageSize, 1, 2, 1), sysvVMA(a+3*pageSize, 1, 3, 1)}, ""},
		{"two segments", []*imagepb.VMA{sysvVMA(a, 4, 0, 1), sysvVMA(a+4*pageSize, 1, 0, 2)}, ""},
		{"head cut", []*imagepb.VMA{sysvVMA(a, 3, 1, 1)}, "from offset 0x1000"},
		{"tail cut", []*imagepb.VMA{sysvVMA(a, 3, 0, 1)}, "only partly mapped"},
		{"middle cut", []*imagepb.VMA{sysvVMA(a, 1, 0, 1), sysvVMA(a+2*pageSize, 2, 2, 1)}, "only partly mapped"},
		{"other segment inside", []*imagepb.VMA{sysvVMA(a, 1, 0, 1), sysvVMA(a+pageSize, 3, 1, 2)}, "only partly mapped"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := checkSysVAttachments(42, tc.vmas, objs)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrUnsupported saying %q", err, tc.want)
			}
		})
	}
}

func TestMigratable(t *testing.T) {
	anon := func(start, pages, pgoff, ino uint64) *imagepb.VMA {
		return &imagepb.VMA{Start: start, End: start + pages*pageSize, Pgoff: pgoff * pageSize, Kind: imagepb.VMAKind_VMA_ANON_SHARED, Shmid: ino}
	}
	cases := []struct {
		name string
		vmas []*imagepb.VMA
		want string
	}{
		{"anon", []*imagepb.VMA{anon(0x10000, 4, 0, 7), anon(0x20000, 4, 0, 8)}, ""},
		{"anon split", []*imagepb.VMA{anon(0x10000, 2, 0, 7), anon(0x30000, 2, 2, 7)}, ""},
		{"anon aliased", []*imagepb.VMA{anon(0x10000, 4, 0, 7), anon(0x30000, 2, 3, 7)}, "mapped at both 0x10000-0x14000 and 0x30000-0x32000"},
		{"memfd", []*imagepb.VMA{{Start: 0x10000, End: 0x11000, Kind: imagepb.VMAKind_VMA_SHMEM, Path: "/memfd:x"}}, "mapping 0x10000-0x11000 (/memfd:x) is a shared memory object"},
		{"sysv", []*imagepb.VMA{sysvVMA(0x10000, 1, 0, 0)}, "is a shared memory object"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := migratable(tc.vmas)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrUnsupported saying %q", err, tc.want)
			}
			if validateLayout(tc.vmas) == nil {
				t.Error("a shadow would take this layout")
			}
		})
	}
}

func TestHasPages(t *testing.T) {
	for _, tc := range []struct {
		v    *imagepb.VMA
		want bool
	}{
		{&imagepb.VMA{Kind: imagepb.VMAKind_VMA_ANON_SHARED}, true}, // a migration's layout
		{&imagepb.VMA{Kind: imagepb.VMAKind_VMA_ANON_SHARED, Shmem: 3}, false},
		{&imagepb.VMA{Kind: imagepb.VMAKind_VMA_SHMEM, Shmem: 3}, false},
		{&imagepb.VMA{Kind: imagepb.VMAKind_VMA_SYSV_SHM, Shmem: 3}, false},
		{&imagepb.VMA{Kind: imagepb.VMAKind_VMA_ANON_PRIVATE}, true},
	} {
		if got := hasPages(tc.v); got != tc.want {
			t.Errorf("hasPages(%v) = %v", tc.v, got)
		}
	}
}

// writeMemfd makes a memfd of size bytes holding the given pages (the
// rest holes) and returns it.
func writeMemfd(t *testing.T, size int64, pages map[int64][]byte) int {
	t.Helper()
	fd, err := sys.MemfdCreate("phaul-test", sys.MFD_CLOEXEC|sys.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sys.Close(fd) })
	if err := sys.Ftruncate(fd, size); err != nil {
		t.Fatal(err)
	}
	if len(pages) > 0 {
		mem, err := sys.MapShared(fd, int(pageUp(uint64(size))), sys.PROT_READ|sys.PROT_WRITE)
		if err != nil {
			t.Fatal(err)
		}
		for off, b := range pages {
			copy(mem[off:], b)
		}
		if err := sys.Munmap(mem); err != nil {
			t.Fatal(err)
		}
	}
	return fd
}

func page(b byte) []byte { return bytes.Repeat([]byte{b}, pageSize) }

func TestCopyShmem(t *testing.T) {
	// Pages 0, 1 data, 2 zero (allocated), 3-5 holes, 6 data, 7 partly
	// past the size with data there.
	size := int64(7*pageSize + 100)
	tail := page(9)
	fd := writeMemfd(t, size, map[int64][]byte{0: page(1), pageSize: page(2), 2 * pageSize: make([]byte, pageSize), 6 * pageSize: page(6), 7 * pageSize: tail})
	type run struct {
		off uint64
		n   int
	}
	var got []run
	var data []byte
	err := copyShmem(fd, uint64(size), func(off uint64, b []byte) error {
		got = append(got, run{off, len(b) / pageSize})
		data = append(data, b...)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []run{{0, 2}, {6 * pageSize, 2}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("runs %v, want %v", got, want)
	}
	if !bytes.Equal(data, bytes.Join([][]byte{page(1), page(2), page(6), tail}, nil)) {
		t.Error("copied data differs")
	}
}

// TestShmemRoundTrip saves objects with writeShmem and makes them again
// with createShmem, the way dump and restore do.
func TestShmemRoundTrip(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("shared anonymous memory is taken through /proc/self/map_files, which needs root")
	}
	d := image.Dir{Path: t.TempDir()}
	size := int64(3*pageSize + 1234)
	content := map[int64][]byte{0: page(1), 2 * pageSize: page(3), 3 * pageSize: page(4)}
	src := writeMemfd(t, size, content)
	if _, err := sys.FcntlInt(src, sys.F_ADD_SEALS, sys.F_SEAL_GROW|sys.F_SEAL_SHRINK); err != nil {
		t.Fatal(err)
	}
	srcPath := "/proc/self/fd/" + strconv.Itoa(src)
	deleted := filepath.Join(t.TempDir(), "gone")
	objs := []*imagepb.Shmem{
		{Id: 1, Kind: imagepb.ShmemKind_SHMEM_MEMFD, Size: uint64(size), Name: "phaul-rt", Mode: 0o644, Seals: sys.F_SEAL_GROW | sys.F_SEAL_SHRINK},
		{Id: 2, Kind: imagepb.ShmemKind_SHMEM_DELETED_FILE, Size: uint64(size), Name: deleted, Mode: 0o640},
		{Id: 3, Kind: imagepb.ShmemKind_SHMEM_ANON, Size: 4 * pageSize, Mode: 0o777},
	}
	for _, o := range objs {
		if err := writeShmem(d, o, srcPath); err != nil {
			t.Fatal(err)
		}
		if len(o.Runs) != 2 {
			t.Fatalf("object %d: runs %v, want pages 0 and 2-3", o.Id, o.Runs)
		}
		fd, err := createShmem(d.Path, o)
		if err != nil {
			t.Fatalf("object %d: %v", o.Id, err)
		}
		defer sys.Close(fd)
		st, err := sys.Fstat(fd)
		if err != nil {
			t.Fatal(err)
		}
		if uint64(st.Size) != o.Size || st.Mode&0o7777 != o.Mode || st.Nlink != 0 {
			t.Errorf("object %d: size %d mode %#o links %d", o.Id, st.Size, st.Mode&0o7777, st.Nlink)
		}
		if seals, _ := sys.FcntlInt(fd, sys.F_GET_SEALS, 0); o.Kind == imagepb.ShmemKind_SHMEM_MEMFD && uint32(seals) != o.Seals {
			t.Errorf("object %d: seals %#x", o.Id, seals)
		}
		mem, err := sys.MapShared(fd, int(pageUp(o.Size)), sys.PROT_READ)
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, pageUp(o.Size))
		for off, b := range content {
			copy(want[off:], b)
		}
		if !bytes.Equal(mem, want) {
			t.Errorf("object %d: contents differ", o.Id)
		}
		sys.Munmap(mem)
		link, _ := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
		wantLink := map[imagepb.ShmemKind]string{
			imagepb.ShmemKind_SHMEM_MEMFD: "/memfd:phaul-rt (deleted)", imagepb.ShmemKind_SHMEM_DELETED_FILE: deleted + " (deleted)",
			imagepb.ShmemKind_SHMEM_ANON: "/dev/zero (deleted)",
		}[o.Kind]
		if link != wantLink {
			t.Errorf("object %d is %s, want %s", o.Id, link, wantLink)
		}
	}
	if _, err := os.Stat(deleted); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the deleted file's name is back: %v", err)
	}
	// Its name taken: an unnamed file of the same directory.
	if err := os.WriteFile(deleted, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	fd, err := createDeleted(deleted)
	if err != nil {
		t.Fatal(err)
	}
	link, _ := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	sys.Close(fd)
	if filepath.Dir(link) != filepath.Dir(deleted) || !strings.HasSuffix(link, " (deleted)") {
		t.Errorf("with its name taken, the deleted file was made as %s", link)
	}
	// A corrupt image is refused.
	o := objs[0]
	b, err := os.ReadFile(d.ShmemPath(o.Id))
	if err != nil {
		t.Fatal(err)
	}
	b[image.PagesHeaderSize+10] ^= 1
	if err := os.WriteFile(d.ShmemPath(o.Id), b, 0o600); err != nil {
		t.Fatal(err)
	}
	if fd, err := createShmem(d.Path, o); !errors.Is(err, image.ErrChecksum) {
		sys.Close(fd)
		t.Fatalf("corrupt contents: got %v", err)
	}
}
