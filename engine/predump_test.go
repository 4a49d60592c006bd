package engine_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/engine"
	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
	"github.com/phaul/phaul/tracker"
)

// rewrite is a running testdata/rewrite.c. It is started without os/exec's
// Wait running alongside: a wait of another thread of the test process
// would take the ptrace stops the engine waits for. It is reaped by the
// dump that kills it (the tracer is its parent), or by the cleanup.
type rewrite struct {
	Pid     int
	log     string
	Regions map[string]testutil.Region
}

// startRewrite builds testdata/rewrite.c and starts it with args; the
// test's cleanup kills and reaps it (and a restored copy with its PID).
func startRewrite(t *testing.T, args ...string) *rewrite {
	t.Helper()
	// Descriptors inherited from whatever started the test would be
	// inherited by the workload, and make its dump fail.
	if err := testutil.CloseInheritedFds(); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	bin := testutil.BuildC(t, "testdata/rewrite.c", filepath.Join(dir, "rewrite"))
	w := &rewrite{log: filepath.Join(dir, "rewrite.log"), Regions: map[string]testutil.Region{}}
	logf, err := os.OpenFile(w.log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	logf.Close()
	if err != nil {
		t.Fatal(err)
	}
	w.Pid = cmd.Process.Pid
	t.Cleanup(w.kill)
	line := w.waitLine(t, 0, "READY ", "SETUP FAIL")
	if !strings.HasPrefix(line, "READY ") {
		t.Fatalf("rewrite: %s", line)
	}
	for _, l := range w.lines() {
		if strings.HasPrefix(l, "REGION ") {
			r, err := testutil.ParseRegion(l)
			if err != nil {
				t.Fatal(err)
			}
			w.Regions[r.Name] = r
		}
	}
	return w
}

// kill kills the process with w's PID if it is our child, and reaps it.
func (w *rewrite) kill() {
	_ = sys.Kill(w.Pid, sys.SIGKILL)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		pid, _, err := sys.Wait4(w.Pid, sys.WNOHANG|sys.WALL)
		if err != nil || pid == w.Pid {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitGone waits until the PID is free (the dump killed and reaped it).
func (w *rewrite) waitGone(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", w.Pid)); err != nil {
			return
		}
		_, _, _ = sys.Wait4(w.Pid, sys.WNOHANG|sys.WALL)
		if time.Now().After(deadline) {
			t.Fatalf("process %d still exists after the dump", w.Pid)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (w *rewrite) lines() []string {
	b, _ := os.ReadFile(w.log)
	s := strings.TrimSuffix(string(b), "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

// waitLine waits for a line after the first skip lines that starts with
// one of prefixes.
func (w *rewrite) waitLine(t *testing.T, skip int, prefixes ...string) string {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		ls := w.lines()
		for i := skip; i < len(ls); i++ {
			for _, p := range prefixes {
				if strings.HasPrefix(ls[i], p) {
					return ls[i]
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("rewrite: no %q line; log:\n%s", prefixes, w.tail())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (w *rewrite) tail() string {
	ls := w.lines()
	return strings.Join(ls[max(0, len(ls)-10):], "\n")
}

// check asks for a self-check and returns its result.
func (w *rewrite) check(t *testing.T) testutil.CheckResult {
	t.Helper()
	skip := len(w.lines())
	if err := sys.Kill(w.Pid, sys.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	r, err := testutil.ParseCheck(w.waitLine(t, skip, "CHECK "))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// mustCheck is check failing the test unless the check passed.
func (w *rewrite) mustCheck(t *testing.T) testutil.CheckResult {
	t.Helper()
	r := w.check(t)
	if !r.OK {
		t.Fatalf("rewrite: %s", r.Line)
	}
	return r
}

// trackers runs f for each tracking backend this kernel supports.
func trackers(t *testing.T, f func(t *testing.T, backend string)) {
	for _, b := range tracker.Backends {
		t.Run(b, func(t *testing.T) {
			testutil.SkipIfNotSupported(t, tracker.Supported(b))
			f(t, b)
		})
	}
}

// TestRewriteCheckFails makes sure the workload's check can fail: a data
// page set back to an older version is reported as stale.
func TestRewriteCheckFails(t *testing.T) {
	w := startRewrite(t, "--pages", "256", "--hot", "8", "--rate", "500")
	w.mustCheck(t)
	// Page 1 is cold (hot pages are multiples of 32): rewrite its first
	// word with what an older version would hold... any other value will
	// do to make it differ; the check names the page.
	data := w.Regions["data"]
	buf := make([]byte, 8)
	binary.LittleEndian.PutUint64(buf, 0x1234)
	if _, err := sys.ProcessVMWritev(w.Pid, [][]byte{buf}, []sys.RemoteIovec{{Base: uintptr(data.Addr + 4096), Len: 8}}); err != nil {
		t.Fatal(err)
	}
	if r := w.check(t); r.OK || !strings.Contains(r.Reason, "data: page 1 ") {
		t.Fatalf("check after damaging page 1: %s", r.Line)
	}
}

// TestPreDumpChainRestore is the iterative migration on one host: while the
// workload rewrites its hot pages, five pre-dump rounds, then the final dump
// with the last round as parent, then restore. The restored process checks
// every page against what it wrote (nothing stale, nothing lost); the
// rounds must shrink to the hot set.
func TestPreDumpChainRestore(t *testing.T) {
	trackers(t, func(t *testing.T, backend string) {
		const pages, hot = 4096, 64
		w := startRewrite(t, "--pages", strconv.Itoa(pages), "--hot", strconv.Itoa(hot), "--rate", "2000")
		pre := w.mustCheck(t)
		ctx := context.Background()
		root := t.TempDir()
		var prev string
		for i := 1; i <= 5; i++ {
			time.Sleep(150 * time.Millisecond)
			dir := filepath.Join(root, strconv.Itoa(i))
			res, err := engine.PreDump(ctx, engine.PreDumpOptions{Pid: w.Pid, Dir: dir, Parent: prev, Track: backend})
			if err != nil {
				t.Fatalf("pre-dump %d: %v\n%s", i, err, w.tail())
			}
			t.Logf("round %d: %d present, %d dirty, %d written, %d zero, %d in parent, %d gone, frozen %.2f ms, took %.1f ms",
				res.Round, res.PagesPresent, res.PagesDirty, res.PagesWritten, res.PagesZero, res.PagesInParent,
				res.PagesGone, res.FrozenMS, res.DurationMS)
			if res.Tracker != backend || res.Round != i || res.Reset != "" {
				t.Errorf("pre-dump %d: tracker %s round %d reset %q", i, res.Tracker, res.Round, res.Reset)
			}
			if i == 1 && res.PagesWritten+res.PagesZero < pages {
				t.Errorf("first pre-dump wrote %d pages, want all %d", res.PagesWritten, pages)
			}
			if i > 1 {
				// About 300 hot-page writes per 150 ms hit the 64 hot pages,
				// plus the churning regions and kernel writes: far below
				// the data region.
				if res.PagesWritten > pages/8 {
					t.Errorf("pre-dump %d wrote %d pages: rounds do not shrink to the hot set", i, res.PagesWritten)
				}
				if res.PagesInParent == 0 {
					t.Errorf("pre-dump %d took nothing from its parent", i)
				}
			}
			if i > 1 && backend != tracker.SoftDirty && res.FrozenMS != 0 {
				t.Errorf("pre-dump %d stopped the process for %.2f ms", i, res.FrozenMS)
			}
			inv, err := image.Dir{Path: dir}.ReadInventory()
			if err != nil {
				t.Fatal(err)
			}
			if !inv.GetPredump() || (i > 1) != (inv.GetParent() != "") {
				t.Errorf("pre-dump %d: inventory predump=%v parent=%q", i, inv.GetPredump(), inv.GetParent())
			}
			prev = dir
		}
		w.mustCheck(t)
		time.Sleep(150 * time.Millisecond)

		final := filepath.Join(root, "final")
		res, err := engine.Dump(ctx, engine.DumpOptions{Pid: w.Pid, Dir: final, Parent: prev})
		if err != nil {
			t.Fatalf("final dump: %v\n%s", err, w.tail())
		}
		t.Logf("final dump: %d written, %d zero, %d in parent, frozen %.1f ms", res.PagesWritten, res.PagesZero, res.PagesInParent, res.FrozenMS)
		if res.PagesInParent < pages/2 || res.PagesWritten > pages/8 {
			t.Errorf("final dump: %d pages written, %d in parent: the parent was not used", res.PagesWritten, res.PagesInParent)
		}
		if _, err := os.Stat(filepath.Join(final, tracker.StateFile)); err == nil {
			t.Errorf("the final image holds tracker state")
		}
		w.waitGone(t)

		rr, err := engine.Restore(ctx, engine.RestoreOptions{Dir: final})
		if err != nil {
			t.Fatalf("restore: %v\n%s", err, w.tail())
		}
		if rr.Pid != w.Pid {
			t.Fatalf("restored as %d, want %d", rr.Pid, w.Pid)
		}
		post := w.mustCheck(t)
		if post.Seq <= pre.Seq {
			t.Errorf("check sequence went back: %d before the pre-dumps, %d after restore", pre.Seq, post.Seq)
		}
		time.Sleep(200 * time.Millisecond)
		p1, _ := post.Int("progress")
		if p2, _ := w.mustCheck(t).Int("progress"); p2 <= p1 {
			t.Errorf("no progress after restore: %d then %d", p1, p2)
		}
		if n := countUffds(t, rr.Pid); n != 0 {
			t.Errorf("the restored process holds %d userfaultfds", n)
		}
	})
}

// TestStopTracking: after `pre-dump --stop-tracking` the process holds no
// userfaultfd and no registered mapping, and runs on unharmed.
func TestStopTracking(t *testing.T) {
	trackers(t, func(t *testing.T, backend string) {
		w := startRewrite(t, "--pages", "512", "--hot", "16", "--rate", "1000")
		ctx := context.Background()
		root := t.TempDir()
		dir := filepath.Join(root, "1")
		if _, err := engine.PreDump(ctx, engine.PreDumpOptions{Pid: w.Pid, Dir: dir, Track: backend}); err != nil {
			t.Fatal(err)
		}
		if backend == tracker.UffdWP {
			if n := countUffds(t, w.Pid); n != 1 {
				t.Errorf("tracked process holds %d userfaultfds, want 1", n)
			}
			if !hasFlag(t, w.Pid, "uw") {
				t.Errorf("no mapping of the tracked process is registered")
			}
		}
		res, err := engine.PreDump(ctx, engine.PreDumpOptions{Pid: w.Pid, Parent: dir, StopTracking: true})
		if err != nil {
			t.Fatal(err)
		}
		if !res.TrackingStopped || res.Tracker != backend {
			t.Errorf("stop tracking: %+v", res)
		}
		if n := countUffds(t, w.Pid); n != 0 {
			t.Errorf("after --stop-tracking the process holds %d userfaultfds", n)
		}
		if hasFlag(t, w.Pid, "uw") {
			t.Errorf("after --stop-tracking a mapping is still registered (uw)")
		}
		w.mustCheck(t)

		// A new chain can start; continuing the stopped one starts over.
		res, err = engine.PreDump(ctx, engine.PreDumpOptions{Pid: w.Pid, Dir: filepath.Join(root, "2"), Parent: dir})
		if err != nil {
			t.Fatal(err)
		}
		if backend == tracker.UffdWP && res.Reset == "" {
			t.Errorf("continuing a stopped chain was not reset")
		}
		if _, err := engine.PreDump(ctx, engine.PreDumpOptions{Pid: w.Pid, Parent: filepath.Join(root, "2"), StopTracking: true}); err != nil {
			t.Fatal(err)
		}
		if n := countUffds(t, w.Pid); n != 0 {
			t.Errorf("the process holds %d userfaultfds at the end", n)
		}
		w.mustCheck(t)
	})
}

// TestDumpRefusesWrongParent: a parent of another process is refused
// before anything is frozen.
func TestDumpRefusesWrongParent(t *testing.T) {
	testutil.SkipIfNotSupported(t, tracker.Supported(tracker.UffdWP))
	a := startRewrite(t, "--pages", "64", "--hot", "4", "--rate", "100")
	b := startRewrite(t, "--pages", "64", "--hot", "4", "--rate", "100")
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "a")
	if _, err := engine.PreDump(ctx, engine.PreDumpOptions{Pid: a.Pid, Dir: dir}); err != nil {
		t.Fatal(err)
	}
	defer engine.PreDump(ctx, engine.PreDumpOptions{Pid: a.Pid, Parent: dir, StopTracking: true})
	_, err := engine.Dump(ctx, engine.DumpOptions{Pid: b.Pid, Dir: filepath.Join(t.TempDir(), "b"), Parent: dir, LeaveRunning: true})
	if err == nil || !strings.Contains(err.Error(), "PID") {
		t.Fatalf("dump of %d with the parent of %d: %v", b.Pid, a.Pid, err)
	}
	b.mustCheck(t)
}

func countUffds(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if link, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name())); strings.Contains(link, "userfaultfd") {
			n++
		}
	}
	return n
}

// hasFlag reports whether a mapping of pid has VmFlags code.
func hasFlag(t *testing.T, pid int, code string) bool {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmFlags:"); ok {
			for _, f := range strings.Fields(v) {
				if f == code {
					return true
				}
			}
		}
	}
	return false
}
