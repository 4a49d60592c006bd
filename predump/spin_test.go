package predump_test

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
)

var (
	buildOnce sync.Once
	spinBin   string
	spinErr   error
	spinDir   string
)

// spin is a running testdata/spin.c.
type spin struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	out   *bufio.Reader
	Pid   int
	Addr  uint64
	Pages uint64
}

// spinStat is one STAT answer.
type spinStat struct {
	units, written uint64
	at             time.Duration
}

// startSpin builds (once per test binary) and starts testdata/spin.c.
func startSpin(tb testing.TB, args ...string) *spin {
	tb.Helper()
	buildOnce.Do(func() {
		if spinDir, spinErr = os.MkdirTemp("", "phaul-predump-test-"); spinErr != nil {
			return
		}
		spinBin = filepath.Join(spinDir, "spin")
		spinErr = testutil.CompileC("testdata/spin.c", spinBin)
	})
	if spinErr != nil {
		testutil.SkipOrFatal(tb, spinErr)
	}
	cmd := exec.Command(spinBin, args...)
	in, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	s := &spin{cmd: cmd, in: in, out: bufio.NewReader(out), Pid: cmd.Process.Pid}
	tb.Cleanup(func() {
		_ = sys.Kill(s.Pid, sys.SIGKILL)
		_ = cmd.Wait()
	})
	line := s.readLine(tb, 60*time.Second)
	f := strings.Fields(line)
	if len(f) != 3 || f[0] != "READY" {
		tb.Fatalf("spin: %q", line)
	}
	s.Addr, err = strconv.ParseUint(strings.TrimPrefix(f[1], "0x"), 16, 64)
	if err == nil {
		s.Pages, err = strconv.ParseUint(f[2], 10, 64)
	}
	if err != nil {
		tb.Fatalf("spin: %q", line)
	}
	return s
}

func (s *spin) readLine(tb testing.TB, timeout time.Duration) string {
	tb.Helper()
	done := make(chan struct{})
	var line string
	var err error
	go func() {
		line, err = s.out.ReadString('\n')
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(timeout):
		_ = sys.Kill(s.Pid, sys.SIGKILL)
		<-done
		tb.Fatalf("spin: no answer within %v", timeout)
	}
	if err != nil {
		tb.Fatalf("spin: %v", err)
	}
	return strings.TrimSpace(line)
}

// stat asks for the workload's counters.
func (s *spin) stat(tb testing.TB) spinStat {
	tb.Helper()
	if _, err := fmt.Fprintln(s.in, "stat"); err != nil {
		tb.Fatal(err)
	}
	line := s.readLine(tb, 10*time.Second)
	var st spinStat
	var ns uint64
	if _, err := fmt.Sscanf(line, "STAT %d %d %d", &st.units, &st.written, &ns); err != nil {
		tb.Fatalf("spin: %q: %v", line, err)
	}
	st.at = time.Duration(ns)
	return st
}
