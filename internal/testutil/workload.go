package testutil

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/sys"
)

// Default timeouts of a workload.
const (
	DefaultReadyTimeout = 30 * time.Second
	DefaultCheckTimeout = 10 * time.Second
)

// Options configure StartWorkload. The zero value is ready to use.
type Options struct {
	// Name labels the workload in messages and names its log file;
	// the base name of argv[0] when empty.
	Name string
	// Dir is the working directory; a fresh t.TempDir() when empty.
	Dir string
	// Env is added to the test's environment.
	Env []string
	// ReadyTimeout bounds the wait for READY (DefaultReadyTimeout).
	ReadyTimeout time.Duration
	// CheckTimeout bounds the wait for a CHECK line (DefaultCheckTimeout).
	CheckTimeout time.Duration
	// PTY, when set, becomes the workload's stdin, stdout and stderr
	// instead of /dev/null and the log file; what the workload writes is
	// copied from the master side into the log file.
	PTY *PTY
}

// Region is a memory range a workload verifies, announced by a line
// "REGION <name> 0x<addr> <len>" before READY.
type Region struct {
	Name string
	Addr uint64
	Len  uint64
}

// CheckResult is one parsed "CHECK <seq> OK|FAIL ..." line.
type CheckResult struct {
	Seq  int
	OK   bool
	Line string
	// Reason is everything after OK or FAIL.
	Reason string
	// Fields holds the key=value words of Reason.
	Fields map[string]string
}

// Int returns the integer value of field key.
func (r CheckResult) Int(key string) (int64, bool) {
	v, ok := r.Fields[key]
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(v, 10, 64)
	return n, err == nil
}

// ParseCheck parses a CHECK line.
func ParseCheck(line string) (CheckResult, error) {
	f := strings.SplitN(strings.TrimSpace(line), " ", 4)
	if len(f) < 3 || f[0] != "CHECK" {
		return CheckResult{}, fmt.Errorf("not a CHECK line: %q", line)
	}
	seq, err := strconv.Atoi(f[1])
	if err != nil {
		return CheckResult{}, fmt.Errorf("CHECK line with a bad sequence number: %q", line)
	}
	r := CheckResult{Seq: seq, Line: line, Fields: map[string]string{}}
	switch f[2] {
	case "OK":
		r.OK = true
	case "FAIL":
	default:
		return CheckResult{}, fmt.Errorf("CHECK line is neither OK nor FAIL: %q", line)
	}
	if len(f) == 4 {
		r.Reason = f[3]
		for _, w := range strings.Fields(f[3]) {
			if k, v, ok := strings.Cut(w, "="); ok && k != "" {
				r.Fields[k] = v
			}
		}
	}
	return r, nil
}

// ParseRegion parses a REGION line.
func ParseRegion(line string) (Region, error) {
	f := strings.Fields(line)
	if len(f) != 4 || f[0] != "REGION" {
		return Region{}, fmt.Errorf("not a REGION line: %q", line)
	}
	addr, err1 := strconv.ParseUint(strings.TrimPrefix(f[2], "0x"), 16, 64)
	n, err2 := strconv.ParseUint(f[3], 10, 64)
	if err1 != nil || err2 != nil || n == 0 {
		return Region{}, fmt.Errorf("bad REGION line: %q", line)
	}
	return Region{Name: f[1], Addr: addr, Len: n}, nil
}

// Workload is a running test program that follows the fixture protocol.
type Workload struct {
	// Name labels the workload in messages.
	Name string
	// Pid is the process the checks go to: the one started, or the one
	// recorded by Restored.
	Pid int
	// Dir is the working directory.
	Dir string
	// Preamble holds the lines printed before READY.
	Preamble []string
	// Regions are the REGION lines of the preamble, by name.
	Regions map[string]Region

	exe          string // /proc/PID/exe of the original
	pgid         int
	cmd          *exec.Cmd
	done         chan struct{} // closed once the original is reaped
	state        *os.ProcessState
	waitErr      error // from cmd.Wait when it got no status
	checkTimeout time.Duration

	mu       sync.Mutex
	logs     []*follower // every log followed; the last one is current
	restored []int
}

// StartWorkload starts argv in its own process group with stdin from
// /dev/null and stdout+stderr appended to a log file in a temporary
// directory, and waits for READY. It skips the test when the workload says
// SKIP and fails it when the workload does not get ready. t.Cleanup kills
// the process group and every restored copy, and reaps them.
func StartWorkload(t testing.TB, argv []string, opts *Options) *Workload {
	t.Helper()
	if opts == nil {
		opts = &Options{}
	}
	w, err := startWorkload(t, argv, opts)
	if err != nil {
		t.Fatalf("start %v: %v", argv, err)
	}
	t.Cleanup(w.cleanup)
	timeout := opts.ReadyTimeout
	if timeout == 0 {
		timeout = DefaultReadyTimeout
	}
	idx, line, err := w.waitLine(0, timeout, "READY ", "SKIP ", "SETUP FAIL")
	switch {
	case err != nil:
		t.Fatalf("%s: no READY: %v\n%s", w.Name, err, w.LogTail(40))
	case strings.HasPrefix(line, "SKIP "):
		t.Skipf("%s: %s", w.Name, strings.TrimPrefix(line, "SKIP "))
	case strings.HasPrefix(line, "SETUP FAIL"):
		t.Fatalf("%s: %s\n%s", w.Name, line, w.LogTail(40))
	}
	if pid, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "READY "))); err != nil || pid != w.Pid {
		t.Fatalf("%s: READY line %q does not name the started PID %d", w.Name, line, w.Pid)
	}
	w.Preamble = w.current().snapshot()[:idx]
	w.Regions = map[string]Region{}
	for _, l := range w.Preamble {
		if strings.HasPrefix(l, "REGION ") {
			r, err := ParseRegion(l)
			if err != nil {
				t.Fatalf("%s: %v", w.Name, err)
			}
			w.Regions[r.Name] = r
		}
	}
	w.exe, _ = os.Readlink(fmt.Sprintf("/proc/%d/exe", w.Pid))
	return w
}

func startWorkload(t testing.TB, argv []string, opts *Options) (*Workload, error) {
	inheritOnce.Do(func() { _ = CloseInheritedFds() })
	if len(argv) == 0 {
		return nil, errors.New("empty argv")
	}
	name := opts.Name
	if name == "" {
		name = filepath.Base(argv[0])
	}
	dir := opts.Dir
	if dir == "" {
		dir = t.TempDir()
	}
	logPath := filepath.Join(t.TempDir(), name+".log")
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), opts.Env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}

	w := &Workload{
		Name: name, Dir: dir, cmd: cmd, done: make(chan struct{}),
		checkTimeout: opts.CheckTimeout,
	}
	if w.checkTimeout == 0 {
		w.checkTimeout = DefaultCheckTimeout
	}
	var closeAfterStart []*os.File
	if opts.PTY != nil {
		cmd.Stdin, cmd.Stdout, cmd.Stderr = opts.PTY.Slave, opts.PTY.Slave, opts.PTY.Slave
		if err := opts.PTY.pumpTo(logPath); err != nil {
			return nil, err
		}
	} else {
		null, err := os.Open(os.DevNull)
		if err != nil {
			return nil, err
		}
		logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			null.Close()
			return nil, err
		}
		cmd.Stdin, cmd.Stdout, cmd.Stderr = null, logf, logf
		closeAfterStart = append(closeAfterStart, null, logf)
	}
	w.logs = []*follower{{path: logPath}}
	err := StartChild(cmd)
	for _, f := range closeAfterStart {
		f.Close()
	}
	if err != nil {
		return nil, err
	}
	w.Pid = cmd.Process.Pid
	w.pgid = w.Pid
	go func() {
		err := cmd.Wait()
		w.mu.Lock()
		w.state = cmd.ProcessState
		if w.state == nil {
			w.waitErr = err
		}
		w.mu.Unlock()
		UnregisterChild(cmd.Process.Pid)
		close(w.done)
	}()
	return w, nil
}

var inheritOnce sync.Once

// CloseInheritedFds marks every descriptor above 2 of this process
// close-on-exec. The Go runtime opens its own descriptors that way, but
// descriptors inherited from whatever started the test (a shell's job
// pipes, a make jobserver) are not, and os/exec would pass them on to every
// workload and to phaul. StartWorkload calls it once; TestMain may call it
// before starting anything else.
func CloseInheritedFds() error {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return err
	}
	for _, e := range ents {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd > 2 {
			syscall.CloseOnExec(fd)
		}
	}
	return nil
}

// LogPath is the path of the log file currently followed.
func (w *Workload) LogPath() string { return w.current().path }

// Signal sends sig to w.Pid.
func (w *Workload) Signal(sig syscall.Signal) error { return sys.Kill(w.Pid, sig) }

// Check sends SIGUSR1 and waits for the next CHECK line. It returns whether
// the check passed and the line; it fails the test when no CHECK line comes
// (timeout, or the process is gone).
func (w *Workload) Check(t testing.TB) (ok bool, line string) {
	t.Helper()
	r := w.CheckResult(t)
	return r.OK, r.Line
}

// CheckResult is Check returning the parsed line.
func (w *Workload) CheckResult(t testing.TB) CheckResult {
	t.Helper()
	r, err := w.TryCheck()
	if err != nil {
		t.Fatalf("%s (pid %d): %v\n%s", w.Name, w.Pid, err, w.LogTail(40))
	}
	return r
}

// MustCheck is CheckResult failing the test unless the check passed.
func (w *Workload) MustCheck(t testing.TB) CheckResult {
	t.Helper()
	r := w.CheckResult(t)
	if !r.OK {
		t.Fatalf("%s (pid %d): self-check failed: %s\n%s", w.Name, w.Pid, r.Line, w.LogTail(40))
	}
	return r
}

// TryCheck is Check returning an error instead of failing the test.
func (w *Workload) TryCheck() (CheckResult, error) {
	mark := w.Mark()
	if err := sys.Kill(w.Pid, sys.SIGUSR1); err != nil {
		return CheckResult{}, fmt.Errorf("send SIGUSR1: %w", err)
	}
	_, line, err := w.waitLine(mark, w.checkTimeout, "CHECK ")
	if err != nil {
		return CheckResult{}, err
	}
	return ParseCheck(line)
}

// Mark returns the number of lines of the current log read so far; lines
// after it are "new" for WaitLine.
func (w *Workload) Mark() int {
	f := w.current()
	_ = f.poll()
	return len(f.snapshot())
}

// WaitLine waits for a line starting with prefix after mark in the current
// log and returns it; it fails the test on timeout or when the process is
// gone without printing one.
func (w *Workload) WaitLine(t testing.TB, mark int, prefix string, timeout time.Duration) string {
	t.Helper()
	_, line, err := w.waitLine(mark, timeout, prefix)
	if err != nil {
		t.Fatalf("%s (pid %d): waiting for %q: %v\n%s", w.Name, w.Pid, prefix, err, w.LogTail(40))
	}
	return line
}

// Lines returns the lines of the current log read so far.
func (w *Workload) Lines() []string {
	f := w.current()
	_ = f.poll()
	return f.snapshot()
}

// waitLine polls the current log for a line after mark that starts with
// one of prefixes. It gives up when the process is gone (after a last look)
// or at the timeout.
func (w *Workload) waitLine(mark int, timeout time.Duration, prefixes ...string) (int, string, error) {
	deadline := time.Now().Add(timeout)
	f := w.current()
	for {
		gone := !w.alive()
		if err := f.poll(); err != nil {
			return 0, "", err
		}
		if i, l, ok := f.find(mark, prefixes); ok {
			return i, l, nil
		}
		if gone {
			return 0, "", fmt.Errorf("process %d is gone (%s) without printing %q", w.Pid, w.describeEnd(), prefixes)
		}
		if time.Now().After(deadline) {
			return 0, "", fmt.Errorf("no %q line within %v (process %s)", prefixes, timeout, describePid(w.Pid))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (w *Workload) current() *follower {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.logs[len(w.logs)-1]
}

// alive reports whether w.Pid still runs (a zombie does not).
func (w *Workload) alive() bool {
	if !w.isRestored() && w.OriginalExited() {
		return false
	}
	return PidAlive(w.Pid)
}

func (w *Workload) isRestored() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.restored) > 0
}

func (w *Workload) describeEnd() string {
	if !w.isRestored() && w.OriginalExited() {
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.state == nil {
			return fmt.Sprintf("wait: %v", w.waitErr)
		}
		return w.state.String()
	}
	return describePid(w.Pid)
}

// OriginalExited reports whether the process started by StartWorkload has
// exited and been reaped.
func (w *Workload) OriginalExited() bool {
	select {
	case <-w.done:
		return true
	default:
		return false
	}
}

// WaitOriginalExit waits until the process started by StartWorkload has
// exited and been reaped, and returns how it ended.
func (w *Workload) WaitOriginalExit(timeout time.Duration) (*os.ProcessState, error) {
	select {
	case <-w.done:
		return w.ExitState(), nil
	case <-time.After(timeout):
		return nil, fmt.Errorf("%s: process %d still there after %v (%s)", w.Name, w.cmd.Process.Pid, timeout, describePid(w.cmd.Process.Pid))
	}
}

// ExitState is how the original process ended (nil while it runs).
func (w *Workload) ExitState() *os.ProcessState {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.state
}

// WaitGone waits until w.Pid is gone and reaped: the original through its
// exec.Cmd, a restored process (adopted through the subreaper) here.
func (w *Workload) WaitGone(t testing.TB, timeout time.Duration) {
	t.Helper()
	if !w.isRestored() {
		if _, err := w.WaitOriginalExit(timeout); err != nil {
			t.Fatalf("%v\n%s", err, w.LogTail(20))
		}
	}
	if err := WaitPidGone(w.Pid, timeout); err != nil {
		t.Fatalf("%s: %v\n%s", w.Name, err, w.LogTail(20))
	}
}

// Restored records that pid now runs the restored image of this workload
// (normally pid == w.Pid) and makes it the target of checks and signals. It
// fails the test when pid is not running.
func (w *Workload) Restored(t testing.TB, pid int) {
	t.Helper()
	if !PidAlive(pid) {
		t.Fatalf("%s: restored process %d is not running (%s)\n%s", w.Name, pid, describePid(pid), w.LogTail(20))
	}
	w.mu.Lock()
	w.restored = append(w.restored, pid)
	w.Pid = pid
	w.mu.Unlock()
}

// FollowPTY starts copying what is written to p into a new log file and
// makes that log the one checks read: output printed after this call is
// only seen if it reaches p.
func (w *Workload) FollowPTY(t testing.TB, p *PTY) {
	t.Helper()
	path := filepath.Join(t.TempDir(), w.Name+"-"+filepath.Base(p.Name)+".log")
	if err := p.pumpTo(path); err != nil {
		t.Fatalf("%s: %v", w.Name, err)
	}
	w.mu.Lock()
	w.logs = append(w.logs, &follower{path: path})
	w.mu.Unlock()
}

// LogTail returns the last n lines of each log the workload wrote, for
// failure messages.
func (w *Workload) LogTail(n int) string {
	w.mu.Lock()
	logs := append([]*follower(nil), w.logs...)
	w.mu.Unlock()
	var b strings.Builder
	for _, f := range logs {
		data, err := os.ReadFile(f.path)
		if err != nil {
			fmt.Fprintf(&b, "--- %s: %v\n", f.path, err)
			continue
		}
		lines := strings.Split(strings.TrimRight(strings.ReplaceAll(string(data), "\r", ""), "\n"), "\n")
		if len(lines) > n {
			lines = lines[len(lines)-n:]
		}
		fmt.Fprintf(&b, "--- last %d lines of %s:\n%s\n", len(lines), f.path, strings.Join(lines, "\n"))
	}
	return b.String()
}

// CorruptByte flips every bit of the byte at offset off of region name in
// the running process, with process_vm_readv/writev.
func (w *Workload) CorruptByte(t testing.TB, name string, off uint64) {
	t.Helper()
	r, ok := w.Regions[name]
	if !ok || off >= r.Len {
		t.Fatalf("%s: no region %q holding offset %d (regions %v)", w.Name, name, off, w.Regions)
	}
	if err := FlipByte(w.Pid, r.Addr+off); err != nil {
		t.Fatalf("%s: corrupt %s+%d: %v", w.Name, name, off, err)
	}
}

// FlipByte inverts the byte at addr in process pid.
func FlipByte(pid int, addr uint64) error {
	b := make([]byte, 1)
	iov := []sys.RemoteIovec{{Base: uintptr(addr), Len: 1}}
	if _, err := sys.ProcessVMReadv(pid, [][]byte{b}, iov); err != nil {
		return err
	}
	b[0] ^= 0xff
	n, err := sys.ProcessVMWritev(pid, [][]byte{b}, iov)
	if err == nil && n != 1 {
		err = fmt.Errorf("process_vm_writev wrote %d bytes", n)
	}
	return err
}

// cleanup kills everything of the workload that may still run and reaps it.
func (w *Workload) cleanup() {
	if !w.OriginalExited() {
		_ = sys.Kill(-w.pgid, sys.SIGKILL)
		_ = sys.Kill(w.cmd.Process.Pid, sys.SIGKILL)
	}
	w.mu.Lock()
	pids := append([]int(nil), w.restored...)
	w.mu.Unlock()
	for _, pid := range pids {
		if w.ours(pid) {
			_ = sys.Kill(pid, sys.SIGKILL)
		}
	}
	_, _ = w.WaitOriginalExit(10 * time.Second)
	for _, pid := range pids {
		if w.ours(pid) {
			_ = WaitPidGone(pid, 10*time.Second)
		}
	}
	ReapOrphans()
}

// ours reports whether pid is (still) this workload's restored process: our
// child (adopted through the subreaper), or running our executable in our
// process group.
func (w *Workload) ours(pid int) bool {
	st, err := ReadProcStat(pid)
	if err != nil {
		return false
	}
	if st.PPid == os.Getpid() {
		return true
	}
	exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	return exe != "" && exe == w.exe && (st.Pgrp == w.pgid || st.Pgrp == pid)
}

// follower reads a log file incrementally and splits it into lines.
type follower struct {
	path    string
	off     int64
	partial []byte
	lines   []string
	mu      sync.Mutex
}

// snapshot returns a copy of the lines read so far.
func (f *follower) snapshot() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.lines...)
}

// find returns the first line at or after index mark that starts with one
// of prefixes.
func (f *follower) find(mark int, prefixes []string) (int, string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := mark; i < len(f.lines); i++ {
		for _, p := range prefixes {
			if strings.HasPrefix(f.lines[i], p) {
				return i, f.lines[i], true
			}
		}
	}
	return 0, "", false
}

// poll reads what was appended to the file since the last poll.
func (f *follower) poll() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := os.Open(f.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer fd.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := fd.ReadAt(buf, f.off)
		f.off += int64(n)
		data := append(f.partial, buf[:n]...)
		for {
			i := bytes.IndexByte(data, '\n')
			if i < 0 {
				break
			}
			f.lines = append(f.lines, strings.TrimRight(string(data[:i]), "\r"))
			data = data[i+1:]
		}
		f.partial = append([]byte(nil), data...)
		if err == io.EOF || n == 0 {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// ---- pseudo-terminals ------------------------------------------------------

// PTY is a pseudo-terminal pair opened by OpenPTY.
type PTY struct {
	Master *os.File
	Slave  *os.File
	// Name is the slave's path, /dev/pts/N.
	Name string

	mu      sync.Mutex
	pumping bool
}

// OpenPTY opens a pseudo-terminal pair; t.Cleanup closes both sides.
func OpenPTY(t testing.TB) *PTY {
	t.Helper()
	m, s, name, err := sys.OpenPTY()
	if err != nil {
		t.Fatalf("open pty: %v", err)
	}
	p := &PTY{Master: m, Slave: s, Name: name}
	t.Cleanup(func() {
		s.Close()
		m.Close()
	})
	return p
}

// pumpTo copies everything read from the master side into a new file at
// path until the master is closed or no slave is open any more.
func (p *PTY) pumpTo(path string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pumping {
		return fmt.Errorf("%s is already copied to a log", p.Name)
	}
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	p.pumping = true
	go func() {
		defer out.Close()
		_, _ = io.Copy(out, p.Master)
	}()
	return nil
}

// ---- processes ------------------------------------------------------------

// ProcStat is the part of /proc/PID/stat the tests use.
type ProcStat struct {
	Pid     int
	Comm    string
	State   byte
	PPid    int
	Pgrp    int
	Session int
}

// ReadProcStat reads /proc/PID/stat.
func ReadProcStat(pid int) (ProcStat, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ProcStat{}, err
	}
	s := string(data)
	l, r := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if l < 0 || r < l {
		return ProcStat{}, fmt.Errorf("/proc/%d/stat: malformed %q", pid, s)
	}
	f := strings.Fields(s[r+1:])
	if len(f) < 4 {
		return ProcStat{}, fmt.Errorf("/proc/%d/stat: malformed %q", pid, s)
	}
	st := ProcStat{Pid: pid, Comm: s[l+1 : r], State: f[0][0]}
	st.PPid, _ = strconv.Atoi(f[1])
	st.Pgrp, _ = strconv.Atoi(f[2])
	st.Session, _ = strconv.Atoi(f[3])
	return st, nil
}

// PidAlive reports whether pid exists and is not a zombie.
func PidAlive(pid int) bool {
	st, err := ReadProcStat(pid)
	return err == nil && st.State != 'Z' && st.State != 'X'
}

func describePid(pid int) string {
	st, err := ReadProcStat(pid)
	if err != nil {
		return fmt.Sprintf("pid %d does not exist", pid)
	}
	return fmt.Sprintf("pid %d %q state %c, parent %d, pgrp %d", pid, st.Comm, st.State, st.PPid, st.Pgrp)
}

// ProcStatus returns the fields of /proc/PID/task/TID/status.
func ProcStatus(pid, tid int) (map[string]string, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/status", pid, tid))
	if err != nil {
		return nil, err
	}
	m := map[string]string{}
	for _, l := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m, nil
}

// SignalSet parses a hex signal mask of /proc status (SigPnd, ShdPnd, ...)
// and reports whether sig is in it.
func SignalSet(mask string, sig syscall.Signal) (bool, error) {
	v, err := strconv.ParseUint(mask, 16, 64)
	if err != nil {
		return false, fmt.Errorf("signal mask %q: %w", mask, err)
	}
	return v&(1<<(uint(sig)-1)) != 0, nil
}

// Tasks lists the thread IDs of pid.
func Tasks(pid int) ([]int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return nil, err
	}
	var tids []int
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, tid)
		}
	}
	return tids, nil
}

// Processes lists every process of the system.
func Processes() []ProcStat {
	ents, _ := os.ReadDir("/proc")
	var out []ProcStat
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := ReadProcStat(pid); err == nil {
			out = append(out, st)
		}
	}
	return out
}

// Children lists the processes whose parent is this process.
func Children() []ProcStat {
	var out []ProcStat
	self := os.Getpid()
	for _, st := range Processes() {
		if st.PPid == self {
			out = append(out, st)
		}
	}
	return out
}

// UnusedPID returns a PID that no process or thread uses right now.
func UnusedPID() (int, error) {
	max := 32768
	if data, err := os.ReadFile("/proc/sys/kernel/pid_max"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil {
			max = n
		}
	}
	for pid := max - 1; pid > 300; pid-- {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); errors.Is(err, os.ErrNotExist) {
			return pid, nil
		}
	}
	return 0, errors.New("no unused PID found")
}

// children started through os/exec: their exec.Cmd reaps them, so
// ReapOrphans must not.
var execChildren sync.Map

// startMu orders StartChild against KillAll: once KillAll has begun,
// nothing new starts.
var (
	startMu sync.Mutex
	killing bool
)

// ErrKilling is returned by StartChild after KillAll.
var ErrKilling = errors.New("not starting a process: the test binary is killing its children")

// StartChild starts cmd and registers its PID (RegisterChild); its owner
// must call UnregisterChild after cmd.Wait. Once KillAll has run it starts
// nothing and returns ErrKilling, so that no process is started behind an
// emergency kill's back.
func StartChild(cmd *exec.Cmd) error {
	startMu.Lock()
	defer startMu.Unlock()
	if killing {
		return ErrKilling
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	RegisterChild(cmd.Process.Pid)
	return nil
}

// RegisterChild marks pid as a child that an exec.Cmd (or other owner)
// will reap; ReapOrphans and WaitPidGone leave it alone.
func RegisterChild(pid int) { execChildren.Store(pid, struct{}{}) }

// UnregisterChild undoes RegisterChild once the owner has reaped pid.
func UnregisterChild(pid int) { execChildren.Delete(pid) }

func registered(pid int) bool {
	_, ok := execChildren.Load(pid)
	return ok
}

// KillAll kills, with SIGKILL, the process group of every registered child
// (workloads and phaul commands run in groups of their own) and every child
// of this process, twice, 100 ms apart (a process re-parented to us in
// between is caught by the second pass); from then on StartChild refuses to
// start anything. It is for emergencies, when cleanups will not run: a test
// binary about to hit its -timeout panic, or an interrupt.
func KillAll() {
	startMu.Lock()
	killing = true
	startMu.Unlock()
	for pass := 0; pass < 2; pass++ {
		execChildren.Range(func(k, _ any) bool {
			pid := k.(int)
			_ = sys.Kill(-pid, sys.SIGKILL)
			_ = sys.Kill(pid, sys.SIGKILL)
			return true
		})
		for _, st := range Children() {
			_ = sys.Kill(st.Pid, sys.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
	ReapOrphans()
}

// ReapOrphans reaps every zombie child of this process that no exec.Cmd
// owns: orphans adopted through the child subreaper (restored processes
// whose parent, phaul restore, has exited). It returns their PIDs.
func ReapOrphans() []int {
	var reaped []int
	for _, st := range Children() {
		if st.State == 'Z' && !registered(st.Pid) {
			if wpid, _, err := sys.Wait4(st.Pid, sys.WNOHANG|sys.WALL); err == nil && wpid == st.Pid {
				reaped = append(reaped, st.Pid)
			}
		}
	}
	return reaped
}

// WaitPidGone waits until pid no longer exists, reaping it when it is an
// unowned zombie child of this process. A PID held by a zombie of another
// parent (PID 1 reaps slowly) counts as not gone.
func WaitPidGone(pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	self := os.Getpid()
	for {
		st, err := ReadProcStat(pid)
		if err != nil {
			return nil
		}
		if st.State == 'Z' && st.PPid == self && !registered(pid) {
			_, _, _ = sys.Wait4(pid, sys.WNOHANG|sys.WALL)
			continue
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pid %d still exists after %v (%s)", pid, timeout, describePid(pid))
		}
		time.Sleep(5 * time.Millisecond)
	}
}
