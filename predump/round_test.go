package predump_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
	"github.com/phaul/phaul/predump"
	"github.com/phaul/phaul/tracker"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if spinDir != "" {
		os.RemoveAll(spinDir)
	}
	os.Exit(code)
}

// memSink keeps a round in memory and checks the Sink contract: address
// order, no page twice, whole pages.
type memSink struct {
	next          uint64
	written, zero tracker.Ranges
	kept          tracker.Ranges
	bytes         uint64
	done          bool
}

func (s *memSink) check(addr, n uint64) error {
	if s.done {
		return fmt.Errorf("page %#x after Done", addr)
	}
	if addr%predump.PageSize != 0 || n == 0 {
		return fmt.Errorf("bad run %#x+%d", addr, n)
	}
	if addr < s.next {
		return fmt.Errorf("run at %#x before the end of the previous one %#x", addr, s.next)
	}
	s.next = addr + n*predump.PageSize
	return nil
}

func (s *memSink) WritePages(addr uint64, data []byte) error {
	if len(data)%predump.PageSize != 0 {
		return fmt.Errorf("%d bytes at %#x", len(data), addr)
	}
	n := uint64(len(data)) / predump.PageSize
	if err := s.check(addr, n); err != nil {
		return err
	}
	s.written.Add(addr, addr+n*predump.PageSize)
	s.bytes += uint64(len(data))
	return nil
}

func (s *memSink) ZeroPages(addr, n uint64) error {
	if err := s.check(addr, n); err != nil {
		return err
	}
	s.zero.Add(addr, addr+n*predump.PageSize)
	return nil
}

func (s *memSink) KeepPages(addr, n uint64) error {
	if err := s.check(addr, n); err != nil {
		return err
	}
	s.kept.Add(addr, addr+n*predump.PageSize)
	return nil
}

func (s *memSink) Done() error {
	if s.done {
		return fmt.Errorf("Done twice")
	}
	s.done = true
	return nil
}

// TestRounds runs rounds over a workload with a hot set: the first round
// records everything, later ones write (about) the hot pages and keep the
// rest; the recorded set of a round is the Previous of the next.
func TestRounds(t *testing.T) {
	for _, backend := range []string{tracker.UffdWP, tracker.Hash} {
		t.Run(backend, func(t *testing.T) {
			testutil.SkipIfNotSupported(t, tracker.Supported(backend))
			const hot = 32
			s := startSpin(t, "--mib", "16", "--hot", fmt.Sprint(hot), "--rate", "2000")
			tr, err := tracker.Start(context.Background(), s.Pid, tracker.Options{Backend: backend})
			if err != nil {
				t.Fatal(err)
			}
			defer tr.Stop()
			region := tracker.Ranges{{Start: s.Addr, End: s.Addr + s.Pages*predump.PageSize}}
			var prev tracker.Ranges
			for i := 1; i <= 4; i++ {
				sink := &memSink{}
				res, err := predump.Run(context.Background(), tr, sink, predump.Options{Previous: prev})
				if err != nil {
					t.Fatal(err)
				}
				if !sink.done {
					t.Fatal("Done not called")
				}
				all := tracker.Union(tracker.Union(sink.written, sink.zero), sink.kept)
				if !rangesEqual(all, res.Recorded) {
					t.Fatalf("round %d: Recorded %v is not what the sink got %v", i, res.Recorded, all)
				}
				inRegion := tracker.Intersect(sink.written, region).Pages()
				t.Logf("round %d: %d written (%d in the region), %d kept, %d present", i, res.PagesWritten, inRegion, res.PagesKept, res.PagesPresent)
				if got := tracker.Intersect(all, region); !rangesEqual(got, region) {
					t.Errorf("round %d: the region is not recorded whole: %v", i, got)
				}
				if i == 1 && inRegion != s.Pages {
					t.Errorf("first round wrote %d pages of the region, want %d", inRegion, s.Pages)
				}
				if i > 1 && inRegion > hot {
					t.Errorf("round %d wrote %d pages of the region, more than the %d hot ones", i, inRegion, hot)
				}
				if i > 1 && res.PagesKept == 0 {
					t.Errorf("round %d kept nothing", i)
				}
				prev = res.Recorded
				time.Sleep(100 * time.Millisecond)
			}
		})
	}
}

func rangesEqual(a, b tracker.Ranges) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestRoundLayout bounds a round to a layout that lacks the workload's
// region (as if the region was mapped after the layout was read): the
// round leaves it out, and the next round, not bounded, reads all of it.
func TestRoundLayout(t *testing.T) {
	testutil.SkipIfNotSupported(t, tracker.Supported(tracker.UffdWP))
	s := startSpin(t, "--mib", "4", "--hot", "8", "--rate", "100")
	tr, err := tracker.Start(context.Background(), s.Pid, tracker.Options{Backend: tracker.UffdWP})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Stop()
	region := tracker.Ranges{{Start: s.Addr, End: s.Addr + s.Pages*predump.PageSize}}
	layout := tracker.Subtract(tracker.Ranges{{Start: 0, End: 1 << 47}}, region)
	sink := &memSink{}
	res, err := predump.Run(context.Background(), tr, sink, predump.Options{Layout: layout})
	if err != nil {
		t.Fatal(err)
	}
	all := tracker.Union(tracker.Union(sink.written, sink.zero), sink.kept)
	if got := tracker.Intersect(all, region); len(got) != 0 {
		t.Fatalf("the round sent %v, outside its layout", got)
	}
	if len(tracker.Intersect(res.Recorded, region)) != 0 || len(all) == 0 {
		t.Fatalf("recorded %v, sent %v", res.Recorded, all)
	}
	sink = &memSink{}
	if got := tracker.Intersect(res.Deferred, region); !rangesEqual(got, region) {
		t.Errorf("deferred %v, want the region %v", res.Deferred, region)
	}
	if _, err := predump.Run(context.Background(), tr, sink, predump.Options{Previous: res.Recorded, Deferred: res.Deferred}); err != nil {
		t.Fatal(err)
	}
	if got := tracker.Intersect(sink.written, region); got.Pages() != s.Pages {
		t.Errorf("the next round wrote %d pages of the region, want all %d", got.Pages(), s.Pages)
	}
}

// checkSink is a memSink that compares every written page with what the
// (stopped) process holds there.
type checkSink struct {
	memSink
	mem *os.File
	bad []uint64
}

func (s *checkSink) WritePages(addr uint64, data []byte) error {
	if err := s.memSink.WritePages(addr, data); err != nil {
		return err
	}
	want := make([]byte, len(data))
	if _, err := s.mem.ReadAt(want, int64(addr)); err != nil {
		return err
	}
	for off := 0; off < len(data); off += predump.PageSize {
		if !bytes.Equal(data[off:off+predump.PageSize], want[off:off+predump.PageSize]) {
			s.bad = append(s.bad, addr+uint64(off))
		}
	}
	return nil
}

// TestRoundsShareBuffers runs rounds that read into the buffers of the
// rounds before (Options.Buffers), the process stopped during each round:
// every page a round hands on holds what the process holds, not what an
// earlier round read into the same memory.
func TestRoundsShareBuffers(t *testing.T) {
	testutil.SkipIfNotSupported(t, tracker.Supported(tracker.UffdWP))
	s := startSpin(t, "--mib", "24", "--hot", "64", "--rate", "5000")
	tr, err := tracker.Start(context.Background(), s.Pid, tracker.Options{Backend: tracker.UffdWP})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Stop()
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", s.Pid))
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	bufs := new(predump.Buffers)
	var prev tracker.Ranges
	for i := 1; i <= 4; i++ {
		if err := sys.Kill(s.Pid, sys.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		waitState(t, s.Pid, 'T')
		sink := &checkSink{mem: mem}
		res, err := predump.Run(context.Background(), tr, sink, predump.Options{Previous: prev, Buffers: bufs})
		if err := sys.Kill(s.Pid, sys.SIGCONT); err != nil {
			t.Fatal(err)
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(sink.bad) > 0 {
			t.Fatalf("round %d: %d of %d pages differ from the process's, the first at %#x", i, len(sink.bad), res.PagesWritten, sink.bad[0])
		}
		if i > 1 && res.PagesWritten == 0 {
			t.Fatalf("round %d wrote nothing: the test checks nothing", i)
		}
		t.Logf("round %d: %d pages written, checked", i, res.PagesWritten)
		prev = res.Recorded
		time.Sleep(50 * time.Millisecond)
	}
}

func waitState(t *testing.T, pid int, state byte) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := testutil.ReadProcStat(pid)
		if err != nil {
			t.Fatal(err)
		}
		if st.State == state {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d in state %c, want %c", pid, st.State, state)
		}
		time.Sleep(time.Millisecond)
	}
}
