package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
)

// The end-to-end tests. Each one starts a workload, checks it, dumps it with
// phaul, makes sure the original is gone, restores it (same PID), compares
// what /proc shows, and checks it again twice (see dumpRestoreCycle).

func TestDumpRestoreMemory(t *testing.T) {
	for _, name := range []string{"memory", "memory-static"} {
		t.Run(name, func(t *testing.T) {
			w := startFixture(t, name)
			dumpRestoreCycle(t, w, cycleOpts{})
		})
	}
}

func TestDumpRestoreThreads(t *testing.T) {
	w := startFixture(t, "threads")
	tids := threadTIDs(t, w)
	dumpRestoreCycle(t, w, cycleOpts{})
	for idx, tid := range tids {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/task/%d", w.Pid, tid)); err != nil {
			t.Errorf("thread %d lost its TID %d: %v", idx, tid, err)
		}
	}
	// The threads exit and are joined: pthread_join needs the restored
	// clear_child_tid of every thread.
	mark := w.Mark()
	if err := w.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if line := w.WaitLine(t, mark, "EXIT", 15*time.Second); !strings.Contains(line, "joined=6") {
		t.Fatalf("threads were not joined after restore: %s\n%s", line, w.LogTail(20))
	}
	w.WaitGone(t, 10*time.Second)
}

// TestDumpRestoreFdTable restores a descriptor table with gaps, numbers
// out of order, two descriptors of one open file and a pipe among the
// files (testdata/fdtable.c): the workload checks every descriptor itself.
func TestDumpRestoreFdTable(t *testing.T) {
	w := startFixture(t, "fdtable")
	dumpRestoreCycle(t, w, cycleOpts{})
}

func TestDumpRestoreGo(t *testing.T) {
	w := startFixture(t, "go")
	dumpRestoreCycle(t, w, cycleOpts{snap: snapOpts{goRuntime: true}})
}

// TestDumpRestoreGoNetpoll needs pipes registered in an epoll instance.
// (Any Go program with timers already has the runtime's epoll and eventfd;
// -netpoll adds two pipes to it, with goroutines parked on them.)
func TestDumpRestoreGoNetpoll(t *testing.T) {
	w := startFixture(t, "go-netpoll")
	dumpRestoreCycle(t, w, cycleOpts{snap: snapOpts{goRuntime: true}})
}

func TestDumpRestorePython(t *testing.T) {
	w := startFixture(t, "python")
	dumpRestoreCycle(t, w, cycleOpts{})
}

// TestPendingSignals dumps a process with a blocked SIGUSR2 pending, for the
// whole process (kill) or for one thread (tgkill). After restore the
// workload's check finds it pending in the right queue, unblocks it and
// sees its handler run once with the sender's si_code and si_pid.
func TestPendingSignals(t *testing.T) {
	t.Run("process-wide", func(t *testing.T) {
		w := startFixture(t, "memory", usr2Args()...)
		dumpRestoreCycle(t, w, cycleOpts{beforeDump: func(tb testing.TB, w *testutil.Workload) {
			sendUSR2(tb, w, 0)
		}})
	})
	t.Run("thread-directed", func(t *testing.T) {
		w := startFixture(t, "threads", usr2Args("--usr2-thread", "3")...)
		tid := threadTIDs(t, w)[3]
		dumpRestoreCycle(t, w, cycleOpts{beforeDump: func(tb testing.TB, w *testutil.Workload) {
			sendUSR2(tb, w, tid)
		}})
	})
}

// TestLeaveRunning dumps with --leave-running: the process must go on
// untraced and healthy. Then it is killed and restored from that image,
// whose state is the one at dump time.
func TestLeaveRunning(t *testing.T) {
	for _, tc := range []struct {
		fixture string
		args    []string
	}{
		// shared.dat is outside the image: it must not change after the dump.
		{"memory", []string{"--shared-writes", "0"}},
		{"threads", nil},
	} {
		t.Run(tc.fixture, func(t *testing.T) {
			w := startFixture(t, tc.fixture, tc.args...)
			pre := w.MustCheck(t)
			before := takeSnapshot(t, w.Pid)
			dir := imageDir(t)
			dump(t, w, dir, "--leave-running")
			if w.OriginalExited() {
				t.Fatalf("dump --leave-running ended the process: %v\n%s", w.ExitState(), w.LogTail(20))
			}
			assertResumed(t, w, 0)
			compareSnapshots(t, w, before, takeSnapshot(t, w.Pid), snapOpts{})
			requireProgress(t, w, "after dump --leave-running")

			if err := sys.Kill(w.Pid, sys.SIGKILL); err != nil {
				t.Fatal(err)
			}
			w.WaitGone(t, 10*time.Second)
			restoreDetached(t, w, dir)
			compareSnapshots(t, w, before, takeSnapshot(t, w.Pid), snapOpts{})
			checkAfterRestore(t, w, pre)
		})
	}
}

func TestDumpRestoreThreeTimes(t *testing.T) {
	for _, name := range []string{"memory", "memory-static", "threads"} {
		t.Run(name, func(t *testing.T) {
			w := startFixture(t, name)
			pid := w.Pid
			for i := 1; i <= 3; i++ {
				dumpRestoreCycle(t, w, cycleOpts{})
				if w.Pid != pid {
					t.Fatalf("cycle %d: PID %d, want %d", i, w.Pid, pid)
				}
			}
		})
	}
}

// TestRestoreWithoutDetach restores in the foreground: phaul waits for the
// restored process and exits with its status (the workloads exit 7 on
// SIGTERM after a last clean-up, which for threads means joining them).
func TestRestoreWithoutDetach(t *testing.T) {
	for _, tc := range []struct {
		fixture string
		exit    string // required in the EXIT line
	}{
		{"memory", "EXIT 7"},
		{"memory-static", "EXIT 7"},
		{"threads", "joined=6"},
		{"go", "EXIT 7"},
		{"python", "EXIT 7"},
	} {
		t.Run(tc.fixture, func(t *testing.T) {
			w := startFixture(t, tc.fixture)
			pre := w.MustCheck(t)
			before := takeSnapshot(t, w.Pid)
			dir := imageDir(t)
			dumpAndWaitGone(t, w, dir)

			p := startPhaul(t, phaulOpts{}, "restore", "-D", dir)
			waitRestored(t, w, p, before)
			w.Restored(t, w.Pid)
			post := w.MustCheck(t)
			if post.Seq != pre.Seq+1 {
				t.Fatalf("first check after restore has seq %d, want %d", post.Seq, pre.Seq+1)
			}
			mark := w.Mark()
			if err := w.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			if line := w.WaitLine(t, mark, "EXIT", 15*time.Second); !strings.Contains(line, tc.exit) {
				t.Errorf("exit line %q does not contain %q", line, tc.exit)
			}
			r := p.wait(t, 30*time.Second, w)
			if r.code != 7 {
				t.Fatalf("phaul restore exited %d, want the program's status 7\n%v", r.code, r)
			}
			if err := testutil.WaitPidGone(w.Pid, 10*time.Second); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// waitRestored waits until a foreground `phaul restore` has finished
// restoring: the PID runs the original executable and name, with at least
// its threads, none of them traced any more. A signal sent earlier could
// hit the restorer instead of the program.
func waitRestored(tb testing.TB, w *testutil.Workload, p *phaulProc, before snapshot) {
	tb.Helper()
	deadline := time.Now().Add(60 * time.Second)
	var last string
	for {
		select {
		case <-p.done:
			tb.Fatalf("phaul restore exited before the program did\n%v\n%s", p.collect(), w.LogTail(20))
		default:
		}
		s, err := readSnapshot(w.Pid)
		switch {
		case err != nil:
			last = err.Error()
		case s.exe != before.exe || s.comm != before.comm:
			last = fmt.Sprintf("runs %s (%s)", s.exe, s.comm)
		case len(s.tids) < len(before.tids):
			last = fmt.Sprintf("%d of %d threads", len(s.tids), len(before.tids))
		default:
			last = resumedProblem(w.Pid, 0)
		}
		if last == "" {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("restore did not finish within 60s: %s\n%s", last, w.LogTail(20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestDumpErrors(t *testing.T) {
	t.Run("missing-pid", func(t *testing.T) {
		pid, err := testutil.UnusedPID()
		if err != nil {
			t.Fatal(err)
		}
		r := runPhaul(t, nil, "dump", "-t", strconv.Itoa(pid), "-D", imageDir(t))
		r.mustFail(t, nil, `\b`+strconv.Itoa(pid)+`\b`, `no such process`)
	})

	t.Run("already-traced", func(t *testing.T) {
		w := startFixture(t, "memory")
		tracer := startFixture(t, "tracer", strconv.Itoa(w.Pid))
		assertResumed(t, w, tracer.Pid)
		w.MustCheck(t)
		r := runPhaul(t, w, "dump", "-t", strconv.Itoa(w.Pid), "-D", imageDir(t))
		r.mustFail(t, w, `trac`, `\b`+strconv.Itoa(tracer.Pid)+`\b`)
		if w.OriginalExited() {
			t.Fatalf("the failed dump killed the process: %v", w.ExitState())
		}
		assertResumed(t, w, tracer.Pid) // still traced by the tracer, not by phaul
		w.MustCheck(t)
	})

	t.Run("unsupported-resource", func(t *testing.T) {
		w := startFixture(t, "unsupported", "--resource", "io_uring")
		w.MustCheck(t)
		before := takeSnapshot(t, w.Pid)
		r := runPhaul(t, w, "dump", "-t", strconv.Itoa(w.Pid), "-D", imageDir(t))
		r.mustFail(t, w, `io_uring`)
		if w.OriginalExited() {
			t.Fatalf("the failed dump killed the process: %v", w.ExitState())
		}
		assertResumed(t, w, 0)
		compareSnapshots(t, w, before, takeSnapshot(t, w.Pid), snapOpts{})
		requireProgress(t, w, "after the failed dump")
	})
}

func TestRestoreErrors(t *testing.T) {
	t.Run("pid-taken", func(t *testing.T) {
		w := startFixture(t, "memory", "--shared-writes", "0")
		w.MustCheck(t)
		dir := imageDir(t)
		dump(t, w, dir, "--leave-running")
		assertResumed(t, w, 0)
		children := childSet()
		r := runPhaul(t, w, "restore", "-D", dir, "-d")
		r.mustFail(t, w, `\b`+strconv.Itoa(w.Pid)+`\b`, `(taken|in use|exists|busy|occupied|already)`)
		assertNoLeaks(t, children)
		if w.OriginalExited() {
			t.Fatalf("the failed restore harmed the running original: %v", w.ExitState())
		}
		w.MustCheck(t)
	})

	t.Run("corrupt-image", func(t *testing.T) {
		w := startFixture(t, "memory")
		pre := w.MustCheck(t)
		pristine := imageDir(t)
		dumpAndWaitGone(t, w, pristine)
		files := imageFiles(t, pristine)
		pid := w.Pid

		corruptions := []struct {
			name string
			file string
			do   func(path string) error
		}{
			{"process-image-bytes-flipped", files.process, flipMiddle},
			{"pagemap-bytes-flipped", files.pagemap, flipMiddle},
			{"pages-truncated", files.pages, truncateHalf},
			// One bit of page data, past the header: only the run's
			// CRC-32C can tell, and no page may reach the process first.
			{"page-data-bit-flipped", files.pages, flipLastPageByte},
			{"inventory-header-flipped", files.inventory, flipHead},
		}
		for _, c := range corruptions {
			t.Run(c.name, func(t *testing.T) {
				if c.file == "" {
					t.Skipf("no such file in the image (%v)", files.all)
				}
				dir := imageDir(t)
				copyDir(t, pristine, dir)
				path := filepath.Join(dir, c.file)
				if err := c.do(path); err != nil {
					t.Fatal(err)
				}
				children := childSet()
				r := runPhaul(t, w, "restore", "-D", dir, "-d")
				if r.code == 0 {
					// Take the process down again so that the next
					// corruption (and the final restore) finds the PID free.
					if testutil.PidAlive(pid) {
						w.Restored(t, pid)
						_ = sys.Kill(pid, sys.SIGKILL)
						_ = testutil.WaitPidGone(pid, 10*time.Second)
					}
					t.Fatalf("restore of a damaged image (%s: %s) succeeded\n%v", c.file, c.name, r)
				}
				r.mustFail(t, w, `(corrupt|invalid|checksum|crc|truncat|unexpected|short|mismatch|malformed|bad|EOF|magic|`+
					strings.ReplaceAll(c.file, ".", `\.`)+`)`)
				if err := testutil.WaitPidGone(pid, 5*time.Second); err != nil {
					t.Errorf("after the failed restore: %v", err)
				}
				assertNoLeaks(t, children)
			})
		}
		// The pristine image still restores: the failures were the damage.
		restoreDetached(t, w, pristine)
		checkAfterRestore(t, w, pre)
	})
}

// requireProgress checks twice, 200 ms apart, and requires both checks to
// pass and the workload's progress counter to advance.
func requireProgress(tb testing.TB, w *testutil.Workload, when string) {
	tb.Helper()
	c1 := w.MustCheck(tb)
	time.Sleep(200 * time.Millisecond)
	c2 := w.MustCheck(tb)
	a, _ := c1.Int("progress")
	if b, _ := c2.Int("progress"); b <= a {
		tb.Fatalf("%s: no progress %s: %q then %q", w.Name, when, c1.Line, c2.Line)
	}
}

// imageFilesOf names the files of a checkpoint directory by role.
type imageFilesOf struct {
	inventory, process, pagemap, pages string
	all                                []string
}

// imageFiles finds the files of an image by their names (inventory.img,
// process-PID.img, pagemap-PID.img, pages-PID.img); the largest file stands
// in for the pages file when none is named so.
func imageFiles(tb testing.TB, dir string) imageFilesOf {
	tb.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		tb.Fatal(err)
	}
	var f imageFilesOf
	var largest int64
	var largestName string
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		n := e.Name()
		f.all = append(f.all, n)
		info, err := e.Info()
		if err == nil && info.Size() > largest {
			largest, largestName = info.Size(), n
		}
		switch {
		case strings.Contains(n, "inventory"):
			f.inventory = n
		case strings.Contains(n, "pagemap"):
			f.pagemap = n
		case strings.Contains(n, "pages"):
			f.pages = n
		case strings.Contains(n, "process"):
			f.process = n
		}
	}
	sort.Strings(f.all)
	if f.pages == "" {
		f.pages = largestName
	}
	if len(f.all) == 0 {
		tb.Fatalf("image directory %s is empty", dir)
	}
	return f
}

func copyDir(tb testing.TB, from, to string) {
	tb.Helper()
	if err := os.MkdirAll(to, 0o755); err != nil {
		tb.Fatal(err)
	}
	ents, err := os.ReadDir(from)
	if err != nil {
		tb.Fatal(err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		if err := copyFile(filepath.Join(from, e.Name()), filepath.Join(to, e.Name())); err != nil {
			tb.Fatal(err)
		}
	}
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// flipMiddle inverts 16 bytes in the middle of a file.
func flipMiddle(path string) error {
	return flipAt(path, -1, 16)
}

// flipLastPageByte inverts one bit in the middle of the last page of a
// pages file (page data, not its header).
func flipLastPageByte(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if fi.Size() < 2*4096 {
		return fmt.Errorf("%s holds no page data", path)
	}
	off := fi.Size() - 2048
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		return err
	}
	b[0] ^= 0x10
	_, err = f.WriteAt(b, off)
	return err
}

// flipHead inverts the first 8 bytes of a file (its magic and version).
func flipHead(path string) error {
	return flipAt(path, 0, 8)
}

func flipAt(path string, off int64, n int) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if len(data) == 0 {
		return fmt.Errorf("%s is empty", path)
	}
	if off < 0 {
		off = int64(len(data)) / 2
	}
	for i := off; i < off+int64(n) && i < int64(len(data)); i++ {
		data[i] ^= 0xff
	}
	return os.WriteFile(path, data, 0o644)
}

// truncateHalf cuts a file to half its size.
func truncateHalf(path string) error {
	info, err := os.Stat(path)
	if err != nil {
		return err
	}
	if info.Size() < 2 {
		return fmt.Errorf("%s is too small (%d bytes) to truncate", path, info.Size())
	}
	return os.Truncate(path, info.Size()/2)
}

// TestShellJob runs the workload on a terminal; dump --shell-job, then
// restore --shell-job with phaul's stdio on a second terminal: the restored
// program's stdio is that second terminal, and its output appears there.
func TestShellJob(t *testing.T) {
	tty1 := testutil.OpenPTY(t)
	w := startFixtureOpts(t, "memory", &testutil.Options{PTY: tty1})
	pre := w.MustCheck(t)
	before := takeSnapshot(t, w.Pid)
	dir := imageDir(t)
	dumpAndWaitGone(t, w, dir, "--shell-job")

	tty2 := testutil.OpenPTY(t)
	w.FollowPTY(t, tty2) // from now on, checks read what reaches tty2
	pidfile := filepath.Join(t.TempDir(), "restored.pid")
	p := startPhaul(t, phaulOpts{tty: tty2.Slave}, "restore", "-D", dir, "-d", "--shell-job", "--pidfile", pidfile)
	r := p.wait(t, *phaulWait, w)
	if testutil.PidAlive(w.Pid) {
		w.Restored(t, w.Pid)
	}
	if r.code != 0 {
		t.Fatalf("phaul restore --shell-job exited %d (its output went to %s)\n%s", r.code, tty2.Name, w.LogTail(30))
	}
	if !testutil.PidAlive(w.Pid) {
		t.Fatalf("restored process %d is not running\n%s", w.Pid, w.LogTail(30))
	}
	for fd := 0; fd < 3; fd++ {
		got, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", w.Pid, fd))
		if err != nil || got != tty2.Name {
			t.Errorf("restored fd %d is %q (%v), want the restorer's terminal %s", fd, got, err, tty2.Name)
		}
	}
	compareSnapshots(t, w, before, takeSnapshot(t, w.Pid), snapOpts{ttyRemap: map[string]string{tty1.Name: tty2.Name}})
	checkAfterRestore(t, w, pre)
}

// dumpStats is the --json output of phaul dump.
type dumpStats struct {
	Pid          *int     `json:"pid"`
	PagesScanned *float64 `json:"pages_scanned"`
	PagesWritten *float64 `json:"pages_written"`
	BytesWritten *float64 `json:"bytes_written"`
	FrozenMs     *float64 `json:"frozen_ms"`
	DurationMs   *float64 `json:"duration_ms"`
}

func TestDumpRestoreJSON(t *testing.T) {
	w := startFixture(t, "memory")
	pre := w.MustCheck(t)
	dir := imageDir(t)
	r := dumpAndWaitGone(t, w, dir, "--json")

	var s dumpStats
	if err := json.Unmarshal([]byte(r.stdout), &s); err != nil {
		t.Fatalf("dump --json printed no JSON object: %v\n%v", err, r)
	}
	if s.Pid == nil || s.PagesScanned == nil || s.PagesWritten == nil || s.BytesWritten == nil ||
		s.FrozenMs == nil || s.DurationMs == nil {
		t.Fatalf("dump --json lacks one of pid, pages_scanned, pages_written, bytes_written, frozen_ms, duration_ms:\n%s", r.stdout)
	}
	if *s.Pid != w.Pid {
		t.Errorf("pid %d, want %d", *s.Pid, w.Pid)
	}
	// The memory workload writes at least 4 MiB of patterns (anon) + 3 MiB
	// (malloc) + 256 KiB (brk) + 256 KiB (stack).
	const minBytes = 7 << 20
	pages, bytes := *s.PagesWritten, *s.BytesWritten
	if pages*4096 < minBytes {
		t.Errorf("pages_written %.0f (%.1f MiB), want at least %d MiB", pages, pages*4096/(1<<20), minBytes>>20)
	}
	if *s.PagesScanned < pages {
		t.Errorf("pages_scanned %.0f < pages_written %.0f", *s.PagesScanned, pages)
	}
	if want := pages * 4096; bytes < want || bytes > want*1.1+(1<<20) {
		t.Errorf("bytes_written %.0f, want about pages_written*4096 = %.0f", bytes, want)
	}
	if *s.FrozenMs < 0 || *s.DurationMs <= 0 || *s.FrozenMs > *s.DurationMs {
		t.Errorf("frozen_ms %.3f, duration_ms %.3f: want 0 <= frozen <= duration, duration > 0", *s.FrozenMs, *s.DurationMs)
	}

	rr := restoreDetached(t, w, dir, "--json")
	var out map[string]any
	if err := json.Unmarshal([]byte(rr.stdout), &out); err != nil {
		t.Errorf("restore --json printed no JSON object: %v\n%v", err, rr)
	} else if v, ok := out["pid"]; ok && v != float64(w.Pid) {
		t.Errorf("restore --json: pid %v, want %d", v, w.Pid)
	}
	checkAfterRestore(t, w, pre)
}

// TestDumpRestoreNonRoot restores a multi-threaded process of an ordinary
// user: every thread must come back with that user's credentials, no
// capabilities and an empty bounding set (one call per capability to drop,
// in every thread), not with the restorer's root.
func TestDumpRestoreNonRoot(t *testing.T) {
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skip("setpriv (util-linux) not installed")
	}
	bin := need(t, "threads")[0]
	// The fixture must be reachable by uid 65534: copy it out of the
	// root-only build directory.
	dir, err := os.MkdirTemp("", "phaul-nonroot-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "threads")
	if err := os.WriteFile(exe, data, 0o755); err != nil {
		t.Fatal(err)
	}
	w := testutil.StartWorkload(t, []string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--bounding-set=-all", exe},
		&testutil.Options{Name: "threads-nobody"})
	dumpRestoreCycle(t, w, cycleOpts{})
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", w.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", w.Pid, task.Name()))
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"Uid:\t65534\t65534\t65534\t65534", "Gid:\t65534\t65534\t65534\t65534", "CapEff:\t0000000000000000", "CapBnd:\t0000000000000000"} {
			if !strings.Contains(string(st), want) {
				t.Errorf("thread %s after restore lacks %q:\n%s", task.Name(), want, st)
			}
		}
	}
}

// TestRestoreThreadStateRefused restores an image in which one thread's
// robust futex list has a length the kernel refuses: the threads' state is
// set in one parallel step, and the failure must name that thread and the
// call, and leave no process behind.
func TestRestoreThreadStateRefused(t *testing.T) {
	w := startFixture(t, "threads")
	dir := imageDir(t)
	dumpAndWaitGone(t, w, dir)
	d := image.Dir{Path: dir}
	p, err := d.ReadProcess(w.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Threads) < 3 {
		t.Fatalf("the fixture dumped %d threads", len(p.Threads))
	}
	bad := p.Threads[2]
	bad.RobustList, bad.RobustListLen = 0x1000, 1 // set_robust_list wants sizeof(struct robust_list_head)
	if err := d.WriteProcess(p); err != nil {
		t.Fatal(err)
	}
	children := childSet()
	r := runPhaul(t, w, "restore", "-D", dir, "-d")
	r.mustFail(t, w, `thread `+strconv.Itoa(int(bad.Tid))+`\b`, `set_robust_list`, `invalid argument`)
	if err := testutil.WaitPidGone(w.Pid, 5*time.Second); err != nil {
		t.Errorf("after the failed restore: %v", err)
	}
	assertNoLeaks(t, children)
}
