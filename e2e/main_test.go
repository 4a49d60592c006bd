package e2e

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
)

// artifact is something TestMain built (or could not build).
type artifact struct {
	argv []string // how to run it
	err  error    // why it is not there; errors.Is(err, testutil.ErrNoTool) means skip
}

var (
	buildDir  string
	phaulBin  artifact
	fixtures  = map[string]*artifact{}
	testdata  string // absolute path of ./testdata
	selfPid   = os.Getpid()
	phaulWait = flag.Duration("phaul-timeout", 45*time.Second, "upper bound of one phaul command")
)

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	var err error
	if testdata, err = filepath.Abs("testdata"); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	if buildDir, err = os.MkdirTemp("", "phaul-e2e-"); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(buildDir)
	// Restored processes are orphaned when `phaul restore -d` exits: be the
	// one they are re-parented to, so that the tests can reap them (PID 1
	// here reaps slowly, and a zombie keeps the PID the next restore needs).
	if err := sys.SetChildSubreaper(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	// Workloads and phaul must not inherit stray descriptors of whatever
	// started the test: a dump would find them in the workload.
	if err := testutil.CloseInheritedFds(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	buildAll()
	defer armEmergencyKill()()
	code := m.Run()
	testutil.ReapOrphans()
	return code
}

// armEmergencyKill makes sure no workload or phaul process outlives the
// test binary when cleanups cannot run: on SIGINT/SIGTERM, and shortly
// before the -timeout panic (which exits without running t.Cleanup), every
// child and process group the tests started is killed. It returns a func
// that disarms it.
func armEmergencyKill() func() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		select {
		case sig := <-sigs:
			fmt.Fprintf(os.Stderr, "e2e: %v: killing the workloads and phaul commands\n", sig)
			testutil.KillAll()
			os.RemoveAll(buildDir)
			os.Exit(2)
		case <-done:
		}
	}()
	var timer *time.Timer
	if f := flag.Lookup("test.timeout"); f != nil {
		if d, ok := f.Value.(flag.Getter).Get().(time.Duration); ok && d > 0 {
			margin := min(10*time.Second, d/4)
			timer = time.AfterFunc(d-margin, func() {
				fmt.Fprintf(os.Stderr, "e2e: the test binary times out in %v: killing the workloads and phaul commands\n", margin)
				// From here on nothing new starts (testutil.StartChild).
				testutil.KillAll()
			})
		}
	}
	return func() {
		signal.Stop(sigs)
		close(done)
		if timer != nil {
			timer.Stop()
		}
	}
}

// buildAll builds phaul and every fixture, concurrently.
func buildAll() {
	var wg sync.WaitGroup
	var mu sync.Mutex
	set := func(name string, a artifact) {
		mu.Lock()
		defer mu.Unlock()
		if name == "phaul" {
			phaulBin = a
		} else {
			fixtures[name] = &a
		}
	}
	build := func(name string, f func() artifact) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			set(name, f())
		}()
	}
	out := func(name string) string { return filepath.Join(buildDir, name) }
	cc := func(name, src string, flags ...string) {
		build(name, func() artifact {
			err := testutil.CompileC(filepath.Join(testdata, src), out(name), flags...)
			return artifact{argv: []string{out(name)}, err: err}
		})
	}
	build("phaul", func() artifact {
		return artifact{argv: []string{out("phaul")}, err: testutil.CompilePhaul(out("phaul"))}
	})
	cc("memory", "memory.c")
	cc("memory-static", "memory.c", "-static")
	cc("threads", "threads.c", "-pthread")
	cc("tracer", "tracer.c")
	cc("unsupported", "unsupported.c")
	cc("bigmem", "bigmem.c")
	cc("treemem", "treemem.c")
	cc("slowaccept", "slowaccept.c")
	cc("churn", "churn.c")
	cc("fdtable", "fdtable.c")
	build("go", func() artifact {
		err := testutil.CompileGo(filepath.Join(testdata, "goworkload"), out("goworkload"))
		return artifact{argv: []string{out("goworkload")}, err: err}
	})
	build("python", func() artifact {
		py, err := testutil.LookTool("python3")
		return artifact{argv: []string{py, filepath.Join(testdata, "workload.py")}, err: err}
	})
	wg.Wait()
	g := *fixtures["go"]
	g.argv = append(append([]string(nil), g.argv...), "-netpoll")
	fixtures["go-netpoll"] = &g
}

// need returns the command line of fixture name; it skips the test when a
// tool is missing and fails it when the fixture did not build.
func need(tb testing.TB, name string) []string {
	tb.Helper()
	a, ok := fixtures[name]
	if !ok {
		tb.Fatalf("no fixture %q", name)
	}
	if a.err != nil {
		if errors.Is(a.err, testutil.ErrNoTool) {
			tb.Skipf("fixture %s: %v", name, a.err)
		}
		tb.Fatalf("fixture %s did not build: %v", name, a.err)
	}
	return append([]string(nil), a.argv...)
}

// needPhaul returns the phaul binary; it skips the test when not root and
// fails it when phaul did not build.
func needPhaul(tb testing.TB) string {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("phaul dump/restore tests need root (ptrace of any process, clone3 with set_tid)")
	}
	if phaulBin.err != nil {
		if errors.Is(phaulBin.err, testutil.ErrNoTool) {
			tb.Skipf("phaul: %v", phaulBin.err)
		}
		tb.Fatalf("phaul did not build: %v", phaulBin.err)
	}
	return phaulBin.argv[0]
}

// startFixture starts fixture name with extra arguments.
func startFixture(tb testing.TB, name string, args ...string) *testutil.Workload {
	tb.Helper()
	return startFixtureOpts(tb, name, &testutil.Options{}, args...)
}

func startFixtureOpts(tb testing.TB, name string, opts *testutil.Options, args ...string) *testutil.Workload {
	tb.Helper()
	argv := append(need(tb, name), args...)
	o := *opts
	if o.Name == "" {
		o.Name = name
	}
	return testutil.StartWorkload(tb, argv, &o)
}

// ---- running phaul --------------------------------------------------------

// phaulResult is one finished phaul command.
type phaulResult struct {
	args     []string
	stdout   string
	stderr   string
	code     int // exit status; -1 when killed by a signal
	duration time.Duration
}

func (r phaulResult) String() string {
	return fmt.Sprintf("phaul %s: exit status %d after %v\nstdout: %s\nstderr: %s",
		strings.Join(r.args, " "), r.code, r.duration.Round(time.Millisecond),
		strings.TrimSpace(r.stdout), strings.TrimSpace(r.stderr))
}

// mustSucceed fails the test unless phaul exited 0; the workload's log tail
// goes into the message.
func (r phaulResult) mustSucceed(tb testing.TB, w *testutil.Workload) {
	tb.Helper()
	if r.code != 0 {
		tb.Fatalf("%v\n%s", r, logTail(w))
	}
}

// mustFail fails the test unless phaul exited non-zero with stderr
// matching every pattern (case-insensitive).
func (r phaulResult) mustFail(tb testing.TB, w *testutil.Workload, patterns ...string) {
	tb.Helper()
	if r.code == 0 {
		tb.Fatalf("phaul succeeded, want a failure\n%v\n%s", r, logTail(w))
	}
	if r.code < 0 {
		tb.Fatalf("phaul died from a signal, want a clean failure\n%v", r)
	}
	for _, p := range patterns {
		if !regexp.MustCompile("(?i)" + p).MatchString(r.stderr) {
			tb.Errorf("phaul's error message does not match %q\n%v", p, r)
		}
	}
	tb.Logf("phaul failed as expected: %s", strings.TrimSpace(r.stderr))
}

func logTail(w *testutil.Workload) string {
	if w == nil {
		return ""
	}
	return w.LogTail(30)
}

// phaulProc is a phaul command that runs in the background.
type phaulProc struct {
	args     []string
	cmd      *exec.Cmd
	outPath  string
	errPath  string
	start    time.Time
	done     chan struct{}
	result   phaulResult
	finished bool
}

// phaulOpts changes how phaul is started.
type phaulOpts struct {
	// tty, when set, is phaul's stdin, stdout and stderr (for --shell-job);
	// phaul's output is then not captured.
	tty *os.File
}

// startPhaul starts phaul in its own process group; t.Cleanup kills that
// group if phaul still runs, and reaps it.
func startPhaul(tb testing.TB, o phaulOpts, args ...string) *phaulProc {
	tb.Helper()
	bin := needPhaul(tb)
	dir := tb.TempDir()
	p := &phaulProc{
		args:    args,
		outPath: filepath.Join(dir, "stdout"),
		errPath: filepath.Join(dir, "stderr"),
		done:    make(chan struct{}),
	}
	p.cmd = exec.Command(bin, args...)
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var files []*os.File
	if o.tty != nil {
		p.cmd.Stdin, p.cmd.Stdout, p.cmd.Stderr = o.tty, o.tty, o.tty
	} else {
		null, err1 := os.Open(os.DevNull)
		out, err2 := os.Create(p.outPath)
		errf, err3 := os.Create(p.errPath)
		if err := errors.Join(err1, err2, err3); err != nil {
			tb.Fatal(err)
		}
		p.cmd.Stdin, p.cmd.Stdout, p.cmd.Stderr = null, out, errf
		files = []*os.File{null, out, errf}
	}
	p.start = time.Now()
	err := testutil.StartChild(p.cmd)
	for _, f := range files {
		f.Close()
	}
	if err != nil {
		tb.Fatalf("start phaul: %v", err)
	}
	pid := p.cmd.Process.Pid
	go func() {
		_ = p.cmd.Wait()
		p.result = phaulResult{args: args, code: p.cmd.ProcessState.ExitCode(), duration: time.Since(p.start)}
		testutil.UnregisterChild(pid)
		close(p.done)
	}()
	tb.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = sys.Kill(-pid, sys.SIGKILL)
			<-p.done
		}
		testutil.ReapOrphans()
	})
	return p
}

// wait waits up to timeout for phaul to exit; on timeout it kills phaul's
// process group and fails the test.
func (p *phaulProc) wait(tb testing.TB, timeout time.Duration, w *testutil.Workload) phaulResult {
	tb.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		_ = sys.Kill(-p.cmd.Process.Pid, sys.SIGKILL)
		<-p.done
		r := p.collect()
		tb.Fatalf("phaul %s did not finish within %v; killed\n%v\n%s", strings.Join(p.args, " "), timeout, r, logTail(w))
	}
	return p.collect()
}

func (p *phaulProc) collect() phaulResult {
	if !p.finished {
		out, _ := os.ReadFile(p.outPath)
		errb, _ := os.ReadFile(p.errPath)
		p.result.stdout, p.result.stderr = string(out), string(errb)
		p.finished = true
	}
	return p.result
}

// runPhaul runs phaul to completion (bounded by -phaul-timeout).
func runPhaul(tb testing.TB, w *testutil.Workload, args ...string) phaulResult {
	tb.Helper()
	return startPhaul(tb, phaulOpts{}, args...).wait(tb, *phaulWait, w)
}

// imageDir returns a fresh directory for an image.
func imageDir(tb testing.TB) string {
	tb.Helper()
	return filepath.Join(tb.TempDir(), "img")
}

// ---- dump and restore steps -----------------------------------------------

// dump runs `phaul dump -t PID -D dir extra...` and requires success.
func dump(tb testing.TB, w *testutil.Workload, dir string, extra ...string) phaulResult {
	tb.Helper()
	r := runPhaul(tb, w, append([]string{"dump", "-t", strconv.Itoa(w.Pid), "-D", dir}, extra...)...)
	r.mustSucceed(tb, w)
	return r
}

// dumpAndWaitGone dumps w and waits until the original process is gone.
func dumpAndWaitGone(tb testing.TB, w *testutil.Workload, dir string, extra ...string) phaulResult {
	tb.Helper()
	r := dump(tb, w, dir, extra...)
	w.WaitGone(tb, 10*time.Second)
	return r
}

// restoreDetached runs `phaul restore -D dir -d --pidfile F extra...`,
// requires success and the original PID, and hands the process to w.
func restoreDetached(tb testing.TB, w *testutil.Workload, dir string, extra ...string) phaulResult {
	tb.Helper()
	pidfile := filepath.Join(tb.TempDir(), "restored.pid")
	want := w.Pid
	r := runPhaul(tb, w, append([]string{"restore", "-D", dir, "-d", "--pidfile", pidfile}, extra...)...)
	if r.code != 0 {
		if testutil.PidAlive(want) {
			w.Restored(tb, want) // so that the cleanup kills it
		}
		tb.Fatalf("%v\n%s", r, logTail(w))
	}
	data, err := os.ReadFile(pidfile)
	if err != nil {
		if testutil.PidAlive(want) {
			w.Restored(tb, want)
		}
		tb.Fatalf("restore -d --pidfile %s wrote no pidfile: %v\n%v", pidfile, err, r)
	}
	got, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		tb.Fatalf("pidfile holds %q\n%v", data, r)
	}
	w.Restored(tb, got)
	if got != want {
		tb.Fatalf("restored with PID %d, want the original PID %d\n%v", got, want, r)
	}
	// phaul restore has exited: its child, the restored process, must have
	// been re-parented to us (we are the child subreaper).
	deadline := time.Now().Add(2 * time.Second)
	for {
		st, err := testutil.ReadProcStat(got)
		if err != nil {
			tb.Fatalf("restored process %d vanished: %v\n%s", got, err, logTail(w))
		}
		if st.PPid == selfPid {
			break
		}
		if time.Now().After(deadline) {
			tb.Errorf("restored process %d has parent %d after phaul exited, want the test process %d", got, st.PPid, selfPid)
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return r
}

// assertResumed checks that pid runs untraced and is not stopped: what a
// failed dump must leave behind.
func assertResumed(tb testing.TB, w *testutil.Workload, wantTracer int) {
	tb.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		problem := resumedProblem(w.Pid, wantTracer)
		if problem == "" {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s: %s\n%s", w.Name, problem, logTail(w))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func resumedProblem(pid, wantTracer int) string {
	tids, err := testutil.Tasks(pid)
	if err != nil {
		return fmt.Sprintf("process %d is gone: %v", pid, err)
	}
	for _, tid := range tids {
		st, err := testutil.ProcStatus(pid, tid)
		if err != nil {
			return fmt.Sprintf("thread %d: %v", tid, err)
		}
		if tid == pid || wantTracer == 0 {
			if tp := st["TracerPid"]; tp != strconv.Itoa(wantTracer) {
				return fmt.Sprintf("thread %d has TracerPid %s, want %d", tid, tp, wantTracer)
			}
		}
		if s := st["State"]; strings.HasPrefix(s, "t") || strings.HasPrefix(s, "T") {
			return fmt.Sprintf("thread %d is stopped (%s)", tid, s)
		}
	}
	return ""
}

// ---- process snapshots ----------------------------------------------------

// snapshot is what /proc shows of a process from outside; a restored
// process must look the same.
type snapshot struct {
	pid     int
	comm    string
	exe     string
	cwd     string
	cmdline string
	status  map[string]string // selected /proc/PID/status fields
	fds     map[int]string    // fd -> normalized link target
	tids    []int
	sigblk  map[int]string // tid -> SigBlk
}

var statusFields = []string{"Umask", "Uid", "Gid", "Groups", "SigIgn", "SigCgt", "NoNewPrivs", "CapEff", "CapBnd"}

// normalizeLink drops the inode number of pipe:[N] and socket:[N]: a
// restore recreates those kernel objects with new numbers.
func normalizeLink(s string) string {
	for _, kind := range []string{"pipe", "socket"} {
		if strings.HasPrefix(s, kind+":[") {
			return kind
		}
	}
	return s
}

func takeSnapshot(tb testing.TB, pid int) snapshot {
	tb.Helper()
	s, err := readSnapshot(pid)
	if err != nil {
		tb.Fatalf("snapshot of %d: %v", pid, err)
	}
	return s
}

func readSnapshot(pid int) (snapshot, error) {
	p := fmt.Sprintf("/proc/%d", pid)
	s := snapshot{pid: pid, fds: map[int]string{}, sigblk: map[int]string{}, status: map[string]string{}}
	comm, err := os.ReadFile(p + "/comm")
	if err != nil {
		return s, err
	}
	s.comm = strings.TrimSpace(string(comm))
	s.exe, _ = os.Readlink(p + "/exe")
	s.cwd, _ = os.Readlink(p + "/cwd")
	cl, _ := os.ReadFile(p + "/cmdline")
	s.cmdline = strings.ReplaceAll(string(cl), "\x00", " ")
	st, err := testutil.ProcStatus(pid, pid)
	if err != nil {
		return s, err
	}
	for _, f := range statusFields {
		s.status[f] = st[f]
	}
	ents, err := os.ReadDir(p + "/fd")
	if err != nil {
		return s, err
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if t, err := os.Readlink(p + "/fd/" + e.Name()); err == nil {
			s.fds[fd] = normalizeLink(t)
		}
	}
	if s.tids, err = testutil.Tasks(pid); err != nil {
		return s, err
	}
	sort.Ints(s.tids)
	for _, tid := range s.tids {
		if ts, err := testutil.ProcStatus(pid, tid); err == nil {
			s.sigblk[tid] = ts["SigBlk"]
		}
	}
	return s, nil
}

// snapOpts tune the comparison of two snapshots.
type snapOpts struct {
	// goRuntime is for Go programs: the runtime starts threads when it
	// likes (the threads of before must all still be there, more may
	// appear) and blocks every signal in a thread for short moments (so
	// per-thread masks are not compared).
	goRuntime bool
	// ttyRemap maps a terminal of before to the one expected after
	// (--shell-job restores stdio onto the restorer's terminal).
	ttyRemap map[string]string
	// skipFds ignores descriptor differences (a test that checks them itself).
	skipFds bool
}

// diffSnapshots lists how after differs from before.
func diffSnapshots(before, after snapshot, o snapOpts) []string {
	var d []string
	eq := func(what, a, b string) {
		if a != b {
			d = append(d, fmt.Sprintf("%s: %q before, %q after", what, a, b))
		}
	}
	eq("comm", before.comm, after.comm)
	eq("exe", before.exe, after.exe)
	eq("cwd", before.cwd, after.cwd)
	eq("cmdline", before.cmdline, after.cmdline)
	for _, f := range statusFields {
		eq("status "+f, before.status[f], after.status[f])
	}
	if !o.skipFds {
		for fd, t := range before.fds {
			want := t
			if r, ok := o.ttyRemap[t]; ok {
				want = r
			}
			got, ok := after.fds[fd]
			if !ok {
				d = append(d, fmt.Sprintf("fd %d (%s) is missing", fd, t))
			} else if got != want {
				d = append(d, fmt.Sprintf("fd %d: %q, want %q", fd, got, want))
			}
		}
		for fd, t := range after.fds {
			if _, ok := before.fds[fd]; !ok {
				d = append(d, fmt.Sprintf("fd %d (%s) appeared (leaked into the restored process?)", fd, t))
			}
		}
	}
	have := map[int]bool{}
	for _, tid := range after.tids {
		have[tid] = true
	}
	for _, tid := range before.tids {
		if !have[tid] {
			d = append(d, fmt.Sprintf("thread %d is missing (threads %v before, %v after)", tid, before.tids, after.tids))
			continue
		}
		if !o.goRuntime {
			eq(fmt.Sprintf("thread %d SigBlk", tid), before.sigblk[tid], after.sigblk[tid])
		}
	}
	if !o.goRuntime && len(after.tids) != len(before.tids) {
		d = append(d, fmt.Sprintf("threads %v before, %v after", before.tids, after.tids))
	}
	sort.Strings(d)
	return d
}

// compareSnapshots fails the test when after differs from before.
func compareSnapshots(tb testing.TB, w *testutil.Workload, before, after snapshot, o snapOpts) {
	tb.Helper()
	if d := diffSnapshots(before, after, o); len(d) > 0 {
		tb.Errorf("%s: restored process %d differs from the original:\n  %s", w.Name, after.pid, strings.Join(d, "\n  "))
	}
}

// ---- leaks ------------------------------------------------------------------

// childSet returns the PIDs of our live children.
func childSet() map[int]bool {
	m := map[int]bool{}
	for _, st := range testutil.Children() {
		m[st.Pid] = true
	}
	return m
}

// assertNoLeaks fails the test when a process that was not our child
// before is now one (everything phaul leaves behind is re-parented to us),
// and kills it.
func assertNoLeaks(tb testing.TB, before map[int]bool) {
	tb.Helper()
	time.Sleep(100 * time.Millisecond) // let exits and re-parenting settle
	testutil.ReapOrphans()
	for _, st := range testutil.Children() {
		if before[st.Pid] || st.State == 'Z' {
			continue
		}
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", st.Pid))
		tb.Errorf("leaked process %d %q (%s, state %c) is still running", st.Pid, st.Comm, exe, st.State)
		_ = sys.Kill(st.Pid, sys.SIGKILL)
		_ = testutil.WaitPidGone(st.Pid, 5*time.Second)
	}
}

// ---- a full cycle ---------------------------------------------------------

// cycleOpts tune dumpRestoreCycle.
type cycleOpts struct {
	dumpArgs    []string
	restoreArgs []string
	snap        snapOpts
	// beforeDump runs after the first check, right before the dump.
	beforeDump func(tb testing.TB, w *testutil.Workload)
}

// dumpRestoreCycle is the standard scenario: check, dump, original gone,
// restore -d with the same PID, same /proc view, check (continuing the
// sequence of the checks before the dump), run a while, check again with
// the counters advanced.
func dumpRestoreCycle(tb testing.TB, w *testutil.Workload, o cycleOpts) {
	tb.Helper()
	pre := w.MustCheck(tb)
	if o.beforeDump != nil {
		o.beforeDump(tb, w)
	}
	before := takeSnapshot(tb, w.Pid)
	dir := imageDir(tb)
	dumpAndWaitGone(tb, w, dir, o.dumpArgs...)
	restoreDetached(tb, w, dir, o.restoreArgs...)
	compareSnapshots(tb, w, before, takeSnapshot(tb, w.Pid), o.snap)
	checkAfterRestore(tb, w, pre)
}

// checkAfterRestore runs the two checks after a restore: the first must
// continue the sequence of pre (the check counter lives in the restored
// memory), the second must see the counters advanced.
func checkAfterRestore(tb testing.TB, w *testutil.Workload, pre testutil.CheckResult) {
	tb.Helper()
	post := w.MustCheck(tb)
	if post.Seq != pre.Seq+1 {
		tb.Fatalf("%s: first check after restore has seq %d, want %d (the check before the dump was %d)\n%s",
			w.Name, post.Seq, pre.Seq+1, pre.Seq, logTail(w))
	}
	p0, _ := pre.Int("progress")
	p1, _ := post.Int("progress")
	if p1 < p0 {
		tb.Fatalf("%s: progress went back from %d to %d across dump/restore", w.Name, p0, p1)
	}
	time.Sleep(300 * time.Millisecond)
	post2 := w.MustCheck(tb)
	if p2, _ := post2.Int("progress"); p2 <= p1 {
		tb.Fatalf("%s: progress stuck at %d after restore (%q, then %q)", w.Name, p1, post.Line, post2.Line)
	}
}
