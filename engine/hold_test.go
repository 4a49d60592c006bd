package engine_test

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/engine"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
	"github.com/phaul/phaul/tracker"
)

// TestHold holds a frozen process for a commit: let go, it stays stopped
// by job control (untraced, not running) until SIGCONT, with its memory
// intact; killed, it is gone.
func TestHold(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("freezing a process needs root (ptrace)")
	}
	w := startRewrite(t)
	w.mustCheck(t)
	fz := mustFreeze(t, w.Pid)
	if err := fz.Hold(); err != nil {
		fz.Close()
		t.Fatal(err)
	}
	if err := fz.Resume(); err != nil {
		t.Fatal(err)
	}
	waitHeld(t, w.Pid)
	if err := sys.Kill(w.Pid, sys.SIGCONT); err != nil {
		t.Fatal(err)
	}
	w.mustCheck(t)

	fz = mustFreeze(t, w.Pid)
	if err := fz.Hold(); err != nil {
		fz.Close()
		t.Fatal(err)
	}
	if err := fz.Kill(); err != nil {
		t.Fatal(err)
	}
	w.waitGone(t)
}

// TestHoldTracked holds a process whose tracking stays registered while
// frozen (KeepTracking, as a migration does): Hold closes the userfaultfd
// parked in it but keeps phaul's copy, so that nothing is unregistered in
// the downtime. Let go with the commit's outcome unknown, the process
// keeps no userfaultfd and no registered mapping; resumed after a refused
// commit, it runs untracked; killed, it leaves nothing behind.
func TestHoldTracked(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("freezing a process needs root (ptrace)")
	}
	testutil.SkipIfNotSupported(t, tracker.Supported(tracker.UffdWP))
	w := startRewrite(t, "--pages", "256", "--hot", "8", "--rate", "500")
	ours := countUffds(t, os.Getpid())
	freeze := func() *engine.Frozen {
		t.Helper()
		ctx := context.Background()
		tr, err := tracker.Start(ctx, w.Pid, tracker.Options{Backend: tracker.UffdWP})
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		if err := tr.Park(dir); err != nil {
			_ = tr.Stop()
			t.Fatal(err)
		}
		fz, err := engine.Freeze(ctx, engine.FreezeOptions{Pid: w.Pid, TrackerDir: dir, KeepTracking: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = fz.Close() })
		if n := countUffds(t, w.Pid); n != 1 {
			t.Fatalf("tracked process holds %d userfaultfds, want 1", n)
		}
		if err := fz.Hold(); err != nil {
			t.Fatal(err)
		}
		if n := countUffds(t, w.Pid); n != 0 {
			t.Errorf("held process holds %d userfaultfds, want none", n)
		}
		// Unregistering walks the page tables: not in the downtime.
		if !hasFlag(t, w.Pid, "uw") {
			t.Errorf("Hold unregistered the mappings")
		}
		if n := countUffds(t, os.Getpid()) - ours; n != 1 {
			t.Errorf("phaul holds %d more userfaultfds while holding, want 1", n)
		}
		return fz
	}
	released := func(how string) {
		t.Helper()
		if n := countUffds(t, w.Pid); n != 0 {
			t.Errorf("after %s the process holds %d userfaultfds", how, n)
		}
		if hasFlag(t, w.Pid, "uw") {
			t.Errorf("after %s a mapping is still registered (uw)", how)
		}
		if n := countUffds(t, os.Getpid()) - ours; n != 0 {
			t.Errorf("after %s phaul holds %d more userfaultfds", how, n)
		}
	}

	// The commit's outcome unknown: let go, it stops.
	fz := freeze()
	if err := fz.Resume(); err != nil {
		t.Fatal(err)
	}
	waitHeld(t, w.Pid)
	released("Hold and Resume")
	if err := sys.Kill(w.Pid, sys.SIGCONT); err != nil {
		t.Fatal(err)
	}
	w.mustCheck(t)

	// Refused: it runs again.
	fz = freeze()
	if err := fz.ResumeHeld(); err != nil {
		t.Fatal(err)
	}
	released("Hold and ResumeHeld")
	w.mustCheck(t)

	// Committed: killed.
	fz = freeze()
	if err := fz.Kill(); err != nil {
		t.Fatal(err)
	}
	w.waitGone(t)
	if n := countUffds(t, os.Getpid()) - ours; n != 0 {
		t.Errorf("after Hold and Kill phaul holds %d more userfaultfds", n)
	}
}

// waitHeld waits until process pid, let go after Hold, is stopped by job
// control and untraced.
func waitHeld(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		st, err := testutil.ReadProcStat(pid)
		if err != nil {
			t.Fatal(err)
		}
		status, _ := testutil.ProcStatus(pid, pid)
		if st.State == 'T' && status["TracerPid"] == "0" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after Hold and Resume: state %c, tracer %s; want stopped, untraced", st.State, status["TracerPid"])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestFreezeFlagsBeforeFreeze: mapping flags read before the freeze serve
// the frozen process's mappings, and not once removing the tracking
// changed them (the write-protect registration, "uw", is gone then).
func TestFreezeFlagsBeforeFreeze(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("freezing a process needs root (ptrace)")
	}
	testutil.SkipIfNotSupported(t, tracker.Supported(tracker.UffdWP))
	w := startRewrite(t, "--pages", "256", "--hot", "8", "--rate", "500")
	for _, keep := range []bool{true, false} {
		ctx := context.Background()
		tr, err := tracker.Start(ctx, w.Pid, tracker.Options{Backend: tracker.UffdWP})
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		if err := tr.Park(dir); err != nil {
			_ = tr.Stop()
			t.Fatal(err)
		}
		fz, err := engine.Freeze(ctx, engine.FreezeOptions{Pid: w.Pid, TrackerDir: dir, KeepTracking: keep, FlagsBeforeFreeze: true})
		if err != nil {
			t.Fatalf("keep tracking %v: %v", keep, err)
		}
		if len(fz.State.Process.GetVmas()) == 0 {
			t.Errorf("keep tracking %v: no mappings", keep)
		}
		if err := fz.Resume(); err != nil {
			t.Fatal(err)
		}
		if hasFlag(t, w.Pid, "uw") {
			t.Errorf("keep tracking %v: tracking left after Resume", keep)
		}
	}
	w.mustCheck(t)
}

// TestKillWhile: the function runs once SIGKILL is on its way (the
// process never runs again), and KillWhile returns after both the
// function and the process's exit.
func TestKillWhile(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("freezing a process needs root (ptrace)")
	}
	w := startRewrite(t)
	w.mustCheck(t)
	fz := mustFreeze(t, w.Pid)
	var killed, ran bool
	err := fz.KillWhile(func() {
		// SIGKILL pending on the process, or the process already dying.
		status, err := testutil.ProcStatus(w.Pid, w.Pid)
		pending, _ := strconv.ParseUint(status["ShdPnd"], 16, 64)
		killed = err != nil || pending&(1<<(sys.SIGKILL-1)) != 0 || strings.HasPrefix(status["State"], "Z") || strings.HasPrefix(status["State"], "X")
		time.Sleep(20 * time.Millisecond)
		ran = true
	})
	if err != nil {
		t.Fatal(err)
	}
	if !ran {
		t.Fatal("KillWhile returned before its function did")
	}
	if !killed {
		t.Fatal("the function ran before SIGKILL was sent")
	}
	w.waitGone(t)
}

// TestScratchLeftUntilResume: the memory the state collection maps in a
// frozen process stays there while it is frozen (killing it needs no
// unmapping in the downtime) and is gone once it runs again: after
// Resume, and already after Hold, before the process is stopped for the
// commit window.
func TestScratchLeftUntilResume(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("freezing a process needs root (ptrace)")
	}
	w := startRewrite(t)
	w.mustCheck(t)
	maps := func() string {
		t.Helper()
		b, err := os.ReadFile("/proc/" + strconv.Itoa(w.Pid) + "/maps")
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	before := maps()
	fz := mustFreeze(t, w.Pid)
	if frozen := maps(); strings.Count(frozen, "\n") != strings.Count(before, "\n")+1 {
		fz.Close()
		t.Fatalf("frozen: want one mapping more than before (the scratch)\nbefore:\n%s\nfrozen:\n%s", before, frozen)
	}
	if err := fz.Resume(); err != nil {
		t.Fatal(err)
	}
	if after := maps(); after != before {
		t.Errorf("mappings after Resume differ:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	w.mustCheck(t)

	fz = mustFreeze(t, w.Pid)
	if err := fz.Hold(); err != nil {
		fz.Close()
		t.Fatal(err)
	}
	if held := maps(); held != before {
		t.Errorf("mappings after Hold differ:\nbefore:\n%s\nheld:\n%s", before, held)
	}
	if err := fz.Resume(); err != nil {
		t.Fatal(err)
	}
	waitHeld(t, w.Pid)
	if err := sys.Kill(w.Pid, sys.SIGCONT); err != nil {
		t.Fatal(err)
	}
	w.mustCheck(t)
}

// mustFreeze freezes pid (collecting its state, without tracking).
func mustFreeze(t *testing.T, pid int) *engine.Frozen {
	t.Helper()
	fz, err := engine.Freeze(context.Background(), engine.FreezeOptions{Pid: pid})
	if err != nil {
		t.Fatal(err)
	}
	return fz
}
