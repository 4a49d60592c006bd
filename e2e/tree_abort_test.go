package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
)

// TestTreeRestoreFailsCleanly breaks the page data of the last process of
// a dumped tree: restore has created every process of the tree by then,
// and must fail naming the checksum, and leave nothing behind — no
// process, and no zombie, not even one handed to this test (a zombie
// would keep its PID from the next restore). The intact image then
// restores, and the tree checks its memory.
func TestTreeRestoreFailsCleanly(t *testing.T) {
	needPhaul(t)
	need(t, "treemem")
	w := startFixtureOpts(t, "treemem", &testutil.Options{ReadyTimeout: time.Minute, CheckTimeout: 30 * time.Second},
		"--procs", "3", "--mib", "4")
	pre := w.MustCheck(t)
	pids := append([]int{w.Pid}, descendants(w.Pid)...)
	if len(pids) != 3 {
		t.Fatalf("treemem has processes %v, want 3", pids)
	}
	good := imageDir(t)
	dumpAndWaitGone(t, w, good)
	for _, pid := range pids[1:] {
		if err := testutil.WaitPidGone(pid, 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}

	bad := imageDir(t)
	if out, err := exec.Command("cp", "-a", good+"/.", bad).CombinedOutput(); err != nil {
		t.Fatalf("copy the image: %v: %s", err, out)
	}
	last := pids[len(pids)-1]
	pages := filepath.Join(bad, fmt.Sprintf("pages-%d.img", last))
	f, err := os.OpenFile(pages, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	const off = 4096 + 1000 // in the first page, after the header block
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	f.Close()

	r := runPhaul(t, w, "restore", "-D", bad, "-d")
	r.mustFail(t, w, "CRC-32C|checksum")
	for _, pid := range pids {
		if st, err := testutil.ReadProcStat(pid); err == nil {
			// Reap what we can, so that the cleanup has nothing to wait for.
			_, _, _ = sys.Wait4(pid, sys.WNOHANG|sys.WALL)
			t.Errorf("after the failed restore PID %d is still there (state %c, parent %d)", pid, st.State, st.PPid)
		}
	}
	if t.Failed() {
		return
	}
	restoreDetached(t, w, good)
	if post := w.MustCheck(t); post.Seq != pre.Seq+1 {
		t.Fatalf("restored treemem check seq %d, want %d", post.Seq, pre.Seq+1)
	}
	rest := descendants(w.Pid)
	if err := sys.Kill(-w.Pid, sys.SIGKILL); err != nil {
		t.Fatal(err)
	}
	w.WaitGone(t, 10*time.Second)
	for _, pid := range rest {
		if err := testutil.WaitPidGone(pid, 10*time.Second); err != nil {
			t.Error(err)
		}
	}
}
