package e2e

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/topology"
)

// TestMigrateTCPTargetHangs moves a server with connected clients to a
// target that restores it (its connections in repair mode behind a
// network lock, the service address moved there by the action script)
// and then never answers, its connection open. phaul migrate must give up
// at --freeze-timeout, naming the step; the rollback scripts move the
// address back on both hosts, no lock is left on either, no copy on the
// target, and the original serves its clients on, none of them having
// lost a message or seen a reset.
func TestMigrateTCPTargetHangs(t *testing.T) {
	phaul := needPhaul(t)
	s := newNetSetup(t)
	args := []string{"serve", "--listen", s.tgt.Addr + ":7070", "--insecure", "-v"}
	for _, sc := range s.tgtScripts {
		args = append(args, "--action-script", sc)
	}
	serve := s.tgt.CommandNewPIDNS(context.Background(), phaul, args...)
	serve.Env = append(environWithout("PHAUL_FAULT"), "PHAUL_FAULT=target.ready@1=stall")
	serveLog := background(t, serve, "serve")
	waitLog(t, serveLog, "time=", 0)
	const port = 7200
	wl, wlLog := s.startServer(t, phaul, port, "16M")
	pid := wl.Process.Pid
	cs := s.startClients(t, port, netModes...)
	cs.waitTraffic(t, "before the migration")
	time.Sleep(300 * time.Millisecond)

	const deadline = 3 * time.Second
	// Without its deadline phaul migrate would wait for ever: killed at
	// this bound, it fails the test.
	ctx, cancel := context.WithTimeout(context.Background(), deadline+time.Minute)
	defer cancel()
	start := time.Now()
	out, err := s.src.Command(ctx, phaul, "migrate", "--to", s.tgt.Addr+":7070", "--insecure",
		"--tcp-established", "--action-script", s.srcScript, "--freeze-timeout", deadline.String(), strconv.Itoa(pid)).CombinedOutput()
	took := time.Since(start)
	if err == nil {
		t.Fatalf("migrate to a target that hangs succeeded:\n%s", out)
	}
	if !hasLine(serveLog, faultLine) {
		t.Fatalf("the fault never fired\nmigrate:\n%s\nserve:\n%s", out, readTail(serveLog))
	}
	want := fmt.Sprintf("restore on the target: target did not answer Freeze within %v; rolled back, the process runs here", deadline)
	if !strings.Contains(string(out), want) {
		t.Errorf("migrate does not name the step (want %q):\n%s", want, out)
	}
	// The rounds of 16 MiB take well under a second here.
	if took < deadline || took > deadline+5*time.Second {
		t.Errorf("migrate ended after %v, want about %v", took, deadline)
	}
	if topology.NestedPid(pid) != 0 {
		t.Fatal("a copy runs on the target after the rollback")
	}
	cs.waitTraffic(t, "after the rollback")
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatalf("the original is gone: %v", err)
	}
	line, _ := waitLog(t, wlLog, "CHECK seq=1", 0)
	if !strings.Contains(line, " OK ") {
		t.Fatalf("after the rollback the server says: %s", line)
	}
	requireRunsHere(t, pid, false)
	fresh := s.startClients(t, port, "normal")
	fresh.waitTraffic(t, "a new client after the rollback")
	fresh.close(t)
	cs.close(t)
	if b, _ := os.ReadFile(wlLog); strings.Contains(string(b), "TCPERR") {
		t.Fatalf("the server saw errors:\n%s", lastLines(string(b), 40))
	}
	// The target ran its rollback when the source's Abort came, though
	// the request it hangs in never ends.
	deadlineScripts := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(s.scriptLog)
		if strings.Contains(string(b), "target rollback") || time.Now().After(deadlineScripts) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	scripts, _ := os.ReadFile(s.scriptLog)
	checkScripts(t, string(scripts), []string{"source network-lock", "source post-dump", "target network-lock",
		"target rollback", "source rollback"}, s.vip)
	s.checkNoLocks(t)
	if t.Failed() {
		t.Logf("serve:\n%s", readTail(serveLog))
	}
}
