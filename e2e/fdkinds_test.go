package e2e

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
)

// The fdkinds fixture (testdata/fdkinds.c) is built on first use.
var (
	fdkindsOnce sync.Once
	fdkindsBin  artifact
)

// startFdkinds starts the fdkinds fixture watching the directories a, gone
// and b it creates in dir.
func startFdkinds(tb testing.TB, dir string, args ...string) *testutil.Workload {
	tb.Helper()
	fdkindsOnce.Do(func() {
		out := filepath.Join(buildDir, "fdkinds")
		err := testutil.CompileC(filepath.Join(testdata, "fdkinds.c"), out)
		fdkindsBin = artifact{argv: []string{out}, err: err}
	})
	if err := fdkindsBin.err; err != nil {
		if errors.Is(err, testutil.ErrNoTool) {
			tb.Skipf("fixture fdkinds: %v", err)
		}
		tb.Fatalf("fixture fdkinds did not build: %v", err)
	}
	for _, d := range []string{"a", "gone", "b"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			tb.Fatal(err)
		}
	}
	argv := append(append([]string(nil), fdkindsBin.argv...), append([]string{"--dir", dir}, args...)...)
	return testutil.StartWorkload(tb, argv, &testutil.Options{Name: "fdkinds"})
}

func field(tb testing.TB, r testutil.CheckResult, key string) int64 {
	tb.Helper()
	v, ok := r.Int(key)
	if !ok {
		tb.Fatalf("check line without %s: %s", key, r.Line)
	}
	return v
}

// TestDumpRestoreFdKinds dumps a process waiting in epoll on an eventfd,
// timerfds, a signalfd and an inotify instance, restores it, and requires
// each of them to work: the periodic timer goes on with its period (the
// workload counts its expirations against the clock, the ones missed while
// it was frozen included), one-shot timers armed right before the dump
// fire at their time, dump and restore included (or right after restore
// when that time passed while the process was away), a signal sent after
// restore arrives through the signalfd, and a file created after restore
// is reported by the inotify watch that had watch descriptor 3 (2 was
// removed before the dump).
func TestDumpRestoreFdKinds(t *testing.T) {
	for _, tc := range []struct {
		name    string
		oneshot time.Duration
	}{
		{"on-time", 2 * time.Second},
		{"due-while-away", 50 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dumpRestoreFdKinds(t, tc.oneshot)
		})
	}
}

func dumpRestoreFdKinds(t *testing.T, oneshot time.Duration) {
	dir := t.TempDir()
	w := startFdkinds(t, dir, "--oneshot-ms", strconv.FormatInt(oneshot.Milliseconds(), 10))
	pre := w.MustCheck(t) // arms the one-shot timers
	armed := time.Unix(0, field(t, pre, "oneshot_armed"))
	absTarget := time.Unix(0, field(t, pre, "abs_target"))
	if field(t, pre, "wd_a") != 1 || field(t, pre, "wd_b") != 3 {
		t.Fatalf("unexpected watch descriptors: %s", pre.Line)
	}
	before := takeSnapshot(t, w.Pid)
	img := imageDir(t)
	dumpAndWaitGone(t, w, img)
	restoreDetached(t, w, img)
	restored := time.Now()
	t.Logf("dump and restore took %v after the timers were armed", restored.Sub(armed).Round(time.Millisecond))
	compareSnapshots(t, w, before, takeSnapshot(t, w.Pid), snapOpts{})
	checkAfterRestore(t, w, pre)

	if err := sys.Kill(w.Pid, sys.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "b", "after-restore"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// Wait for every timer, then check.
	time.Sleep(time.Until(absTarget.Add(300 * time.Millisecond)))
	var r testutil.CheckResult
	for deadline := time.Now().Add(10 * time.Second); ; {
		r = w.MustCheck(t)
		if field(t, r, "oneshot_fired") != 0 && field(t, r, "abs_fired") != 0 && field(t, r, "sigs") > 0 &&
			r.Fields["ino_name"] == "after-restore" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the workload did not see every event after restore: %s", r.Line)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if got := field(t, r, "sigs"); got != 1 || field(t, r, "sigpid") != int64(selfPid) {
		t.Errorf("signalfd: %d signals from %d, want 1 from %d", got, field(t, r, "sigpid"), selfPid)
	}
	if got := field(t, r, "ino_wd"); got != 3 {
		t.Errorf("inotify: the file created in b was reported for watch %d, want 3", got)
	}
	// Each timer fires at its time; if that passed while the process was
	// away, right after restore.
	const tolerance = 150 * time.Millisecond
	for _, tm := range []struct {
		name        string
		want, fired time.Time
	}{
		{"one-shot CLOCK_BOOTTIME", armed.Add(oneshot), time.Unix(0, field(t, r, "oneshot_fired"))},
		{"absolute CLOCK_REALTIME", absTarget, time.Unix(0, field(t, r, "abs_fired"))},
	} {
		latest := tm.want
		if restored.After(latest) {
			latest = restored
			t.Logf("%s: due while the process was away", tm.name)
		}
		late := tm.fired.Sub(tm.want)
		if tm.fired.Before(tm.want) || tm.fired.After(latest.Add(tolerance)) {
			t.Errorf("%s timer fired %v after its time, want within %v of %v", tm.name, late, tolerance, latest.Sub(tm.want))
		} else {
			t.Logf("%s timer fired %v after its time", tm.name, late.Round(time.Microsecond))
		}
	}
}

// TestDumpRefusesFdKinds covers the variants dump must refuse, naming
// them, with the process left running: an inotify instance with unread
// events, and an inotify watch on a file that was deleted (held open
// elsewhere, so the watch lives on).
func TestDumpRefusesFdKinds(t *testing.T) {
	refuse := func(t *testing.T, w *testutil.Workload, patterns ...string) {
		t.Helper()
		w.MustCheck(t)
		before := takeSnapshot(t, w.Pid)
		r := runPhaul(t, w, "dump", "-t", strconv.Itoa(w.Pid), "-D", imageDir(t))
		r.mustFail(t, w, patterns...)
		if w.OriginalExited() {
			t.Fatalf("the failed dump killed the process: %v", w.ExitState())
		}
		assertResumed(t, w, 0)
		compareSnapshots(t, w, before, takeSnapshot(t, w.Pid), snapOpts{})
		requireProgress(t, w, "after the failed dump")
	}
	t.Run("inotify-unread-events", func(t *testing.T) {
		w := startFdkinds(t, t.TempDir(), "--pending-inotify", "1")
		refuse(t, w, `inotify instance with \d+ bytes of unread events`, `not supported`)
	})
	t.Run("inotify-deleted-file", func(t *testing.T) {
		dir := t.TempDir()
		path := filepath.Join(dir, "doomed")
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		w := startFdkinds(t, dir, "--watch-file", path)
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond) // the workload reads the IN_ATTRIB event
		refuse(t, w, `inotify watch 4`, `deleted file .*doomed`)
	})
}
