package feature_test

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/phaul/phaul/internal/feature"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root, as phaul does")
	}
}

// capEff reports whether capability bit is effective, read independently of
// the package under test.
func capEff(t *testing.T, bit uint) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			m, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return m&(1<<bit) != 0
		}
	}
	t.Fatal("no CapEff in /proc/self/status")
	return false
}

// The mechanisms DESIGN.md records as working on our machines (root,
// kernel 6.18): each probe must find them.
func TestPresentAsMeasured(t *testing.T) {
	needRoot(t)
	for _, tc := range []struct {
		name  string
		probe func() error
	}{
		{feature.NamePtraceSeize, feature.PtraceSeize},
		{feature.NameProcessVM, feature.ProcessVM},
		{feature.NameClone3SetTid, feature.Clone3SetTid},
		{feature.NamePRSetMMMap, feature.PRSetMMMap},
		{feature.NameRseqConfig, feature.RseqConfig},
		{feature.NameVDSOLayout, feature.VDSO},
		{feature.NamePidfdGetfd, feature.PidfdGetfd},
		{feature.NameUffdWPAsync, feature.UffdWPAsync},
		{feature.NamePagemapScan, feature.PagemapScan},
		{feature.NameMemfdCreate, feature.MemfdCreate},
		{feature.NamePidMax, feature.PidMax},
		{feature.NameUnprivilegedUFD, feature.UnprivilegedUserfaultfd},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.probe(); err != nil {
				t.Fatal(err)
			}
			if err := feature.Check(tc.name); err != nil {
				t.Fatalf("Check(%s) = %v after the probe said present", tc.name, err)
			}
		})
	}
}

// softDirtyWorks writes a fresh page and reads its pagemap entry directly:
// bit 55 set after a write is what soft-dirty tracking needs.
func softDirtyWorks(t *testing.T) bool {
	t.Helper()
	page, err := sys.Mmap(-1, 0, sys.Pagesize, sys.PROT_READ|sys.PROT_WRITE, sys.MAP_PRIVATE|sys.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Munmap(page)
	page[0] = 1
	addr, err := sys.BufferAddr(page)
	if err != nil {
		t.Fatal(err)
	}
	pm, err := os.Open("/proc/self/pagemap")
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	var e [8]byte
	if _, err := pm.ReadAt(e[:], int64(addr/uint64(sys.Pagesize))*8); err != nil {
		t.Fatal(err)
	}
	entry := binary.LittleEndian.Uint64(e[:])
	if entry&(1<<63) == 0 {
		t.Fatalf("written page not present in pagemap: %#x", entry)
	}
	return entry&(1<<55) != 0
}

func TestSoftDirty(t *testing.T) {
	err := feature.SoftDirty()
	if softDirtyWorks(t) {
		if err != nil {
			t.Fatalf("pagemap bit 55 gets set, yet the probe says %v", err)
		}
		return
	}
	if !errors.Is(err, feature.ErrNotSupported) {
		t.Fatalf("pagemap bit 55 never gets set, yet the probe says %v", err)
	}
	for _, want := range []string{"soft-dirty: absent", "bit 55", "userfaultfd write-protect"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("message %q lacks %q", err, want)
		}
	}
}

func TestTCPRepair(t *testing.T) {
	err := feature.TCPRepair()
	if capEff(t, 12) { // CAP_NET_ADMIN
		if err != nil {
			t.Fatalf("CAP_NET_ADMIN is effective, yet %v", err)
		}
		return
	}
	if !errors.Is(err, feature.ErrNotSupported) || !errors.Is(err, sys.EPERM) {
		t.Fatalf("without CAP_NET_ADMIN: %v, want absent with EPERM", err)
	}
}

func result(t *testing.T, name string) feature.Result {
	t.Helper()
	for _, r := range feature.All() {
		if r.Name == name {
			return r
		}
	}
	t.Fatalf("All() has no %s", name)
	return feature.Result{}
}

func TestPRSetMMMapNotesCapSysResource(t *testing.T) {
	needRoot(t)
	r := result(t, feature.NamePRSetMMMap)
	if !r.OK || !strings.Contains(r.Detail, "104 B") {
		t.Fatalf("%+v", r)
	}
	want := "CAP_SYS_RESOURCE absent"
	if capEff(t, 24) {
		want = "CAP_SYS_RESOURCE present"
	}
	if !strings.Contains(r.Detail, want) {
		t.Errorf("detail %q lacks %q", r.Detail, want)
	}
}

func TestRseqConfigDetail(t *testing.T) {
	needRoot(t)
	if strings.Contains(os.Getenv("GLIBC_TUNABLES"), "rseq=0") {
		t.Skip("rseq disabled in glibc by GLIBC_TUNABLES")
	}
	// DESIGN.md: glibc 2.36 registers a 32-byte area with signature 0x53053053.
	r := result(t, feature.NameRseqConfig)
	if !r.OK || !strings.Contains(r.Detail, "32 B, signature 0x53053053") {
		t.Fatalf("%+v", r)
	}
}

func sysctl(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func TestSysctlDetails(t *testing.T) {
	if r, want := result(t, feature.NamePidMax), "pid_max="+sysctl(t, "/proc/sys/kernel/pid_max"); !strings.Contains(r.Detail, want) {
		t.Errorf("pid-max detail %q lacks %q", r.Detail, want)
	}
	if r, want := result(t, feature.NameUnprivilegedUFD), "unprivileged_userfaultfd="+sysctl(t, "/proc/sys/vm/unprivileged_userfaultfd"); !strings.Contains(r.Detail, want) {
		t.Errorf("unprivileged-userfaultfd detail %q lacks %q", r.Detail, want)
	}
}

// vdsoLines returns the vdso mappings of /proc/self/maps, parsed here
// independently: name -> [start, end).
func vdsoLines(t *testing.T) map[string][2]uint64 {
	t.Helper()
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][2]uint64{}
	s := bufio.NewScanner(f)
	for s.Scan() {
		var lo, hi uint64
		var rest string
		line := s.Text()
		if _, err := fmt.Sscanf(line, "%x-%x", &lo, &hi); err != nil {
			t.Fatalf("maps line %q: %v", line, err)
		}
		if i := strings.LastIndexByte(line, ' '); i >= 0 {
			rest = line[i+1:]
		}
		if rest == "[vvar]" || rest == "[vvar_vclock]" || rest == "[vdso]" {
			out[rest] = [2]uint64{lo, hi}
		}
	}
	return out
}

func TestCurrentVDSOLayout(t *testing.T) {
	l, err := feature.CurrentVDSOLayout()
	testutil.SkipIfNotSupported(t, err)
	want := vdsoLines(t)
	if len(l.Regions) != len(want) {
		t.Fatalf("layout %v, maps %v", l, want)
	}
	for _, r := range l.Regions {
		if w := want[r.Name]; w != [2]uint64{r.Start, r.End} {
			t.Errorf("%s: layout [%#x,%#x), maps %#x", r.Name, r.Start, r.End, w)
		}
	}
	if _, ok := want["[vvar_vclock]"]; ok {
		// DESIGN.md, kernel 6.18: V, V+0x4000, V+0x6000; 4, 2, 2 pages.
		const s = "vvar 4 pages at +0x0, vvar_vclock 2 pages at +0x4000, vdso 2 pages at +0x6000, contiguous"
		if l.String() != s || l.Span() != 0x8000 || !l.Contiguous() {
			t.Errorf("layout %q (span %#x), want %q", l, l.Span(), s)
		}
		if r := result(t, feature.NameVDSOLayout); r.Detail != s {
			t.Errorf("probe detail %q", r.Detail)
		}
	}
}

func TestParseVDSOLayout(t *testing.T) {
	const v618 = `55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
7f6ba89b0000-7f6ba89b4000 r--p 00000000 00:00 0                          [vvar]
7f6ba89b4000-7f6ba89b6000 r--p 00000000 00:00 0                          [vvar_vclock]
7f6ba89b6000-7f6ba89b8000 r-xp 00000000 00:00 0                          [vdso]
7ffd1c3f0000-7ffd1c411000 rw-p 00000000 00:00 0                          [stack]
`
	const old = `7ffc2b3f9000-7ffc2b3fd000 r--p 00000000 00:00 0                          [vvar]
7ffc2b3fd000-7ffc2b3ff000 r-xp 00000000 00:00 0                          [vdso]
`
	const apart = `7f0000000000-7f0000004000 r--p 00000000 00:00 0 [vvar]
7f0000010000-7f0000012000 r-xp 00000000 00:00 0 [vdso]
`
	const none = `7ffd1c3f0000-7ffd1c411000 rw-p 00000000 00:00 0                          [stack]
`
	for _, tc := range []struct {
		name, maps, want string
		base             uint64
	}{
		{"6.18", v618, "vvar 4 pages at +0x0, vvar_vclock 2 pages at +0x4000, vdso 2 pages at +0x6000, contiguous", 0x7f6ba89b0000},
		{"old", old, "vvar 4 pages at +0x0, vdso 2 pages at +0x4000, contiguous", 0x7ffc2b3f9000},
		{"apart", apart, "vvar 4 pages at +0x0, vdso 2 pages at +0x10000, not contiguous", 0x7f0000000000},
	} {
		l, err := feature.ParseVDSOLayout(strings.NewReader(tc.maps))
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if l.String() != tc.want || l.Base() != tc.base {
			t.Errorf("%s: %q at %#x, want %q at %#x", tc.name, l, l.Base(), tc.want, tc.base)
		}
		if r, ok := l.Region("[vdso]"); !ok || r.Size() != 0x2000 {
			t.Errorf("%s: [vdso] = %+v, %v", tc.name, r, ok)
		}
	}
	if l, err := feature.ParseVDSOLayout(strings.NewReader(none)); err == nil {
		t.Errorf("maps without [vdso] gave %v", l)
	}
	if _, err := feature.ParseVDSOLayout(strings.NewReader("zz-10 r--p 0 00:00 0 [vdso]\n")); err == nil {
		t.Error("bad address accepted")
	}
}

func TestAllIsCachedAndOrdered(t *testing.T) {
	a, b := feature.All(), feature.All()
	fs := feature.Features()
	if len(a) != len(fs) || len(b) != len(fs) {
		t.Fatalf("All() gave %d and %d results for %d features", len(a), len(b), len(fs))
	}
	for i, f := range fs {
		if a[i].Name != f.Name || a[i] != b[i] {
			t.Errorf("result %d: %+v then %+v (feature %s)", i, a[i], b[i], f.Name)
		}
		if a[i].OK != (a[i].Err == nil) {
			t.Errorf("%s: OK %v with error %v", f.Name, a[i].OK, a[i].Err)
		}
		if a[i].Err != nil && !errors.Is(a[i].Err, feature.ErrNotSupported) {
			t.Errorf("%s: probe could not run: %v", f.Name, a[i].Err)
		}
	}
}

// fakeTB records what SkipIfNotSupported asks of a test.
type fakeTB struct {
	testing.TB
	skipped, failed string
}

func (f *fakeTB) Helper()           {}
func (f *fakeTB) Skip(args ...any)  { f.skipped = fmt.Sprint(args...) }
func (f *fakeTB) Fatal(args ...any) { f.failed = fmt.Sprint(args...) }

func TestSkipIfNotSupported(t *testing.T) {
	absentErr := &feature.NotSupportedError{Feature: "x", Reason: "gone", Consequence: "slower"}
	for _, tc := range []struct {
		err           error
		skip, fail    bool
		name, message string
	}{
		{name: "nil"},
		{name: "absent", err: fmt.Errorf("wrapped: %w", absentErr), skip: true, message: "x: absent (gone): slower"},
		{name: "broken", err: errors.New("probe failed"), fail: true, message: "probe failed"},
	} {
		f := &fakeTB{TB: t}
		testutil.SkipIfNotSupported(f, tc.err)
		if (f.skipped != "") != tc.skip || (f.failed != "") != tc.fail {
			t.Errorf("%s: skipped %q, failed %q", tc.name, f.skipped, f.failed)
		}
		if got := f.skipped + f.failed; !strings.Contains(got, tc.message) {
			t.Errorf("%s: reason %q lacks %q", tc.name, got, tc.message)
		}
	}
}
