package cli

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
	"github.com/phaul/phaul/tracker"
)

func runCmd(args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := run(args, &Env{Stdout: &out, Stderr: &errOut})
	return code, out.String(), errOut.String()
}

func TestPreDumpUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"pre-dump", "-D", "/tmp/x"}, "-t PID is required"},
		{[]string{"pre-dump", "-t", "1"}, "-D DIR is required"},
		{[]string{"pre-dump", "-t", "1", "--stop-tracking"}, "-D DIR is required"},
		{[]string{"pre-dump", "-t", "1", "-D", "/tmp/x", "--track", "bogus"}, "unknown tracking backend"},
		{[]string{"pre-dump", "-t", "1", "-D", "/tmp/x", "extra"}, "unexpected argument"},
	} {
		code, _, stderr := runCmd(tc.args...)
		if code != 2 || !strings.Contains(stderr, tc.want) {
			t.Errorf("phaul %s: exit %d, stderr %q; want 2 and %q", strings.Join(tc.args, " "), code, stderr, tc.want)
		}
	}
}

// idleSource is a process that writes a MiB and sleeps.
const idleSource = `#include <unistd.h>
static char buf[1 << 20];
int main(void)
{
	for (int i = 0; i < (1 << 20); i += 4096)
		((volatile char *)buf)[i] = 1;
	if (write(1, "READY\n", 6) != 6)
		return 1;
	for (;;)
		pause();
}
`

// startIdle starts the idle program; it is not waited for by another
// goroutine (that would take the ptrace stops phaul waits for), but
// killed and reaped by the cleanup.
func startIdle(t *testing.T) int {
	t.Helper()
	if err := testutil.CloseInheritedFds(); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "idle.c")
	if err := os.WriteFile(src, []byte(idleSource), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := testutil.BuildC(t, src, filepath.Join(dir, "idle"))
	cmd := exec.Command(bin)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = sys.Kill(cmd.Process.Pid, sys.SIGKILL)
		_ = cmd.Wait()
	})
	ready := make([]byte, 6)
	if _, err := io.ReadFull(out, ready); err != nil || string(ready) != "READY\n" {
		t.Fatalf("idle: %q %v", ready, err)
	}
	return cmd.Process.Pid
}

// TestPreDumpJSON runs two pre-dumps and --stop-tracking through the
// command line and checks the JSON reports.
func TestPreDumpJSON(t *testing.T) {
	testutil.SkipIfNotSupported(t, tracker.Supported(tracker.UffdWP))
	pid := startIdle(t)
	root := t.TempDir()
	one, two := filepath.Join(root, "1"), filepath.Join(root, "2")
	report := func(args ...string) map[string]any {
		t.Helper()
		code, out, stderr := runCmd(args...)
		if code != 0 {
			t.Fatalf("phaul %s: exit %d: %s", strings.Join(args, " "), code, stderr)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(out), &m); err != nil {
			t.Fatalf("phaul %s: %v in %q", strings.Join(args, " "), err, out)
		}
		for _, k := range []string{"pages_scanned", "pages_written", "bytes_written", "frozen_ms", "duration_ms"} {
			if _, ok := m[k]; !ok {
				t.Errorf("phaul %s: no %q in %s", strings.Join(args, " "), k, out)
			}
		}
		return m
	}
	p := fmt.Sprint(pid)
	m := report("pre-dump", "-t", p, "-D", one, "--track", "uffdwp", "--json")
	if m["pages_written"].(float64) < 256 {
		t.Errorf("first pre-dump wrote %v pages, the process has 256 of its own", m["pages_written"])
	}
	m = report("pre-dump", "-t", p, "-D", two, "--prev", one, "--json")
	if m["frozen_ms"].(float64) != 0 {
		t.Errorf("second pre-dump froze the process for %v ms", m["frozen_ms"])
	}
	if m["pages_written"].(float64) > 16 || m["pages_in_parent"].(float64) < 256 {
		t.Errorf("second pre-dump of an idle process: %v written, %v in parent", m["pages_written"], m["pages_in_parent"])
	}
	code, out, stderr := runCmd("pre-dump", "-t", p, "--prev", two, "--stop-tracking")
	if code != 0 || !strings.Contains(out, "removed") {
		t.Fatalf("--stop-tracking: exit %d, %q %q", code, out, stderr)
	}
	links, _ := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", pid))
	for _, l := range links {
		if target, _ := os.Readlink(l); strings.Contains(target, "userfaultfd") {
			t.Errorf("%s is still a userfaultfd after --stop-tracking", l)
		}
	}
}
