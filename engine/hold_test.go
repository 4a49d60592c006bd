package engine_test

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/phaul/phaul/engine"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
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
	fz, err := engine.Freeze(context.Background(), engine.FreezeOptions{Pid: w.Pid})
	if err != nil {
		t.Fatal(err)
	}
	if err := fz.Hold(); err != nil {
		fz.Close()
		t.Fatal(err)
	}
	if err := fz.Resume(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		st, err := testutil.ReadProcStat(w.Pid)
		if err != nil {
			t.Fatal(err)
		}
		status, _ := testutil.ProcStatus(w.Pid, w.Pid)
		if st.State == 'T' && status["TracerPid"] == "0" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after Hold and Resume: state %c, tracer %s; want stopped, untraced", st.State, status["TracerPid"])
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := sys.Kill(w.Pid, sys.SIGCONT); err != nil {
		t.Fatal(err)
	}
	w.mustCheck(t)

	fz, err = engine.Freeze(context.Background(), engine.FreezeOptions{Pid: w.Pid})
	if err != nil {
		t.Fatal(err)
	}
	if err := fz.Hold(); err != nil {
		fz.Close()
		t.Fatal(err)
	}
	if err := fz.Kill(); err != nil {
		t.Fatal(err)
	}
	w.waitGone(t)
}
