package testutil

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/phaul/phaul/internal/sys"
)

// A shell script speaking the fixture protocol: every SIGUSR1 prints a
// CHECK line with an advancing counter, SIGTERM exits with status 7.
const shWorkload = `
n=0
trap 'n=$((n+1)); echo "CHECK $n OK progress=$n"' USR1
trap 'echo "EXIT 7"; exit 7' TERM
echo "REGION fake 0x1000 16"
echo "THREAD 0 $$ main"
echo "READY $$"
while :; do sleep 0.02; done
`

func shArgv(t *testing.T, script string) []string {
	t.Helper()
	sh, err := LookTool("sh")
	if err != nil {
		t.Skip(err)
	}
	return []string{sh, "-c", script}
}

func TestParseCheck(t *testing.T) {
	for _, tc := range []struct {
		line   string
		ok     bool
		seq    int
		fields map[string]string
		bad    bool
	}{
		{line: "CHECK 1 OK progress=12 cpu=0", ok: true, seq: 1, fields: map[string]string{"progress": "12", "cpu": "0"}},
		{line: "CHECK 3 OK", ok: true, seq: 3, fields: map[string]string{}},
		{line: "CHECK 2 FAIL anon: page 3 offset 8: pattern mismatch", seq: 2, fields: map[string]string{}},
		{line: "CHECK x OK", bad: true},
		{line: "CHECK 1 MAYBE", bad: true},
		{line: "READY 12", bad: true},
	} {
		r, err := ParseCheck(tc.line)
		if tc.bad {
			if err == nil {
				t.Errorf("ParseCheck(%q) = %+v, want an error", tc.line, r)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseCheck(%q): %v", tc.line, err)
			continue
		}
		if r.OK != tc.ok || r.Seq != tc.seq || len(r.Fields) != len(tc.fields) {
			t.Errorf("ParseCheck(%q) = %+v, want ok=%v seq=%d fields=%v", tc.line, r, tc.ok, tc.seq, tc.fields)
		}
		for k, v := range tc.fields {
			if r.Fields[k] != v {
				t.Errorf("ParseCheck(%q): field %s=%q, want %q", tc.line, k, r.Fields[k], v)
			}
		}
	}
	r, _ := ParseCheck("CHECK 1 OK progress=42")
	if n, ok := r.Int("progress"); !ok || n != 42 {
		t.Errorf("Int(progress) = %d, %v; want 42, true", n, ok)
	}
}

func TestParseRegion(t *testing.T) {
	r, err := ParseRegion("REGION anon 0x7f556f400000 8388608")
	if err != nil || r.Name != "anon" || r.Addr != 0x7f556f400000 || r.Len != 8388608 {
		t.Errorf("ParseRegion = %+v, %v", r, err)
	}
	for _, bad := range []string{"REGION anon 0x10", "REGION a zz 1", "REGION a 0x10 0", "CHECK 1 OK"} {
		if _, err := ParseRegion(bad); err == nil {
			t.Errorf("ParseRegion(%q): no error", bad)
		}
	}
}

func TestWorkloadChecksAndExit(t *testing.T) {
	w := StartWorkload(t, shArgv(t, shWorkload), &Options{Name: "sh"})
	if r, ok := w.Regions["fake"]; !ok || r.Addr != 0x1000 || r.Len != 16 {
		t.Errorf("Regions = %v, want fake at 0x1000+16", w.Regions)
	}
	if len(w.Preamble) != 2 {
		t.Errorf("Preamble = %q, want the REGION and THREAD lines", w.Preamble)
	}
	for want := 1; want <= 3; want++ {
		r := w.MustCheck(t)
		if r.Seq != want {
			t.Fatalf("check %d: got seq %d (%q)", want, r.Seq, r.Line)
		}
		if n, _ := r.Int("progress"); n != int64(want) {
			t.Fatalf("check %d: progress %d", want, n)
		}
	}
	mark := w.Mark()
	if err := w.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if line := w.WaitLine(t, mark, "EXIT ", 5*time.Second); line != "EXIT 7" {
		t.Errorf("exit line %q", line)
	}
	st, err := w.WaitOriginalExit(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if st.ExitCode() != 7 {
		t.Errorf("exit status %v, want 7", st)
	}
	if _, err := w.TryCheck(); err == nil {
		t.Error("TryCheck on an exited workload: no error")
	}
}

func TestCheckTimeout(t *testing.T) {
	script := `trap '' USR1; echo "READY $$"; while :; do sleep 0.02; done`
	w := StartWorkload(t, shArgv(t, script), &Options{Name: "mute", CheckTimeout: 300 * time.Millisecond})
	start := time.Now()
	_, err := w.TryCheck()
	if err == nil || !strings.Contains(err.Error(), "within") {
		t.Fatalf("TryCheck = %v, want a timeout", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("timeout took %v", d)
	}
}

func TestCheckNoticesDeath(t *testing.T) {
	script := `trap 'exit 3' USR1; echo "READY $$"; while :; do sleep 0.02; done`
	w := StartWorkload(t, shArgv(t, script), &Options{Name: "dies"})
	start := time.Now()
	_, err := w.TryCheck()
	if err == nil || !strings.Contains(err.Error(), "gone") {
		t.Fatalf("TryCheck = %v, want 'gone'", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("noticing the death took %v", d)
	}
}

func TestStartWorkloadSkipAndSetupFail(t *testing.T) {
	var skipped bool
	t.Run("skip", func(t *testing.T) {
		defer func() { skipped = t.Skipped() }()
		StartWorkload(t, shArgv(t, `echo "SKIP no io_uring here"`), &Options{Name: "skipper"})
		t.Error("StartWorkload returned after SKIP")
	})
	if !skipped {
		t.Error("SKIP line did not skip the test")
	}
	// A workload that exits without READY makes waitLine give up quickly.
	w, err := startWorkload(t, shArgv(t, `echo "SETUP FAIL mmap: out of memory"; exit 3`), &Options{Name: "setupfail"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.cleanup)
	_, line, err := w.waitLine(0, 5*time.Second, "READY ", "SETUP FAIL")
	if err != nil || line != "SETUP FAIL mmap: out of memory" {
		t.Errorf("waitLine = %q, %v", line, err)
	}
	_, _, err = w.waitLine(0, 5*time.Second, "READY ")
	if err == nil || !strings.Contains(err.Error(), "gone") {
		t.Errorf("waiting for READY from an exited workload: %v", err)
	}
}

func TestCleanupKillsProcessGroup(t *testing.T) {
	script := `sleep 1000 & echo "CHILD $!"; echo "READY $$"; while :; do sleep 0.02; done`
	var pid, child int
	t.Run("inner", func(t *testing.T) {
		w := StartWorkload(t, shArgv(t, script), &Options{Name: "group"})
		pid = w.Pid
		for _, l := range w.Preamble {
			if c, ok := strings.CutPrefix(l, "CHILD "); ok {
				child, _ = strconv.Atoi(c)
			}
		}
		if child == 0 || !PidAlive(child) {
			t.Fatalf("background child not running: %q", w.Preamble)
		}
	})
	for _, p := range []int{pid, child} {
		deadline := time.Now().Add(5 * time.Second)
		for PidAlive(p) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if PidAlive(p) {
			t.Errorf("pid %d survived the cleanup: %s", p, describePid(p))
		}
	}
}

func TestReapOrphansAfterSubreaper(t *testing.T) {
	if err := sys.SetChildSubreaper(); err != nil {
		t.Fatal(err)
	}
	// The script forks a grandchild, reports it and exits: the grandchild
	// is re-parented to us and becomes our unowned zombie when it exits.
	script := `sh -c 'sleep 0.3' & echo "ORPHAN $!"; echo "READY $$"; exit 0`
	w := StartWorkload(t, shArgv(t, script), &Options{Name: "orphaner"})
	var orphan int
	for _, l := range w.Preamble {
		if c, ok := strings.CutPrefix(l, "ORPHAN "); ok {
			orphan, _ = strconv.Atoi(c)
		}
	}
	if orphan == 0 {
		t.Fatalf("no ORPHAN line: %q", w.Preamble)
	}
	if _, err := w.WaitOriginalExit(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	if st, err := ReadProcStat(orphan); err == nil && st.PPid != os.Getpid() {
		t.Fatalf("orphan %d has parent %d, want us (%d) as subreaper", orphan, st.PPid, os.Getpid())
	}
	if err := WaitPidGone(orphan, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	for _, p := range ReapOrphans() {
		if p == orphan {
			t.Errorf("ReapOrphans reaped %d again after WaitPidGone", orphan)
		}
	}
	if _, err := ReadProcStat(orphan); err == nil {
		t.Errorf("orphan %d still exists: %s", orphan, describePid(orphan))
	}
}

func TestFlipByte(t *testing.T) {
	buf := []byte{0x0f, 0x55}
	if err := FlipByte(os.Getpid(), uint64(uintptr(unsafe.Pointer(&buf[1])))); err != nil {
		t.Fatal(err)
	}
	if buf[0] != 0x0f || buf[1] != 0xaa {
		t.Errorf("after FlipByte: % x, want 0f aa", buf)
	}
}

func TestWorkloadOnPTY(t *testing.T) {
	p := OpenPTY(t)
	if !sys.IsPTYSlave(p.Name) {
		t.Fatalf("pty slave name %q", p.Name)
	}
	w := StartWorkload(t, shArgv(t, shWorkload), &Options{Name: "tty", PTY: p})
	w.MustCheck(t)
	fd1, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/1", w.Pid))
	if err != nil || fd1 != p.Name {
		t.Errorf("workload stdout is %q (%v), want %s", fd1, err, p.Name)
	}
	// Follow a second terminal that nobody writes to: checks must time out,
	// proving that FollowPTY switched the log the checks read.
	p2 := OpenPTY(t)
	w.FollowPTY(t, p2)
	w.checkTimeout = 300 * time.Millisecond
	if _, err := w.TryCheck(); err == nil {
		t.Error("check answered through a terminal the workload does not use")
	}
	if !strings.Contains(w.LogTail(5), filepath.Base(p2.Name)) {
		t.Errorf("LogTail does not list the second log:\n%s", w.LogTail(5))
	}
}

func TestUnusedPID(t *testing.T) {
	pid, err := UnusedPID()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
		t.Errorf("UnusedPID returned %d, which exists", pid)
	}
}

func TestSignalSet(t *testing.T) {
	in, err := SignalSet("0000000000000800", syscall.SIGUSR2)
	if err != nil || !in {
		t.Errorf("SIGUSR2 in 0x800: %v %v", in, err)
	}
	in, _ = SignalSet("0000000000000800", syscall.SIGUSR1)
	if in {
		t.Error("SIGUSR1 in 0x800")
	}
}

func TestWorkloadGetsOnlyStdio(t *testing.T) {
	// A descriptor without close-on-exec, as a parent shell might leave.
	r, wr, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer wr.Close()
	fd, err := syscall.Dup(int(wr.Fd())) // dup(2) drops close-on-exec
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	inheritOnce = sync.Once{}
	w := StartWorkload(t, shArgv(t, shWorkload), &Options{Name: "fds"})
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", w.Pid))
	if err != nil {
		t.Fatal(err)
	}
	var fds []string
	for _, e := range ents {
		fds = append(fds, e.Name())
	}
	if strings.Join(fds, " ") != "0 1 2" {
		t.Errorf("workload has descriptors %v, want only 0 1 2", fds)
	}
}
