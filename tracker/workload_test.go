package tracker_test

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
	"github.com/phaul/phaul/tracker"
)

// buildDir holds the workload built by TestMain; workloadErr says why it
// is missing.
var (
	workloadBin string
	workloadErr error
)

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "phaul-tracker-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	workloadBin = filepath.Join(dir, "dirty")
	workloadErr = testutil.CompileC("testdata/dirty.c", workloadBin)
	return m.Run()
}

// workload is a running testdata/dirty.c, driven through its stdin.
type workload struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
	Pid int
	// regions by letter: their address and size in pages.
	addr  map[string]uint64
	pages map[string]uint64
}

// startWorkload starts the workload; the test's cleanup kills and reaps it.
func startWorkload(tb testing.TB) *workload {
	tb.Helper()
	if workloadErr != nil {
		testutil.SkipOrFatal(tb, workloadErr)
	}
	cmd := exec.Command(workloadBin)
	in, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	w := &workload{cmd: cmd, in: in, out: bufio.NewReader(out), Pid: cmd.Process.Pid,
		addr: map[string]uint64{}, pages: map[string]uint64{}}
	tb.Cleanup(func() { w.kill() })
	return w
}

// kill ends the workload and reaps it.
func (w *workload) kill() {
	if w.cmd.ProcessState == nil {
		_ = sys.Kill(w.Pid, sys.SIGKILL)
		_ = w.cmd.Wait()
	}
}

// do sends one command and returns the reply after "OK"; an error reply
// fails the test.
func (w *workload) do(tb testing.TB, format string, args ...any) string {
	tb.Helper()
	line := fmt.Sprintf(format, args...)
	if _, err := fmt.Fprintln(w.in, line); err != nil {
		tb.Fatalf("workload: send %q: %v", line, err)
	}
	done := make(chan struct{})
	var reply string
	var err error
	go func() {
		reply, err = w.out.ReadString('\n')
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		w.kill()
		<-done
		tb.Fatalf("workload: no reply to %q", line)
	}
	if err != nil {
		tb.Fatalf("workload: reply to %q: %v", line, err)
	}
	reply = strings.TrimSpace(reply)
	rest, ok := strings.CutPrefix(reply, "OK")
	if !ok {
		tb.Fatalf("workload: %q: %s", line, reply)
	}
	return strings.TrimSpace(rest)
}

// mapRegion maps region r of n pages and records it.
func (w *workload) mapRegion(tb testing.TB, r string, n uint64) {
	tb.Helper()
	w.addr[r] = parseAddr(tb, w.do(tb, "map %s %d", r, n))
	w.pages[r] = n
}

// move moves region r and records its new address.
func (w *workload) move(tb testing.TB, r string) {
	tb.Helper()
	w.addr[r] = parseAddr(tb, w.do(tb, "move %s", r))
}

func parseAddr(tb testing.TB, s string) uint64 {
	tb.Helper()
	v, err := strconv.ParseUint(strings.TrimPrefix(s, "0x"), 16, 64)
	if err != nil {
		tb.Fatalf("bad address %q", s)
	}
	return v
}

// span returns the pages of region r.
func (w *workload) span(r string) tracker.Ranges {
	return tracker.Ranges{{Start: w.addr[r], End: w.addr[r] + w.pages[r]*tracker.PageSize}}
}

// pages returns pages idx of region r as a set.
func (w *workload) pageSet(r string, idx ...uint64) tracker.Ranges {
	var rs []tracker.Range
	for _, i := range idx {
		a := w.addr[r] + i*tracker.PageSize
		rs = append(rs, tracker.Range{Start: a, End: a + tracker.PageSize})
	}
	return tracker.Normalize(rs)
}

// present returns the present pages of region r.
func (w *workload) present(tb testing.TB, r string) tracker.Ranges {
	tb.Helper()
	pm, err := tracker.OpenPagemap(w.Pid)
	if err != nil {
		tb.Fatal(err)
	}
	defer pm.Close()
	got, err := pm.Present(tracker.Area{Range: w.span(r)[0], Readable: true})
	if err != nil {
		tb.Fatal(err)
	}
	return got
}

// pageNumbers renders a set as page numbers of region r, for messages.
func (w *workload) pageNumbers(r string, rs tracker.Ranges) string {
	var b strings.Builder
	for _, x := range rs {
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		first := (int64(x.Start) - int64(w.addr[r])) / tracker.PageSize
		last := (int64(x.End)-int64(w.addr[r]))/tracker.PageSize - 1
		if first == last {
			fmt.Fprintf(&b, "%d", first)
		} else {
			fmt.Fprintf(&b, "%d-%d", first, last)
		}
	}
	return "{" + b.String() + "}"
}
