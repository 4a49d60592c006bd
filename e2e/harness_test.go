package e2e

// Self-tests of the fixtures and the harness. They do not need phaul: they
// prove that every workload starts, reports READY, passes its checks while
// its counters advance, and, as importantly, that a check FAILS when the
// state it guards is damaged from outside.

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
)

// harnessFixtures are the workloads with a self-check, and their arguments
// for the self-tests.
var harnessFixtures = []struct {
	name string
	args []string
}{
	{"memory", nil},
	{"memory-static", nil},
	{"threads", nil},
	{"go", nil},
	{"go-netpoll", nil},
	{"python", nil},
	{"unsupported", nil},
	{"bigmem", []string{"--mib", "64"}},
}

func TestHarnessFixtures(t *testing.T) {
	for _, f := range harnessFixtures {
		t.Run(f.name, func(t *testing.T) {
			w := startFixture(t, f.name, f.args...)
			c1 := w.MustCheck(t)
			time.Sleep(300 * time.Millisecond)
			c2 := w.MustCheck(t)
			if c2.Seq != c1.Seq+1 {
				t.Errorf("check sequence %d then %d", c1.Seq, c2.Seq)
			}
			p1, ok1 := c1.Int("progress")
			p2, ok2 := c2.Int("progress")
			if !ok1 || !ok2 || p2 <= p1 {
				t.Errorf("progress did not advance: %q then %q", c1.Line, c2.Line)
			}
			if len(w.Regions) == 0 {
				t.Errorf("no REGION announced: %q", w.Preamble)
			}
			maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", w.Pid))
			if err != nil {
				t.Fatal(err)
			}
			if strings.HasPrefix(f.name, "memory") {
				static := !strings.Contains(string(maps), "/ld-linux")
				if wantStatic := f.name == "memory-static"; static != wantStatic {
					t.Errorf("%s: statically linked = %v, want %v", f.name, static, wantStatic)
				}
			}
		})
	}
}

func TestHarnessFixtureThreads(t *testing.T) {
	w := startFixture(t, "threads")
	w.MustCheck(t)
	tids, err := testutil.Tasks(w.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if len(tids) != 7 {
		t.Errorf("threads fixture runs %d threads, want 7", len(tids))
	}
	threads := threadTIDs(t, w)
	if len(threads) != 6 {
		t.Fatalf("THREAD lines: %v", w.Preamble)
	}
	// Each worker has its own signal mask.
	masks := map[string]bool{}
	for _, tid := range threads {
		st, err := testutil.ProcStatus(w.Pid, tid)
		if err != nil {
			t.Fatal(err)
		}
		masks[st["SigBlk"]] = true
	}
	if len(masks) != 6 {
		t.Errorf("worker threads share signal masks: %v", masks)
	}
}

// TestHarnessDetectsCorruption flips one byte of each memory region a
// fixture verifies, from outside, and requires the next check to fail and
// to name the region.
func TestHarnessDetectsCorruption(t *testing.T) {
	for _, f := range harnessFixtures {
		if f.name == "go-netpoll" {
			continue // same regions as "go"
		}
		t.Run(f.name, func(t *testing.T) {
			probe := startFixture(t, f.name, f.args...)
			var names []string
			for n := range probe.Regions {
				names = append(names, n)
			}
			sort.Strings(names)
			if len(names) == 0 {
				t.Fatalf("no regions announced")
			}
			for _, region := range names {
				t.Run(region, func(t *testing.T) {
					w := probe
					if region != names[0] {
						w = startFixture(t, f.name, f.args...) // a fresh process per region
					}
					w.MustCheck(t)
					r := w.Regions[region]
					w.CorruptByte(t, region, (r.Len/2+13)%r.Len)
					res := w.CheckResult(t)
					if res.OK {
						t.Fatalf("check passed after corrupting %s at %#x: %s", region, r.Addr+r.Len/2, res.Line)
					}
					if !strings.Contains(res.Reason, region+":") {
						t.Errorf("the failure does not name region %q: %s", region, res.Line)
					}
				})
			}
		})
	}
}

func threadTIDs(tb testing.TB, w *testutil.Workload) map[int]int {
	tb.Helper()
	m := map[int]int{}
	for _, l := range w.Preamble {
		f := strings.Fields(l)
		if len(f) == 4 && f[0] == "THREAD" {
			idx, err1 := strconv.Atoi(f[1])
			tid, err2 := strconv.Atoi(f[2])
			if err1 != nil || err2 != nil {
				tb.Fatalf("bad THREAD line %q", l)
			}
			m[idx] = tid
		}
	}
	return m
}

// sendUSR2 sends the pending-signal tests' SIGUSR2: to the process, or
// (tid > 0) to one thread, and waits until /proc shows it pending where
// it should be.
func sendUSR2(tb testing.TB, w *testutil.Workload, tid int) {
	tb.Helper()
	var err error
	if tid > 0 {
		err = sys.Tgkill(w.Pid, tid, sys.SIGUSR2)
	} else {
		err = sys.Kill(w.Pid, sys.SIGUSR2)
	}
	if err != nil {
		tb.Fatal(err)
	}
	statusOf, field := w.Pid, "ShdPnd"
	if tid > 0 {
		statusOf, field = tid, "SigPnd"
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		st, err := testutil.ProcStatus(w.Pid, statusOf)
		if err != nil {
			tb.Fatal(err)
		}
		if in, _ := testutil.SignalSet(st[field], syscall.SIGUSR2); in {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("SIGUSR2 not in %s of %d: %q", field, statusOf, st[field])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func usr2Args(extra ...string) []string {
	return append([]string{"--usr2-at", "2", "--usr2-from", strconv.Itoa(selfPid)}, extra...)
}

func TestHarnessPendingSignals(t *testing.T) {
	t.Run("process-wide", func(t *testing.T) {
		w := startFixture(t, "memory", usr2Args()...)
		w.MustCheck(t)
		sendUSR2(t, w, 0)
		if r := w.MustCheck(t); r.Fields["usr2"] != "1" {
			t.Errorf("handler count after the check: %s", r.Line)
		}
		w.MustCheck(t)
	})
	t.Run("thread-directed", func(t *testing.T) {
		w := startFixture(t, "threads", usr2Args("--usr2-thread", "3")...)
		w.MustCheck(t)
		sendUSR2(t, w, threadTIDs(t, w)[3])
		if r := w.MustCheck(t); r.Fields["usr2"] != "1" {
			t.Errorf("handler count after the check: %s", r.Line)
		}
		w.MustCheck(t)
	})
	// The checks must notice a signal that is missing or in the wrong place.
	mustFail := func(t *testing.T, w *testutil.Workload) {
		t.Helper()
		r := w.CheckResult(t)
		if r.OK || !strings.Contains(r.Reason, "usr2") {
			t.Fatalf("check should fail on the SIGUSR2 state: %s", r.Line)
		}
	}
	t.Run("process-wide-missing", func(t *testing.T) {
		w := startFixture(t, "memory", usr2Args()...)
		w.MustCheck(t)
		mustFail(t, w)
	})
	t.Run("process-wide-wrong-sender", func(t *testing.T) {
		w := startFixture(t, "memory", "--usr2-at", "2", "--usr2-from", "1")
		w.MustCheck(t)
		sendUSR2(t, w, 0)
		mustFail(t, w)
	})
	t.Run("thread-directed-sent-process-wide", func(t *testing.T) {
		w := startFixture(t, "threads", usr2Args()...)
		w.MustCheck(t)
		sendUSR2(t, w, 0)
		mustFail(t, w)
	})
	t.Run("thread-directed-wrong-thread", func(t *testing.T) {
		w := startFixture(t, "threads", usr2Args()...)
		w.MustCheck(t)
		sendUSR2(t, w, threadTIDs(t, w)[2])
		mustFail(t, w)
	})
	t.Run("unexpected", func(t *testing.T) {
		w := startFixture(t, "memory")
		w.MustCheck(t)
		sendUSR2(t, w, 0)
		mustFail(t, w)
	})
}

func TestHarnessExitStatus(t *testing.T) {
	for _, tc := range []struct {
		name, fixture string
		args          []string
		want          int
		line          string
	}{
		{"memory", "memory", []string{"--exit-code", "9"}, 9, "EXIT 9"},
		{"threads-joined", "threads", nil, 7, "joined=6"},
		{"go", "go", nil, 7, "EXIT 7"},
		{"python", "python", nil, 7, "EXIT 7"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := startFixture(t, tc.fixture, tc.args...)
			w.MustCheck(t)
			mark := w.Mark()
			if err := w.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			line := w.WaitLine(t, mark, "EXIT", 10*time.Second)
			if !strings.Contains(line, tc.line) {
				t.Errorf("exit line %q does not contain %q", line, tc.line)
			}
			st, err := w.WaitOriginalExit(10 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if st.ExitCode() != tc.want {
				t.Errorf("exit status %v, want %d", st, tc.want)
			}
		})
	}
}

func TestHarnessTracer(t *testing.T) {
	w := startFixture(t, "memory")
	tracer := startFixture(t, "tracer", strconv.Itoa(w.Pid))
	st, err := testutil.ProcStatus(w.Pid, w.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if st["TracerPid"] != strconv.Itoa(tracer.Pid) {
		t.Fatalf("TracerPid %s, want the tracer %d", st["TracerPid"], tracer.Pid)
	}
	// Signals pass through the tracer: the traced workload keeps working.
	w.MustCheck(t)
	w.MustCheck(t)
}

func TestHarnessPTY(t *testing.T) {
	p := testutil.OpenPTY(t)
	w := startFixtureOpts(t, "memory", &testutil.Options{PTY: p})
	w.MustCheck(t)
	for fd := 0; fd < 3; fd++ {
		got, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", w.Pid, fd))
		if err != nil || got != p.Name {
			t.Errorf("fd %d is %q (%v), want %s", fd, got, err, p.Name)
		}
	}
}

// TestHarnessSnapshot proves that the /proc comparison used after every
// restore reports nothing for an untouched process, and reports a change.
func TestHarnessSnapshot(t *testing.T) {
	for _, f := range harnessFixtures {
		t.Run(f.name, func(t *testing.T) {
			w := startFixture(t, f.name, f.args...)
			w.MustCheck(t)
			a := takeSnapshot(t, w.Pid)
			time.Sleep(200 * time.Millisecond)
			w.MustCheck(t)
			b := takeSnapshot(t, w.Pid)
			o := snapOpts{goRuntime: strings.HasPrefix(f.name, "go")}
			if d := diffSnapshots(a, b, o); len(d) > 0 {
				t.Errorf("an untouched process differs from itself:\n  %s", strings.Join(d, "\n  "))
			}
			b.fds[99] = "/tmp/leak"
			b.comm = "other"
			if d := diffSnapshots(a, b, o); len(d) != 2 {
				t.Errorf("diff found %d differences, want 2: %q", len(d), d)
			}
		})
	}
}
