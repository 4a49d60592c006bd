package e2e

// End-to-end tests of process trees and of the kernel objects their
// processes share: `phaul dump -t PID` takes the tree under PID, restore
// rebuilds it with the same PIDs, parents, sessions and process groups, and
// every program checks itself after restore. The fixtures are
// testdata/tree_*.c (protocol in testdata/tree_fixture.h) and
// testdata/tree_pool.py.

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
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

// ---- fixtures ---------------------------------------------------------------

// lazyFixture is a fixture built on first use.
type lazyFixture struct {
	once sync.Once
	a    artifact
}

var treeFixtures sync.Map // name -> *lazyFixture

// needTreeFixture returns the command line of testdata/NAME.c, built on
// first use; it skips the test when gcc is missing.
func needTreeFixture(tb testing.TB, name string) []string {
	tb.Helper()
	v, _ := treeFixtures.LoadOrStore(name, &lazyFixture{})
	l := v.(*lazyFixture)
	l.once.Do(func() {
		out := filepath.Join(buildDir, name)
		err := testutil.CompileC(filepath.Join(testdata, name+".c"), out)
		l.a = artifact{argv: []string{out}, err: err}
	})
	if err := l.a.err; err != nil {
		if errors.Is(err, testutil.ErrNoTool) {
			tb.Skipf("fixture %s: %v", name, err)
		}
		tb.Fatalf("fixture %s did not build: %v", name, err)
	}
	return append([]string(nil), l.a.argv...)
}

// ---- a tree of processes ------------------------------------------------------

// procTree is a running fixture tree: the workload is its root, the
// "PROC <role> <pid>" lines of its preamble name every process.
type procTree struct {
	w      *testutil.Workload
	marker string // a word of every member's command line: the fixture's path
	roles  []string
	pids   map[string]int
}

// startTree starts a tree fixture. marker is a word of the command line of
// every process of the tree (the fixture's path); the cleanup kills every
// process of the tree, the descendants it finds included, and reaps them.
func startTree(tb testing.TB, marker string, argv []string, opts *testutil.Options) *procTree {
	tb.Helper()
	t := &procTree{marker: marker, pids: map[string]int{}}
	// Registered before the workload's own cleanup, so it runs after it:
	// by then the root is dead and its orphans are our children.
	tb.Cleanup(func() { t.kill(tb) })
	if opts == nil {
		opts = &testutil.Options{}
	}
	t.w = testutil.StartWorkload(tb, argv, opts)
	for _, l := range t.w.Preamble {
		f := strings.Fields(l)
		if len(f) != 3 || f[0] != "PROC" {
			continue
		}
		pid, err := strconv.Atoi(f[2])
		if err != nil {
			tb.Fatalf("bad PROC line %q", l)
		}
		t.roles = append(t.roles, f[1])
		t.pids[f[1]] = pid
	}
	if t.pids["root"] != t.w.Pid {
		tb.Fatalf("%s: PROC lines %q do not name the root %d", t.w.Name, t.w.Preamble, t.w.Pid)
	}
	return t
}

func (t *procTree) isZombie(role string) bool { return strings.HasPrefix(role, "zombie") }

// members lists the roles of the live processes (not the zombies).
func (t *procTree) members() []string {
	var out []string
	for _, r := range t.roles {
		if !t.isZombie(r) {
			out = append(out, r)
		}
	}
	return out
}

// treeChildPids lists the children of pid (of every thread).
func treeChildPids(pid int) []int {
	var out []int
	tids, _ := testutil.Tasks(pid)
	for _, tid := range tids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, tid))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

func treeCmdlineHas(pid int, word string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	for _, a := range strings.Split(string(b), "\x00") {
		if a == word {
			return true
		}
	}
	return false
}

// kill kills every process of the tree still there (the known ones, their
// descendants, our children running the fixture) and reaps them.
func (t *procTree) kill(tb testing.TB) {
	set := map[int]bool{}
	for _, st := range testutil.Children() {
		if treeCmdlineHas(st.Pid, t.marker) {
			set[st.Pid] = true
		}
	}
	for _, p := range t.pids {
		if st, err := testutil.ReadProcStat(p); err == nil && (st.State == 'Z' || treeCmdlineHas(p, t.marker)) {
			set[p] = true
		}
	}
	queue := make([]int, 0, len(set))
	for p := range set {
		queue = append(queue, p)
	}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range treeChildPids(p) {
			if !set[c] && treeCmdlineHas(c, t.marker) {
				set[c] = true
				queue = append(queue, c)
			}
		}
	}
	for p := range set {
		_ = sys.Kill(p, sys.SIGKILL)
	}
	for p := range set {
		st, err := testutil.ReadProcStat(p)
		if err != nil || (st.State == 'Z' && st.PPid != selfPid && !set[st.PPid]) {
			continue // gone, or a zombie of someone else
		}
		if err := testutil.WaitPidGone(p, 10*time.Second); err != nil {
			tb.Errorf("cleanup of the %s tree: %v", t.marker, err)
		}
	}
	testutil.ReapOrphans()
}

// ---- what the tree looks like from outside -----------------------------------

// treeState is what /proc shows of a tree.
type treeState struct {
	stats map[string]testutil.ProcStat
	snaps map[string]snapshot
	// shared lists the open file descriptions held more than once in the
	// tree (kcmp KCMP_FILE), each as its holders "role:fd ...".
	shared []string
}

func (t *procTree) state(tb testing.TB) treeState {
	tb.Helper()
	s := treeState{stats: map[string]testutil.ProcStat{}, snaps: map[string]snapshot{}}
	for _, r := range t.roles {
		st, err := testutil.ReadProcStat(t.pids[r])
		if err != nil {
			tb.Fatalf("%s %d: %v", r, t.pids[r], err)
		}
		s.stats[r] = st
		if !t.isZombie(r) {
			s.snaps[r] = takeSnapshot(tb, t.pids[r])
		}
	}
	s.shared = t.sharedDescriptions(tb, s)
	return s
}

// sharedDescriptions groups every descriptor of the tree by open file
// description (kcmp) and lists the groups with more than one holder.
func (t *procTree) sharedDescriptions(tb testing.TB, s treeState) []string {
	tb.Helper()
	type holder struct {
		role string
		pid  int
		fd   int
	}
	var groups [][]holder
	for _, r := range t.members() {
		fds := make([]int, 0, len(s.snaps[r].fds))
		for fd := range s.snaps[r].fds {
			fds = append(fds, fd)
		}
		sort.Ints(fds)
		for _, fd := range fds {
			h := holder{r, t.pids[r], fd}
			placed := false
			for i, g := range groups {
				if same, err := sys.Kcmp(g[0].pid, h.pid, sys.KCMP_FILE, uint64(g[0].fd), uint64(h.fd)); err == nil && same == 0 {
					groups[i] = append(groups[i], h)
					placed = true
					break
				}
			}
			if !placed {
				groups = append(groups, []holder{h})
			}
		}
	}
	var out []string
	for _, g := range groups {
		if len(g) < 2 {
			continue
		}
		names := make([]string, len(g))
		for i, h := range g {
			names[i] = fmt.Sprintf("%s:%d", h.role, h.fd)
		}
		sort.Strings(names)
		out = append(out, fmt.Sprintf("%s (%s)", strings.Join(names, " "), s.snaps[g[0].role].fds[g[0].fd]))
	}
	sort.Strings(out)
	return out
}

// treeCompare tunes compareTree.
type treeCompare struct {
	snap snapOpts
	// skipShared does not compare the shared descriptions (a tree whose
	// descriptors come and go, like a server's connections).
	skipShared bool
}

// compareTree fails the test when the restored tree differs from the
// original: a process missing, another parent, group or session, a zombie
// no longer one, a snapshot difference, or a file description shared
// differently.
func (t *procTree) compareTree(tb testing.TB, before, after treeState, o treeCompare) {
	tb.Helper()
	var d []string
	for _, r := range t.roles {
		b, a := before.stats[r], after.stats[r]
		if (b.State == 'Z') != (a.State == 'Z') {
			d = append(d, fmt.Sprintf("%s %d: state %c before, %c after", r, b.Pid, b.State, a.State))
		}
		if b.PPid != a.PPid || b.Pgrp != a.Pgrp || b.Session != a.Session {
			d = append(d, fmt.Sprintf("%s %d: parent/pgrp/session %d/%d/%d before, %d/%d/%d after", r, b.Pid,
				b.PPid, b.Pgrp, b.Session, a.PPid, a.Pgrp, a.Session))
		}
		if bs, ok := before.snaps[r]; ok {
			for _, x := range diffSnapshots(bs, after.snaps[r], o.snap) {
				d = append(d, fmt.Sprintf("%s %d: %s", r, b.Pid, x))
			}
		}
	}
	if !o.skipShared {
		have := map[string]bool{}
		for _, g := range after.shared {
			have[g] = true
		}
		for _, g := range before.shared {
			if !have[g] {
				d = append(d, "file description no longer shared as before: "+g)
			}
			delete(have, g)
		}
		for g := range have {
			d = append(d, "file description shared only after restore: "+g)
		}
	}
	if len(d) > 0 {
		sort.Strings(d)
		tb.Errorf("%s: the restored tree differs from the original:\n  %s", t.w.Name, strings.Join(d, "\n  "))
	}
}

// ---- dump and restore ------------------------------------------------------

// waitTreeGone waits until every process of the tree is gone (and reaped).
func (t *procTree) waitTreeGone(tb testing.TB) {
	tb.Helper()
	t.w.WaitGone(tb, 10*time.Second)
	for _, r := range t.roles {
		if err := testutil.WaitPidGone(t.pids[r], 10*time.Second); err != nil {
			tb.Fatalf("after the dump, %s: %v", r, err)
		}
	}
}

// dumpTree dumps the tree and waits until all of it is gone.
func (t *procTree) dumpTree(tb testing.TB, dir string, extra ...string) {
	tb.Helper()
	dump(tb, t.w, dir, extra...)
	t.waitTreeGone(tb)
}

// restoreTree restores the tree detached and requires every process back
// under its PID (the zombies as zombies).
func (t *procTree) restoreTree(tb testing.TB, dir string) {
	tb.Helper()
	restoreDetached(tb, t.w, dir)
	for _, r := range t.roles {
		st, err := testutil.ReadProcStat(t.pids[r])
		switch {
		case err != nil:
			tb.Fatalf("%s %d was not restored: %v\n%s", r, t.pids[r], err, logTail(t.w))
		case t.isZombie(r) && st.State != 'Z':
			tb.Errorf("%s %d was restored in state %c, want a zombie", r, t.pids[r], st.State)
		case !t.isZombie(r) && st.State == 'Z':
			tb.Errorf("%s %d was restored as a zombie", r, t.pids[r])
		}
	}
}

// progressFields returns the fields of a check that count progress: the
// root's "progress" and each member's "<role>_progress".
func progressFields(r testutil.CheckResult) map[string]int64 {
	m := map[string]int64{}
	for k := range r.Fields {
		if k == "progress" || strings.HasSuffix(k, "_progress") {
			if v, ok := r.Int(k); ok {
				m[k] = v
			}
		}
	}
	return m
}

// requireTreeProgress requires c2 to show every process of the tree
// further than c1.
func requireTreeProgress(tb testing.TB, t *procTree, c1, c2 testutil.CheckResult, when string) {
	tb.Helper()
	p1, p2 := progressFields(c1), progressFields(c2)
	for _, r := range t.members() {
		k := r + "_progress"
		if r == "root" {
			k = "progress"
		}
		a, ok1 := p1[k]
		b, ok2 := p2[k]
		if !ok1 || !ok2 {
			tb.Fatalf("%s: %s: no %s in %q / %q", t.w.Name, when, k, c1.Line, c2.Line)
		}
		if b <= a {
			tb.Fatalf("%s: %s: %s %d does not advance (%d before): %q", t.w.Name, when, r, b, a, c2.Line)
		}
	}
}

// checkTreeAfterRestore checks twice after a restore: the first check must
// continue the sequence of pre, the second must show every process of the
// tree further than the first.
func checkTreeAfterRestore(tb testing.TB, t *procTree, pre testutil.CheckResult) testutil.CheckResult {
	tb.Helper()
	post := t.w.MustCheck(tb)
	if post.Seq != pre.Seq+1 {
		tb.Fatalf("%s: first check after restore has seq %d, want %d", t.w.Name, post.Seq, pre.Seq+1)
	}
	time.Sleep(300 * time.Millisecond)
	post2 := t.w.MustCheck(tb)
	requireTreeProgress(tb, t, post, post2, "after restore")
	return post2
}

// terminate sends SIGTERM to the root and returns its EXIT line; the tree
// must be gone afterwards.
func (t *procTree) terminate(tb testing.TB) string {
	tb.Helper()
	mark := t.w.Mark()
	if err := t.w.Signal(syscall.SIGTERM); err != nil {
		tb.Fatal(err)
	}
	line := t.w.WaitLine(tb, mark, "EXIT", 15*time.Second)
	t.waitTreeGone(tb)
	return line
}

// dumpRestoreTree is the common scenario: check, dump, the whole tree gone,
// restore, the same tree seen from /proc, checks continue and every process
// makes progress. It returns the last check.
func dumpRestoreTree(tb testing.TB, t *procTree, cmp treeCompare, extra ...string) testutil.CheckResult {
	tb.Helper()
	pre := t.w.MustCheck(tb)
	before := t.state(tb)
	dir := imageDir(tb)
	t.dumpTree(tb, dir, extra...)
	t.restoreTree(tb, dir)
	t.compareTree(tb, before, t.state(tb), cmp)
	return checkTreeAfterRestore(tb, t, pre)
}

// ---- 1. pipes, zombies, sessions, groups, a shared offset --------------------

// TestTreePipeStream dumps a tree of three generations (a new process group
// with a member that joined it, a new session, two zombies) streaming
// numbered records through two pipes kept full, with a file description
// shared across fork. After restore every process checks its IDs, the flags
// of its pipe ends, the shared offset (each side writes and sees the
// other's write move it), and the records go on with no gap and no repeat;
// the zombies are still zombies, and the root reaps them at exit with their
// original statuses. "single" is the stream within one process,
// "tree-without-zombies" the tree without its zombies.
func TestTreePipeStream(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		exit []string // required in the EXIT line
	}{
		{"single", []string{"--single"}, []string{"EXIT 7 "}},
		{"tree-without-zombies", []string{"--no-zombies"}, []string{"EXIT 7 ", "children_ended=1"}},
		{"tree", nil, []string{"EXIT 7 ", "zombie_exit=42", "zombie_signal=12", "children_ended=1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			needPhaul(t)
			argv := append(needTreeFixture(t, "tree_pipe"), tc.args...)
			tr := startTree(t, argv[0], argv, nil)
			if tc.name != "single" {
				st := tr.state(t)
				child, gc, sess := st.stats["child"], st.stats["grandchild"], st.stats["session"]
				if child.Pgrp != child.Pid || gc.Pgrp != child.Pid || sess.Session != sess.Pid ||
					(tc.name == "tree" && st.stats["zombie-exit"].State != 'Z') {
					t.Fatalf("the fixture did not build the tree it promises: %+v", st.stats)
				}
			}
			time.Sleep(200 * time.Millisecond) // the pipes fill up
			dumpRestoreTree(t, tr, treeCompare{})
			line := tr.terminate(t)
			for _, want := range tc.exit {
				if !strings.Contains(line, want) {
					t.Errorf("exit line %q lacks %q: the zombies or the children did not end as they should", line, want)
				}
			}
		})
	}
}

// ---- 2. a pre-forked unix socket server ---------------------------------------

// unixClient sends requests to the pre-forked server, one connection each,
// and records what happened.
type unixClient struct {
	path    string
	workers map[int]bool

	busy   sync.Mutex // held during a request
	mu     sync.Mutex
	ok     int
	errs   []clientError
	seenAt map[int]time.Time // worker PID -> last answer
	cur    net.Conn          // the connection in flight
	paused bool
	halted bool
	stop   chan struct{}
	done   chan struct{}
}

type clientError struct {
	start time.Time
	err   error
}

func startUnixClient(tb testing.TB, path string, workers map[int]bool) *unixClient {
	c := &unixClient{path: path, workers: workers, seenAt: map[int]time.Time{},
		stop: make(chan struct{}), done: make(chan struct{})}
	go c.run()
	tb.Cleanup(c.halt)
	return c
}

// halt stops the client, aborting the request in flight.
func (c *unixClient) halt() {
	c.mu.Lock()
	if !c.halted {
		c.halted = true
		close(c.stop)
		if c.cur != nil {
			c.cur.Close()
		}
	}
	c.mu.Unlock()
	<-c.done
}

// pause returns once the request in flight, if any, is over (the worker
// closed its end) and no other will start until resume.
func (c *unixClient) pause() {
	c.mu.Lock()
	c.paused = true
	c.mu.Unlock()
	c.busy.Lock()
	defer c.busy.Unlock()
}

func (c *unixClient) resume() {
	c.mu.Lock()
	c.paused = false
	c.mu.Unlock()
}

func (c *unixClient) run() {
	defer close(c.done)
	for n := 1; ; {
		select {
		case <-c.stop:
			return
		case <-time.After(3 * time.Millisecond):
		}
		c.busy.Lock()
		c.mu.Lock()
		paused := c.paused
		c.mu.Unlock()
		if paused {
			c.busy.Unlock()
			continue
		}
		start := time.Now()
		pid, err := c.request(n)
		n++
		c.busy.Unlock()
		c.mu.Lock()
		if c.halted {
			c.mu.Unlock()
			return
		}
		if err != nil {
			c.errs = append(c.errs, clientError{start, err})
		} else {
			c.ok++
			c.seenAt[pid] = time.Now()
		}
		c.mu.Unlock()
	}
}

// request sends "n", checks the answer "n n*n%1000003 pid" and waits until
// the worker has closed the connection.
func (c *unixClient) request(n int) (int, error) {
	conn, err := net.DialTimeout("unix", c.path, 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	c.mu.Lock()
	c.cur = conn
	if c.halted {
		conn.Close()
	}
	c.mu.Unlock()
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := fmt.Fprintf(conn, "%d\n", n); err != nil {
		return 0, err
	}
	answer, err := io.ReadAll(conn)
	if err != nil {
		return 0, fmt.Errorf("request %d: %w after %q", n, err, answer)
	}
	var an, sq, pid int
	if _, err := fmt.Sscanf(string(answer), "%d %d %d\n", &an, &sq, &pid); err != nil || an != n || sq != n*n%1000003 {
		return 0, fmt.Errorf("request %d: wrong answer %q", n, answer)
	}
	if !c.workers[pid] {
		return 0, fmt.Errorf("request %d: answered by %d, not one of the workers %v", n, pid, c.workers)
	}
	return pid, nil
}

// status returns the answers so far, the errors of requests started
// outside [from, to], and how many started inside.
func (c *unixClient) status(from, to time.Time) (ok int, bad []clientError, inWindow int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.errs {
		if !e.start.Before(from) && !e.start.After(to) {
			inWindow++
		} else {
			bad = append(bad, e)
		}
	}
	return c.ok, bad, inWindow
}

// seenSince lists the workers that answered since t.
func (c *unixClient) seenSince(t time.Time) map[int]bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := map[int]bool{}
	for pid, at := range c.seenAt {
		if at.After(t) {
			m[pid] = true
		}
	}
	return m
}

// TestTreePreforkUnixServer dumps a pre-forked server: three workers
// accept on one listening unix socket the root bound, and a prober inside
// the tree checks answers all along (its connections are in flight when
// the tree freezes: queued in the backlog, or accepted with the request
// unread). This test is a client too, from outside: every worker must
// answer it before and after, under its PID.
//
// "client-paused": the outside client pauses during the dump and restore
// (no connection of it exists then); it must never fail.
// "client-during-dump": it keeps connecting all along. Its connections
// queued while the server is frozen cannot be taken (their client end is
// outside): the dump must go on without them and their clients see them
// fail; requests started between the dump and the end of the restore may
// fail, no other may.
func TestTreePreforkUnixServer(t *testing.T) {
	for _, during := range []bool{false, true} {
		name := "client-paused"
		if during {
			name = "client-during-dump"
		}
		t.Run(name, func(t *testing.T) { preforkUnixServer(t, during) })
	}
}

func preforkUnixServer(t *testing.T, during bool) {
	needPhaul(t)
	argv := needTreeFixture(t, "tree_prefork")
	sock := filepath.Join(t.TempDir(), "srv.sock")
	tr := startTree(t, argv[0], append(argv, "--socket", sock, "--workers", "3"), nil)
	workers := map[int]bool{}
	for _, r := range tr.roles {
		if strings.HasPrefix(r, "worker") {
			workers[tr.pids[r]] = true
		}
	}
	if len(workers) != 3 {
		t.Fatalf("PROC lines name %d workers: %v", len(workers), tr.pids)
	}
	client := startUnixClient(t, sock, workers)
	begin := time.Now()
	treeWaitFor(t, 10*time.Second, "every worker answers the outside client", func() bool {
		return len(client.seenSince(begin)) == 3
	})
	pre := tr.w.MustCheck(t)
	before := tr.state(t)

	windowStart := time.Now()
	if !during {
		client.pause()
	}
	// A connection of the outside client being served when the tree
	// freezes makes phaul run it again and retry (ErrBusy): the dump
	// itself must succeed.
	dir := imageDir(t)
	runPhaul(t, tr.w, "dump", "-t", strconv.Itoa(tr.w.Pid), "-D", dir).mustSucceed(t, tr.w)
	tr.waitTreeGone(t)
	tr.restoreTree(t, dir)
	windowEnd := time.Now()
	client.resume()
	tr.compareTree(t, before, tr.state(t), treeCompare{snap: snapOpts{skipFds: true}, skipShared: true})
	checkTreeAfterRestore(t, tr, pre)

	treeWaitFor(t, 10*time.Second, "every worker answers the outside client after restore", func() bool {
		return len(client.seenSince(windowEnd)) == 3
	})
	client.halt()
	ok, bad, inWindow := client.status(windowStart, windowEnd)
	if !during {
		// Paused: no failure is excused (the zero window excuses none).
		_, bad, _ = client.status(time.Time{}, time.Time{})
	}
	t.Logf("outside client: %d answers; %d connections failed while the server was away (%v)", ok, inWindow,
		windowEnd.Sub(windowStart).Round(time.Millisecond))
	for i, e := range bad {
		if i == 5 {
			t.Errorf("... %d more", len(bad)-5)
			break
		}
		t.Errorf("request started at %s (dump and restore %s..%s): %v", e.start.Format("15:04:05.000"),
			windowStart.Format("15:04:05.000"), windowEnd.Format("15:04:05.000"), e.err)
	}
	if line := tr.terminate(t); !strings.Contains(line, "children_ended=4") {
		t.Errorf("exit line %q: the workers and the prober did not all end", line)
	}
}

// treeWaitFor polls cond every 20 ms until it holds, and fails the test after
// timeout.
func treeWaitFor(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting until %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ---- 3. epoll, eventfd and timerfds in a child ---------------------------------

// TestTreeEpollTimer dumps a child waiting in epoll_wait(-1) on an eventfd
// its parent writes to and on timerfds: a periodic one (its count of
// expirations must follow the clock, the ones missed while frozen
// included), and two one-shot timers armed right before the dump (relative
// CLOCK_MONOTONIC, absolute CLOCK_REALTIME) that must fire on time after
// restore. An eventfd nobody reads keeps its counter. "single" is the same
// in one process.
func TestTreeEpollTimer(t *testing.T) {
	for _, tc := range []struct {
		name   string
		args   []string
		prefix string
	}{
		{"single", []string{"--single"}, ""},
		{"tree", nil, "waiter_"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			needPhaul(t)
			const oneshot = 1500 * time.Millisecond
			argv := needTreeFixture(t, "tree_epoll")
			argv = append(append(argv, tc.args...), "--oneshot-ms", strconv.FormatInt(oneshot.Milliseconds(), 10))
			tr := startTree(t, argv[0], argv, nil)
			pre := tr.w.MustCheck(t) // arms the one-shot timers
			armed := field(t, pre, tc.prefix+"oneshot_armed")
			absTarget := field(t, pre, tc.prefix+"abs_target")
			before := tr.state(t)
			dir := imageDir(t)
			tr.dumpTree(t, dir)
			tr.restoreTree(t, dir)
			restoredMono, err := sys.ClockGettime(sys.CLOCK_MONOTONIC)
			if err != nil {
				t.Fatal(err)
			}
			restoredReal := time.Now().UnixNano()
			tr.compareTree(t, before, tr.state(t), treeCompare{})
			checkTreeAfterRestore(t, tr, pre)

			time.Sleep(time.Until(time.Unix(0, absTarget).Add(300 * time.Millisecond)))
			var r testutil.CheckResult
			for deadline := time.Now().Add(10 * time.Second); ; {
				r = tr.w.MustCheck(t)
				if field(t, r, tc.prefix+"oneshot_fired") != 0 && field(t, r, tc.prefix+"abs_fired") != 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the one-shot timers did not fire after restore: %s", r.Line)
				}
				time.Sleep(100 * time.Millisecond)
			}
			const tolerance = 150 * time.Millisecond
			for _, tm := range []struct {
				name            string
				want, fired, at int64 // ns on the timer's clock; at: when restore ended
			}{
				{"one-shot CLOCK_MONOTONIC", armed + oneshot.Nanoseconds(), field(t, r, tc.prefix+"oneshot_fired"), restoredMono},
				{"absolute CLOCK_REALTIME", absTarget, field(t, r, tc.prefix+"abs_fired"), restoredReal},
			} {
				latest := max(tm.want, tm.at)
				late := time.Duration(tm.fired - tm.want)
				if tm.fired < tm.want || tm.fired > latest+tolerance.Nanoseconds() {
					t.Errorf("%s timer fired %v after its time, want within %v of %v", tm.name, late, tolerance,
						time.Duration(latest-tm.want))
				} else {
					t.Logf("%s timer fired %v after its time", tm.name, late.Round(time.Microsecond))
				}
			}
			if line := tr.terminate(t); !strings.Contains(line, "EXIT 7 ") {
				t.Errorf("exit line %q", line)
			}
		})
	}
}

// ---- 4. a python multiprocessing pool ------------------------------------------

// TestTreePythonPool dumps a python3 multiprocessing Pool (fork context,
// three workers) half-way through its tasks: pipes between the processes,
// POSIX semaphores in deleted /dev/shm files, the pool's threads. After
// restore the pool finishes, every result correct, in order, and computed
// by the original three workers.
func TestTreePythonPool(t *testing.T) {
	needPhaul(t)
	py, err := testutil.LookTool("python3")
	if err != nil {
		t.Skipf("python3: %v", err)
	}
	script := filepath.Join(testdata, "tree_pool.py")
	const tasks = 240
	tr := startTree(t, script, []string{py, script, "--tasks", strconv.Itoa(tasks), "--task-ms", "20"}, nil)
	var pre testutil.CheckResult
	treeWaitFor(t, 10*time.Second, "the pool has done 30 tasks", func() bool {
		time.Sleep(50 * time.Millisecond)
		pre = tr.w.MustCheck(t)
		return field(t, pre, "progress") >= 30
	})
	if field(t, pre, "progress") >= tasks*2/3 {
		t.Fatalf("the pool is nearly done before the dump: %s", pre.Line)
	}
	mark := tr.w.Mark()
	before := tr.state(t)
	dir := imageDir(t)
	tr.dumpTree(t, dir)
	tr.restoreTree(t, dir)
	tr.compareTree(t, before, tr.state(t), treeCompare{})
	post := tr.w.MustCheck(t)
	if post.Seq != pre.Seq+1 {
		t.Fatalf("first check after restore has seq %d, want %d", post.Seq, pre.Seq+1)
	}
	if line := tr.w.WaitLine(t, mark, "DONE", 30*time.Second); line != fmt.Sprintf("DONE results=%d", tasks) {
		t.Fatalf("the pool did not finish its work correctly after restore: %s\n%s", line, logTail(tr.w))
	}
	final := tr.w.MustCheck(t)
	if got := field(t, final, "progress"); got != tasks {
		t.Errorf("%d results, want %d: %s", got, tasks, final.Line)
	}
	if line := tr.terminate(t); line != fmt.Sprintf("EXIT 7 results=%d", tasks) {
		t.Errorf("exit line %q", line)
	}
}

// ---- 5. counting in turns through shared memory ---------------------------------

// TestTreeSharedCounter dumps a parent and a child that count in turns
// through shared pages, waiting for their turn on a futex in the shared
// anonymous page: "anon-memfd" (MAP_SHARED anonymous memory, a memfd mapped
// before the fork and once more by the child after it), "posix-sysv" (a
// POSIX shm object unlinked after mapping, a SysV segment). No count may
// be lost or repeated across the dump; the SysV segment must be gone once
// the program has removed it at exit.
func TestTreeSharedCounter(t *testing.T) {
	for _, tc := range []struct{ name, kinds string }{
		{"anon-memfd", "anon,memfd"},
		{"posix-sysv", "posix,sysv"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			needPhaul(t)
			argv := needTreeFixture(t, "tree_shm")
			name := fmt.Sprintf("/phaul-e2e-%d-%d", selfPid, time.Now().UnixNano())
			t.Cleanup(func() { _ = os.Remove("/dev/shm" + name) })
			argv = append(argv, "--kinds", tc.kinds, "--posix-name", name)
			tr := startTree(t, argv[0], argv, nil)
			shmid := -1
			for _, l := range tr.w.Preamble {
				if f := strings.Fields(l); len(f) == 3 && f[0] == "SHM" && f[1] == "sysv" {
					shmid, _ = strconv.Atoi(f[2])
				}
			}
			t.Cleanup(func() { removeSysvShm(t, shmid, tr) })
			dumpRestoreTree(t, tr, treeCompare{})
			if line := tr.terminate(t); !strings.Contains(line, "EXIT 7 children_ended=1") {
				t.Errorf("exit line %q", line)
			}
			for _, s := range sysvSegments(t) {
				if s.id == shmid {
					t.Errorf("SysV segment %d still exists after the program removed it (IPC_RMID) and exited: %+v", shmid, s)
				}
			}
		})
	}
}

type sysvSeg struct{ key, id, size, cpid, lpid, nattch int }

// sysvSegments lists the SysV shared memory segments of /proc/sysvipc/shm.
func sysvSegments(tb testing.TB) []sysvSeg {
	tb.Helper()
	data, err := os.ReadFile("/proc/sysvipc/shm")
	if err != nil {
		tb.Fatal(err)
	}
	var out []sysvSeg
	for _, l := range strings.Split(string(data), "\n")[1:] {
		f := strings.Fields(l)
		// key shmid perms size cpid lpid nattch ...
		if len(f) < 7 {
			continue
		}
		var s sysvSeg
		var errs []error
		for i, p := range []*int{&s.key, &s.id, nil, &s.size, &s.cpid, &s.lpid, &s.nattch} {
			if p != nil {
				var err error
				*p, err = strconv.Atoi(f[i])
				errs = append(errs, err)
			}
		}
		if errors.Join(errs...) == nil {
			out = append(out, s)
		}
	}
	return out
}

// removeSysvShm removes segment id and any private one-page segment
// created or last attached by a process of the tree (a restore may have
// made a new one).
func removeSysvShm(tb testing.TB, id int, tr *procTree) {
	pids := map[int]bool{}
	for _, p := range tr.pids {
		pids[p] = true
	}
	for _, s := range sysvSegments(tb) {
		if s.id == id || (s.key == 0 && s.size == 4096 && (pids[s.cpid] || pids[s.lpid])) {
			const ipcRmid = 0
			if _, _, e := syscall.Syscall(syscall.SYS_SHMCTL, uintptr(s.id), ipcRmid, 0); e != 0 {
				tb.Errorf("remove SysV segment %d: %v", s.id, e)
			}
		}
	}
}

// ---- 6. refusals --------------------------------------------------------------

// TestTreeRefusals dumps trees with one process phaul cannot take: the dump
// must be refused naming that process and what it holds, and the whole tree
// must go on: every process running, none stopped, none traced by phaul,
// each one making progress, nothing changed in /proc.
func TestTreeRefusals(t *testing.T) {
	for _, tc := range []struct {
		name     string
		args     []string
		culprit  string   // the role the message must name
		patterns []string // what else it must say
		tracedBy bool     // a tracer fixture attaches to the culprit
	}{
		{"io_uring-in-child", []string{"--where", "child", "--resource", "io_uring"}, "child", []string{`io_uring`}, false},
		{"userfaultfd-in-grandchild", []string{"--where", "grandchild", "--resource", "userfaultfd"}, "grandchild", []string{`userfaultfd`}, false},
		{"traced-grandchild", []string{"--resource", "none"}, "grandchild", []string{`trac`}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			needPhaul(t)
			argv := append(needTreeFixture(t, "tree_refuse"), tc.args...)
			tr := startTree(t, argv[0], argv, nil)
			culprit := tr.pids[tc.culprit]
			patterns := append([]string{`\b` + strconv.Itoa(culprit) + `\b`}, tc.patterns...)
			tracer := 0
			if tc.tracedBy {
				tw := startFixture(t, "tracer", strconv.Itoa(culprit))
				tracer = tw.Pid
				patterns = append(patterns, `\b`+strconv.Itoa(tracer)+`\b`)
			}
			c1 := tr.w.MustCheck(t)
			before := tr.state(t)
			r := runPhaul(t, tr.w, "dump", "-t", strconv.Itoa(tr.w.Pid), "-D", imageDir(t))
			r.mustFail(t, tr.w, patterns...)
			if tr.w.OriginalExited() {
				t.Fatalf("the refused dump killed the root: %v", tr.w.ExitState())
			}
			for _, role := range tr.members() {
				want := 0
				if role == tc.culprit {
					want = tracer
				}
				deadline := time.Now().Add(3 * time.Second)
				for {
					p := resumedProblem(tr.pids[role], want)
					if p == "" {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("%s after the refused dump: %s", role, p)
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
			tr.compareTree(t, before, tr.state(t), treeCompare{})
			c2 := tr.w.MustCheck(t)
			time.Sleep(200 * time.Millisecond)
			c3 := tr.w.MustCheck(t)
			requireTreeProgress(t, tr, c1, c2, "across the refused dump")
			requireTreeProgress(t, tr, c2, c3, "after the refused dump")
		})
	}
}

// ---- the fixtures' own checks ----------------------------------------------------

// TestTreeFixturesSelfCheck proves, without phaul, that each tree fixture
// comes up with the tree it promises, passes its checks with every process
// making progress, and fails a check when the tree is damaged: a member
// killed, junk in a pipe, a shared counter changed from outside.
func TestTreeFixturesSelfCheck(t *testing.T) {
	sock := func(t *testing.T) string { return filepath.Join(t.TempDir(), "s.sock") }
	for _, tc := range []struct {
		name    string
		fixture string
		args    func(t *testing.T) []string
		members int
		damage  func(t *testing.T, tr *procTree) string // returns what the failure must name
	}{
		{"pipe", "tree_pipe", nil, 6, damagePipe},
		{"prefork", "tree_prefork", func(t *testing.T) []string { return []string{"--socket", sock(t)} }, 5, killLeaf},
		{"epoll", "tree_epoll", nil, 2, killLeaf},
		{"shm", "tree_shm", nil, 2, damageCounter},
		{"refuse", "tree_refuse", func(t *testing.T) []string { return []string{"--resource", "none"} }, 3, killLeaf},
	} {
		t.Run(tc.name, func(t *testing.T) {
			argv := needTreeFixture(t, tc.fixture)
			if tc.args != nil {
				argv = append(argv, tc.args(t)...)
			}
			tr := startTree(t, argv[0], argv, nil)
			if len(tr.roles) != tc.members {
				t.Fatalf("%d processes in the tree, want %d: %v", len(tr.roles), tc.members, tr.pids)
			}
			for _, r := range tr.roles {
				st, err := testutil.ReadProcStat(tr.pids[r])
				if err != nil {
					t.Fatalf("%s: %v", r, err)
				}
				if r != "root" && st.PPid == selfPid {
					t.Errorf("%s %d is our child, want a descendant of the root", r, st.Pid)
				}
			}
			c1 := tr.w.MustCheck(t)
			time.Sleep(300 * time.Millisecond)
			c2 := tr.w.MustCheck(t)
			requireTreeProgress(t, tr, c1, c2, "self-check")
			want := tc.damage(t, tr)
			var res testutil.CheckResult
			for deadline := time.Now().Add(5 * time.Second); ; {
				res = tr.w.CheckResult(t)
				if !res.OK || time.Now().After(deadline) {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if res.OK {
				t.Fatalf("the check passed after the damage: %s", res.Line)
			}
			if !strings.Contains(res.Reason, want) {
				t.Errorf("the failure does not name %q: %s", want, res.Line)
			}
		})
	}
}

// killLeaf kills the last process of the PROC lines and waits until it
// is a zombie.
func killLeaf(t *testing.T, tr *procTree) string {
	role := tr.roles[len(tr.roles)-1]
	pid := tr.pids[role]
	if err := sys.Kill(pid, sys.SIGKILL); err != nil {
		t.Fatal(err)
	}
	treeWaitFor(t, 5*time.Second, role+" is a zombie", func() bool { return !testutil.PidAlive(pid) })
	return role + " " + strconv.Itoa(pid) + " is gone"
}

// damagePipe writes a record of junk into pipe 1 (grandchild -> child),
// opened from outside through the grandchild's descriptor: the one pipe of
// the grandchild that the root does not hold too.
func damagePipe(t *testing.T, tr *procTree) string {
	rootLinks := map[string]bool{}
	for _, l := range treeFdLinks(tr.pids["root"]) {
		rootLinks[l] = true
	}
	gc := tr.pids["grandchild"]
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", gc))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		path := fmt.Sprintf("/proc/%d/fd/%s", gc, e.Name())
		link, _ := os.Readlink(path)
		if !strings.HasPrefix(link, "pipe:") || rootLinks[link] {
			continue
		}
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.Write([]byte("0123456789abcdef")); err != nil {
			t.Fatal(err)
		}
		return "pipe 1"
	}
	t.Fatalf("no pipe of the grandchild that the root does not hold too")
	return ""
}

func treeFdLinks(pid int) []string {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	var out []string
	for _, e := range ents {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name())); err == nil {
			out = append(out, l)
		}
	}
	return out
}

// damageCounter flips a byte of the anonymous page's counter.
func damageCounter(t *testing.T, tr *procTree) string {
	tr.w.CorruptByte(t, "anon", 8)
	return "anon: counter"
}
