package tracker_test

import (
	"context"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/internal/testutil"
	"github.com/phaul/phaul/tracker"
)

// backends runs f for each backend, skipping the ones this kernel lacks.
func backends(t *testing.T, f func(t *testing.T, backend string)) {
	for _, b := range tracker.Backends {
		t.Run(b, func(t *testing.T) {
			testutil.SkipIfNotSupported(t, tracker.Supported(b))
			f(t, b)
		})
	}
}

// round runs one round and fails the test on error.
func round(t *testing.T, tr tracker.Tracker) *tracker.Delta {
	t.Helper()
	d, err := tr.Round(context.Background())
	if err != nil {
		t.Fatalf("round: %v", err)
	}
	return d
}

// expect checks that, inside region r, the round reported exactly want,
// and that what it says it saw present is (checkSeen).
func expect(t *testing.T, w *workload, d *tracker.Delta, r, step string, want tracker.Ranges) {
	t.Helper()
	got := tracker.Intersect(d.Dirty, w.span(r))
	if !equal(got, want) {
		t.Errorf("%s: round %d reported pages %s of region %s written, want %s",
			step, d.Round, w.pageNumbers(r, got), r, w.pageNumbers(r, want))
	}
	checkSeen(t, w.Pid, d, step)
}

// checkSeen compares the presence a round reports of the written pages it
// saw (Delta.Seen, Delta.Present) with the page tables, in the private
// anonymous mappings, where a pre-dump round relies on it.
func checkSeen(t *testing.T, pid int, d *tracker.Delta, step string) {
	t.Helper()
	if d.Seen == nil {
		return
	}
	if extra := tracker.Subtract(d.Seen, d.Dirty); len(extra) > 0 {
		t.Errorf("%s: round %d saw pages %s that it does not report written", step, d.Round, extra)
	}
	pm, err := tracker.OpenPagemap(pid)
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	for _, a := range d.Areas {
		if a.File || a.Shared {
			continue
		}
		seen := tracker.Intersect(d.Seen, tracker.Ranges{a.Range})
		if len(seen) == 0 {
			continue
		}
		truth, err := pm.Present(a)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := tracker.Intersect(d.Present, seen), tracker.Intersect(truth, seen); !equal(got, want) {
			t.Errorf("%s: round %d: of the written pages it saw, %s present, the page tables say %s", step, d.Round, got, want)
		}
	}
}

func equal(a, b tracker.Ranges) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestExactPages drives the workload through every kind of change between
// rounds and compares what each backend reports, as sets of pages, with
// what the workload did.
func TestExactPages(t *testing.T) {
	backends(t, func(t *testing.T, backend string) {
		testExactPages(t, backend, false)
	})
}

// TestExactPagesNonRoot repeats it with a process that is not root: the
// injected userfaultfd is then limited to user-mode faults, and writes by
// the kernel must be tracked all the same.
func TestExactPagesNonRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to start a process as another user")
	}
	testutil.SkipIfNotSupported(t, tracker.Supported(tracker.UffdWP))
	testExactPages(t, tracker.UffdWP, true)
}

func testExactPages(t *testing.T, backend string, nonRoot bool) {
	w := startWorkload(t)
	if nonRoot {
		w.do(t, "setuid 65534")
	}
	w.mapRegion(t, "a", 64)
	w.do(t, "write a 0 64 1")

	tr, err := tracker.Start(context.Background(), w.Pid, tracker.Options{Backend: backend})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Stop()
	if tr.Backend() != backend {
		t.Fatalf("backend %s, want %s", tr.Backend(), backend)
	}
	d := round(t, tr)
	if backend == tracker.Hash {
		// No digests yet: every present page.
		expect(t, w, d, "a", "first round", w.span("a"))
	} else {
		expect(t, w, d, "a", "first round", nil)
	}

	w.do(t, "write a 3 5 2")
	expect(t, w, round(t, tr), "a", "user writes", w.pageSet("a", 3, 5, 7, 9, 11))

	expect(t, w, round(t, tr), "a", "nothing written", nil)

	w.do(t, "kread a 20")
	expect(t, w, round(t, tr), "a", "read() into page 20", w.pageSet("a", 20))

	// Dropped pages are reported, and are gone.
	w.do(t, "dontneed a 30 2")
	d = round(t, tr)
	expect(t, w, d, "a", "MADV_DONTNEED of 30-31", w.pageSet("a", 30, 31))
	if p := tracker.Intersect(w.present(t, "a"), w.pageSet("a", 30, 31)); len(p) != 0 {
		t.Errorf("dropped pages still present: %s", w.pageNumbers("a", p))
	}
	// Read again, a dropped page maps the zero page. The hash backend sees
	// new contents; for the others nothing was written (a dump records the
	// page anyway, as the previous round reported it gone).
	w.do(t, "touch a 30 1")
	d = round(t, tr)
	if got := tracker.Intersect(d.Dirty, w.span("a")); len(got) != 0 && !equal(got, w.pageSet("a", 30)) {
		t.Errorf("dropped page 30 read again: reported %s", w.pageNumbers("a", got))
	} else if backend == tracker.Hash && len(got) == 0 {
		t.Errorf("dropped page 30 read again: hash backend did not see the change")
	}
	if !tracker.Intersect(w.present(t, "a"), w.pageSet("a", 30)).Contains(w.addr["a"] + 30*tracker.PageSize) {
		t.Errorf("page 30, read again, is not present")
	}

	// A mapping created after tracking started counts as written (its
	// present pages at least), and is tracked from then on.
	w.mapRegion(t, "b", 16)
	w.do(t, "write b 0 4 1")
	d = round(t, tr)
	if got := tracker.Intersect(d.Dirty, w.present(t, "b")); !equal(got, w.pageSet("b", 0, 1, 2, 3)) {
		t.Errorf("new mapping: present pages %s reported written, want 0-3", w.pageNumbers("b", got))
	}
	w.do(t, "write b 1 1 1")
	expect(t, w, round(t, tr), "b", "write to the new mapping", w.pageSet("b", 1))

	// Growing in place: the new pages are new.
	w.do(t, "grow b 24")
	w.pages["b"] = 24
	w.do(t, "write b 20 1 1")
	d = round(t, tr)
	if got := tracker.Intersect(d.Dirty, w.present(t, "b")); !equal(got, w.pageSet("b", 20)) {
		t.Errorf("grown mapping: present pages %s reported written, want 20", w.pageNumbers("b", got))
	}
	w.do(t, "write b 21 1 1")
	expect(t, w, round(t, tr), "b", "write to the grown part", w.pageSet("b", 21))

	// munmap: the pages vanish from the answer.
	old := w.span("b")
	w.do(t, "unmap b")
	d = round(t, tr)
	if got := tracker.Intersect(tracker.AreaRanges(d.Areas), old); len(got) != 0 {
		t.Errorf("unmapped region still in the areas: %v", got)
	}
	if got := tracker.Intersect(d.Dirty, old); len(got) != 0 {
		t.Errorf("unmapped region reported written: %v", got)
	}

	// mremap to a new place: all its (present) pages count as written at
	// the new place, nothing at the old one.
	old = w.span("a")
	w.move(t, "a")
	d = round(t, tr)
	if got := tracker.Intersect(d.Dirty, old); len(got) != 0 {
		t.Errorf("moved region reported written at its old place: %v", got)
	}
	present := w.present(t, "a")
	if present.Pages() != 63 { // page 31 was dropped
		t.Errorf("moved region has %d present pages, want 63", present.Pages())
	}
	if got := tracker.Intersect(d.Dirty, present); !equal(got, present) {
		t.Errorf("moved region: present pages %s reported written, want all %s",
			w.pageNumbers("a", got), w.pageNumbers("a", present))
	}
	w.do(t, "write a 40 1 1")
	expect(t, w, round(t, tr), "a", "write to the moved region", w.pageSet("a", 40))

	if err := tr.Stop(); err != nil {
		t.Fatal(err)
	}
	assertNoTrace(t, w.Pid)
}

// TestSharedMemory: shared anonymous memory can be written by other
// processes; the uffdwp backend does not track it and reports it whole in
// every round, the hash backend reports what changed.
func TestSharedMemory(t *testing.T) {
	backends(t, func(t *testing.T, backend string) {
		w := startWorkload(t)
		w.addr["s"] = parseAddr(t, w.do(t, "smap s 16"))
		w.pages["s"] = 16
		w.do(t, "write s 0 16 1")
		tr, err := tracker.Start(context.Background(), w.Pid, tracker.Options{Backend: backend})
		if err != nil {
			t.Fatal(err)
		}
		defer tr.Stop()
		round(t, tr)
		w.do(t, "write s 2 1 1")
		d := round(t, tr)
		if backend == tracker.UffdWP {
			expect(t, w, d, "s", "shared memory", w.span("s"))
		} else {
			expect(t, w, d, "s", "shared memory", w.pageSet("s", 2))
		}
		if got := w.present(t, "s"); !equal(got, w.span("s")) {
			t.Errorf("present pages of the shared mapping: %s", w.pageNumbers("s", got))
		}
	})
}

// assertNoTrace checks that pid holds no userfaultfd and no mapping
// registered with one.
func assertNoTrace(t *testing.T, pid int) {
	t.Helper()
	smaps, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/smaps")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(smaps), "\n") {
		if v, ok := strings.CutPrefix(line, "VmFlags:"); ok {
			for _, f := range strings.Fields(v) {
				if f == "uw" || f == "um" || f == "ui" {
					t.Errorf("a mapping is still registered with userfaultfd: VmFlags%s", v)
				}
			}
		}
	}
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		link, _ := os.Readlink("/proc/" + strconv.Itoa(pid) + "/fd/" + e.Name())
		if strings.Contains(link, "userfaultfd") {
			t.Errorf("descriptor %s of %d is still a userfaultfd", e.Name(), pid)
		}
	}
}

// countUffds returns how many userfaultfds pid holds.
func countUffds(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		link, _ := os.Readlink("/proc/" + strconv.Itoa(pid) + "/fd/" + e.Name())
		if strings.Contains(link, "userfaultfd") {
			n++
		}
	}
	return n
}

// TestParkResume parks tracking in a directory, continues it from there
// (as a second pre-dump run would), refuses to continue twice from one
// directory, and stops it.
func TestParkResume(t *testing.T) {
	backends(t, func(t *testing.T, backend string) {
		w := startWorkload(t)
		w.mapRegion(t, "a", 32)
		w.do(t, "write a 0 32 1")
		tr, err := tracker.Start(context.Background(), w.Pid, tracker.Options{Backend: backend})
		if err != nil {
			t.Fatal(err)
		}
		round(t, tr)
		dir1, dir2 := t.TempDir(), t.TempDir()
		if err := tr.Park(dir1); err != nil {
			t.Fatal(err)
		}
		if backend == tracker.UffdWP && countUffds(t, w.Pid) != 1 {
			t.Errorf("parked: the process holds %d userfaultfds, want 1", countUffds(t, w.Pid))
		}
		w.do(t, "write a 4 3 1")

		tr, err = tracker.Resume(context.Background(), w.Pid, dir1, tracker.Options{})
		if err != nil {
			t.Fatal(err)
		}
		d := round(t, tr)
		if d.Reset != "" {
			t.Errorf("resumed round reset: %s", d.Reset)
		}
		expect(t, w, d, "a", "written while parked", w.pageSet("a", 4, 5, 6))
		if err := tr.Park(dir2); err != nil {
			t.Fatal(err)
		}

		// dir1 was consumed: continuing from it again reports everything.
		tr, err = tracker.Resume(context.Background(), w.Pid, dir1, tracker.Options{})
		if err != nil {
			t.Fatal(err)
		}
		d = round(t, tr)
		if d.Reset == "" {
			t.Errorf("continuing twice from one directory was not reset")
		}
		expect(t, w, d, "a", "continued twice", w.span("a"))
		if err := tr.Stop(); err != nil {
			t.Fatal(err)
		}
		assertNoTrace(t, w.Pid)

		// dir2 names a userfaultfd that Stop closed: continuing from it
		// starts over, and says so.
		tr, err = tracker.Resume(context.Background(), w.Pid, dir2, tracker.Options{})
		if err != nil {
			t.Fatal(err)
		}
		d = round(t, tr)
		if backend == tracker.UffdWP && d.Reset == "" {
			t.Errorf("continuing after Stop was not reset")
		}
		if err := tr.Stop(); err != nil {
			t.Fatal(err)
		}
		assertNoTrace(t, w.Pid)
	})
}

// TestAlreadyTracked: a second Start on a tracked process is refused
// instead of fighting over the write-protect bits.
func TestAlreadyTracked(t *testing.T) {
	testutil.SkipIfNotSupported(t, tracker.Supported(tracker.UffdWP))
	w := startWorkload(t)
	w.mapRegion(t, "a", 4)
	tr, err := tracker.Start(context.Background(), w.Pid, tracker.Options{Backend: tracker.UffdWP})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Stop()
	tr2, err := tracker.Start(context.Background(), w.Pid, tracker.Options{Backend: tracker.UffdWP})
	if !errors.Is(err, tracker.ErrAlreadyTracked) {
		if tr2 != nil {
			tr2.Stop()
		}
		t.Fatalf("second Start: %v, want ErrAlreadyTracked", err)
	}
	if n := countUffds(t, w.Pid); n != 1 {
		t.Errorf("the process holds %d userfaultfds after the refused Start, want 1", n)
	}
}

// TestProcessExit: tracking ends cleanly when the process exits, with an
// error that says so, and nothing is left open here.
func TestProcessExit(t *testing.T) {
	backends(t, func(t *testing.T, backend string) {
		before := openFDs(t)
		w := startWorkload(t)
		w.mapRegion(t, "a", 8)
		tr, err := tracker.Start(context.Background(), w.Pid, tracker.Options{Backend: backend})
		if err != nil {
			t.Fatal(err)
		}
		round(t, tr)
		w.kill()
		if _, err := tr.Round(context.Background()); !errors.Is(err, tracker.ErrProcessGone) {
			t.Errorf("round after exit: %v, want ErrProcessGone", err)
		}
		_ = tr.Stop()
		w.in.Close()
		if after := openFDs(t); after > before {
			t.Errorf("%d descriptors open before, %d after", before, after)
		}
	})
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestSoftDirtyAbsent: where the kernel lacks soft-dirty, the backend says
// so instead of reporting nothing.
func TestSoftDirtyAbsent(t *testing.T) {
	if tracker.Supported(tracker.SoftDirty) == nil {
		t.Skip("this kernel has soft-dirty bits")
	}
	w := startWorkload(t)
	_, err := tracker.Start(context.Background(), w.Pid, tracker.Options{Backend: tracker.SoftDirty})
	if !errors.Is(err, tracker.ErrNotSupported) {
		t.Fatalf("Start(softdirty) = %v, want ErrNotSupported", err)
	}
	if b, err := tracker.Choose(tracker.Auto); err != nil || b == tracker.SoftDirty {
		t.Errorf("Choose(auto) = %s, %v", b, err)
	}
}

// TestFinalRound: a final round over mappings read earlier leaves out a
// mapping made since (as an injection scratch is), and still reports the
// writes to the others; it leaves what it reported unarmed (except the
// hash backend, which arms nothing), so a plain round afterwards reports
// those pages again, and finds the new mapping.
func TestFinalRound(t *testing.T) {
	backends(t, func(t *testing.T, backend string) {
		w := startWorkload(t)
		w.mapRegion(t, "a", 8)
		w.do(t, "write a 0 8 1")
		tr, err := tracker.Start(context.Background(), w.Pid, tracker.Options{Backend: backend})
		if err != nil {
			t.Fatal(err)
		}
		defer tr.Stop()
		round(t, tr)
		maps, err := proc.ReadMaps(w.Pid)
		if err != nil {
			t.Fatal(err)
		}
		w.mapRegion(t, "b", 4)
		w.do(t, "write b 0 4 1")
		w.do(t, "write a 3 1 2")
		d, err := tr.FinalRound(context.Background(), maps)
		if err != nil {
			t.Fatal(err)
		}
		if got := tracker.Intersect(tracker.AreaRanges(d.Areas), w.span("b")); len(got) != 0 {
			t.Errorf("the mapping made after the maps were read is in the round's areas: %v", got)
		}
		if got := tracker.Intersect(d.Dirty, w.span("b")); len(got) != 0 {
			t.Errorf("the mapping made after the maps were read is reported written: %v", got)
		}
		expect(t, w, d, "a", "final round over earlier maps", w.pageSet("a", 3))
		d = round(t, tr)
		if got := tracker.Intersect(d.Dirty, w.span("b")); !equal(got, w.span("b")) {
			t.Errorf("the next plain round reports %s of the new mapping written, want all of it", w.pageNumbers("b", got))
		}
		again := w.pageSet("a", 3)
		if backend == tracker.Hash {
			again = w.pageSet("a")
		}
		expect(t, w, d, "a", "plain round after the final one", again)
	})
}

// TestPresentWithin asks of scattered pages, some close together (walked
// as one) and some far apart: the answer is exactly the present pages
// among those asked, none from the gaps walked over.
func TestPresentWithin(t *testing.T) {
	w := startWorkload(t)
	w.mapRegion(t, "a", 1200)
	for _, p := range []uint64{0, 2, 3, 7, 8, 9, 10, 40, 300, 301, 900, 1199} {
		w.do(t, "write a %d 1 1", p)
	}
	pm, err := tracker.OpenPagemap(w.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	within := tracker.Union(w.pageSet("a", 1, 2, 3, 4, 9, 40, 41, 301, 1199), tracker.Ranges{{
		Start: w.addr["a"] + 890*tracker.PageSize, End: w.addr["a"] + 895*tracker.PageSize}})
	got, err := pm.PresentWithin(tracker.Area{Range: w.span("a")[0], Readable: true}, within)
	if err != nil {
		t.Fatal(err)
	}
	want := w.pageSet("a", 2, 3, 9, 40, 301, 1199)
	if !equal(got, want) {
		t.Fatalf("present within the pages asked: %s, want %s", w.pageNumbers("a", got), w.pageNumbers("a", want))
	}
}
