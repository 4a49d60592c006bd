package e2e

import (
	"encoding/json"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
)

// Benchmarks of dump and restore of a process holding N MiB of heap-like
// data (testdata/bigmem.c). Images go to /dev/shm when it exists, so that
// the disk is not what is measured. b.SetBytes makes `go test` print MB/s;
// dumps also report the frozen time phaul measured (--json).
//
//	go test ./e2e -run '^$' -bench . -benchtime 3x

func BenchmarkDump256M(b *testing.B)    { benchDump(b, 256) }
func BenchmarkDump1G(b *testing.B)      { benchDump(b, 1024) }
func BenchmarkRestore256M(b *testing.B) { benchRestore(b, 256) }
func BenchmarkRestore1G(b *testing.B)   { benchRestore(b, 1024) }

func startBigmem(b *testing.B, mib int) *testutil.Workload {
	b.Helper()
	return startFixtureOpts(b, "bigmem", &testutil.Options{ReadyTimeout: 2 * time.Minute, CheckTimeout: time.Minute},
		"--mib", strconv.Itoa(mib))
}

// benchImageDir returns a fresh directory for an image, in /dev/shm when
// possible; it is removed by b.Cleanup.
func benchImageDir(b *testing.B) string {
	b.Helper()
	parent := ""
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		parent = "/dev/shm"
	}
	dir, err := os.MkdirTemp(parent, "phaul-bench-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func benchDump(b *testing.B, mib int) {
	needPhaul(b)
	need(b, "bigmem")
	b.SetBytes(int64(mib) << 20)
	var frozen float64
	b.StopTimer()
	for i := 0; i < b.N; i++ {
		w := startBigmem(b, mib)
		if i == 0 {
			w.MustCheck(b)
		}
		dir := benchImageDir(b)
		args := []string{"dump", "-t", strconv.Itoa(w.Pid), "-D", dir, "--json"}
		b.StartTimer()
		r := runPhaul(b, w, args...)
		b.StopTimer()
		r.mustSucceed(b, w)
		var s dumpStats
		if err := json.Unmarshal([]byte(r.stdout), &s); err == nil && s.FrozenMs != nil {
			frozen += *s.FrozenMs
		}
		w.WaitGone(b, 10*time.Second)
		os.RemoveAll(dir)
	}
	b.ReportMetric(frozen/float64(b.N), "frozen-ms/op")
}

func benchRestore(b *testing.B, mib int) {
	needPhaul(b)
	need(b, "bigmem")
	w := startBigmem(b, mib)
	pre := w.MustCheck(b)
	dir := benchImageDir(b)
	dumpAndWaitGone(b, w, dir)
	b.SetBytes(int64(mib) << 20)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		restoreDetached(b, w, dir)
		b.StopTimer()
		if i == 0 {
			if post := w.MustCheck(b); post.Seq != pre.Seq+1 {
				b.Fatalf("restored bigmem check seq %d, want %d", post.Seq, pre.Seq+1)
			}
		}
		if err := sys.Kill(w.Pid, sys.SIGKILL); err != nil {
			b.Fatal(err)
		}
		w.WaitGone(b, 10*time.Second)
		b.StartTimer()
	}
}
