package pageserver_test

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/phaul/phaul/pageserver"
	"github.com/phaul/phaul/pagestream"
	"github.com/phaul/phaul/protocol/migrationpb"
)

// serve runs a page service over bufconn with one migration "m" whose
// store is s, accepting codecs (all if none given).
func serve(t *testing.T, s *pageserver.Store, codecs ...pagestream.Codec) migrationpb.PagesClient {
	t.Helper()
	return serveWith(t, s, pageserver.ServiceConfig{Codecs: codecs})
}

// serveWith is serve with a configuration (its Lookup is set here).
func serveWith(t *testing.T, s *pageserver.Store, cfg pageserver.ServiceConfig) migrationpb.PagesClient {
	t.Helper()
	cfg.Lookup = func(id string) (*pageserver.Store, error) {
		if id == "m" {
			return s, nil
		}
		return nil, pageserver.ErrUnknownMigration
	}
	svc, err := pageserver.NewService(cfg)
	if err != nil {
		t.Fatal(err)
	}
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(pageserver.GRPCServerOptions()...)
	migrationpb.RegisterPagesServer(srv, svc)
	var wg sync.WaitGroup
	wg.Go(func() { srv.Serve(lis) })
	cc, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cc.Close()
		srv.Stop()
		wg.Wait()
		// A stream's receiving goroutine ends, releasing what it holds,
		// once its handler returned.
		for deadline := time.Now().Add(2 * time.Second); pageserver.HeldBuffers() != 0 && time.Now().Before(deadline); {
			time.Sleep(time.Millisecond)
		}
		if n := pageserver.HeldBuffers(); n != 0 {
			t.Errorf("%d received buffers not released", n)
		}
	})
	return migrationpb.NewPagesClient(cc)
}

func openMsg(id string, c pagestream.Codec) *migrationpb.PageStreamRequest {
	return &migrationpb.PageStreamRequest{Msg: &migrationpb.PageStreamRequest_Open{Open: &migrationpb.PageStreamOpen{MigrationId: id, Codec: c}}}
}

func batchMsg(b *migrationpb.PageBatch) *migrationpb.PageStreamRequest {
	return &migrationpb.PageStreamRequest{Msg: &migrationpb.PageStreamRequest_Batch{Batch: b}}
}

// exchange sends msgs on a new stream, half-closes, and returns the acks
// and the stream's final error (nil for a clean end).
func exchange(t *testing.T, c migrationpb.PagesClient, msgs ...*migrationpb.PageStreamRequest) ([]*migrationpb.PageAck, error) {
	t.Helper()
	st, err := c.Stream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		if err := st.Send(m); err != nil {
			break // the server ended the stream; Recv says why
		}
	}
	st.CloseSend()
	var acks []*migrationpb.PageAck
	for {
		a, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return acks, nil
		}
		if err != nil {
			return acks, err
		}
		acks = append(acks, a)
	}
}

func wire(t *testing.T, c pagestream.Codec, seq uint64, round uint32, runs []pagestream.Run, data []byte) *migrationpb.PageBatch {
	enc, err := pagestream.NewEncoder(c, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	return pagestream.BuildBatch(enc, nil, seq, 9, round, runs, data)
}

func TestServiceStream(t *testing.T) {
	for _, c := range pagestream.Codecs() {
		t.Run(pagestream.CodecName(c), func(t *testing.T) {
			s := newStore(t, pageserver.Config{})
			client := serve(t, s)
			m := model{}
			r1 := []pagestream.Run{{Addr: 0x1000, Pages: 20}, {Addr: 0x100000, Pages: 5, Kind: pagestream.Zero}}
			r2 := []pagestream.Run{{Addr: 0x3000, Pages: 2}}
			acks, err := exchange(t, client, openMsg("m", c),
				batchMsg(wire(t, c, 1, 0, r1, fill(1, 20))),
				batchMsg(wire(t, c, 2, 1, r2, fill(2, 2))))
			if err != nil {
				t.Fatal(err)
			}
			m.apply(r1, fill(1, 20))
			m.apply(r2, fill(2, 2))
			m.check(t, s, 9)
			if len(acks) != 4 || acks[0].Seq != 0 || acks[1].Seq != 1 || acks[2].Seq != 2 || !acks[3].Final {
				t.Fatalf("acks %v", acks)
			}
			last := acks[3]
			if last.Batches != 2 || last.PagesData != 22 || last.PagesZero != 5 || last.BytesRaw != 22*ps || last.BytesWire == 0 {
				t.Errorf("final ack %v", last)
			}
		})
	}
}

// TestServiceRefuses: each bad stream ends with a status whose code and
// message say what was wrong; nothing of the bad batch is stored.
func TestServiceRefuses(t *testing.T) {
	good := func(t *testing.T, seq uint64) *migrationpb.PageStreamRequest {
		return batchMsg(wire(t, pagestream.CodecS2, seq, 0, []pagestream.Run{{Addr: 0, Pages: 4}}, fill(1, 4)))
	}
	cases := []struct {
		name   string
		codecs []pagestream.Codec
		msgs   func(t *testing.T) []*migrationpb.PageStreamRequest
		code   codes.Code
		text   string
		acked  int // batches applied before the refusal
	}{
		{"no open", nil, func(t *testing.T) []*migrationpb.PageStreamRequest {
			return []*migrationpb.PageStreamRequest{good(t, 1)}
		}, codes.InvalidArgument, "must open", 0},
		{"empty stream", nil, func(t *testing.T) []*migrationpb.PageStreamRequest { return nil }, codes.InvalidArgument, "closed before", 0},
		{"unknown migration", nil, func(t *testing.T) []*migrationpb.PageStreamRequest {
			return []*migrationpb.PageStreamRequest{openMsg("x", pagestream.CodecS2)}
		}, codes.NotFound, `"x"`, 0},
		{"codec not accepted", []pagestream.Codec{pagestream.CodecS2}, func(t *testing.T) []*migrationpb.PageStreamRequest {
			return []*migrationpb.PageStreamRequest{openMsg("m", pagestream.CodecZstd)}
		}, codes.InvalidArgument, "zstd is not accepted", 0},
		{"second open", nil, func(t *testing.T) []*migrationpb.PageStreamRequest {
			return []*migrationpb.PageStreamRequest{openMsg("m", pagestream.CodecS2), good(t, 1), openMsg("m", pagestream.CodecS2)}
		}, codes.InvalidArgument, "second open", 1},
		{"out of sequence", nil, func(t *testing.T) []*migrationpb.PageStreamRequest {
			return []*migrationpb.PageStreamRequest{openMsg("m", pagestream.CodecS2), good(t, 1), good(t, 3)}
		}, codes.FailedPrecondition, "batch 3, expected 2", 1},
		{"corrupt", nil, func(t *testing.T) []*migrationpb.PageStreamRequest {
			bad := good(t, 2)
			bad.GetBatch().Payload[5] ^= 1
			return []*migrationpb.PageStreamRequest{openMsg("m", pagestream.CodecS2), good(t, 1), bad}
		}, codes.DataLoss, "corrupt page batch", 1},
		{"wrong codec", nil, func(t *testing.T) []*migrationpb.PageStreamRequest {
			return []*migrationpb.PageStreamRequest{openMsg("m", pagestream.CodecZstd), good(t, 1)}
		}, codes.InvalidArgument, "codec s2 on a stream opened with zstd", 0},
		{"stale round", nil, func(t *testing.T) []*migrationpb.PageStreamRequest {
			late := batchMsg(wire(t, pagestream.CodecS2, 2, 5, []pagestream.Run{{Addr: 0, Pages: 1}}, fill(1, 1)))
			early := batchMsg(wire(t, pagestream.CodecS2, 3, 4, []pagestream.Run{{Addr: 0, Pages: 1}}, fill(1, 1)))
			return []*migrationpb.PageStreamRequest{openMsg("m", pagestream.CodecS2), good(t, 1), late, early}
		}, codes.FailedPrecondition, "older round", 2},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := newStore(t, pageserver.Config{})
			acks, err := exchange(t, serve(t, s, c.codecs...), c.msgs(t)...)
			if status.Code(err) != c.code || !strings.Contains(err.Error(), c.text) {
				t.Fatalf("stream ended with %v, want %v saying %q", err, c.code, c.text)
			}
			if got := s.Stats().Batches; got != uint64(c.acked) {
				t.Errorf("%d batches applied, want %d", got, c.acked)
			}
			if c.acked > 0 && (len(acks) == 0 || acks[len(acks)-1].Seq != uint64(c.acked)) {
				t.Errorf("acks %v", acks)
			}
		})
	}
}

// TestServiceNoSpace: the store's refusal reaches the source as
// ResourceExhausted.
func TestServiceNoSpace(t *testing.T) {
	s := newStore(t, pageserver.Config{Budget: pageserver.NewBudget(4 * ps)})
	_, err := exchange(t, serve(t, s), openMsg("m", pagestream.CodecS2),
		batchMsg(wire(t, pagestream.CodecS2, 1, 0, []pagestream.Run{{Addr: 0, Pages: 8}}, fill(1, 8))))
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "no space") {
		t.Fatalf("over budget: %v", err)
	}
}

func TestServiceConfig(t *testing.T) {
	if _, err := pageserver.NewService(pageserver.ServiceConfig{}); err == nil {
		t.Error("service without lookup")
	}
	lim := pagestream.DefaultLimits()
	lim.MaxRuns = 0
	if _, err := pageserver.NewService(pageserver.ServiceConfig{Lookup: func(string) (*pageserver.Store, error) { return nil, nil }, Limits: lim}); err == nil {
		t.Error("service with bad limits")
	}
	if _, err := pageserver.NewService(pageserver.ServiceConfig{Lookup: func(string) (*pageserver.Store, error) { return nil, nil }, Workers: -1}); err == nil {
		t.Error("service with -1 workers")
	}
}

// Uncompressed pages are used where they arrived, in the received
// message's buffer: it must outlive the batch's turn to be applied while
// later batches are received and decoded (the batch hook here is slow,
// so that they are).
func TestServiceUncompressedBatchesKeepTheirBuffers(t *testing.T) {
	s := newStore(t, pageserver.Config{})
	s.SetBatchHook(func(*pagestream.Batch) error {
		time.Sleep(2 * time.Millisecond)
		return nil
	})
	client := serve(t, s)
	m := model{}
	msgs := []*migrationpb.PageStreamRequest{openMsg("m", pagestream.CodecNone)}
	const batches = 40
	for i := range batches {
		runs := []pagestream.Run{{Addr: uint64(i) * 16 * ps, Pages: 16}}
		data := fill(byte(i+1), 16)
		m.apply(runs, data)
		msgs = append(msgs, batchMsg(wire(t, pagestream.CodecNone, uint64(i+1), 0, runs, data)))
	}
	acks, err := exchange(t, client, msgs...)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(acks); n != batches+2 || !acks[n-1].Final {
		t.Fatalf("%d acks, want %d", n, batches+2)
	}
	m.check(t, s, 9)
}

// hookLog records when the batch hook's calls start and end.
type hookLog struct {
	mu           sync.Mutex
	start, end   map[uint64]time.Time
	calls, inCnt int
	most         int // most calls at once
}

func newHookLog() *hookLog {
	return &hookLog{start: map[uint64]time.Time{}, end: map[uint64]time.Time{}}
}

// hook returns a batch hook that sleeps for slow[seq] and fails batch
// fail (0: none).
func (h *hookLog) hook(slow map[uint64]time.Duration, fail uint64) func(*pagestream.Batch) error {
	return func(b *pagestream.Batch) error {
		h.mu.Lock()
		h.start[b.Seq] = time.Now()
		h.calls++
		h.inCnt++
		h.most = max(h.most, h.inCnt)
		h.mu.Unlock()
		time.Sleep(slow[b.Seq])
		h.mu.Lock()
		h.end[b.Seq] = time.Now()
		h.inCnt--
		h.mu.Unlock()
		if b.Seq == fail {
			return errors.New("shadow refused the pages")
		}
		return nil
	}
}

// TestServiceWritesInParallel: batches that touch different pages are
// written at once; a batch of a later round touching the same pages is
// written only after the earlier one, so the latest round wins; the
// acknowledgements stay in order.
func TestServiceWritesInParallel(t *testing.T) {
	s := newStore(t, pageserver.Config{})
	h := newHookLog()
	s.SetBatchHook(h.hook(map[uint64]time.Duration{1: 300 * time.Millisecond}, 0))
	client := serveWith(t, s, pageserver.ServiceConfig{Workers: 3})
	c := pagestream.CodecS2
	a := []pagestream.Run{{Addr: 0x10000, Pages: 8}}
	b := []pagestream.Run{{Addr: 0x40000, Pages: 8}}
	// Round 1 rewrites two pages inside a's span.
	a2 := []pagestream.Run{{Addr: 0x12000, Pages: 2}}
	acks, err := exchange(t, client, openMsg("m", c),
		batchMsg(wire(t, c, 1, 0, a, fill(1, 8))),
		batchMsg(wire(t, c, 2, 0, b, fill(2, 8))),
		batchMsg(wire(t, c, 3, 1, a2, fill(3, 2))))
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []uint64{0, 1, 2, 3, 3} {
		if i >= len(acks) || acks[i].GetSeq() != want {
			t.Fatalf("acks %v, want sequence numbers 0 1 2 3 then the final one", acks)
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.start[2].Before(h.end[1]) {
		t.Errorf("batch 2 (other pages) was written after batch 1 ended: not in parallel")
	}
	if h.start[3].Before(h.end[1]) {
		t.Errorf("batch 3 (round 1, pages of batch 1) was written before batch 1 ended")
	}
	m := model{}
	m.apply(a, fill(1, 8))
	m.apply(b, fill(2, 8))
	m.apply(a2, fill(3, 2))
	m.check(t, s, 9)
}

// TestServiceWriteFails: a batch whose write fails ends the stream with
// its error; nothing after it is acknowledged, and no write runs once
// the stream has ended.
func TestServiceWriteFails(t *testing.T) {
	s := newStore(t, pageserver.Config{})
	h := newHookLog()
	s.SetBatchHook(h.hook(map[uint64]time.Duration{2: 100 * time.Millisecond, 3: 200 * time.Millisecond}, 2))
	client := serveWith(t, s, pageserver.ServiceConfig{Workers: 3})
	c := pagestream.CodecS2
	var msgs []*migrationpb.PageStreamRequest
	msgs = append(msgs, openMsg("m", c))
	for seq := uint64(1); seq <= 6; seq++ {
		runs := []pagestream.Run{{Addr: seq << 20, Pages: 4}}
		msgs = append(msgs, batchMsg(wire(t, c, seq, 0, runs, fill(byte(seq), 4))))
	}
	acks, err := exchange(t, client, msgs...)
	if err == nil || !strings.Contains(err.Error(), "batch 2 of 9") || !strings.Contains(err.Error(), "shadow refused") {
		t.Fatalf("stream error %v, want batch 2's", err)
	}
	for _, a := range acks {
		if a.GetSeq() > 1 {
			t.Errorf("batch %d acknowledged after batch 2 failed", a.GetSeq())
		}
	}
	h.mu.Lock()
	calls, running := h.calls, h.inCnt
	h.mu.Unlock()
	if running != 0 {
		t.Errorf("%d writes still running after the stream ended", running)
	}
	time.Sleep(50 * time.Millisecond)
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.calls != calls {
		t.Errorf("%d writes started after the stream ended", h.calls-calls)
	}
}
