package pagestream_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/phaul/phaul/pageserver"
	"github.com/phaul/phaul/pagestream"
	"github.com/phaul/phaul/predump"
	"github.com/phaul/phaul/protocol/migrationpb"
)

// Sink must fit what a pre-dump round produces.
var _ predump.Sink = (*pagestream.Sink)(nil)

// process is a fake process's memory for the rounds of a sender test:
// present pages and which of them were written since the last round.
type process struct {
	pid   int32
	pages map[uint64][]byte
	dirty map[uint64]bool
	rng   *rand.Rand
}

func newProcess(pid int32, base uint64, n int) *process {
	p := &process{pid: pid, pages: map[uint64][]byte{}, dirty: map[uint64]bool{}, rng: rand.New(rand.NewPCG(uint64(pid), 5))}
	data := heapLike(uint64(pid), n)
	clear(data[n/3*pageSize : (n/3+n/10)*pageSize]) // some zero pages
	for i := range n {
		a := base + uint64(i)*pageSize
		if i%97 == 50 {
			a += 1 << 30 // a few far away
		}
		p.pages[a] = data[i*pageSize : (i+1)*pageSize]
		p.dirty[a] = true
	}
	return p
}

// run mutates the process between rounds: rewrites, zeroes and drops some
// pages, maps some new ones.
func (p *process) run() {
	for a := range p.pages {
		switch p.rng.IntN(20) {
		case 0:
			pg := make([]byte, pageSize)
			heapPage(p.rng, pg)
			p.pages[a], p.dirty[a] = pg, true
		case 1:
			p.pages[a], p.dirty[a] = make([]byte, pageSize), true
		case 2:
			delete(p.pages, a)
			delete(p.dirty, a)
		}
	}
	for range 5 {
		a := uint64(p.rng.IntN(1<<20)) * pageSize
		pg := make([]byte, pageSize)
		randomPage(p.rng, pg)
		p.pages[a], p.dirty[a] = pg, true
	}
}

// round feeds one pre-dump round of the process to k as predump does:
// every present page in address order, runs of written pages as data
// (zero ones among them left to the sink to find, some reported as zero
// directly), the rest kept; then Done.
func (p *process) round(k predump.Sink) error {
	addrs := slices.Sorted(maps.Keys(p.pages))
	for i := 0; i < len(addrs); {
		a := addrs[i]
		j := i + 1
		for j < len(addrs) && addrs[j] == addrs[j-1]+pageSize && p.dirty[addrs[j]] == p.dirty[a] {
			j++
		}
		n := uint64(j - i)
		var err error
		switch {
		case !p.dirty[a]:
			err = k.KeepPages(a, n)
		case n == 1 && bytes.Equal(p.pages[a], make([]byte, pageSize)):
			err = k.ZeroPages(a, 1)
		default:
			var data []byte
			for _, b := range addrs[i:j] {
				data = append(data, p.pages[b]...)
			}
			err = k.WritePages(a, data)
		}
		if err != nil {
			return err
		}
		i = j
	}
	clear(p.dirty)
	return k.Done()
}

// check compares the store's pages of the process with its memory.
func (p *process) check(t *testing.T, store *pageserver.Store) {
	t.Helper()
	seen := 0
	err := store.Walk(p.pid, func(e pageserver.Extent) error {
		for i := range e.Pages {
			addr := e.Addr + i*pageSize
			want, ok := p.pages[addr]
			if !ok {
				return fmt.Errorf("page %#x stored, not the process's", addr)
			}
			seen++
			zero := bytes.Equal(want, make([]byte, pageSize))
			if e.Zero != zero {
				return fmt.Errorf("page %#x: zero %v, want %v", addr, e.Zero, zero)
			}
			if !e.Zero && !bytes.Equal(e.Data[i*pageSize:(i+1)*pageSize], want) {
				return fmt.Errorf("page %#x differs", addr)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen != len(p.pages) {
		t.Fatalf("store has %d pages of %d, the process %d", seen, p.pid, len(p.pages))
	}
}

func open(t *testing.T, tg *target, cfg pagestream.SenderConfig) *pagestream.Sender {
	t.Helper()
	s, err := pagestream.Open(context.Background(), tg.client, "m1", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// checkNoLeak fails when a goroutine of package pagestream (the sender's
// workers and loops) is still running.
func checkNoLeak(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		leaked := false
		for _, g := range strings.Split(stacks, "\n\n") {
			if strings.Contains(g, "phaul/pagestream.(*") {
				leaked = true
			}
		}
		if !leaked {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("sender goroutines left:\n%s", stacks)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestSenderRounds streams rounds of two processes with each codec: after
// every round the target holds exactly the processes' memory, zero pages
// as holes, dropped pages forgotten.
func TestSenderRounds(t *testing.T) {
	for _, c := range pagestream.Codecs() {
		t.Run(pagestream.CodecName(c), func(t *testing.T) {
			tg := startTarget(t)
			s, err := pagestream.Open(context.Background(), tg.client, "m1", pagestream.SenderConfig{
				Codec: c, BatchBytes: 64 * pageSize, // many batches
			})
			if err != nil {
				t.Fatal(err)
			}
			procs := []*process{newProcess(10, 0x7f0000000000, 700), newProcess(11, 0x5500000000, 300)}
			for round := range uint32(4) {
				var wg sync.WaitGroup
				errs := make([]error, len(procs))
				for i, p := range procs {
					wg.Go(func() { errs[i] = p.round(s.Sink(p.pid, round)) })
				}
				wg.Wait()
				for i, p := range procs {
					if errs[i] != nil {
						t.Fatalf("round %d of %d: %v", round, p.pid, errs[i])
					}
					p.check(t, tg.store)
					if r, _ := tg.store.Round(p.pid); r != round {
						t.Errorf("store at round %d", r)
					}
					p.run()
				}
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			st := s.Stats()
			ts := tg.store.Stats()
			if st.Batches != ts.Batches || st.PagesData == 0 || st.PagesZero == 0 || st.PagesGone == 0 {
				t.Errorf("sender stats %+v, store %+v", st, ts)
			}
			if st.RawBytes != st.PagesData*pageSize {
				t.Errorf("raw bytes %d for %d pages", st.RawBytes, st.PagesData)
			}
			if c != pagestream.CodecNone && st.WireBytes >= st.RawBytes*9/10 {
				t.Errorf("%s: %d wire bytes for %d raw", pagestream.CodecName(c), st.WireBytes, st.RawBytes)
			}
			if c == pagestream.CodecNone && st.WireBytes != st.RawBytes {
				t.Errorf("none: %d wire bytes for %d raw", st.WireBytes, st.RawBytes)
			}
			if st.Busy <= 0 || st.WireRate() <= 0 || st.RawRate() < st.WireRate() {
				t.Errorf("rates: busy %v wire %.0f raw %.0f", st.Busy, st.WireRate(), st.RawRate())
			}
			checkNoLeak(t)
		})
	}
}

// TestSenderKeepUnknown: keeping pages the target never got is an error
// of the caller, caught at Done.
func TestSenderKeepUnknown(t *testing.T) {
	tg := startTarget(t)
	s := open(t, tg, pagestream.SenderConfig{})
	k := s.Sink(1, 0)
	if err := k.WritePages(0, heapLike(1, 4)); err != nil {
		t.Fatal(err)
	}
	if err := k.Done(); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(s.Holds(1)); got != "[[0 16384]]" {
		t.Errorf("holds %s", got)
	}
	k = s.Sink(1, 1)
	k.KeepPages(0, 4)
	k.KeepPages(8*pageSize, 1)
	if err := k.Done(); err == nil || !strings.Contains(err.Error(), "0x8000-0x9000 kept, but the target does not hold them") {
		t.Fatalf("done: %v", err)
	}
	if err := k.Done(); err == nil {
		t.Error("Done twice")
	}
	if err := k.KeepPages(0, 1); err == nil {
		t.Error("keep after Done")
	}
}

// TestSenderBatchLimits: huge zero runs and many small runs are split into
// batches the default decoder accepts.
func TestSenderBatchLimits(t *testing.T) {
	tg := startTarget(t)
	s := open(t, tg, pagestream.SenderConfig{MaxBatchPages: 4096, MaxBatchRuns: 8})
	k := s.Sink(1, 0)
	if err := k.ZeroPages(0, 3*4096+5); err != nil {
		t.Fatal(err)
	}
	page := heapLike(1, 1)
	for i := range uint64(20) {
		if err := k.WritePages(1<<30+i*2*pageSize, page); err != nil { // not contiguous: one run each
			t.Fatal(err)
		}
	}
	if err := k.Done(); err != nil {
		t.Fatal(err)
	}
	st := s.Stats()
	// 3 batches of 4096 zero pages; then 5 zero pages and 7 data pages
	// (8 runs), 8 data pages, 5 data pages.
	if st.Batches != 6 || st.PagesZero != 3*4096+5 || st.PagesData != 20 {
		t.Fatalf("stats %+v, want 6 batches, %d zero pages, 20 data pages", st, 3*4096+5)
	}
}

func TestSenderBadCalls(t *testing.T) {
	tg := startTarget(t)
	s := open(t, tg, pagestream.SenderConfig{})
	k := s.Sink(1, 0)
	if err := k.WritePages(0x1001, make([]byte, pageSize)); err == nil {
		t.Error("unaligned address accepted")
	}
	if err := k.WritePages(0x1000, make([]byte, 100)); err == nil {
		t.Error("partial page accepted")
	}
	if err := k.ZeroPages(1<<63, 1<<52); err == nil {
		t.Error("wrapping zero run accepted")
	}
	if err := k.Done(); err != nil { // nothing was sent
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	k = s.Sink(1, 1)
	if err := k.WritePages(0, make([]byte, pageSize)); err != nil {
		t.Fatal(err) // buffered: nothing submitted yet
	}
	if err := k.Done(); !errors.Is(err, pagestream.ErrSenderClosed) {
		t.Errorf("done after close: %v", err)
	}
}

func TestSenderConfig(t *testing.T) {
	tg := startTarget(t)
	bad := []pagestream.SenderConfig{
		{Codec: 9},
		{BatchBytes: 1000},
		{BatchBytes: 64 << 20},
		{PageSize: 3000},
		{Workers: -1},
		{MaxBatchPages: 10},
	}
	for _, cfg := range bad {
		if s, err := pagestream.Open(context.Background(), tg.client, "m1", cfg); err == nil {
			s.Close()
			t.Errorf("config %+v accepted", cfg)
		}
	}
}

func TestSenderUnknownMigration(t *testing.T) {
	tg := startTarget(t)
	_, err := pagestream.Open(context.Background(), tg.client, "nope", pagestream.SenderConfig{})
	if status.Code(errors.Unwrap(err)) != codes.NotFound || !strings.Contains(err.Error(), `"nope"`) {
		t.Fatalf("open of an unknown migration: %v", err)
	}
}

// corruptor is a server stream interceptor that flips a payload byte of
// batch number seq.
func corruptor(seq uint64) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		return h(srv, corruptStream{ss, seq})
	}
}

type corruptStream struct {
	grpc.ServerStream
	seq uint64
}

func (c corruptStream) RecvMsg(m any) error {
	if err := c.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if b := m.(*migrationpb.PageStreamRequest).GetBatch(); b.GetSeq() == c.seq && len(b.Payload) > 0 {
		b.Payload[len(b.Payload)/2] ^= 0x10
	}
	return nil
}

// TestSenderCorruptBatch: a batch damaged on the way is refused by the
// target; the sender reports why and stops, without hanging or leaking.
func TestSenderCorruptBatch(t *testing.T) {
	for _, c := range pagestream.Codecs() {
		t.Run(pagestream.CodecName(c), func(t *testing.T) {
			tg := startTarget(t, grpc.StreamInterceptor(corruptor(3)))
			s, err := pagestream.Open(context.Background(), tg.client, "m1", pagestream.SenderConfig{Codec: c, BatchBytes: 16 * pageSize})
			if err != nil {
				t.Fatal(err)
			}
			k := s.Sink(5, 0)
			data := heapLike(5, 200)
			err = k.WritePages(0x10000, data)
			if err == nil {
				err = k.Done()
			}
			if status.Code(errors.Unwrap(errors.Unwrap(err))) != codes.DataLoss && !strings.Contains(err.Error(), "DataLoss") {
				t.Errorf("error %v: want DataLoss", err)
			}
			if !strings.Contains(err.Error(), "batch 3") || !strings.Contains(strings.ToLower(err.Error()), "corrupt") {
				t.Errorf("error %q does not name the batch and the damage", err)
			}
			if err := s.Close(); err == nil {
				t.Error("Close after a refused batch returned nil")
			}
			k = s.Sink(5, 1)
			if err := k.WritePages(0, data[:pageSize]); err == nil {
				if err = k.Done(); err == nil {
					t.Error("sink works after the stream broke")
				}
			}
			// Batches 1 and 2 stay applied, nothing after.
			if st := tg.store.Stats(); st.Batches != 2 {
				t.Errorf("store applied %d batches, want 2", st.Batches)
			}
			checkNoLeak(t)
		})
	}
}

// TestSenderTargetGone: the target fails mid-stream (as one that died
// would); Done fails with its reason instead of hanging.
func TestSenderTargetGone(t *testing.T) {
	tg := startTarget(t, grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		return h(srv, &dyingStream{ServerStream: ss, left: 4})
	}))
	s, err := pagestream.Open(context.Background(), tg.client, "m1", pagestream.SenderConfig{BatchBytes: 16 * pageSize})
	if err != nil {
		t.Fatal(err)
	}
	k := s.Sink(5, 0)
	done := make(chan error, 1)
	go func() {
		err := k.WritePages(0, heapLike(1, 400))
		if err == nil {
			err = k.Done()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if status.Code(errors.Unwrap(err)) != codes.Unavailable || !strings.Contains(err.Error(), "target went away") {
			t.Fatalf("done against a dying target: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Done hangs")
	}
	if err := s.Close(); err == nil {
		t.Error("close succeeded")
	}
	checkNoLeak(t)
}

// dyingStream fails receiving after left messages.
type dyingStream struct {
	grpc.ServerStream
	left int
}

func (s *dyingStream) RecvMsg(m any) error {
	if s.left == 0 {
		return status.Error(codes.Unavailable, "target went away")
	}
	s.left--
	return s.ServerStream.RecvMsg(m)
}

// TestSenderCancel: cancelling the context ends a blocked stream.
func TestSenderCancel(t *testing.T) {
	tg := startTarget(t)
	ctx, cancel := context.WithCancel(context.Background())
	s, err := pagestream.Open(ctx, tg.client, "m1", pagestream.SenderConfig{})
	if err != nil {
		t.Fatal(err)
	}
	k := s.Sink(1, 0)
	if err := k.WritePages(0, heapLike(1, 10)); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := k.Done(); err == nil {
		// The batch may have been acknowledged before the cancel.
		t.Log("flush won the race against cancel")
	}
	if err := s.Close(); err == nil {
		t.Error("close after cancel returned nil")
	}
}

// TestSenderBandwidth: a limited stream does not run ahead of its limit
// (the lower bound on its time is exact; nothing upper-bounds a busy
// machine), and an unlimited one of the same pages is faster.
func TestSenderBandwidth(t *testing.T) {
	send := func(limit float64) (time.Duration, pagestream.Stats) {
		tg := startTarget(t)
		s, err := pagestream.Open(context.Background(), tg.client, "m1", pagestream.SenderConfig{
			Codec: pagestream.CodecNone, BatchBytes: 16 * pageSize, Bandwidth: limit,
		})
		if err != nil {
			t.Fatal(err)
		}
		p := newProcess(10, 0x7f0000000000, 512) // 2 MiB
		start := time.Now()
		if err := p.round(s.Sink(p.pid, 0)); err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		p.check(t, tg.store)
		return took, s.Stats()
	}
	const limit = 8e6 // bytes per second
	took, st := send(limit)
	// The first batch goes at once; the others wait for the link.
	want := time.Duration(float64(st.WireBytes-16*pageSize) / limit * float64(time.Second))
	if took < want {
		t.Errorf("%d bytes at %.0f B/s took %v, less than %v", st.WireBytes, float64(limit), took, want)
	}
	if free, _ := send(0); free >= took {
		t.Errorf("unlimited stream took %v, limited %v", free, took)
	}
}
