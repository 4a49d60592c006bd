package pagestream

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/internal/fault"
	"github.com/phaul/phaul/protocol/migrationpb"
)

// PageSink receives the pages of one process in one round, in increasing
// address order with no page given twice (predump.Sink has this shape;
// Sink implements it for the network).
type PageSink interface {
	// WritePages records the pages at addr (page aligned); len(data) is a
	// multiple of the page size. data may be reused once the call returns.
	WritePages(addr uint64, data []byte) error
	// ZeroPages records n pages at addr known to be zero.
	ZeroPages(addr, n uint64) error
	// KeepPages records n pages at addr as unchanged since the previous
	// round.
	KeepPages(addr, n uint64) error
	// Done ends the round: the pages of the previous round not mentioned
	// in this one are gone.
	Done() error
}

// SenderConfig tunes a Sender. The zero value of a field means its default.
type SenderConfig struct {
	// Codec of the stream: what the Hello negotiated (default S2).
	Codec Codec
	// BatchBytes is the page bytes gathered per batch before zero pages
	// are taken out (default 1 MiB).
	BatchBytes int
	// Workers is the number of goroutines finding zero pages, checksumming
	// and compressing (default 2).
	Workers int
	// PageSize of both hosts (default 4096).
	PageSize int
	// MaxQueued is the number of batches submitted but not yet on the
	// wire (default 4 per worker); WritePages blocks beyond.
	MaxQueued int
	// MaxBatchPages bounds the pages, zero ones included, of one batch
	// (default 1<<18, a quarter of the decoder's default limit).
	MaxBatchPages uint64
	// MaxBatchRuns bounds the page runs given to one batch (default 4096).
	MaxBatchRuns int
	// Bandwidth limits what goes on the wire, in bytes per second (0: no
	// limit): batches are paced so that the stream never runs ahead of it.
	Bandwidth float64
}

// Default sender settings.
const (
	DefaultBatchBytes    = 1 << 20
	DefaultWorkers       = 2
	DefaultMaxBatchPages = 1 << 18
	DefaultMaxBatchRuns  = 4096
)

// withDefaults fills unset fields and checks the others.
func (c SenderConfig) withDefaults() (SenderConfig, error) {
	if c.Codec == migrationpb.Codec_CODEC_UNSPECIFIED {
		c.Codec = DefaultCodec
	}
	if c.PageSize == 0 {
		c.PageSize = 4096
	}
	if c.BatchBytes == 0 {
		c.BatchBytes = DefaultBatchBytes
	}
	if c.Workers == 0 {
		c.Workers = DefaultWorkers
	}
	if c.MaxQueued == 0 {
		c.MaxQueued = 4 * c.Workers
	}
	if c.MaxBatchPages == 0 {
		c.MaxBatchPages = DefaultMaxBatchPages
	}
	if c.MaxBatchRuns == 0 {
		c.MaxBatchRuns = DefaultMaxBatchRuns
	}
	switch {
	case !knownCodec(c.Codec):
		return c, fmt.Errorf("page sender: %w: %s", ErrCodec, CodecName(c.Codec))
	case c.PageSize < 512 || c.PageSize&(c.PageSize-1) != 0:
		return c, fmt.Errorf("page sender: page size %d is not a power of two >= 512", c.PageSize)
	case c.BatchBytes < c.PageSize || c.BatchBytes%c.PageSize != 0 || c.BatchBytes > DefaultMaxRawBytes:
		return c, fmt.Errorf("page sender: batch size %d is not a page multiple in [%d, %d]", c.BatchBytes, c.PageSize, DefaultMaxRawBytes)
	case c.Workers < 1 || c.MaxQueued < 1 || c.MaxBatchRuns < 1:
		return c, fmt.Errorf("page sender: workers %d, queue %d and runs %d must be positive", c.Workers, c.MaxQueued, c.MaxBatchRuns)
	case c.MaxBatchPages < uint64(c.BatchBytes/c.PageSize):
		return c, fmt.Errorf("page sender: max batch pages %d below the batch size", c.MaxBatchPages)
	}
	return c, nil
}

// Stats are a page stream's figures as the target acknowledged them.
type Stats struct {
	Batches   uint64
	PagesData uint64
	PagesZero uint64
	PagesGone uint64
	// RawBytes counts data pages (zero pages excluded) before compression;
	// WireBytes the payload bytes sent for them.
	RawBytes  uint64
	WireBytes uint64
	// Busy is the time during which batches were in flight (submitted
	// and not yet acknowledged): the time the stream took, idle gaps
	// between rounds excluded.
	Busy time.Duration
}

// WireRate is the measured bandwidth on the wire, in payload bytes per
// second of Busy time (0 before anything was acknowledged).
func (s Stats) WireRate() float64 { return rate(s.WireBytes, s.Busy) }

// RawRate is the rate of data pages moved, in uncompressed bytes per second.
func (s Stats) RawRate() float64 { return rate(s.RawBytes, s.Busy) }

// Sub returns the figures accumulated since prev (an earlier Stats of the
// same Sender), for instance one round's.
func (s Stats) Sub(prev Stats) Stats {
	return Stats{
		Batches:   s.Batches - prev.Batches,
		PagesData: s.PagesData - prev.PagesData,
		PagesZero: s.PagesZero - prev.PagesZero,
		PagesGone: s.PagesGone - prev.PagesGone,
		RawBytes:  s.RawBytes - prev.RawBytes,
		WireBytes: s.WireBytes - prev.WireBytes,
		Busy:      s.Busy - prev.Busy,
	}
}

func rate(n uint64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / d.Seconds()
}

// ErrSenderClosed is returned by sinks of a closed Sender.
var ErrSenderClosed = errors.New("page sender closed")

// Sender streams page batches of one migration on one Pages.Stream call.
// Sinks of different processes may be used concurrently; the batches reach
// the target in the order they were filled.
type Sender struct {
	cfg    SenderConfig
	enc    *Encoder
	stream migrationpb.Pages_StreamClient
	cancel context.CancelFunc

	mu     sync.Mutex // serializes submissions: sequence order = queue order
	seq    uint64     // last sequence number given out
	closed bool
	work   chan *outBatch // to the workers
	order  chan *outBatch // to the send loop, in sequence order
	wg     sync.WaitGroup // workers, send loop, receive loop

	// st guards the fields below. Lock order: mu, then st.
	st        sync.Mutex
	cond      *sync.Cond
	submitted uint64 // last sequence number queued (a copy of seq)
	acked     uint64 // last acknowledged sequence number
	ack       *migrationpb.PageAck
	final     bool // the final ack arrived
	err       error
	inflight  bool      // batches submitted and not all acknowledged
	since     time.Time // start of the current busy period
	busy      time.Duration
	held      map[int32]spans // pages the target holds, per process, after the last Done
}

// Open starts a page stream for migrationID on client and returns once the
// target accepted it. ctx bounds the whole stream: cancelling it aborts the
// stream. Close the Sender to end it.
func Open(ctx context.Context, client migrationpb.PagesClient, migrationID string, cfg SenderConfig) (*Sender, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	enc, err := NewEncoder(cfg.Codec, cfg.Workers)
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithCancel(ctx)
	stream, err := client.Stream(sctx)
	if err == nil {
		err = stream.Send(&migrationpb.PageStreamRequest{Msg: &migrationpb.PageStreamRequest_Open{
			Open: &migrationpb.PageStreamOpen{MigrationId: migrationID, Codec: cfg.Codec},
		}})
	}
	var first *migrationpb.PageAck
	if err == nil {
		first, err = stream.Recv()
		if err == nil && first.GetSeq() != 0 {
			err = fmt.Errorf("target acknowledged batch %d before any was sent", first.GetSeq())
		}
	}
	if err != nil {
		cancel()
		enc.Close()
		return nil, fmt.Errorf("open page stream for migration %q: %w", migrationID, err)
	}
	s := &Sender{
		cfg:    cfg,
		enc:    enc,
		stream: stream,
		cancel: cancel,
		work:   make(chan *outBatch, cfg.MaxQueued),
		order:  make(chan *outBatch, cfg.MaxQueued),
		ack:    first,
		held:   map[int32]spans{},
	}
	s.cond = sync.NewCond(&s.st)
	s.wg.Add(cfg.Workers + 2)
	for range cfg.Workers {
		go s.worker()
	}
	go s.sendLoop(sctx)
	go s.recvLoop()
	return s, nil
}

// Stats returns the figures acknowledged so far.
func (s *Sender) Stats() Stats {
	s.st.Lock()
	defer s.st.Unlock()
	st := Stats{
		Batches:   s.ack.GetBatches(),
		PagesData: s.ack.GetPagesData(),
		PagesZero: s.ack.GetPagesZero(),
		PagesGone: s.ack.GetPagesGone(),
		RawBytes:  s.ack.GetBytesRaw(),
		WireBytes: s.ack.GetBytesWire(),
		Busy:      s.busy,
	}
	if s.inflight {
		st.Busy += time.Since(s.since)
	}
	return st
}

// Err returns the error that broke the stream, or nil.
func (s *Sender) Err() error {
	s.st.Lock()
	defer s.st.Unlock()
	return s.err
}

// fail records the first error and aborts the stream.
func (s *Sender) fail(err error) {
	s.st.Lock()
	if s.err == nil {
		s.err = err
	}
	s.cond.Broadcast()
	s.st.Unlock()
	s.cancel()
}

// Close ends the stream: it sends what was submitted, waits for the
// target's final acknowledgement (bounded by Open's context) and releases
// everything. Pages left in sinks whose round is not done are dropped. It
// returns the error that broke the stream, if any; after a Close, sinks
// fail with ErrSenderClosed.
func (s *Sender) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return s.Err()
	}
	s.closed = true
	close(s.work)
	close(s.order)
	s.mu.Unlock()
	s.wg.Wait() // the send loop half-closes the stream after the last batch
	s.cancel()
	s.enc.Close()
	s.st.Lock()
	defer s.st.Unlock()
	if s.err == nil && !s.final {
		s.err = errors.New("page stream ended without the final acknowledgement")
	}
	return s.err
}

// submit queues b for compression and sending.
func (s *Sender) submit(b *outBatch) (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		b.release()
		return 0, ErrSenderClosed
	}
	if err := s.Err(); err != nil {
		b.release()
		return 0, err
	}
	s.seq++
	b.seq = s.seq
	b.ready = make(chan struct{})
	s.st.Lock()
	s.submitted = b.seq
	if !s.inflight {
		s.inflight = true
		s.since = time.Now()
	}
	s.st.Unlock()
	// order bounds the batches in the pipeline (WritePages blocks here
	// when the wire is the bottleneck). Every batch in work is also in
	// order or the one the send loop waits for, and the workers drain
	// work even after a failure, so the second send waits at most for a
	// worker to take a batch.
	s.order <- b
	s.work <- b
	return b.seq, nil
}

// waitAcked blocks until seq is acknowledged or the stream broke.
func (s *Sender) waitAcked(seq uint64) error {
	s.st.Lock()
	defer s.st.Unlock()
	for s.acked < seq && s.err == nil {
		s.cond.Wait()
	}
	if s.acked >= seq {
		return nil
	}
	return s.err
}

func (s *Sender) worker() {
	defer s.wg.Done()
	for b := range s.work {
		b.encode(s.enc, s.cfg.PageSize)
		close(b.ready)
	}
}

// sendLoop puts compressed batches on the wire in sequence order, then
// half-closes the stream.
func (s *Sender) sendLoop(ctx context.Context) {
	defer s.wg.Done()
	broken := false
	pace := pacer{rate: s.cfg.Bandwidth}
	for b := range s.order {
		if !broken {
			select {
			case <-b.ready:
			case <-ctx.Done():
				broken = true
				s.fail(fmt.Errorf("page stream: %w", ctx.Err()))
			}
		}
		if !broken && s.cfg.Bandwidth > 0 {
			if err := pace.wait(ctx, len(b.msg.GetPayload())+batchOverhead); err != nil {
				broken = true
				s.fail(fmt.Errorf("page stream: %w", err))
			}
		}
		if !broken {
			// No stats handler or binary log is installed, so gRPC is
			// done with the message (it marshals it) when Send returns,
			// and the buffers can go back to the pool.
			err := s.stream.Send(&migrationpb.PageStreamRequest{Msg: &migrationpb.PageStreamRequest_Batch{Batch: b.msg}})
			switch {
			case errors.Is(err, io.EOF):
				// The stream ended; the receive loop gets the
				// target's reason and fails the sender with it.
				broken = true
			case err != nil:
				broken = true
				s.fail(fmt.Errorf("send page batch %d: %w", b.seq, err))
			}
		}
		<-b.ready // a worker may still hold the buffers after a cancel
		b.release()
	}
	if !broken {
		if err := s.stream.CloseSend(); err != nil {
			s.fail(fmt.Errorf("close page stream: %w", err))
		}
	}
}

// batchOverhead is what a batch costs on the wire besides its payload
// (message framing and page runs), roughly.
const batchOverhead = 64

// pacer spaces sends so that they keep to rate bytes per second. Time the
// link stayed idle is not saved up beyond one batch's worth.
type pacer struct {
	rate float64
	next time.Time // when the next send may start
}

// wait blocks until n more bytes may go.
func (p *pacer) wait(ctx context.Context, n int) error {
	now := time.Now()
	if p.next.Before(now) {
		p.next = now
	}
	if d := p.next.Sub(now); d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	p.next = p.next.Add(time.Duration(float64(n) / p.rate * float64(time.Second)))
	return nil
}

// recvLoop reads acknowledgements until the final one.
func (s *Sender) recvLoop() {
	defer s.wg.Done()
	for {
		a, err := s.stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				s.st.Lock()
				final := s.final
				s.st.Unlock()
				if final {
					return
				}
				err = errors.New("target ended the page stream without a final acknowledgement")
			}
			s.fail(fmt.Errorf("page stream: %w", err))
			return
		}
		s.st.Lock()
		switch {
		case s.final:
			err = errors.New("target acknowledged after its final acknowledgement")
		case a.GetSeq() < s.acked:
			err = fmt.Errorf("target acknowledged batch %d after %d", a.GetSeq(), s.acked)
		case a.GetSeq() > s.submitted:
			err = fmt.Errorf("target acknowledged batch %d, only %d were sent", a.GetSeq(), s.submitted)
		}
		if err != nil {
			s.st.Unlock()
			s.fail(err)
			return
		}
		s.acked, s.ack, s.final = a.GetSeq(), a, a.GetFinal()
		if s.inflight && s.acked == s.submitted {
			s.inflight = false
			s.busy += time.Since(s.since)
		}
		s.cond.Broadcast()
		s.st.Unlock()
	}
}

// segment is one WritePages, ZeroPages or gone range (or part of one) in
// a batch.
type segment struct {
	addr  uint64
	pages uint64
	off   int // offset in raw of a data segment
	kind  Kind
}

// outBatch is a batch on its way out.
type outBatch struct {
	seq   uint64
	pid   int32
	round uint32
	raw   *[]byte // pooled, len = bytes gathered
	dst   *[]byte // pooled compression buffer
	segs  []segment
	pages uint64 // pages of every kind gathered
	end   uint64 // end address of the last segment
	msg   *migrationpb.PageBatch
	ready chan struct{} // closed once msg is built
}

func (b *outBatch) release() {
	if b.raw != nil {
		putBuffer(b.raw)
		b.raw = nil
	}
	if b.dst != nil {
		putBuffer(b.dst)
		b.dst = nil
	}
	b.msg = nil
}

// encode finds the zero pages among the data, compacts the data pages,
// checksums and compresses them, and builds the message.
func (b *outBatch) encode(enc *Encoder, pageSize int) {
	raw := *b.raw
	ps := uint64(pageSize)
	runs := make([]*migrationpb.PageRun, 0, len(b.segs)+4)
	add := func(addr, n uint64, k Kind) {
		kind := pbKind(k)
		if j := len(runs) - 1; j >= 0 && runs[j].Kind == kind && runs[j].Addr+runs[j].NrPages*ps == addr {
			runs[j].NrPages += n
			return
		}
		runs = append(runs, &migrationpb.PageRun{Addr: addr, NrPages: n, Kind: kind})
	}
	w := 0
	for _, sg := range b.segs {
		if sg.kind != Data {
			add(sg.addr, sg.pages, sg.kind)
			continue
		}
		for i := range sg.pages {
			off := sg.off + int(i)*pageSize
			page := raw[off : off+pageSize]
			addr := sg.addr + i*ps
			if image.IsZero(page) {
				add(addr, 1, Zero)
				continue
			}
			if w != off {
				copy(raw[w:w+pageSize], page)
			}
			w += pageSize
			add(addr, 1, Data)
		}
	}
	m := &migrationpb.PageBatch{
		Seq:     b.seq,
		Pid:     b.pid,
		Round:   b.round,
		Runs:    runs,
		Codec:   CodecNone,
		RawSize: uint64(w),
	}
	if w > 0 {
		data := raw[:w]
		if enc.Codec() != CodecNone {
			b.dst = getBuffer(maxEncodedLen(enc.Codec(), w))
			m.Payload, m.Codec = enc.Encode((*b.dst)[:0], data)
		} else {
			m.Payload = data
		}
		m.Crc32C = Checksum(m.Payload)
		_ = fault.Data(fault.SourceBatch, m.Payload) // test-only; nothing unless armed
	}
	b.msg = m
}

// Sink is a PageSink feeding a Sender with the pages of one process in one
// round. It is not safe for concurrent use, and one process has one sink
// at a time.
type Sink struct {
	s         *Sender
	pid       int32
	round     uint32
	cur       *outBatch
	lastSeq   uint64 // last batch this sink submitted
	mentioned spans  // pages written, zeroed or kept this round
	kept      spans
	done      bool
	noWait    bool // Done does not wait for the acknowledgement
}

var _ PageSink = (*Sink)(nil)

// Sink returns the sink of the pages of process pid in round round.
func (s *Sender) Sink(pid int32, round uint32) *Sink {
	return &Sink{s: s, pid: pid, round: round}
}

// FinalSink is Sink for the last round of the stream, whose end the
// target learns some other way (a migration's final state names it): its
// Done sends everything but returns without waiting for the target's
// acknowledgement. LastSeq then tells the batch the target must have
// applied; WaitAcked waits for its acknowledgement.
func (s *Sender) FinalSink(pid int32, round uint32) *Sink {
	return &Sink{s: s, pid: pid, round: round, noWait: true}
}

// LastSeq returns the sequence number of the last batch the sink sent
// (0: none).
func (k *Sink) LastSeq() uint64 { return k.lastSeq }

// WaitAcked blocks until the target acknowledged batch seq, or the stream
// broke.
func (s *Sender) WaitAcked(seq uint64) error { return s.waitAcked(seq) }

// Holds returns the pages the target holds for pid after the rounds done
// so far, as [start, end) address ranges.
func (s *Sender) Holds(pid int32) [][2]uint64 {
	s.st.Lock()
	defer s.st.Unlock()
	out := make([][2]uint64, len(s.held[pid]))
	for i, r := range s.held[pid] {
		out[i] = [2]uint64{r.start, r.end}
	}
	return out
}

// WritePages implements PageSink.
func (k *Sink) WritePages(addr uint64, data []byte) error {
	ps := k.s.cfg.PageSize
	if len(data)%ps != 0 {
		return fmt.Errorf("write pages at %#x: %d bytes are not whole pages", addr, len(data))
	}
	if err := k.check(addr, uint64(len(data)/ps)); err != nil {
		return fmt.Errorf("write pages: %w", err)
	}
	k.mentioned.add(addr, addr+uint64(len(data)))
	for len(data) > 0 {
		b, err := k.batchFor(addr, true)
		if err != nil {
			return err
		}
		used := len(*b.raw)
		roomPages := min(uint64(k.s.cfg.BatchBytes-used)/uint64(ps), k.s.cfg.MaxBatchPages-b.pages)
		n := int(min(roomPages, uint64(len(data)/ps))) * ps
		*b.raw = (*b.raw)[:used+n]
		copy((*b.raw)[used:], data[:n])
		pages := uint64(n / ps)
		if j := len(b.segs) - 1; j >= 0 && b.segs[j].kind == Data && b.segs[j].addr+b.segs[j].pages*uint64(ps) == addr {
			b.segs[j].pages += pages
		} else {
			b.segs = append(b.segs, segment{addr: addr, pages: pages, off: used})
		}
		b.pages += pages
		addr += uint64(n)
		b.end = addr
		data = data[n:]
	}
	return nil
}

// ZeroPages implements PageSink.
func (k *Sink) ZeroPages(addr, n uint64) error {
	if err := k.check(addr, n); err != nil {
		return fmt.Errorf("zero pages: %w", err)
	}
	k.mentioned.add(addr, addr+n*uint64(k.s.cfg.PageSize))
	return k.addEmpty(addr, n, Zero)
}

// KeepPages implements PageSink: the target has these pages from an
// earlier round, so nothing is sent.
func (k *Sink) KeepPages(addr, n uint64) error {
	if err := k.check(addr, n); err != nil {
		return fmt.Errorf("keep pages: %w", err)
	}
	end := addr + n*uint64(k.s.cfg.PageSize)
	k.mentioned.add(addr, end)
	k.kept.add(addr, end)
	return nil
}

// check refuses calls after Done and ranges that are unaligned or wrap.
func (k *Sink) check(addr, n uint64) error {
	ps := uint64(k.s.cfg.PageSize)
	switch {
	case k.done:
		return fmt.Errorf("round %d of %d is done", k.round, k.pid)
	case addr%ps != 0:
		return fmt.Errorf("address %#x not page aligned", addr)
	case n > (^uint64(0)-addr)/ps:
		return fmt.Errorf("%d pages at %#x wrap the address space", n, addr)
	}
	return nil
}

// addEmpty adds n pages of a kind without data.
func (k *Sink) addEmpty(addr, n uint64, kind Kind) error {
	ps := uint64(k.s.cfg.PageSize)
	for n > 0 {
		b, err := k.batchFor(addr, false)
		if err != nil {
			return err
		}
		take := min(n, k.s.cfg.MaxBatchPages-b.pages)
		if j := len(b.segs) - 1; j >= 0 && b.segs[j].kind == kind && b.segs[j].addr+b.segs[j].pages*ps == addr {
			b.segs[j].pages += take
		} else {
			b.segs = append(b.segs, segment{addr: addr, pages: take, kind: kind})
		}
		b.pages += take
		addr += take * ps
		b.end = addr
		n -= take
	}
	return nil
}

// batchFor returns the batch to append pages at addr to, submitting the
// current one first when it is full, would need another run beyond the
// limit, or addr goes backwards.
func (k *Sink) batchFor(addr uint64, data bool) (*outBatch, error) {
	if b := k.cur; b != nil {
		full := b.pages >= k.s.cfg.MaxBatchPages ||
			len(b.segs) >= k.s.cfg.MaxBatchRuns ||
			(data && len(*b.raw) >= k.s.cfg.BatchBytes) ||
			addr < b.end
		if !full {
			return b, nil
		}
		if err := k.submit(); err != nil {
			return nil, err
		}
	}
	if err := k.s.Err(); err != nil {
		return nil, err
	}
	raw := getBuffer(k.s.cfg.BatchBytes)
	*raw = (*raw)[:0]
	k.cur = &outBatch{pid: k.pid, round: k.round, raw: raw}
	return k.cur, nil
}

// submit hands the current batch to the sender.
func (k *Sink) submit() error {
	b := k.cur
	k.cur = nil
	if b == nil || b.pages == 0 {
		if b != nil {
			b.release()
		}
		return nil
	}
	seq, err := k.s.submit(b)
	if err != nil {
		return err
	}
	k.lastSeq = seq
	return nil
}

// Done implements PageSink: it sends the pages the target holds from the
// previous round that this round did not mention as gone, sends what is
// buffered, and returns once the target acknowledged all of it. Keeping
// pages the target does not hold is an error. After an error the round is
// incomplete and the migration cannot go on with this Sender.
func (k *Sink) Done() error {
	if k.done {
		return fmt.Errorf("round %d of %d: Done twice", k.round, k.pid)
	}
	k.done = true
	k.mentioned.normalize()
	k.kept.normalize()
	k.s.st.Lock()
	held := k.s.held[k.pid]
	k.s.st.Unlock()
	if bad := k.kept.subtract(held); len(bad) > 0 {
		return fmt.Errorf("round %d of %d: pages %#x-%#x kept, but the target does not hold them", k.round, k.pid, bad[0].start, bad[0].end)
	}
	ps := uint64(k.s.cfg.PageSize)
	for _, g := range held.subtract(k.mentioned) {
		if err := k.addEmpty(g.start, (g.end-g.start)/ps, Gone); err != nil {
			return err
		}
	}
	if err := k.submit(); err != nil {
		return err
	}
	if k.noWait {
		return nil // no round follows: what the target holds no longer matters
	}
	if err := k.s.waitAcked(k.lastSeq); err != nil {
		return err
	}
	k.s.st.Lock()
	k.s.held[k.pid] = k.mentioned
	k.s.st.Unlock()
	return nil
}

// span is the address range [start, end).
type span struct{ start, end uint64 }

// spans is a set of address ranges; after normalize, sorted and merged.
type spans []span

// add appends [start, end), merging with the last range when they touch.
// Ranges added out of order are sorted out by normalize.
func (s *spans) add(start, end uint64) {
	if start == end {
		return
	}
	if n := len(*s); n > 0 && (*s)[n-1].end == start {
		(*s)[n-1].end = end
		return
	}
	*s = append(*s, span{start, end})
}

// normalize sorts and merges the ranges.
func (s *spans) normalize() {
	slices.SortFunc(*s, func(a, b span) int { return cmp.Compare(a.start, b.start) })
	out := (*s)[:0]
	for _, r := range *s {
		if n := len(out); n > 0 && r.start <= out[n-1].end {
			out[n-1].end = max(out[n-1].end, r.end)
			continue
		}
		out = append(out, r)
	}
	*s = out
}

// subtract returns the parts of s not in t (both normalized).
func (s spans) subtract(t spans) spans {
	var out spans
	j := 0
	for _, r := range s {
		start := r.start
		for j < len(t) && t[j].end <= start {
			j++
		}
		for k := j; k < len(t) && t[k].start < r.end; k++ {
			if t[k].start > start {
				out = append(out, span{start, t[k].start})
			}
			start = max(start, t[k].end)
		}
		if start < r.end {
			out = append(out, span{start, r.end})
		}
	}
	return out
}
