package pageserver_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/phaul/phaul/pageserver"
	"github.com/phaul/phaul/pagestream"
)

const ps = 4096

// batch builds a decoded batch the way the page service does: encoded,
// then checked by a decoder.
func batch(t testing.TB, pid int32, round uint32, runs []pagestream.Run, data []byte) *pagestream.Batch {
	t.Helper()
	enc, err := pagestream.NewEncoder(pagestream.CodecNone, 1)
	if err != nil {
		t.Fatal(err)
	}
	m := pagestream.BuildBatch(enc, nil, 1, pid, round, runs, data)
	d, err := pagestream.NewDecoder(pagestream.CodecNone, pagestream.DefaultLimits())
	if err != nil {
		t.Fatal(err)
	}
	b, err := d.Decode(m)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Release)
	return b
}

// fill returns n pages, each page's words holding its tag and index.
func fill(tag byte, n int) []byte {
	b := make([]byte, n*ps)
	for i := range n {
		p := b[i*ps : (i+1)*ps]
		for j := range p {
			p[j] = tag + byte(i) + byte(j>>8)
		}
		p[0] = tag
	}
	return b
}

func newStore(t testing.TB, cfg pageserver.Config) *pageserver.Store {
	t.Helper()
	s, err := pageserver.NewStore(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s
}

func apply(t testing.TB, s *pageserver.Store, b *pagestream.Batch) {
	t.Helper()
	if err := s.Apply(b); err != nil {
		t.Fatal(err)
	}
}

// model is the expected content of one process: page address → page, nil
// for zero.
type model map[uint64][]byte

func (m model) apply(runs []pagestream.Run, data []byte) {
	off := 0
	for _, r := range runs {
		for i := range r.Pages {
			a := r.Addr + i*ps
			switch r.Kind {
			case pagestream.Zero:
				m[a] = nil
			case pagestream.Gone:
				delete(m, a)
			default:
				m[a] = bytes.Clone(data[off : off+ps])
				off += ps
			}
		}
	}
}

// check walks the store and reads every page back, comparing with m.
// It returns the zero extents seen.
func (m model) check(t testing.TB, s *pageserver.Store, pid int32) []pageserver.Extent {
	t.Helper()
	var zeros []pageserver.Extent
	var last uint64
	n := 0
	err := s.Walk(pid, func(e pageserver.Extent) error {
		if n > 0 && e.Addr < last {
			return fmt.Errorf("extent %#x after %#x", e.Addr, last)
		}
		last = e.Addr + e.Pages*ps
		if e.Zero {
			if e.Data != nil {
				return fmt.Errorf("zero extent %#x with data", e.Addr)
			}
			zeros = append(zeros, e)
		} else if uint64(len(e.Data)) != e.Pages*ps {
			return fmt.Errorf("extent %#x: %d bytes for %d pages", e.Addr, len(e.Data), e.Pages)
		}
		for i := range e.Pages {
			a := e.Addr + i*ps
			want, ok := m[a]
			switch {
			case !ok:
				return fmt.Errorf("page %#x stored, never sent", a)
			case e.Zero != (want == nil):
				return fmt.Errorf("page %#x: zero %v, want %v", a, e.Zero, want == nil)
			case !e.Zero && !bytes.Equal(e.Data[i*ps:(i+1)*ps], want):
				return fmt.Errorf("page %#x differs", a)
			}
			n++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n != len(m) {
		t.Fatalf("walk saw %d pages, want %d", n, len(m))
	}
	buf := make([]byte, ps)
	for a, want := range m {
		st, err := s.ReadPage(pid, a, buf)
		if err != nil {
			t.Fatal(err)
		}
		if want == nil && st != pageserver.Zero || want != nil && (st != pageserver.Data || !bytes.Equal(buf, want)) {
			t.Fatalf("read page %#x: %v", a, st)
		}
	}
	return zeros
}

func TestLatestRoundWins(t *testing.T) {
	s := newStore(t, pageserver.Config{})
	m := model{}
	step := func(round uint32, runs []pagestream.Run, data []byte) {
		t.Helper()
		apply(t, s, batch(t, 7, round, runs, data))
		m.apply(runs, data)
	}
	const base = 0x7f0000000000
	step(0, []pagestream.Run{{Addr: base, Pages: 100}}, fill(1, 100))
	step(1, []pagestream.Run{{Addr: base + 10*ps, Pages: 10}, {Addr: base + 30*ps, Pages: 10, Kind: pagestream.Zero}}, fill(2, 10))
	step(2, []pagestream.Run{{Addr: base + 35*ps, Pages: 1}}, fill(3, 1))
	step(2, []pagestream.Run{{Addr: base + 60*ps, Pages: 10}}, fill(4, 10)) // across a block boundary
	zeros := m.check(t, s, 7)
	want := []pageserver.Extent{{Addr: base + 30*ps, Pages: 5, Zero: true}, {Addr: base + 36*ps, Pages: 4, Zero: true}}
	if fmt.Sprint(zeros) != fmt.Sprint(want) {
		t.Errorf("zero extents %v, want %v", zeros, want)
	}
	if r, ok := s.Round(7); !ok || r != 2 {
		t.Errorf("round %d %v", r, ok)
	}
	st := s.Stats()
	if st.PagesData != 91 || st.PagesZero != 9 || st.Batches != 4 || st.Processes != 1 {
		t.Errorf("stats %+v", st)
	}
	buf := make([]byte, ps)
	if st, err := s.ReadPage(7, base+200*ps, buf); err != nil || st != pageserver.Absent {
		t.Errorf("never sent page: %v %v", st, err)
	}
	if st, err := s.ReadPage(8, base, buf); err != nil || st != pageserver.Absent {
		t.Errorf("page of another process: %v %v", st, err)
	}
}

func TestStaleRound(t *testing.T) {
	s := newStore(t, pageserver.Config{})
	apply(t, s, batch(t, 1, 3, []pagestream.Run{{Addr: 0, Pages: 1}}, fill(1, 1)))
	err := s.Apply(batch(t, 1, 2, []pagestream.Run{{Addr: 0, Pages: 1}}, fill(2, 1)))
	if !errors.Is(err, pageserver.ErrStaleRound) {
		t.Fatalf("older round applied: %v", err)
	}
	model{0: fill(1, 1)}.check(t, s, 1)
	// Another process has its own rounds.
	apply(t, s, batch(t, 2, 0, []pagestream.Run{{Addr: 0, Pages: 1}}, fill(2, 1)))
}

// TestZeroPagesAreHoles: zero pages take no page memory, and zeroing data
// pages gives their memory back.
func TestZeroPagesAreHoles(t *testing.T) {
	budget := pageserver.NewBudget(0)
	s := newStore(t, pageserver.Config{Budget: budget})
	apply(t, s, batch(t, 1, 0, []pagestream.Run{{Addr: 0, Pages: 64}}, fill(1, 64)))
	if used := budget.Used(); used < 64*ps || used > 64*ps+4096 {
		t.Fatalf("64 pages use %d bytes", used)
	}
	apply(t, s, batch(t, 1, 1, []pagestream.Run{{Addr: 0, Pages: 64, Kind: pagestream.Zero}}, nil))
	if used := budget.Used(); used > 4096 {
		t.Fatalf("64 zero pages use %d bytes", used)
	}
	st := s.Stats()
	if st.PagesData != 0 || st.PagesZero != 64 || st.MemoryBytes != budget.Used() {
		t.Fatalf("stats %+v", st)
	}
	m := model{}
	m.apply([]pagestream.Run{{Addr: 0, Pages: 64, Kind: pagestream.Zero}}, nil)
	if z := m.check(t, s, 1); len(z) != 1 || z[0].Pages != 64 {
		t.Fatalf("zero extents %v", z)
	}
	// Data again in part of the block: memory for those pages only.
	apply(t, s, batch(t, 1, 2, []pagestream.Run{{Addr: 8 * ps, Pages: 2}}, fill(5, 2)))
	if used := budget.Used(); used > 2*ps+4096 {
		t.Fatalf("2 pages use %d bytes", used)
	}
}

// TestGonePages: gone pages are forgotten, data or zero, and their memory
// and bookkeeping returned.
func TestGonePages(t *testing.T) {
	budget := pageserver.NewBudget(0)
	s := newStore(t, pageserver.Config{Budget: budget})
	// The process exists: its bookkeeping is the baseline.
	apply(t, s, batch(t, 1, 0, []pagestream.Run{{Addr: 1 << 40, Pages: 1, Kind: pagestream.Gone}}, nil))
	base := budget.Used()
	m := model{}
	step := func(round uint32, runs []pagestream.Run, data []byte) {
		t.Helper()
		apply(t, s, batch(t, 1, round, runs, data))
		m.apply(runs, data)
	}
	step(1, []pagestream.Run{{Addr: 0, Pages: 100}, {Addr: 200 * ps, Pages: 100, Kind: pagestream.Zero}}, fill(1, 100))
	step(2, []pagestream.Run{{Addr: 50 * ps, Pages: 200, Kind: pagestream.Gone}, {Addr: 1 << 30, Pages: 10, Kind: pagestream.Gone}}, nil)
	m.check(t, s, 1)
	st := s.Stats()
	if st.PagesData != 50 || st.PagesZero != 50 {
		t.Errorf("stats %+v", st)
	}
	step(3, []pagestream.Run{{Addr: 0, Pages: 50, Kind: pagestream.Gone}, {Addr: 250 * ps, Pages: 50, Kind: pagestream.Gone}}, nil)
	m.check(t, s, 1)
	if used := budget.Used(); used != base {
		t.Errorf("nothing held, %d bytes used (baseline %d)", used, base)
	}
}

// TestZeroThenDataInOneBatch: a batch that empties a block with a zero
// run and fills it again with a later data run.
func TestZeroThenDataInOneBatch(t *testing.T) {
	s := newStore(t, pageserver.Config{})
	m := model{}
	runs := []pagestream.Run{{Addr: 0, Pages: 1}}
	apply(t, s, batch(t, 1, 0, runs, fill(1, 1)))
	m.apply(runs, fill(1, 1))
	runs = []pagestream.Run{{Addr: 0, Pages: 1, Kind: pagestream.Zero}, {Addr: 5 * ps, Pages: 3}}
	apply(t, s, batch(t, 1, 1, runs, fill(2, 3)))
	m.apply(runs, fill(2, 3))
	m.check(t, s, 1)
}

// TestSparse4GiB: 4 GiB of zero pages and a data page every 16 MiB cost
// megabytes, not gigabytes.
func TestSparse4GiB(t *testing.T) {
	budget := pageserver.NewBudget(0)
	s := newStore(t, pageserver.Config{Budget: budget})
	const base = 0x7f0000000000
	const total = 4 << 30 / ps // pages
	const every = 16 << 20 / ps
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	apply(t, s, batch(t, 1, 0, []pagestream.Run{{Addr: base, Pages: total, Kind: pagestream.Zero}}, nil))
	var runs []pagestream.Run
	for i := uint64(0); i < total; i += every {
		runs = append(runs, pagestream.Run{Addr: base + (i+every/2)*ps, Pages: 1})
	}
	data := fill(9, len(runs))
	apply(t, s, batch(t, 1, 1, runs, data))
	runtime.ReadMemStats(&after)
	st := s.Stats()
	t.Logf("store %+v; heap grew %d MiB, allocated %d MiB", st, (int64(after.HeapAlloc)-int64(before.HeapAlloc))>>20, (after.TotalAlloc-before.TotalAlloc)>>20)
	if st.PagesData != uint64(len(runs)) || st.PagesZero != total-uint64(len(runs)) {
		t.Fatalf("stats %+v", st)
	}
	if st.MemoryBytes > 8<<20 {
		t.Errorf("store charged %d MiB for %d data pages", st.MemoryBytes>>20, len(runs))
	}
	if a := after.TotalAlloc - before.TotalAlloc; a > 64<<20 {
		t.Errorf("applying allocated %d MiB", a>>20)
	}
	// The walk: zero extents between the data pages, merged across blocks.
	var zero, dataPages, extents uint64
	err := s.Walk(1, func(e pageserver.Extent) error {
		extents++
		if e.Zero {
			zero += e.Pages
		} else {
			dataPages += e.Pages
			if e.Data[0] != 9 {
				return fmt.Errorf("extent %#x: wrong data", e.Addr)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if zero != total-uint64(len(runs)) || dataPages != uint64(len(runs)) || extents != 2*uint64(len(runs))+1 {
		t.Errorf("walk: %d zero pages, %d data pages in %d extents", zero, dataPages, extents)
	}
}

// TestScatteredPages: one page per block costs one page, not a block.
func TestScatteredPages(t *testing.T) {
	budget := pageserver.NewBudget(0)
	s := newStore(t, pageserver.Config{Budget: budget})
	var runs []pagestream.Run
	for i := range uint64(1000) {
		runs = append(runs, pagestream.Run{Addr: i * 64 * ps, Pages: 1})
	}
	apply(t, s, batch(t, 1, 0, runs, fill(1, 1000)))
	if used := budget.Used(); used > 1000*(ps+512) {
		t.Fatalf("1000 scattered pages use %d KiB", used>>10)
	}
}

// TestBudgetRefusesWholeBatch: without a spill directory, a batch the
// budget cannot hold is refused and changes nothing.
func TestBudgetRefusesWholeBatch(t *testing.T) {
	budget := pageserver.NewBudget(100 * ps)
	s := newStore(t, pageserver.Config{Budget: budget})
	m := model{}
	runs := []pagestream.Run{{Addr: 0, Pages: 64}}
	apply(t, s, batch(t, 1, 0, runs, fill(1, 64)))
	m.apply(runs, fill(1, 64))
	before := s.Stats()
	runs = []pagestream.Run{{Addr: 10 * ps, Pages: 2}, {Addr: 1 << 30, Pages: 64}}
	err := s.Apply(batch(t, 1, 1, runs, fill(2, 66)))
	if !errors.Is(err, pageserver.ErrNoSpace) {
		t.Fatalf("over budget: %v", err)
	}
	if after := s.Stats(); after != before {
		t.Errorf("refused batch changed the store: %+v → %+v", before, after)
	}
	m.check(t, s, 1)
	if r, _ := s.Round(1); r != 0 {
		t.Errorf("round advanced to %d", r)
	}
}

func TestSpill(t *testing.T) {
	dir := t.TempDir()
	budget := pageserver.NewBudget(70 * ps)
	s := newStore(t, pageserver.Config{Budget: budget, SpillDir: dir})
	m := model{}
	step := func(round uint32, runs []pagestream.Run, data []byte) {
		t.Helper()
		apply(t, s, batch(t, 3, round, runs, data))
		m.apply(runs, data)
	}
	step(0, []pagestream.Run{{Addr: 0, Pages: 64}, {Addr: 64 * ps, Pages: 64}, {Addr: 256 * ps, Pages: 100}}, fill(1, 228))
	st := s.Stats()
	if st.SpillBytes == 0 || st.MemoryBytes > 70*ps {
		t.Fatalf("no spill: %+v", st)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("spill file visible: %v", ents)
	}
	step(1, []pagestream.Run{{Addr: 70 * ps, Pages: 10}, {Addr: 300 * ps, Pages: 4, Kind: pagestream.Zero}}, fill(2, 10))
	step(2, []pagestream.Run{{Addr: 256 * ps, Pages: 64, Kind: pagestream.Zero}}, nil) // a spilled block emptied
	m.check(t, s, 3)
	if got := s.Stats().SpillBytes; got >= st.SpillBytes {
		t.Errorf("spill area in use %d, was %d: emptied block not freed", got, st.SpillBytes)
	}
}

func TestSpillLimit(t *testing.T) {
	s := newStore(t, pageserver.Config{Budget: pageserver.NewBudget(1), SpillDir: t.TempDir(), SpillLimit: 64 * ps})
	err := s.Apply(batch(t, 1, 0, []pagestream.Run{{Addr: 0, Pages: 65}}, fill(1, 65)))
	if !errors.Is(err, pageserver.ErrNoSpace) {
		t.Fatalf("over the spill limit: %v", err)
	}
}

// TestRandomized applies random batches to stores with and without memory
// pressure and compares with a model.
func TestRandomized(t *testing.T) {
	for _, name := range []string{"memory", "spill"} {
		t.Run(name, func(t *testing.T) {
			cfg := pageserver.Config{}
			if name == "spill" {
				cfg = pageserver.Config{Budget: pageserver.NewBudget(300 * ps), SpillDir: t.TempDir()}
			}
			s := newStore(t, cfg)
			r := rand.New(rand.NewPCG(7, 7))
			m := model{}
			for round := range uint32(200) {
				var runs []pagestream.Run
				addr := uint64(r.IntN(64)) * ps
				pages := 0
				for range r.IntN(6) + 1 {
					n := uint64(r.IntN(100) + 1)
					kind := []pagestream.Kind{pagestream.Data, pagestream.Data, pagestream.Zero, pagestream.Gone}[r.IntN(4)]
					runs = append(runs, pagestream.Run{Addr: addr, Pages: n, Kind: kind})
					if kind == pagestream.Data {
						pages += int(n)
					}
					addr += (n + uint64(r.IntN(70))) * ps
				}
				data := fill(byte(round), pages)
				apply(t, s, batch(t, 1, round, runs, data))
				m.apply(runs, data)
			}
			m.check(t, s, 1)
			st := s.Stats()
			var zero uint64
			for _, p := range m {
				if p == nil {
					zero++
				}
			}
			if st.PagesData+st.PagesZero != uint64(len(m)) || st.PagesZero != zero {
				t.Errorf("stats %+v, model %d pages, %d zero", st, len(m), zero)
			}
			t.Logf("%+v", st)
		})
	}
}

func TestHook(t *testing.T) {
	s := newStore(t, pageserver.Config{})
	var got []string
	s.SetBatchHook(func(b *pagestream.Batch) error {
		return b.Each(func(r pagestream.Run, data []byte) error {
			if r.Kind == pagestream.Data && data[0] == 0xee {
				return errors.New("shadow refused")
			}
			got = append(got, fmt.Sprintf("%d:%#x+%d %v len=%d", b.Round, r.Addr, r.Pages, r.Kind, len(data)))
			return nil
		})
	})
	apply(t, s, batch(t, 1, 0, []pagestream.Run{{Addr: 0, Pages: 2}, {Addr: 2 * ps, Pages: 1, Kind: pagestream.Zero}}, fill(1, 2)))
	apply(t, s, batch(t, 1, 1, []pagestream.Run{{Addr: ps, Pages: 1}}, fill(2, 1)))
	want := "[0:0x0+2 data len=8192 0:0x2000+1 zero len=0 1:0x1000+1 data len=4096]"
	if fmt.Sprint(got) != want {
		t.Errorf("hook saw %v, want %v", got, want)
	}
	err := s.Apply(batch(t, 1, 2, []pagestream.Run{{Addr: 0, Pages: 1}}, fill(0xee, 1)))
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("shadow refused")) {
		t.Errorf("hook error: %v", err)
	}
	s.SetBatchHook(nil)
	apply(t, s, batch(t, 1, 3, []pagestream.Run{{Addr: 0, Pages: 1}}, fill(0xee, 1)))
}

func TestConcurrentProcesses(t *testing.T) {
	budget := pageserver.NewBudget(0)
	s := newStore(t, pageserver.Config{Budget: budget})
	var wg sync.WaitGroup
	models := make([]model, 8)
	for i := range models {
		models[i] = model{}
		wg.Go(func() {
			for round := range uint32(20) {
				runs := []pagestream.Run{{Addr: uint64(round) * 10 * ps, Pages: 30}}
				data := fill(byte(i*20)+byte(round), 30)
				b := batch(t, int32(i+1), round, runs, data)
				if err := s.Apply(b); err != nil {
					t.Error(err)
					return
				}
				models[i].apply(runs, data)
			}
		})
		wg.Go(func() {
			for range 20 {
				s.Stats()
				s.Walk(int32(i+1), func(pageserver.Extent) error { return nil })
			}
		})
	}
	wg.Wait()
	for i, m := range models {
		m.check(t, s, int32(i+1))
	}
	if got := fmt.Sprint(s.Processes()); got != "[1 2 3 4 5 6 7 8]" {
		t.Errorf("processes %s", got)
	}
}

func TestCloseReturnsBudget(t *testing.T) {
	budget := pageserver.NewBudget(1 << 30)
	a, err := pageserver.NewStore(pageserver.Config{Budget: budget})
	if err != nil {
		t.Fatal(err)
	}
	b := newStore(t, pageserver.Config{Budget: budget})
	apply(t, a, batch(t, 1, 0, []pagestream.Run{{Addr: 0, Pages: 100}}, fill(1, 100)))
	apply(t, b, batch(t, 1, 0, []pagestream.Run{{Addr: 0, Pages: 10}}, fill(1, 10)))
	bUsed := b.Stats().MemoryBytes
	if budget.Used() != a.Stats().MemoryBytes+bUsed {
		t.Fatalf("budget %d, stores %d + %d", budget.Used(), a.Stats().MemoryBytes, bUsed)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if budget.Used() != bUsed {
		t.Fatalf("after close: budget %d, want %d", budget.Used(), bUsed)
	}
	if err := a.Apply(batch(t, 1, 1, []pagestream.Run{{Addr: 0, Pages: 1}}, fill(1, 1))); !errors.Is(err, pageserver.ErrClosed) {
		t.Errorf("apply after close: %v", err)
	}
	if err := a.Walk(1, func(pageserver.Extent) error { return nil }); !errors.Is(err, pageserver.ErrClosed) {
		t.Errorf("walk after close: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
}

func TestWalkStops(t *testing.T) {
	s := newStore(t, pageserver.Config{})
	apply(t, s, batch(t, 1, 0, []pagestream.Run{{Addr: 0, Pages: 200}}, fill(1, 200)))
	stop := errors.New("stop")
	n := 0
	if err := s.Walk(1, func(pageserver.Extent) error { n++; return stop }); err != stop || n != 1 {
		t.Errorf("walk: %v after %d extents", err, n)
	}
}

func TestConfig(t *testing.T) {
	for _, cfg := range []pageserver.Config{
		{PageSize: 1000},
		{SpillLimit: -1},
		{SpillDir: "/nonexistent/phaul"},
		{StateOnly: true, SpillDir: os.TempDir()},
	} {
		if _, err := pageserver.NewStore(cfg); err == nil {
			t.Errorf("config %+v accepted", cfg)
		}
	}
	s := newStore(t, pageserver.Config{PageSize: 16384})
	if err := s.Apply(batch(t, 1, 0, []pagestream.Run{{Addr: 0, Pages: 1}}, fill(1, 1))); err == nil {
		t.Error("batch of another page size applied")
	}
}

// A StateOnly store follows every page's state and charges data pages to
// the budget without keeping a byte: the hook has them.
func TestStateOnly(t *testing.T) {
	budget := pageserver.NewBudget(100 * ps)
	s := newStore(t, pageserver.Config{Budget: budget, StateOnly: true})
	var hooked uint64
	s.SetBatchHook(func(b *pagestream.Batch) error {
		hooked += b.DataPages()
		return nil
	})
	apply(t, s, batch(t, 1, 0, []pagestream.Run{{Addr: 0, Pages: 64}, {Addr: 64 * ps, Pages: 8, Kind: pagestream.Zero}}, fill(1, 64)))
	// Rewriting pages the store has costs nothing more; new ones do.
	apply(t, s, batch(t, 1, 1, []pagestream.Run{{Addr: 2 * ps, Pages: 4}, {Addr: 64 * ps, Pages: 2}}, fill(2, 6)))
	if hooked != 70 {
		t.Errorf("hook saw %d data pages, want 70", hooked)
	}
	if st := s.Stats(); st.PagesData != 66 || st.PagesZero != 6 {
		t.Errorf("stats %+v, want 66 data and 6 zero pages", st)
	}
	if used := budget.Used(); used < 66*ps || used > 66*ps+4096 {
		t.Errorf("budget charged %d bytes for 66 pages of %d", used, ps)
	}
	// Over the budget: refused whole, nothing changes.
	before := s.Stats()
	err := s.Apply(batch(t, 1, 2, []pagestream.Run{{Addr: 0, Pages: 1}, {Addr: 1 << 30, Pages: 40}}, fill(3, 41)))
	if !errors.Is(err, pageserver.ErrNoSpace) {
		t.Fatalf("over budget: %v", err)
	}
	if after := s.Stats(); after != before {
		t.Errorf("refused batch changed the store: %+v → %+v", before, after)
	}
	// Zero and gone pages give their charge back.
	apply(t, s, batch(t, 1, 2, []pagestream.Run{{Addr: 0, Pages: 32, Kind: pagestream.Zero}, {Addr: 32 * ps, Pages: 32, Kind: pagestream.Gone}}, nil))
	if st := s.Stats(); st.PagesData != 2 || st.PagesZero != 38 {
		t.Errorf("stats %+v, want 2 data and 38 zero pages", st)
	}
	if used := budget.Used(); used >= 66*ps || used < 2*ps {
		t.Errorf("budget still charged %d bytes for 2 pages", used)
	}
	var extents []string
	err = s.Walk(1, func(e pageserver.Extent) error {
		if e.Data != nil {
			return fmt.Errorf("extent %#x has data in a state-only store", e.Addr)
		}
		extents = append(extents, fmt.Sprintf("%#x+%d zero=%v", e.Addr, e.Pages, e.Zero))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := "[0x0+32 zero=true 0x40000+2 zero=false 0x42000+6 zero=true]"; fmt.Sprint(extents) != want {
		t.Errorf("walk %v, want %v", extents, want)
	}
	buf := bytes.Repeat([]byte{0xaa}, ps)
	if st, err := s.ReadPage(1, 64*ps, buf); err != nil || st != pageserver.Data || buf[0] != 0xaa {
		t.Errorf("read page: %v, %v, buffer touched: %v", st, err, buf[0] != 0xaa)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if used := budget.Used(); used != 0 {
		t.Errorf("closed store keeps %d bytes of the budget", used)
	}
}

// WaitApplied returns once the stream applied the batch it names (the
// hook included), and gives up when the stream ends without it.
func TestWaitApplied(t *testing.T) {
	s := newStore(t, pageserver.Config{StateOnly: true})
	hooked := make(chan uint64, 4)
	s.SetBatchHook(func(b *pagestream.Batch) error {
		hooked <- b.Seq
		return nil
	})
	waited := make(chan error, 1)
	go func() { waited <- s.WaitApplied(context.Background(), 1) }()
	select {
	case err := <-waited:
		t.Fatalf("WaitApplied returned before any batch: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	apply(t, s, batch(t, 1, 0, []pagestream.Run{{Addr: 0, Pages: 1}}, fill(1, 1)))
	if err := <-waited; err != nil {
		t.Fatal(err)
	}
	if seq := <-hooked; seq != 1 {
		t.Errorf("hook saw batch %d", seq)
	}
	// Already applied: at once.
	if err := s.WaitApplied(context.Background(), 1); err != nil {
		t.Error(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := s.WaitApplied(ctx, 2); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("wait for a batch that never comes: %v", err)
	}
	go func() { waited <- s.WaitApplied(context.Background(), 2) }()
	s.EndStream(errors.New("checksum mismatch"))
	if err := <-waited; err == nil || !strings.Contains(err.Error(), "checksum mismatch") {
		t.Errorf("wait across a failed stream: %v", err)
	}
	s2 := newStore(t, pageserver.Config{})
	s2.EndStream(nil)
	if err := s2.WaitApplied(context.Background(), 1); err == nil || !strings.Contains(err.Error(), "ended without it") {
		t.Errorf("wait across a closed stream: %v", err)
	}
}
