package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/bench/workload"
	"github.com/phaul/phaul/internal/testutil"
	"github.com/phaul/phaul/internal/topology"
)

var (
	phaulOnce sync.Once
	phaulBin  string
	phaulErr  error
	buildDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// phaul builds the phaul command once for the package's tests.
func phaul(t *testing.T) string {
	t.Helper()
	phaulOnce.Do(func() {
		if buildDir, phaulErr = os.MkdirTemp("", "phaul-bench-test-"); phaulErr != nil {
			return
		}
		phaulBin = filepath.Join(buildDir, "phaul")
		phaulErr = testutil.CompilePhaul(phaulBin)
	})
	if phaulErr != nil {
		testutil.SkipOrFatal(t, phaulErr)
	}
	return phaulBin
}

// fakeRunner runs the built-in workload here (no hosts) and lets move
// stand in for the migration.
func fakeRunner(t *testing.T, move func(pid int) (start, end time.Time)) *runner {
	hosts := &Hosts{Phaul: phaul(t), Dir: t.TempDir()}
	t.Cleanup(func() { _ = hosts.Close() })
	r := &runner{
		cfg: withDefaults(Config{Phaul: hosts.Phaul, Heartbeat: 5 * time.Millisecond, Warmup: 900 * time.Millisecond,
			Threads: 2}),
		hosts:        hosts,
		startTarget:  func(context.Context, int) (*Serve, error) { return nil, nil },
		workloadArgs: []string{"--pause", "250ms"},
	}
	r.migrate = func(ctx context.Context, c runCase, pid int, _ *Serve) (*migration, error) {
		start, end := move(pid)
		return &migration{start: start, end: end, pid: pid}, nil
	}
	return r
}

// measurePause does a run with move standing in for the migration and
// checks that the app downtime is within [lo, hi] ms. A busy machine can
// delay the workload's wake-up past hi, so a run above hi is tried again
// (up to three times); a wrong measurement is wrong every time.
func measurePause(t *testing.T, what string, lo, hi float64, move func(pid int) (time.Time, time.Time)) {
	t.Helper()
	var got []string
	for attempt := 0; attempt < 3; attempt++ {
		r := fakeRunner(t, move)
		run := r.runOne(context.Background(), runCase{index: attempt, v: Variant{Name: "fake"}, mem: 4 << 20, dirty: 1000})
		if run.Err != "" {
			t.Fatal(run.Err)
		}
		if !run.Checked {
			t.Error("the workload's self-check did not run")
		}
		if run.AppDowntimeMS == nil {
			t.Fatalf("%s: not measured", what)
		}
		v := *run.AppDowntimeMS
		got = append(got, fmt.Sprintf("%.1f", v))
		if v < lo {
			t.Fatalf("%s: measured %.1f ms, less than the pause (%.0f ms)", what, v, lo)
		}
		if v <= hi {
			t.Logf("%s: measured %s ms (want %.0f–%.0f ms)", what, strings.Join(got, ", "), lo, hi)
			return
		}
	}
	t.Errorf("%s: measured %s ms, want %.0f–%.0f ms", what, strings.Join(got, ", "), lo, hi)
}

// TestSelfPauseIsMeasured: the workload pauses itself for 250 ms during
// the "migration" window; a longer stop before the window (500 ms) must not
// count. The harness must report the 250 ms pause (plus at most a
// heartbeat and scheduling slack), and the self-check must pass.
func TestSelfPauseIsMeasured(t *testing.T) {
	measurePause(t, "self-pause of 250 ms", 250, 250+5+35, func(pid int) (time.Time, time.Time) {
		// Outside the window: stopped for 500 ms.
		_ = syscall.Kill(pid, syscall.SIGSTOP)
		time.Sleep(500 * time.Millisecond)
		_ = syscall.Kill(pid, syscall.SIGCONT)
		time.Sleep(100 * time.Millisecond)
		start := time.Now()
		_ = syscall.Kill(pid, syscall.SIGUSR2) // pause 250 ms
		time.Sleep(400 * time.Millisecond)
		return start, time.Now()
	})
}

// TestExternalStopIsMeasured: the process is stopped from outside (as a
// freeze does) for 200 ms within the window.
func TestExternalStopIsMeasured(t *testing.T) {
	measurePause(t, "stop of 200 ms", 200, 200+5+35, func(pid int) (time.Time, time.Time) {
		start := time.Now()
		time.Sleep(50 * time.Millisecond)
		_ = syscall.Kill(pid, syscall.SIGSTOP)
		time.Sleep(200 * time.Millisecond)
		_ = syscall.Kill(pid, syscall.SIGCONT)
		return start, time.Now() // the beat ending the stop comes after end
	})
}

// clientRun does a run with TCP clients (local, no hosts) and move
// standing in for the migration.
func clientRun(t *testing.T, clients, attempt int, move func(pid int) (time.Time, time.Time)) Run {
	t.Helper()
	r := fakeRunner(t, move)
	r.cfg.TCPClients = clients
	return r.runOne(context.Background(), runCase{index: attempt, v: Variant{Name: "fake"}, mem: 4 << 20, dirty: 1000})
}

// TestClientSelfPauseIsMeasured: the workload pauses itself (and its
// server's sends) for 250 ms during the "migration" window, with three
// TCP clients (normal, lazy-server, bulk) and a UDP client connected. The
// client stall and the UDP gap must be that pause, give or take 60 ms;
// every client must have ended in order. A run above the bound is tried
// again (a busy machine can delay a wake-up); a wrong measurement is
// wrong every time.
func TestClientSelfPauseIsMeasured(t *testing.T) {
	const pause, slack = 250.0, 60.0
	var got []string
	for attempt := 0; attempt < 3; attempt++ {
		run := clientRun(t, 3, attempt, func(pid int) (time.Time, time.Time) {
			start := time.Now()
			_ = syscall.Kill(pid, syscall.SIGUSR2) // pause 250 ms
			time.Sleep(400 * time.Millisecond)
			return start, time.Now()
		})
		if run.Err != "" {
			t.Fatal(run.Err)
		}
		if run.ClientStallMS == nil || run.UDPGapMS == nil || run.TCPClients != 3 || len(run.Clients) != 4 || !run.Checked {
			t.Fatalf("incomplete run: %+v", run)
		}
		for _, c := range run.Clients {
			if c.Sent == 0 || c.Received == 0 {
				t.Errorf("client %+v carried nothing", c)
			}
		}
		stall, udp := *run.ClientStallMS, *run.UDPGapMS
		got = append(got, fmt.Sprintf("%.1f/%.1f", stall, udp))
		if stall < pause-5 || udp < pause-5 {
			t.Fatalf("client stall %.1f ms, UDP gap %.1f ms: less than the pause (%.0f ms); clients %+v", stall, udp, pause, run.Clients)
		}
		if stall <= pause+slack && udp <= pause+slack {
			t.Logf("client stall / UDP gap: %s ms (want %.0f–%.0f ms); clients %+v", strings.Join(got, ", "), pause, pause+slack, run.Clients)
			return
		}
	}
	t.Errorf("client stall / UDP gap: %s ms, want %.0f–%.0f ms", strings.Join(got, ", "), pause, pause+slack)
}

// TestClientStallOutsideWindowIsNotTaken: the clients' longest gap (a
// 500 ms stop) comes before the window, which holds a shorter pause. The
// stall during the window is then unknown: the run must fail so, not
// report the 500 ms.
func TestClientStallOutsideWindowIsNotTaken(t *testing.T) {
	run := clientRun(t, 2, 0, func(pid int) (time.Time, time.Time) {
		_ = syscall.Kill(pid, syscall.SIGSTOP)
		time.Sleep(500 * time.Millisecond)
		_ = syscall.Kill(pid, syscall.SIGCONT)
		time.Sleep(100 * time.Millisecond)
		start := time.Now()
		_ = syscall.Kill(pid, syscall.SIGUSR2)
		time.Sleep(400 * time.Millisecond)
		return start, time.Now()
	})
	if !strings.Contains(run.Err, ErrNoStall.Error()) || run.ClientStallMS != nil {
		t.Fatalf("run error %q, stall %v", run.Err, run.ClientStallMS)
	}
	if len(run.Clients) != 3 || run.Clients[0].MaxGapMS < 500 || run.Clients[0].InMigration {
		t.Errorf("clients %+v", run.Clients)
	}
}

// TestWindowStall: only gaps overlapping the window count; the largest
// of those is the stall.
func TestWindowStall(t *testing.T) {
	t0 := time.Now()
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	gap := func(from, to int) workload.TCPStats {
		return workload.TCPStats{MaxGap: at(to).Sub(at(from)), GapStart: at(from), GapEnd: at(to)}
	}
	start, end := at(1000), at(2000)
	for _, tc := range []struct {
		stats []workload.TCPStats
		want  time.Duration // -1: ErrNoStall
	}{
		{[]workload.TCPStats{gap(1500, 1550), gap(200, 700), gap(1950, 2030)}, 80 * time.Millisecond},
		{[]workload.TCPStats{gap(990, 1040)}, 50 * time.Millisecond},
		{[]workload.TCPStats{gap(100, 999), gap(2001, 2900)}, -1},
		{[]workload.TCPStats{{}}, -1},
		{nil, -1},
	} {
		got, err := windowStall(tc.stats, start, end)
		switch {
		case tc.want < 0 && !errors.Is(err, ErrNoStall):
			t.Errorf("%v: got %v, %v; want ErrNoStall", tc.stats, got, err)
		case tc.want >= 0 && (err != nil || got != tc.want):
			t.Errorf("%v: got %v, %v; want %v", tc.stats, got, err, tc.want)
		}
	}
}

func TestReadyAddrs(t *testing.T) {
	tcp, udp := readyAddrs("READY pid=7 pages=16 tcp=10.1.2.200:8000 udp=10.1.2.200:8001")
	if tcp != "10.1.2.200:8000" || udp != "10.1.2.200:8001" {
		t.Errorf("%q %q", tcp, udp)
	}
	if tcp, udp := readyAddrs("READY pid=7 pages=16"); tcp != "" || udp != "" {
		t.Errorf("%q %q", tcp, udp)
	}
}

// TestNoBeatAfterMigrationFails: a workload that never beats again after
// the window is a failed run, not a zero downtime.
func TestNoBeatAfterMigrationFails(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "w.log")
	now := time.Now()
	var lines []string
	for i := 0; i < 5; i++ {
		tm := now.Add(time.Duration(i-5) * 10 * time.Millisecond)
		lines = append(lines, fmt.Sprintf("BEAT seq=%d writes=0 maxgap_ms=10 gap_ms=10.000 t_ms=%.3f", i+1, float64(tm.UnixMicro())/1000))
	}
	if err := os.WriteFile(log, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := AppDowntime(context.Background(), log, now.Add(-25*time.Millisecond), now, 100*time.Millisecond); err == nil {
		t.Error("no beat after the migration, yet a downtime was reported")
	}
	// With a beat after the end, its gap is the answer.
	f, _ := os.OpenFile(log, os.O_APPEND|os.O_WRONLY, 0)
	fmt.Fprintf(f, "BEAT seq=6 writes=0 maxgap_ms=123.4 gap_ms=123.400 t_ms=%.3f\n", float64(now.Add(time.Millisecond).UnixMicro())/1000)
	fmt.Fprintf(f, "BEAT seq=7 writes=0 maxgap_ms=999 gap_ms=999.000 t_ms=%.3f\n", float64(now.Add(time.Second).UnixMicro())/1000)
	f.Close()
	got, err := AppDowntime(context.Background(), log, now.Add(-25*time.Millisecond), now, 100*time.Millisecond)
	if err != nil || got != 123.4 {
		t.Errorf("AppDowntime = %v, %v; want 123.4 (the first beat after the end, not later ones)", got, err)
	}
}

func TestParseCompare(t *testing.T) {
	vs, err := ParseCompare([]string{"track=uffdwp,hash", "compress=s2,zstd,none", "downtime=25ms,100ms"}, Variant{})
	if err != nil {
		t.Fatal(err)
	}
	if len(vs) != 12 {
		t.Fatalf("%d variants", len(vs))
	}
	if v := vs[11]; v.Name != "track=hash compress=none downtime=100ms" || v.Track != "hash" || v.Compress != "none" || v.Downtime != 100*time.Millisecond {
		t.Errorf("last variant %+v", v)
	}
	if vs, _ := ParseCompare(nil, Variant{}); len(vs) != 1 || vs[0].Name != "phaul" || vs[0].Engine != "phaul" {
		t.Errorf("no compare: %+v", vs)
	}
	for _, bad := range []string{"track=foo", "speed=1", "compress=", "downtime=soon", "track"} {
		if _, err := ParseCompare([]string{bad}, Variant{}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestPlanInterleavesAndNotes: repeats go over the whole matrix, variants
// rotate, and what cannot run is noted.
func TestPlanInterleavesAndNotes(t *testing.T) {
	t.Setenv("PATH", t.TempDir()) // no criu
	res := &Results{}
	cases, err := plan(context.Background(), withDefaults(Config{Mems: []int64{1 << 20}, DirtyRates: []int{0}, Repeat: 2,
		Compare: []string{"engine=phaul,criu", "compress=s2,zstd"}, Workloads: []string{"mem", "tcp"}}), res)
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, c := range cases {
		order = append(order, fmt.Sprintf("%d:%s", c.repeat, c.v.Name))
	}
	want := "0:engine=phaul compress=s2 0:engine=phaul compress=zstd 1:engine=phaul compress=zstd 1:engine=phaul compress=s2"
	if strings.Join(order, " ") != want {
		t.Errorf("order %v", order)
	}
	notes := strings.Join(res.Notes, "\n")
	if !strings.Contains(notes, "CRIU comparisons skipped: criu is not on the PATH") || !strings.Contains(notes, "engine=criu compress=zstd") ||
		!strings.Contains(notes, "Clients: 3 TCP clients (modes normal, lazy-server, bulk, in turn)") {
		t.Errorf("notes:\n%s", notes)
	}
}

func TestProbeCRIUVersions(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("PATH", dir)
	for _, tc := range []struct{ out, version, reason string }{
		{"Version: 3.17.1\n", "3.17.1", "older than 4.x"},
		{"Version: 4.2\nGitID: v4.2\n", "4.2", ""},
		{"garbage", "", "gave no version"},
	} {
		script := "#!/bin/sh\nprintf '" + strings.ReplaceAll(tc.out, "\n", `\n`) + "'\n"
		if err := os.WriteFile(filepath.Join(dir, "criu"), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		v, reason := ProbeCRIU(context.Background())
		if v != tc.version || (tc.reason == "") != (reason == "") || !strings.Contains(reason, tc.reason) {
			t.Errorf("%q: version %q, reason %q", tc.out, v, reason)
		}
	}
}

func needRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the bench needs root (namespaces, ptrace)")
	}
}

// leftovers lists this package's namespaces and phaul processes still
// alive, to compare before and after a session.
func leftovers(bin string) []string {
	var out []string
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "phaul-") {
			out = append(out, "netns "+e.Name())
		}
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if exe, _ := os.Readlink("/proc/" + p.Name() + "/exe"); exe == bin {
			out = append(out, "process "+p.Name())
		}
	}
	return out
}

// watchLeftovers records the networks the bench builds from now on and
// returns what finds, later, those of their namespaces and the processes
// of bin that are still there. Other packages' tests build namespaces of
// their own meanwhile: only the bench's count.
func watchLeftovers(t *testing.T, bin string) func() []string {
	before := leftovers(bin)
	var mu sync.Mutex
	var mine []string
	build := buildNetwork
	buildNetwork = func(ctx context.Context, names ...string) (*topology.Network, error) {
		n, err := build(ctx, names...)
		if n != nil {
			mu.Lock()
			mine = append(mine, n.Namespaces()...)
			mu.Unlock()
		}
		return n, err
	}
	t.Cleanup(func() { buildNetwork = build })
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		var left []string
		for _, x := range newOnly(before, leftovers(bin)) {
			if !strings.HasPrefix(x, "netns ") || slices.Contains(mine, strings.TrimPrefix(x, "netns ")) {
				left = append(left, x)
			}
		}
		return left
	}
}

func newOnly(before, after []string) []string {
	had := map[string]bool{}
	for _, b := range before {
		had[b] = true
	}
	var out []string
	for _, a := range after {
		if !had[a] {
			out = append(out, a)
		}
	}
	return out
}

// TestBenchEndToEnd runs a small real session (16 MiB, two codecs, one
// repeat) between two namespaces and checks every figure is there and
// plausible, that the files agree, and that nothing is left behind.
func TestBenchEndToEnd(t *testing.T) {
	needRoot(t)
	bin := phaul(t)
	leftBehind := watchLeftovers(t, bin)
	out := t.TempDir()
	var progress []Progress
	res, err := RunBench(context.Background(), Config{Phaul: bin, Mems: []int64{16 << 20}, DirtyRates: []int{1000},
		Repeat: 1, Compare: []string{"compress=s2,none"}, Dir: filepath.Join(out, "logs"),
		Progress: func(p Progress) { progress = append(progress, p) }})
	if errors.Is(err, topology.ErrNoIP) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if left := leftBehind(); len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
	if len(res.Runs) != 2 || len(progress) != 3 || progress[2].Done != 2 {
		t.Fatalf("%d runs, progress %+v", len(res.Runs), progress)
	}
	if bw := res.Bandwidth; bw == nil || bw.ReadMBps <= 0 || bw.LinkMBps <= 0 || len(bw.Compress) != 1 ||
		bw.Compress[0].Codec != "s2" || bw.Compress[0].Data != "heap" || bw.Compress[0].MBps <= 0 || progress[0].Bandwidth != bw {
		t.Errorf("bandwidth %+v", bw)
	} else {
		t.Logf("bandwidth: %s", bw)
	}
	for _, r := range res.Runs {
		if r.Err != "" {
			t.Fatalf("%s: %s", r.Config, r.Err)
		}
		if r.BoundMS <= 0 || r.BoundRatio != r.TotalMS/r.BoundMS {
			t.Errorf("%s: bound %v ms, ratio %v, total %v ms", r.Config, r.BoundMS, r.BoundRatio, r.TotalMS)
		}
		t.Logf("%s: app %.1f ms, frozen %.1f ms %v, total %.0f ms, %d bytes, %d rounds %v, CPU %.2f s + %.2f s",
			r.Config, *r.AppDowntimeMS, r.FrozenMS, r.Phases, r.TotalMS, r.Bytes, r.Rounds, r.RoundBytes, r.SourceCPU, r.TargetCPU)
		if r.AppDowntimeMS == nil || *r.AppDowntimeMS <= 0 || *r.AppDowntimeMS > r.TotalMS {
			t.Errorf("%s: app downtime %v, total %.0f ms", r.Config, r.AppDowntimeMS, r.TotalMS)
		}
		// The application is stopped at least from the freeze until the
		// target resumes it: phaul's frozen time less the commit's
		// confirmation.
		if *r.AppDowntimeMS < r.FrozenMS/2 {
			t.Errorf("%s: app saw %.1f ms, phaul was frozen %.1f ms", r.Config, *r.AppDowntimeMS, r.FrozenMS)
		}
		if r.FrozenMS <= 0 || r.Bytes == 0 || r.Rounds < 1 || len(r.RoundBytes) != r.Rounds || len(r.RoundMS) != r.Rounds ||
			r.SourceCPU <= 0 || r.TargetCPU <= 0 || !r.Checked || len(r.Phases) == 0 {
			t.Errorf("%s: incomplete run %+v", r.Config, r)
		}
	}
	s2, none := res.Runs[0], res.Runs[1]
	if s2.Config != "compress=s2" || none.Config != "compress=none" || s2.Bytes*2 > none.Bytes {
		t.Errorf("s2 sent %d bytes, none %d: compression did not show", s2.Bytes, none.Bytes)
	}
	if len(res.Notes) != 0 {
		t.Errorf("notes %v", res.Notes)
	}
	files, err := WriteAll(out, res)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if st, err := os.Stat(f); err != nil || st.Size() == 0 {
			t.Errorf("%s: %v", f, err)
		}
	}
	if len(files) != 5 {
		t.Errorf("wrote %v", files)
	}
	var back Results
	b, _ := os.ReadFile(filepath.Join(out, "results.json"))
	if err := json.Unmarshal(b, &back); err != nil || len(back.Runs) != 2 || *back.Runs[0].AppDowntimeMS != *s2.AppDowntimeMS {
		t.Errorf("results.json does not hold the runs: %v", err)
	}
	if _, err := os.Stat(filepath.Join(out, "logs", "run000-migrate.log")); err != nil {
		t.Errorf("logs: %v", err)
	}
}

// TestBenchInterrupted cancels a session in its first run: it returns
// promptly with the context's error, and leaves nothing behind.
func TestBenchInterrupted(t *testing.T) {
	needRoot(t)
	bin := phaul(t)
	leftBehind := watchLeftovers(t, bin)
	ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
	defer cancel()
	start := time.Now()
	res, err := RunBench(ctx, Config{Phaul: bin, Mems: []int64{16 << 20}, DirtyRates: []int{1000}, Repeat: 5})
	if errors.Is(err, topology.ErrNoIP) {
		t.Skip(err)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("took %v to stop", d)
	}
	if len(res.Runs) != 0 || len(res.Notes) == 0 {
		t.Errorf("runs %d, notes %v", len(res.Runs), res.Notes)
	}
	if left := leftBehind(); len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
}
