package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"syscall"
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

// The tree benchmarks dump and restore 16 processes of 64 MiB each (1 GiB
// in all, as BenchmarkDump1G in one process).
func BenchmarkDumpTree16x64M(b *testing.B)    { benchDumpTree(b, 16, 64) }
func BenchmarkRestoreTree16x64M(b *testing.B) { benchRestoreTree(b, 16, 64) }

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

func startTreemem(b *testing.B, procs, mib int) *testutil.Workload {
	b.Helper()
	return startFixtureOpts(b, "treemem", &testutil.Options{ReadyTimeout: 2 * time.Minute, CheckTimeout: time.Minute},
		"--procs", strconv.Itoa(procs), "--mib", strconv.Itoa(mib))
}

func benchDumpTree(b *testing.B, procs, mib int) {
	needPhaul(b)
	need(b, "treemem")
	b.SetBytes(int64(procs*mib) << 20)
	var frozen float64
	b.StopTimer()
	for i := 0; i < b.N; i++ {
		w := startTreemem(b, procs, mib)
		if i == 0 {
			w.MustCheck(b)
		}
		dir := benchImageDir(b)
		b.StartTimer()
		r := runPhaul(b, w, "dump", "-t", strconv.Itoa(w.Pid), "-D", dir, "--json")
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

func benchRestoreTree(b *testing.B, procs, mib int) {
	needPhaul(b)
	need(b, "treemem")
	w := startTreemem(b, procs, mib)
	pre := w.MustCheck(b)
	dir := benchImageDir(b)
	dumpAndWaitGone(b, w, dir)
	b.SetBytes(int64(procs*mib) << 20)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		restoreDetached(b, w, dir)
		b.StopTimer()
		if i == 0 {
			if post := w.MustCheck(b); post.Seq != pre.Seq+1 {
				b.Fatalf("restored treemem check seq %d, want %d", post.Seq, pre.Seq+1)
			}
		}
		// The whole tree goes, and its orphans are reaped here (this
		// test is their subreaper): a zombie would keep its PID from the
		// next restore.
		pids := descendants(w.Pid)
		if err := sys.Kill(-w.Pid, sys.SIGKILL); err != nil { // its process group
			b.Fatal(err)
		}
		w.WaitGone(b, 10*time.Second)
		for _, pid := range pids {
			if err := testutil.WaitPidGone(pid, 10*time.Second); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
	}
}

// descendants returns the PIDs of every descendant of pid.
func descendants(pid int) []int {
	var out []int
	for _, kid := range treeChildPids(pid) {
		out = append(append(out, kid), descendants(kid)...)
	}
	return out
}

// benchRun is the part of a `phaul bench` run this test reads.
type benchRun struct {
	DirtyRate     int                `json:"dirty_pages_per_sec"`
	TCPClients    int                `json:"tcp_clients"`
	AppDowntimeMS *float64           `json:"app_downtime_ms"`
	ClientStallMS *float64           `json:"client_stall_ms"`
	UDPGapMS      *float64           `json:"udp_gap_ms"`
	FrozenMS      float64            `json:"frozen_ms"`
	Phases        map[string]float64 `json:"downtime_phases"`
	Clients       []struct {
		Mode        string  `json:"mode"`
		Received    int64   `json:"received"`
		MaxGapMS    float64 `json:"max_gap_ms"`
		InMigration bool    `json:"in_migration"`
	} `json:"clients"`
	Checked bool   `json:"self_check_ok"`
	Err     string `json:"error"`
}

// TestBenchTCPClients runs `phaul bench --mem 16M --tcp-clients 3
// --repeat 1` (two runs: 0 and 1000 pages/s): three TCP clients and a UDP
// client on a third host stay connected through each migration. Every
// run must succeed with a client stall that is plausible: above zero,
// at least phaul's frozen time less its commit round trip (the process
// resumes on the target within it, and cannot send before) and a small
// tolerance, and below 5 s. results.json, the JSON on stdout and
// report.md must agree, and the bench must leave no namespace or process
// behind.
func TestBenchTCPClients(t *testing.T) {
	phaul := needPhaul(t)
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("the ip tool (iproute2) is not installed")
	}
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, phaul, "bench", "--mem", "16M", "--tcp-clients", "3", "--repeat", "1", "--out", out, "--json")
	// On timeout the bench is asked to stop; it removes what it made.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	if err := cmd.Run(); err != nil {
		report, _ := os.ReadFile(filepath.Join(out, "report.md"))
		t.Fatalf("phaul bench: %v\n%s\n%s", err, stderr.String(), report)
	}
	t.Logf("phaul bench took %v", time.Since(start).Round(time.Millisecond))

	b, err := os.ReadFile(filepath.Join(out, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	var printed, file any
	if err := json.Unmarshal(stdout.Bytes(), &printed); err != nil {
		t.Fatalf("bench --json: %v\n%s", err, stdout.String())
	}
	if err := json.Unmarshal(b, &file); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(printed, file) {
		t.Errorf("results.json differs from what bench --json printed:\n%s\n%s", b, stdout.String())
	}
	var written struct {
		Runs []benchRun `json:"runs"`
	}
	if err := json.Unmarshal(b, &written); err != nil || len(written.Runs) != 2 {
		t.Fatalf("results.json: %v, %d runs:\n%s", err, len(written.Runs), b)
	}
	md, err := os.ReadFile(filepath.Join(out, "report.md"))
	if err != nil {
		t.Fatal(err)
	}
	const tolerance = 10.0 // ms: a message in flight at the freeze
	for _, r := range written.Runs {
		if r.Err != "" || !r.Checked || r.TCPClients != 3 || r.ClientStallMS == nil || r.AppDowntimeMS == nil || len(r.Clients) != 4 {
			t.Fatalf("incomplete run: %+v", r)
		}
		stall, floor := *r.ClientStallMS, r.FrozenMS-r.Phases["commit_ms"]-tolerance
		t.Logf("%d pages/s: client stall %.1f ms, UDP gap %v ms, app downtime %.1f ms, frozen %.1f ms %v; clients %+v",
			r.DirtyRate, stall, fmtOpt(r.UDPGapMS), *r.AppDowntimeMS, r.FrozenMS, r.Phases, r.Clients)
		if stall <= 0 || stall < floor || stall >= 5000 {
			t.Errorf("%d pages/s: client stall %.1f ms, want %.1f ms (frozen %.1f less commit %.1f and %.0f) to 5000 ms",
				r.DirtyRate, stall, floor, r.FrozenMS, r.Phases["commit_ms"], tolerance)
		}
		var largest float64
		for _, c := range r.Clients {
			if c.Received == 0 {
				t.Errorf("%d pages/s: client %+v received nothing", r.DirtyRate, c)
			}
			if c.Mode != "udp" && c.InMigration {
				largest = max(largest, c.MaxGapMS)
			}
		}
		if largest != stall {
			t.Errorf("%d pages/s: client stall %.3f ms, but the clients' largest gap during the migration is %.3f ms", r.DirtyRate, stall, largest)
		}
		// One run per row: the median is the run's own figure.
		row := benchReportRow(t, string(md), r.DirtyRate)
		for col, v := range map[string]float64{"client stall ms": stall, "app downtime ms": *r.AppDowntimeMS, "frozen ms": r.FrozenMS} {
			if want := fmt.Sprintf("%.1f (%.1f–%.1f)", v, v, v); row[col] != want {
				t.Errorf("%d pages/s: report.md says %s %q, results.json %q", r.DirtyRate, col, row[col], want)
			}
		}
		if want := fmt.Sprintf("1000 pages/s: the 3 TCP clients stalled %.1f ms", stall); r.DirtyRate == 1000 && !strings.Contains(string(md), want) {
			t.Errorf("report.md does not say %q:\n%s", want, md)
		}
	}
	// The namespaces the bench made (named in its action script) are gone,
	// and so is every process it started.
	script, err := os.ReadFile(filepath.Join(out, "logs", "move-address.sh"))
	if err != nil {
		t.Fatal(err)
	}
	ns := regexp.MustCompile(`phaul-[0-9a-f]+-`).Find(script)
	if ns == nil {
		t.Fatalf("no namespace named in the action script:\n%s", script)
	}
	if left, _ := filepath.Glob("/run/netns/" + string(ns) + "*"); len(left) > 0 {
		t.Errorf("namespaces left behind: %v", left)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/exe")
	for _, p := range procs {
		if exe, _ := os.Readlink(p); exe == phaul {
			t.Errorf("process left behind: %s", filepath.Dir(p))
		}
	}
}

func fmtOpt(v *float64) string {
	if v == nil {
		return "–"
	}
	return fmt.Sprintf("%.1f", *v)
}

// benchReportRow returns the row of report.md's main table for the dirty
// rate given, keyed by column name.
func benchReportRow(t *testing.T, md string, dirty int) map[string]string {
	t.Helper()
	cells := func(l string) []string {
		var out []string
		for _, c := range strings.Split(strings.Trim(l, "|"), "|") {
			out = append(out, strings.TrimSpace(c))
		}
		return out
	}
	lines := strings.Split(md, "\n")
	for i, l := range lines {
		if !strings.HasPrefix(l, "| config | workload | memory | dirty pages/s | runs |") {
			continue
		}
		cols := cells(l)
		for _, r := range lines[i+2:] {
			if !strings.HasPrefix(r, "|") {
				break
			}
			row := map[string]string{}
			for j, c := range cells(r) {
				if j < len(cols) {
					row[cols[j]] = c
				}
			}
			if row["dirty pages/s"] == strconv.Itoa(dirty) {
				return row
			}
		}
	}
	t.Fatalf("report.md has no row for %d pages/s:\n%s", dirty, md)
	return nil
}
