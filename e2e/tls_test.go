package e2e

import (
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
	"github.com/phaul/phaul/transport/transporttest"
)

// TestMigrateTLS checks the security of migration between two hosts: off
// loopback, phaul serve refuses to listen without TLS (or --insecure);
// a target with mutual TLS refuses a client without TLS, a client whose
// certificate another CA signed, and a client that does not trust its own
// certificate; each refusal leaves the process running where it was, and
// the client with the right certificate then migrates it.
func TestMigrateTLS(t *testing.T) {
	phaul := needPhaul(t)
	n := hosts(t)
	src, tgt := n.Host("source"), n.Host("target")

	t.Run("plain-listen-refused", func(t *testing.T) {
		out, err := tgt.Command(t.Context(), phaul, "serve", "--listen", tgt.Addr+":7200").CombinedOutput()
		if code := exitCode(err); code != 1 || !strings.Contains(string(out), "TLS is required") || !strings.Contains(string(out), "--insecure") {
			t.Fatalf("phaul serve --listen %s:7200 without TLS: status %d, %s", tgt.Addr, code, out)
		}
	})

	ca, intruder := transporttest.NewCA(t, "phaul-e2e"), transporttest.NewCA(t, "intruder")
	tcert, tkey := ca.IssueFor(t, "target", tgt.Addr)
	scert, skey := ca.IssueFor(t, "source", src.Addr)
	icert, ikey := intruder.IssueFor(t, "intruder", src.Addr)
	addr := tgt.Addr + ":7201"
	serve := &targetDaemon{log: filepath.Join(t.TempDir(), "serve.log"), addr: addr}
	serve.cmd = tgt.CommandNewPIDNS(t.Context(), phaul, "serve", "--listen", addr, "--tls-cert", tcert, "--tls-key", tkey, "--tls-ca", ca.File)
	serve.cmd.Env = environWithout("PHAUL_FAULT")
	startLogged(t, serve.cmd, serve.log)
	waitLine(t, serve.log, "msg=listening", 0)
	pid, wlLog := startMigrant(t, phaul, src, "8M")

	// migrate runs phaul migrate to the target with args.
	migrate := func(t *testing.T, args ...string) (int, string) {
		t.Helper()
		a := append([]string{"netns", "exec", src.NS, phaul, "migrate", "--to", addr}, args...)
		cmd := exec.Command("ip", append(a, strconv.Itoa(pid))...)
		cmd.Env = environWithout("PHAUL_FAULT")
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := testutil.StartChild(cmd); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		var err error
		select {
		case err = <-done:
		case <-time.After(30 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			err = <-done
			t.Errorf("phaul migrate did not end")
		}
		testutil.UnregisterChild(cmd.Process.Pid)
		return exitCode(err), out.String()
	}
	refused := func(name, why string, args ...string) {
		t.Run(name, func(t *testing.T) {
			code, out := migrate(t, args...)
			if code == 0 {
				t.Fatalf("phaul migrate succeeded:\n%s", out)
			}
			if !regexp.MustCompile("(?i)" + why).MatchString(out) {
				t.Errorf("the refusal does not say why (want /%s/):\n%s", why, out)
			}
			t.Logf("refused: %s", strings.TrimSpace(out))
			requireRunsHere(t, pid, false)
			selfCheck(t, pid, wlLog)
		})
	}
	refused("plain-client-refused-by-policy", `TLS is required off loopback.*--insecure`)
	refused("plain-client-refused", `closed the connection; does it require TLS`, "--insecure")
	refused("wrong-certificate", `certificate (required|rejected|unknown authority)|unknown certificate authority`,
		"--tls-cert", icert, "--tls-key", ikey, "--tls-ca", ca.File)
	refused("untrusted-target", `certificate signed by unknown authority`,
		"--tls-cert", scert, "--tls-key", skey, "--tls-ca", intruder.File)
	if n := strings.Count(readAll(serve.log), "migration started"); n != 0 {
		t.Errorf("the target started %d migrations for refused clients", n)
	}

	t.Run("mutual-tls", func(t *testing.T) {
		code, out := migrate(t, "--tls-cert", scert, "--tls-key", skey, "--tls-ca", ca.File)
		if code != 0 {
			t.Fatalf("phaul migrate with mutual TLS: status %d\n%s\nserve:\n%s", code, out, readTail(serve.log))
		}
		if !hasLine(serve.log, `identity=source tls=true`) {
			t.Errorf("the target did not see the source's certificate:\n%s", readTail(serve.log))
		}
		waitGone(t, pid)
		var moved int
		deadline := time.Now().Add(5 * time.Second)
		for moved = nestedLive(pid); moved == 0; moved = nestedLive(pid) {
			if time.Now().After(deadline) {
				t.Fatalf("no copy of %d on the target\n%s", pid, readTail(serve.log))
			}
			time.Sleep(20 * time.Millisecond)
		}
		line := selfCheck(t, moved, wlLog)
		if !strings.Contains(line, fmt.Sprintf("pid=%d", pid)) {
			t.Errorf("on the target: %s", line)
		}
	})
}

// nestedLive returns the PID here of the live process that is pid in a
// child PID namespace, or 0.
func nestedLive(pid int) int {
	for _, st := range testutil.Processes() {
		if st.State == 'Z' || st.State == 'X' {
			continue
		}
		status, err := testutil.ProcStatus(st.Pid, st.Pid)
		if err != nil {
			continue
		}
		if f := strings.Fields(status["NSpid"]); len(f) == 2 && f[1] == strconv.Itoa(pid) {
			return st.Pid
		}
	}
	return 0
}

func readAll(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// exitCode is the exit status of a finished command (-1 for a signal).
func exitCode(err error) int {
	if err == nil {
		return 0
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	return -1
}
