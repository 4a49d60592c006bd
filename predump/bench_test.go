package predump_test

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/testutil"
	"github.com/phaul/phaul/predump"
	"github.com/phaul/phaul/tracker"
)

// The benchmarks track a workload with 1 GiB of populated memory. Run them
// with -benchtime 1x: each measurement takes seconds.
//
//	go test -run x -bench . -benchtime 1x ./predump

// discard is a Sink that counts.
type discard struct{ written, zero, kept uint64 }

func (d *discard) WritePages(addr uint64, data []byte) error {
	d.written += uint64(len(data)) / predump.PageSize
	return nil
}
func (d *discard) ZeroPages(addr, n uint64) error { d.zero += n; return nil }
func (d *discard) KeepPages(addr, n uint64) error { d.kept += n; return nil }
func (d *discard) Done() error                    { return nil }

func benchBackends(b *testing.B, f func(b *testing.B, backend string)) {
	for _, backend := range []string{tracker.UffdWP, tracker.Hash} {
		b.Run(backend, func(b *testing.B) {
			testutil.SkipIfNotSupported(b, tracker.Supported(backend))
			f(b, backend)
		})
	}
}

// BenchmarkRoundScan1GiB measures one tracking round over 1 GiB of
// populated memory in which nothing was written: the fixed cost of a round
// (uffdwp: PAGEMAP_SCAN; hash: reading and hashing everything).
func BenchmarkRoundScan1GiB(b *testing.B) {
	benchBackends(b, func(b *testing.B, backend string) {
		s := startSpin(b, "--mib", "1024", "--rate", "0")
		tr, err := tracker.Start(context.Background(), s.Pid, tracker.Options{Backend: backend})
		if err != nil {
			b.Fatal(err)
		}
		defer tr.Stop()
		if _, err := tr.Round(context.Background()); err != nil {
			b.Fatal(err)
		}
		b.ResetTimer()
		var scanned uint64
		for i := 0; i < b.N; i++ {
			d, err := tr.Round(context.Background())
			if err != nil {
				b.Fatal(err)
			}
			scanned = d.Scanned()
		}
		b.StopTimer()
		b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/round")
		b.ReportMetric(float64(scanned)*predump.PageSize/(1<<30), "GiB/round")
	})
}

// BenchmarkTrackedThroughput measures how much slower a workload that
// writes 1000 pages per second (each on a page not written for a long
// time, so each write faults once) computes while tracked, with a tracking
// round every 100 ms, compared to untracked.
//
// The machine is shared: wall-clock rates swing with whatever else runs.
// The loss is therefore measured as work per CPU second of the workload
// (/proc/PID/schedstat, which counts the time the kernel spends on its
// write faults too): windows untracked, tracked, tracked, untracked. The
// rounds' own cost is phaul's, reported as ms/round.
func BenchmarkTrackedThroughput(b *testing.B) {
	benchBackends(b, func(b *testing.B, backend string) {
		const window = 1500 * time.Millisecond
		s := startSpin(b, "--mib", "1024", "--rate", "1000")
		for i := 0; i < b.N; i++ {
			// measure returns work units per CPU second over one window.
			measure := func() float64 {
				a, ca := s.stat(b), cpuTime(b, s.Pid)
				time.Sleep(window)
				z, cz := s.stat(b), cpuTime(b, s.Pid)
				return float64(z.units-a.units) / (cz - ca).Seconds()
			}
			time.Sleep(300 * time.Millisecond)
			u1 := measure()
			tr, err := tracker.Start(context.Background(), s.Pid, tracker.Options{Backend: backend})
			if err != nil {
				b.Fatal(err)
			}
			stop := make(chan struct{})
			var wg sync.WaitGroup
			var rounds int
			var took time.Duration
			wg.Add(1)
			go func() {
				defer wg.Done()
				tick := time.NewTicker(100 * time.Millisecond)
				defer tick.Stop()
				for {
					select {
					case <-stop:
						return
					case <-tick.C:
					}
					d, err := tr.Round(context.Background())
					if err != nil {
						b.Error(err)
						return
					}
					rounds++
					took += d.Took
				}
			}()
			time.Sleep(500 * time.Millisecond) // past the first (full) rounds
			t1 := measure()
			t2 := measure()
			close(stop)
			wg.Wait()
			if err := tr.Stop(); err != nil {
				b.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond)
			u2 := measure()
			untracked, tracked := (u1+u2)/2, (t1+t2)/2
			b.ReportMetric(100*(1-tracked/untracked), "loss_%")
			if rounds > 0 {
				b.ReportMetric(float64(took.Microseconds())/1000/float64(rounds), "ms/round")
			}
			b.Logf("units per CPU second: untracked %.0f, tracked %.0f, %.0f, untracked %.0f; %d rounds", u1, t1, t2, u2, rounds)
		}
	})
}

// cpuTime returns the CPU time pid has used (/proc/PID/schedstat).
func cpuTime(tb testing.TB, pid int) time.Duration {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/schedstat", pid))
	if err != nil {
		tb.Fatal(err)
	}
	var ns int64
	if _, err := fmt.Sscan(string(b), &ns); err != nil {
		tb.Fatalf("schedstat %q: %v", b, err)
	}
	return time.Duration(ns)
}

// BenchmarkHotSetRounds runs six pre-dump rounds, 200 ms apart, over 1 GiB
// of which a hot set of 256 pages is rewritten 5000 times per second, and
// reports the pages each round copied: from all of memory down to the hot
// set.
func BenchmarkHotSetRounds(b *testing.B) {
	benchBackends(b, func(b *testing.B, backend string) {
		const hot, rounds = 256, 6
		s := startSpin(b, "--mib", "1024", "--hot", fmt.Sprint(hot), "--rate", "5000")
		for i := 0; i < b.N; i++ {
			tr, err := tracker.Start(context.Background(), s.Pid, tracker.Options{Backend: backend})
			if err != nil {
				b.Fatal(err)
			}
			var prev tracker.Ranges
			for r := 1; r <= rounds; r++ {
				if r > 1 {
					time.Sleep(200 * time.Millisecond)
				}
				res, err := predump.Run(context.Background(), tr, &discard{}, predump.Options{Previous: prev})
				if err != nil {
					b.Fatal(err)
				}
				prev = res.Recorded
				b.ReportMetric(float64(res.PagesWritten), fmt.Sprintf("pages_round%d", r))
				b.ReportMetric(float64(res.Duration.Microseconds())/1000, fmt.Sprintf("ms_round%d", r))
				if r > 1 && res.PagesWritten > 2*hot {
					b.Errorf("round %d copied %d pages, the hot set is %d", r, res.PagesWritten, hot)
				}
			}
			if err := tr.Stop(); err != nil {
				b.Fatal(err)
			}
		}
	})
}
