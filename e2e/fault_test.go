package e2e

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/testutil"
	"github.com/phaul/phaul/internal/topology"
	"github.com/phaul/phaul/netlock"
)

// The fault-injection matrix of live migration: each subtest of
// TestMigrateFault is STEP/FAULT. A fault point (package internal/fault,
// armed through PHAUL_FAULT in phaul serve or phaul migrate) or the test
// itself breaks the migration at that step; then exactly one copy of the
// process must run, with its memory intact: the original, resumed and
// untraced, when the failure came before the commit; the target's copy
// when it came after; and when the commit's answer was lost, the original
// stays stopped for the operator, who then finds one copy (or none) on the
// target. Finally the target (restarted if the fault killed it) must take
// a next migration.

// outcome is what a fault must leave behind.
type outcome int

const (
	// rolledBack: migrate fails; the original runs on, untraced.
	rolledBack outcome = iota
	// migrated: migrate succeeds (the fault came after the commit, or
	// could not stop it); the process runs on the target only.
	migrated
	// unknownOnTarget: migrate reports the commit outcome unknown; the
	// original is stopped, the target runs the process.
	unknownOnTarget
	// unknownNowhere: migrate reports the commit outcome unknown; the
	// original is stopped, the target has no copy.
	unknownNowhere
	// exited: the process exited on its own; no copy anywhere.
	exited
)

// faultCase is one cell of the matrix.
type faultCase struct {
	name string
	// serveFault and migrateFault arm fault points (PHAUL_FAULT). Rules
	// of phaul serve must fire once (@N): the daemon serves the next
	// migration too.
	serveFault, migrateFault string
	// serveArgs are added to phaul serve's command line; setup prepares
	// them (it returns the arguments).
	setup func(t *testing.T) []string
	// migrateArgs are added to phaul migrate's command line.
	migrateArgs []string
	// deadline, when set, is the time phaul migrate must end in after
	// the fault fired: the step deadline that ends the wait for a target
	// that does not answer.
	deadline time.Duration
	// mem is the workload's memory (default 16M).
	mem string
	// fixture, when set, is the C fixture to migrate instead of the
	// built-in workload.
	fixture string
	// during runs while phaul migrate runs (the fault line appeared).
	during func(t *testing.T, r *faultRun)
	want   outcome
	// cause must match phaul migrate's error message.
	cause string
	// serveDies: the fault kills phaul serve (it is restarted for the
	// next migration).
	serveDies bool
	// fresh: after a rollback, the next migration moves a fresh small
	// workload, not the original (it always does after other outcomes).
	fresh bool
}

// A fault's announcement.
const faultLine = "phaul: fault injected: "

func TestMigrateFault(t *testing.T) {
	phaul := needPhaul(t)
	n := hosts(t)
	// Ctrl-C on phaul migrate once the fault line shows that it reached
	// the step.
	ctrlC := func(t *testing.T, r *faultRun) {
		r.waitFault(t)
		if err := syscall.Kill(r.migrate.cmd.Process.Pid, syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
	}
	cases := []faultCase{
		// The pre-copy rounds: the process runs, the target builds the shadow.
		{name: "round0/kill-target", serveFault: "target.batch@4=exit", serveDies: true,
			cause: `round 0: .*(reset|EOF|closed|unavailable)`},
		{name: "round0/shadow-enomem", serveFault: "target.BeginRound@1=error:enomem",
			cause: `round 0: target: .*cannot allocate memory`},
		{name: "round1/kill-target", serveFault: "target.RoundDone@2=exit", serveDies: true,
			cause: `round 1: target: .*(reset|EOF|closed|unavailable)`},
		{name: "round1/cut-connection", serveFault: "target.RoundDone.handled@2=cut",
			cause: `round 1: target: .*(reset|EOF|closed|unavailable)`},
		{name: "round1/ctrl-c", migrateFault: "source.RoundDone@2=hang", during: ctrlC,
			cause: `interrupted, the process runs on here: .*context canceled`},
		{name: "rounds/mapping-churn", fixture: "churn", want: migrated},
		{name: "rounds/process-exits", migrateFault: "source.RoundDone.answered@1=sleep:1s", want: exited,
			during: func(t *testing.T, r *faultRun) {
				r.waitFault(t)
				if err := syscall.Kill(r.pid, syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
			},
			cause: `round 1: .*(no such process|exited|gone)`},
		// Pages on their way: a corrupt batch, a target out of memory or disk.
		{name: "pages/corrupt-batch", migrateFault: "source.batch@3=corrupt",
			cause: `corrupt page batch.*checksum`},
		{name: "pages/memory-refused", serveFault: "target.batch@3=error:enomem",
			cause: `page stream: .*cannot allocate memory`},
		{name: "pages/memory-budget", mem: "24M", fresh: true,
			setup: func(*testing.T) []string { return []string{"--page-memory", "12M"} },
			cause: `no space for pages: memory budget exhausted`},
		// The final state: the original is frozen.
		{name: "final-state/kill-target", serveFault: "target.Freeze@1=exit", serveDies: true,
			cause: `restore on the target: .*(reset|EOF|closed|unavailable)`},
		{name: "final-state/cut-connection", migrateFault: "source.Freeze@1=cut",
			cause: `restore on the target: .*(reset|EOF|closed|unavailable)`},
		{name: "final-state/ctrl-c", serveFault: "target.Freeze@1=hang", during: ctrlC,
			cause: `interrupted, .*restore on the target: .*context canceled`},
		// A target that keeps the connection but never answers: the
		// step's deadline (--freeze-timeout) ends the wait.
		{name: "final-state/hang", serveFault: "target.Freeze@1=hang", migrateArgs: freezeTimeout, deadline: 2 * time.Second,
			cause: `restore on the target: target did not answer Freeze within 2s; rolled back, the process runs here$`},
		// Restore: the shadow takes the final state; ready, it waits for the commit.
		{name: "restore/memory-refused", serveFault: "target.restore@1=error:enomem",
			cause: `restore on the target: .*cannot allocate memory`},
		{name: "restore/refused-when-ready", serveFault: "target.ready@1=error",
			cause: `restore on the target: .*fault injected`},
		{name: "restore/kill-target-when-ready", serveFault: "target.ready@1=exit", serveDies: true,
			cause: `restore on the target: .*(reset|EOF|closed|unavailable)`},
		{name: "restore/ctrl-c", serveFault: "target.ready@1=hang", during: ctrlC,
			cause: `interrupted, .*restore on the target: .*context canceled`},
		{name: "restore/hang", serveFault: "target.restore@1=hang", migrateArgs: freezeTimeout, deadline: 2 * time.Second,
			cause: `restore on the target: target did not answer Freeze within 2s; rolled back, the process runs here$`},
		// Ready (the shadow restored, waiting for the commit), then stuck
		// for good: the target does not even notice the deadline.
		{name: "restore/stall-when-ready", serveFault: "target.ready@1=stall", migrateArgs: freezeTimeout, deadline: 2 * time.Second,
			cause: `restore on the target: target did not answer Freeze within 2s; rolled back, the process runs here$`},
		// A source that goes silent with the connection open: the target
		// discards the shadow after --source-timeout. The source, back,
		// is interrupted here; the late commit below is refused.
		{name: "restore/source-silent", migrateFault: "source.Freeze.answered@1=hang", setup: sourceTimeout,
			during: func(t *testing.T, r *faultRun) {
				r.waitFault(t)
				waitLine(t, r.serve.log, "its source went silent", 0)
				waitNoCopy(t, r.serve, r.pid)
				ctrlC(t, r)
			},
			cause: `interrupted, .*restore on the target: .*context canceled`},
		// The commit window.
		{name: "commit/kill-target-before-resume", serveFault: "target.Commit@1=exit", serveDies: true, want: unknownNowhere,
			cause: `commit outcome unknown.*left stopped`},
		{name: "commit/lost-answer", serveFault: "target.Commit.handled@1=cut", want: unknownOnTarget,
			cause: `commit outcome unknown.*left stopped`},
		{name: "commit/kill-source-before-request", migrateFault: "source.Commit@1=exit", want: unknownNowhere,
			cause: `^$`},
		{name: "commit/kill-source-after-answer", migrateFault: "source.Commit.answered@1=exit", want: unknownOnTarget,
			cause: `^$`},
		{name: "commit/ctrl-c", serveFault: "target.Commit@1=sleep:500ms", during: ctrlC, want: migrated},
		// A commit never answered ends at its deadline, the outcome
		// unknown: the target never got to it, or it did.
		{name: "commit/hang", serveFault: "target.Commit@1=hang", migrateArgs: freezeTimeout, deadline: 2 * time.Second,
			want: unknownNowhere, cause: `commit outcome unknown: target did not answer Commit within 2s; .*left stopped`},
		{name: "commit/stall-after-resume", serveFault: "target.Commit.handled@1=stall", migrateArgs: freezeTimeout, deadline: 2 * time.Second,
			want: unknownOnTarget, cause: `commit outcome unknown: target did not answer Commit within 2s; .*left stopped`},
		// The source silent while the target is ready: the target
		// discards the shadow, and refuses the commit that comes late;
		// the original runs on.
		{name: "commit/source-silent", migrateFault: "source.Commit@1=sleep:3s", setup: sourceTimeout,
			cause: `refused the commit: .*discarded .*the source sent nothing for 1s`},
		// After the commit: the process runs on the target.
		{name: "confirm/kill-target", serveFault: "target.Confirm@1=exit", serveDies: true, want: migrated},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			runFaultCase(t, phaul, n, 7100+i, c)
		})
	}
}

// freezeTimeout makes phaul migrate wait 2 s for each answer of the
// target.
var freezeTimeout = []string{"--freeze-timeout", "2s"}

// sourceTimeout makes phaul serve discard a migration whose source is
// silent for 1 s.
func sourceTimeout(*testing.T) []string { return []string{"--source-timeout", "1s"} }

// faultRun is the state of one case.
type faultRun struct {
	c       faultCase
	phaul   string
	src     *topology.Host
	serve   *targetDaemon
	pid     int
	wlLog   string
	migrate *migrateProc
	errPath string
}

// waitFault waits for the case's fault line from phaul serve or phaul
// migrate.
func (r *faultRun) waitFault(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if hasLine(r.serve.log, faultLine) || hasLine(r.errPath, faultLine) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("the fault never fired\nserve:\n%s\nmigrate:\n%s", readTail(r.serve.log), readTail(r.errPath))
}

func runFaultCase(t *testing.T, phaul string, n *topology.Network, port int, c faultCase) {
	src, tgt := n.Host("source"), n.Host("target")
	if c.mem == "" {
		c.mem = "16M"
	}
	var serveArgs []string
	if c.setup != nil {
		serveArgs = c.setup(t)
	}
	r := &faultRun{c: c, phaul: phaul, src: src}
	r.serve = startTarget(t, phaul, tgt, port, c.serveFault, serveArgs...)
	if c.fixture != "" {
		r.pid, r.wlLog = startFixtureOn(t, src, need(t, c.fixture))
	} else {
		r.pid, r.wlLog = startMigrant(t, phaul, src, c.mem)
	}
	selfCheck(t, r.pid, r.wlLog)

	// The migration that breaks.
	start := time.Now()
	r.migrate = startMigrate(t, phaul, src, r.serve.addr, r.pid, c.migrateFault, c.migrateArgs...)
	r.errPath = r.migrate.errPath
	var firedAt time.Time
	switch {
	case c.during != nil:
		c.during(t, r)
	case c.deadline > 0:
		r.waitFault(t)
		firedAt = time.Now()
	}
	werr := r.migrate.wait(t)
	stderr, _ := os.ReadFile(r.errPath)
	msg := string(stderr)
	t.Logf("phaul migrate ended after %v: %v", time.Since(start).Round(time.Millisecond), werr)
	if armed := c.serveFault != "" || c.migrateFault != ""; armed && !hasLine(r.serve.log, faultLine) && !strings.Contains(msg, faultLine) {
		t.Fatalf("the fault never fired\nmigrate:\n%s\nserve:\n%s", msg, readTail(r.serve.log))
	}
	errLine := lastErrorLine(msg)
	switch {
	case c.want == migrated && werr != nil:
		t.Fatalf("phaul migrate failed: %v\n%s\nserve:\n%s", werr, msg, readTail(r.serve.log))
	case c.want != migrated && werr == nil:
		t.Fatalf("phaul migrate succeeded\n%s", msg)
	case c.cause != "" && !regexp.MustCompile("(?i)"+c.cause).MatchString(errLine):
		t.Errorf("phaul migrate's error does not name the cause (want /%s/): %q\n%s", c.cause, errLine, msg)
	default:
		t.Logf("phaul migrate: %s", errLine)
	}
	if c.deadline > 0 {
		// The deadline, then at most the Abort's own (answered at once
		// by a target that hangs in one request only).
		took := r.migrate.ended.Sub(firedAt)
		t.Logf("phaul migrate ended %v after the fault", took.Round(time.Millisecond))
		if took < c.deadline-100*time.Millisecond || took > c.deadline+3*time.Second {
			t.Errorf("phaul migrate ended %v after the fault, want %v (+ slack)", took, c.deadline)
		}
	}

	// Exactly one copy runs, and its memory is intact.
	switch c.want {
	case rolledBack:
		waitNoCopy(t, r.serve, r.pid)
		requireRunsHere(t, r.pid, false)
		selfCheck(t, r.pid, r.wlLog)
		r.serve.requireNoLocks(t)
	case migrated:
		waitGone(t, r.pid)
		selfCheck(t, r.serve.copyOf(t, r.pid), r.wlLog)
	case unknownOnTarget:
		requireStopped(t, r.pid)
		selfCheck(t, r.serve.copyOf(t, r.pid), r.wlLog)
		// The operator, told the process runs on the target, kills the
		// stopped original.
		_ = syscall.Kill(r.pid, syscall.SIGKILL)
		waitGone(t, r.pid)
	case unknownNowhere:
		requireStopped(t, r.pid)
		waitNoCopy(t, r.serve, r.pid)
		r.serve.requireNoLocks(t)
		// The operator, seeing nothing on the target, resumes the
		// original.
		if err := syscall.Kill(r.pid, syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		// Tracking stays registered through the commit window (removing
		// it would lengthen the downtime; see engine.Frozen.Hold), but
		// the process gets no userfaultfd, and phaul removed the rest
		// when it let go of the stopped original.
		requireRunsHere(t, r.pid, false)
		selfCheck(t, r.pid, r.wlLog)
	case exited:
		waitGone(t, r.pid)
		waitNoCopy(t, r.serve, r.pid)
	}
	if t.Failed() {
		t.FailNow()
	}

	// The target (restarted if the fault killed it) takes the next
	// migration; the daemon that survived has nothing left of this one.
	if c.serveDies {
		r.serve.waitRestarted(t)
	} else {
		r.serve.requireAlive(t)
	}
	r.serve.requireNoStrays(t, r.pid, c.want == migrated || c.want == unknownOnTarget)
	pid, wlLog := r.pid, r.wlLog
	if c.fresh || c.want != rolledBack {
		pid, wlLog = startMigrant(t, phaul, src, "4M")
	}
	mark := countLines(wlLog)
	next := startMigrate(t, phaul, src, r.serve.addr, pid, "")
	if err := next.wait(t); err != nil {
		b, _ := os.ReadFile(next.errPath)
		t.Fatalf("the next migration failed: %v\n%s\nworkload:\n%s%s\nserve:\n%s", err, b, readTail(wlLog), ended(wlLog), readTail(r.serve.log))
	}
	waitGone(t, pid)
	moved := r.serve.copyOf(t, pid)
	line := selfCheck(t, moved, wlLog)
	if !strings.Contains(line, fmt.Sprintf("pid=%d", pid)) || countLines(wlLog) <= mark {
		t.Errorf("after the next migration: %s", line)
	}
}

// targetDaemon is phaul serve on the target host, in a PID namespace of
// its own whose init is a shell (so the daemon is not init, as on a real
// host where systemd is: what it leaves behind when it dies stays visible).
// The shell starts the daemon again, unarmed, when it dies.
type targetDaemon struct {
	cmd  *exec.Cmd
	log  string
	addr string
	ns   string // the PID namespace, as /proc/PID/ns/pid reads
	// netns is the network namespace's name.
	netns string
	// listening is the line number of the last "listening" log line.
	listening int
}

func startTarget(t *testing.T, phaul string, h *topology.Host, port int, fault string, args ...string) *targetDaemon {
	t.Helper()
	d := &targetDaemon{log: filepath.Join(t.TempDir(), "serve.log"), addr: fmt.Sprintf("%s:%d", h.Addr, port), netns: h.NS}
	serve := append([]string{"--listen", d.addr, "--insecure", "-v"}, args...)
	script := `p=$0; f=$1; shift
PHAUL_FAULT="$f" "$p" serve "$@"
echo "phaul serve exited with status $?; starting it again"
"$p" serve "$@"`
	d.cmd = exec.Command("ip", append([]string{"netns", "exec", h.NS, "unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
		"sh", "-c", script, phaul, fault}, serve...)...)
	d.cmd.Env = environWithout("PHAUL_FAULT")
	startLogged(t, d.cmd, d.log)
	_, d.listening = waitLine(t, d.log, "msg=listening", 0)
	// The namespace's init is unshare's child.
	for _, st := range testutil.Processes() {
		if st.PPid == d.cmd.Process.Pid {
			d.ns, _ = os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", st.Pid))
		}
	}
	if d.ns == "" {
		t.Fatal("no init in the target's PID namespace")
	}
	return d
}

// waitRestarted waits for the daemon started again after a fault killed
// it.
func (d *targetDaemon) waitRestarted(t *testing.T) {
	t.Helper()
	waitLine(t, d.log, "phaul serve exited", d.listening)
	_, d.listening = waitLine(t, d.log, "msg=listening", d.listening)
}

// requireAlive fails the test when the first daemon has exited.
func (d *targetDaemon) requireAlive(t *testing.T) {
	t.Helper()
	if hasLine(d.log, "phaul serve exited") {
		t.Fatalf("phaul serve exited\n%s", readTail(d.log))
	}
}

// requireNoLocks fails the test when a network lock (nftables table) is
// left in the target's network namespace.
func (d *targetDaemon) requireNoLocks(t *testing.T) {
	t.Helper()
	ns, err := os.Open("/run/netns/" + d.netns)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	ids, err := netlock.Locks(ns)
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) != 0 {
		t.Errorf("network locks left on the target: %q", ids)
	}
}

// procs returns the live processes of the target's PID namespace other than
// its init and phaul serve, by their PID there.
func (d *targetDaemon) procs() map[int]testutil.ProcStat {
	out := map[int]testutil.ProcStat{}
	for _, st := range testutil.Processes() {
		if st.State == 'Z' || st.State == 'X' {
			continue
		}
		if ns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", st.Pid)); ns != d.ns {
			continue
		}
		status, err := testutil.ProcStatus(st.Pid, st.Pid)
		if err != nil {
			continue
		}
		f := strings.Fields(status["NSpid"])
		if len(f) != 2 {
			continue
		}
		inner, _ := strconv.Atoi(f[1])
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", st.Pid))
		if inner == 1 || strings.Contains(string(cmdline), "\x00serve\x00") {
			continue
		}
		out[inner] = st
	}
	return out
}

// copyOf returns the PID here of the live copy of pid on the target.
func (d *targetDaemon) copyOf(t *testing.T, pid int) int {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if st, ok := d.procs()[pid]; ok {
			return st.Pid
		}
		if time.Now().After(deadline) {
			t.Fatalf("no copy of %d runs on the target\nserve:\n%s", pid, readTail(d.log))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// requireNoStrays fails the test when the target's namespace holds a
// process besides the daemon and, if copy is set, the copy of pid.
func (d *targetDaemon) requireNoStrays(t *testing.T, pid int, copy bool) {
	t.Helper()
	for inner, st := range d.procs() {
		if copy && inner == pid {
			continue
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", st.Pid))
		t.Errorf("left on the target: PID %d (%d here) %q state %c: %q", inner, st.Pid, st.Comm, st.State,
			strings.ReplaceAll(string(cmdline), "\x00", " "))
	}
}

// waitNoCopy waits until the target runs no copy of pid (a shadow the
// target discards as its session ends goes a moment after the source
// gave up).
func waitNoCopy(t *testing.T, d *targetDaemon, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, ok := d.procs()[pid]
		if !ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("a copy of %d (%d here, state %c) runs on the target\nserve:\n%s", pid, st.Pid, st.State, readTail(d.log))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startMigrant starts the built-in workload on host h and waits until it
// is ready.
func startMigrant(t *testing.T, phaul string, h *topology.Host, mem string) (int, string) {
	t.Helper()
	return startFixtureOn(t, h, []string{phaul, "__workload", "--mem", mem, "--dirty", "1000", "--heartbeat", "100ms"})
}

// startFixtureOn starts a workload (argv) on host h and waits until it is
// ready.
func startFixtureOn(t *testing.T, h *topology.Host, argv []string) (int, string) {
	t.Helper()
	log := filepath.Join(t.TempDir(), "workload.log")
	cmd := exec.Command("ip", append([]string{"netns", "exec", h.NS}, argv...)...)
	cmd.Env = environWithout("PHAUL_FAULT")
	startLogged(t, cmd, log)
	waitLine(t, log, "READY", 0)
	return cmd.Process.Pid, log
}

// migrateProc is a phaul migrate running in the background.
type migrateProc struct {
	cmd     *exec.Cmd
	errPath string // its output
	done    chan struct{}
	err     error     // of Wait, once done is closed
	ended   time.Time // when Wait returned, once done is closed
}

// startMigrate starts phaul migrate on host h with fault armed; its output
// goes to a file. The test's cleanup kills it if it still runs.
func startMigrate(t *testing.T, phaul string, h *topology.Host, addr string, pid int, fault string, args ...string) *migrateProc {
	t.Helper()
	m := &migrateProc{errPath: filepath.Join(t.TempDir(), "migrate.out"), done: make(chan struct{})}
	f, err := os.Create(m.errPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m.cmd = exec.Command("ip", append(append([]string{"netns", "exec", h.NS, phaul, "migrate", "--to", addr, "--insecure"},
		args...), strconv.Itoa(pid))...)
	// A phaul killed by a fault leaves its temporary directory behind.
	m.cmd.Env = append(environWithout("PHAUL_FAULT"), "TMPDIR="+t.TempDir())
	if fault != "" {
		m.cmd.Env = append(m.cmd.Env, "PHAUL_FAULT="+fault)
	}
	m.cmd.Stdout, m.cmd.Stderr = f, f
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := testutil.StartChild(m.cmd); err != nil {
		t.Fatal(err)
	}
	go func() {
		m.err = m.cmd.Wait()
		m.ended = time.Now()
		testutil.UnregisterChild(m.cmd.Process.Pid)
		close(m.done)
	}()
	t.Cleanup(func() {
		select {
		case <-m.done:
		default:
			_ = syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL)
			<-m.done
		}
	})
	return m
}

// wait waits for phaul migrate to end and returns Wait's error; one that
// does not end within 40 s is killed and fails the test.
func (m *migrateProc) wait(t *testing.T) error {
	t.Helper()
	select {
	case <-m.done:
		return m.err
	case <-time.After(40 * time.Second):
		_ = syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL)
		<-m.done
		t.Fatalf("phaul migrate did not end\n%s", readTail(m.errPath))
		return nil
	}
}

// startLogged starts cmd in a process group of its own with its output in
// log; the test's cleanup kills the group and reaps it.
func startLogged(t *testing.T, cmd *exec.Cmd, log string) {
	t.Helper()
	f, err := os.Create(log)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := testutil.StartChild(cmd); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		testutil.UnregisterChild(cmd.Process.Pid)
		// For the messages of a failing test: how it ended (not in the log
		// itself, which a migrated copy writes at its own offset).
		_ = os.WriteFile(log+".end", fmt.Appendf(nil, "process %d ended: %v\n", cmd.Process.Pid, cmd.ProcessState), 0o644)
		close(done)
	}()
	t.Cleanup(func() {
		select {
		case <-done: // a workload that migrated, a target that exited
		default:
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Errorf("%s did not end", cmd.Args)
			}
		}
		testutil.ReapOrphans()
	})
}

// selfCheck asks the workload (PID pid here) to verify its memory and
// requires that it does; it returns the CHECK line.
func selfCheck(t *testing.T, pid int, log string) string {
	t.Helper()
	mark := countLines(log)
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatalf("self-check of %d: %v\n%s%s", pid, err, readTail(log), ended(log))
	}
	line, _ := waitLine(t, log, "CHECK ", mark)
	if !strings.Contains(line, " OK") {
		t.Fatalf("the workload's self-check: %s", line)
	}
	return line
}

// requireRunsHere requires that pid runs on the source: not stopped,
// untraced, and unless tracked, with no tracking left (no userfaultfd, no
// write-protected mapping).
func requireRunsHere(t *testing.T, pid int, tracked bool) {
	t.Helper()
	if !testutil.PidAlive(pid) {
		t.Fatalf("the original %d is gone", pid)
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		problem := resumedProblem(pid, 0)
		if problem == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the original: %s", problem)
		}
		time.Sleep(20 * time.Millisecond)
	}
	report := t.Errorf
	if tracked {
		report = t.Logf
	}
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	for _, fd := range fds {
		if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); strings.Contains(l, "userfaultfd") {
			report("the original still holds descriptor %s: %s", fd.Name(), l)
		}
	}
	if smaps, _ := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid)); strings.Contains(string(smaps), " uw") {
		report("the original still has mappings registered for write-protect tracking")
	}
}

// requireStopped requires that pid is stopped (SIGSTOP), untraced, and
// not killed.
func requireStopped(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		st, err := testutil.ReadProcStat(pid)
		if err != nil || st.State == 'Z' {
			t.Fatalf("the original is gone (%v, state %c), want it stopped", err, st.State)
		}
		status, _ := testutil.ProcStatus(pid, pid)
		if st.State == 'T' && status["TracerPid"] == "0" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the original has state %c and tracer %s, want stopped (T) and untraced", st.State, status["TracerPid"])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitGone waits until pid no longer runs here.
func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for testutil.PidAlive(pid) {
		if time.Now().After(deadline) {
			st, _ := testutil.ReadProcStat(pid)
			t.Fatalf("the original %d still runs here (state %c)", pid, st.State)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitLine waits for a line containing s after the first skip lines of the
// file at path, and returns it with its number.
func waitLine(t *testing.T, path, s string, skip int) (string, int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if line, n := findLine(path, s, skip); n > 0 {
			return line, n
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q line in %s:\n%s%s", s, path, readTail(path), ended(path))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func findLine(path, s string, skip int) (string, int) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	n := 0
	for sc.Scan() {
		n++
		if n > skip && strings.Contains(sc.Text(), s) {
			return sc.Text(), n
		}
	}
	return "", 0
}

// ended says how the process logging to path ended, if it did.
func ended(path string) string {
	b, err := os.ReadFile(path + ".end")
	if err != nil {
		return ""
	}
	return "\n" + string(b)
}

func hasLine(path, s string) bool {
	_, n := findLine(path, s, 0)
	return n > 0
}

func countLines(path string) int {
	b, _ := os.ReadFile(path)
	return strings.Count(string(b), "\n")
}

// lastErrorLine returns phaul migrate's error line ("phaul migrate: ...").
func lastErrorLine(out string) string {
	lines := strings.Split(out, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.HasPrefix(lines[i], "phaul migrate: ") {
			return strings.TrimPrefix(lines[i], "phaul migrate: ")
		}
	}
	return ""
}

// environWithout returns the environment without the variable name.
func environWithout(name string) []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, name+"=") {
			out = append(out, kv)
		}
	}
	return out
}
