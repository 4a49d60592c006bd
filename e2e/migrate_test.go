package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/topology"
)

// The live-migration tests run on two host-like namespaces joined by a
// bridge; the target's phaul serve is init of its own PID namespace, so the
// migrated process keeps its PID there while the original still runs.

// hosts builds the topology, or skips when it cannot be built here.
func hosts(t *testing.T) *topology.Network {
	t.Helper()
	n, err := topology.New(context.Background(), "source", "target")
	if errors.Is(err, topology.ErrNoIP) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Error(err)
		}
	})
	return n
}

// background starts cmd with its output in a log file and returns the
// log's path; t.Cleanup stops it (SIGTERM, then SIGKILL) and reaps it.
func background(t *testing.T, cmd *exec.Cmd, name string) string {
	t.Helper()
	log := filepath.Join(t.TempDir(), name+".log")
	f, err := os.Create(log)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	})
	return log
}

// waitLog waits for a line of the log at path that starts with prefix and
// comes after the first skip lines; it returns the line and its number.
func waitLog(t *testing.T, path, prefix string, skip int) (string, int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		f, err := os.Open(path)
		if err == nil {
			sc := bufio.NewScanner(f)
			n := 0
			for sc.Scan() {
				n++
				if n > skip && strings.HasPrefix(sc.Text(), prefix) {
					f.Close()
					return sc.Text(), n
				}
			}
			f.Close()
		}
		time.Sleep(20 * time.Millisecond)
	}
	b, _ := os.ReadFile(path)
	t.Fatalf("no %q line in %s:\n%s", prefix, path, lastLines(string(b), 30))
	return "", 0
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

type migrateResult struct {
	Pid        int     `json:"pid"`
	DowntimeMS float64 `json:"downtime_ms"`
	TotalMS    float64 `json:"total_ms"`
	CleanupMS  float64 `json:"cleanup_ms"`
	Rounds     int     `json:"rounds"`
	BytesSent  uint64  `json:"bytes_sent"`
	PagesSent  uint64  `json:"pages_sent"`
	PerRound   []struct {
		Round int    `json:"round"`
		Pages uint64 `json:"pages_sent"`
	} `json:"per_round"`
	Phases map[string]float64 `json:"downtime_phases"`
}

// TestMigrateAcrossHosts moves the built-in workload (64 MiB, 1000 pages/s
// rewritten) from the source host to the target host. The workload checks
// all of its memory on the target and reports the same PID; its heartbeats
// go on.
func TestMigrateAcrossHosts(t *testing.T) {
	phaul := needPhaul(t)
	n := hosts(t)
	src, tgt := n.Host("source"), n.Host("target")
	ctx := context.Background()
	serveLog := background(t, tgt.CommandNewPIDNS(ctx, phaul, "serve", "--listen", tgt.Addr+":7070", "--insecure", "-v"), "serve")
	waitLog(t, serveLog, "time=", 0)
	wl := exec.Command("ip", "netns", "exec", src.NS, phaul, "__workload", "--mem", "64M", "--dirty", "1000")
	wlLog := background(t, wl, "workload")
	waitLog(t, wlLog, "READY", 0)
	pid := wl.Process.Pid
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	_, mark := waitLog(t, wlLog, "CHECK seq=1 OK", 0)

	mc := src.Command(ctx, phaul, "migrate", "--to", tgt.Addr+":7070", "--insecure", "--json", "-vv", strconv.Itoa(pid))
	var stderrBuf strings.Builder
	mc.Stderr = &stderrBuf
	began := time.Now()
	out, err := mc.Output()
	wall := time.Since(began)
	if err != nil {
		t.Fatalf("migrate: %v\n%s\nserve log:\n%s", err, stderrBuf.String(), readTail(serveLog))
	}
	var res migrateResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("migrate --json: %v\n%s", err, out)
	}
	// The migration's time and the cleanup after it are both within the
	// command's.
	if res.CleanupMS <= 0 || res.TotalMS+res.CleanupMS > float64(wall.Milliseconds())+1 {
		t.Errorf("total %.1f ms and cleanup %.1f ms; the command took %v", res.TotalMS, res.CleanupMS, wall)
	}
	if res.Pid != pid || res.Rounds < 2 || res.DowntimeMS <= 0 || res.DowntimeMS > res.TotalMS || res.BytesSent == 0 ||
		len(res.PerRound) != res.Rounds || res.PerRound[0].Pages < 16384 {
		t.Errorf("migrate result: %+v", res)
	}
	// The phases split the downtime.
	var sum float64
	for name, v := range res.Phases {
		if v < 0 {
			t.Errorf("downtime phase %s: %.3f ms", name, v)
		}
		sum += v
	}
	if len(res.Phases) != 6 || sum > res.DowntimeMS || sum < res.DowntimeMS/2 {
		t.Errorf("downtime phases %v add up to %.1f ms of the %.1f ms downtime", res.Phases, sum, res.DowntimeMS)
	}
	t.Logf("downtime %.1f ms %v, total %.0f ms, %d rounds, %d bytes on the wire", res.DowntimeMS, res.Phases, res.TotalMS, res.Rounds, res.BytesSent)

	// The original is gone here...
	deadline := time.Now().Add(10 * time.Second)
	for syscall.Kill(pid, 0) == nil && topology.NestedPid(pid) != pid {
		if time.Now().After(deadline) {
			t.Fatal("the original still runs on the source")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// ...and runs on the target, with its PID, memory intact.
	moved := topology.NestedPid(pid)
	if moved == 0 {
		t.Fatalf("no process with PID %d in the target's namespace\nserve log:\n%s", pid, readTail(serveLog))
	}
	if err := syscall.Kill(moved, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	line, _ := waitLog(t, wlLog, "CHECK seq=2", mark)
	if !strings.Contains(line, " OK ") || !strings.Contains(line, fmt.Sprintf("pid=%d", pid)) {
		t.Fatalf("on the target the workload says: %s", line)
	}
	beat, _ := waitLog(t, wlLog, "BEAT", mark+1)
	t.Logf("after the move: %s / %s", line, beat)
	if err := syscall.Kill(moved, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitLog(t, wlLog, "EXIT", mark)
}

// TestMigrateRollsBack migrates to a target that cannot build the process
// (its serve shares the source's PID namespace, where the PID is taken):
// the migration fails naming the cause, and the original runs on with its
// memory intact and no trace of tracking.
func TestMigrateRollsBack(t *testing.T) {
	phaul := needPhaul(t)
	n := hosts(t)
	src, tgt := n.Host("source"), n.Host("target")
	ctx := context.Background()
	serveLog := background(t, tgt.Command(ctx, phaul, "serve", "--listen", tgt.Addr+":7070", "--insecure", "-v"), "serve")
	waitLog(t, serveLog, "time=", 0)
	wl := exec.Command("ip", "netns", "exec", src.NS, phaul, "__workload", "--mem", "16M", "--dirty", "1000")
	wlLog := background(t, wl, "workload")
	waitLog(t, wlLog, "READY", 0)
	pid := wl.Process.Pid

	cmd := src.Command(ctx, phaul, "migrate", "--to", tgt.Addr+":7070", "--insecure", strconv.Itoa(pid))
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("migrate into a PID namespace where PID %d is taken succeeded:\n%s", pid, out)
	}
	if !strings.Contains(string(out), "PID is in use") {
		t.Errorf("the error does not name the cause:\n%s", out)
	}
	checkRolledBack(t, pid, wlLog)
}

// TestMigrateRollsBackThreadTaken migrates to a target whose PID namespace
// has the PID free but not the TID of one of the process's threads: the
// target refuses at the restore, naming that TID, leaves the process that
// holds it alone, and the original runs on.
func TestMigrateRollsBackThreadTaken(t *testing.T) {
	phaul := needPhaul(t)
	if _, err := exec.LookPath("nsenter"); err != nil {
		t.Skip("nsenter (util-linux) is not installed")
	}
	n := hosts(t)
	src, tgt := n.Host("source"), n.Host("target")
	ctx := context.Background()
	serve := tgt.CommandNewPIDNS(ctx, phaul, "serve", "--listen", tgt.Addr+":7070", "--insecure", "-v")
	serveLog := background(t, serve, "serve")
	waitLog(t, serveLog, "time=", 0)
	wl := exec.Command("ip", "netns", "exec", src.NS, phaul, "__workload", "--mem", "16M", "--dirty", "1000")
	wlLog := background(t, wl, "workload")
	waitLog(t, wlLog, "READY", 0)
	pid := wl.Process.Pid
	tid := 0
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range tasks {
		if id, _ := strconv.Atoi(e.Name()); id != pid {
			tid = max(tid, id)
		}
	}
	if tid == 0 {
		t.Fatalf("the workload has no thread but its main one: %v", tasks)
	}
	holdPID(t, serve.Process.Pid, tid)

	cmd := src.Command(ctx, phaul, "migrate", "--to", tgt.Addr+":7070", "--insecure", strconv.Itoa(pid))
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("migrate into a PID namespace where TID %d is taken succeeded:\n%s", tid, out)
	}
	t.Logf("migrate failed as it should:\n%s", lastLines(string(out), 3))
	if !strings.Contains(string(out), "PID is in use") || !strings.Contains(string(out), strconv.Itoa(tid)) {
		t.Errorf("the error does not name the cause (TID %d in use):\n%s", tid, out)
	}
	if topology.NestedPid(tid) == 0 {
		t.Errorf("the process that held TID %d on the target is gone", tid)
	}
	checkRolledBack(t, pid, wlLog)
}

// holdPID starts a process that is want in the PID namespace whose init is
// the child of unshare (PID unshare, as CommandNewPIDNS starts it), by
// setting the namespace's last PID just before the fork. It runs until the
// test ends.
func holdPID(t *testing.T, unshare, want int) {
	t.Helper()
	var init int
	for deadline := time.Now().Add(5 * time.Second); init == 0; {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", unshare, unshare))
		if f := strings.Fields(string(b)); len(f) > 0 {
			init, _ = strconv.Atoi(f[0])
		} else if time.Now().After(deadline) {
			t.Fatalf("no namespace init under unshare (PID %d)", unshare)
		} else {
			time.Sleep(10 * time.Millisecond)
		}
	}
	// Another fork in the namespace between the write and ours would take
	// the PID: try again then.
	for try := 0; try < 3; try++ {
		script := fmt.Sprintf("echo %d > /proc/sys/kernel/ns_last_pid; sleep 600 & echo HELD $!; wait", want-1)
		log := background(t, exec.Command("nsenter", "-t", strconv.Itoa(init), "-p", "-m", "--", "sh", "-c", script), fmt.Sprintf("hold%d", try))
		line, _ := waitLog(t, log, "HELD ", 0)
		if strings.TrimPrefix(line, "HELD ") == strconv.Itoa(want) {
			return
		}
	}
	t.Fatalf("could not take PID %d in the target's namespace", want)
}

// checkRolledBack checks the original after a failed migration: it runs,
// its memory is intact, and nothing of the tracking is left in it.
func checkRolledBack(t *testing.T, pid int, wlLog string) {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatalf("the original is gone after a failed migration: %v", err)
	}
	line, _ := waitLog(t, wlLog, "CHECK seq=1", 0)
	if !strings.Contains(line, " OK ") {
		t.Fatalf("after the rollback the workload says: %s", line)
	}
	st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if !strings.Contains(string(st), "TracerPid:\t0") {
		t.Errorf("still traced after the rollback:\n%s", st)
	}
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	for _, fd := range fds {
		if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); strings.Contains(l, "userfaultfd") {
			t.Errorf("descriptor %s left behind: %s", fd.Name(), l)
		}
	}
	if smaps, _ := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid)); strings.Contains(string(smaps), " uw") {
		t.Error("mappings still registered for write-protect tracking after the rollback")
	}
}

func readTail(path string) string {
	b, _ := os.ReadFile(path)
	return lastLines(string(b), 20)
}

// TestDemo runs the README's main command, phaul demo, on a small workload:
// it must migrate it between its two hosts and see it check OK there.
func TestDemo(t *testing.T) {
	phaul := needPhaul(t)
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("the ip tool (iproute2) is not installed")
	}
	out, err := exec.Command(phaul, "demo", "--mem", "32M").CombinedOutput()
	if err != nil {
		t.Fatalf("phaul demo: %v\n%s", err, out)
	}
	for _, want := range []string{"migrated: downtime", "self-check on the target: CHECK seq=2 OK", "the original on the source is gone: true", "done"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("phaul demo did not say %q:\n%s", want, out)
		}
	}
}
