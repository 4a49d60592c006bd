package pageserver

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"slices"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/phaul/phaul/internal/fault"
	"github.com/phaul/phaul/pagestream"
	"github.com/phaul/phaul/protocol/migrationpb"
)

// ErrUnknownMigration is what a Lookup returns for an id it does not know.
var ErrUnknownMigration = errors.New("unknown migration")

// ServiceConfig configures a Service.
type ServiceConfig struct {
	// Lookup returns the store of a migration (ErrUnknownMigration when
	// there is none). Required.
	Lookup func(migrationID string) (*Store, error)
	// Codecs the target accepts (default: every codec pagestream
	// implements).
	Codecs []pagestream.Codec
	// Limits applied to every batch (default pagestream.DefaultLimits with
	// the page size of the stores).
	Limits pagestream.Limits
	// Logger for stream events (default: slog.Default()).
	Logger *slog.Logger
	// Workers is how many batches of a stream are decompressed and
	// written at once (default: the CPUs Go uses, between 2 and 4).
	Workers int
}

// Service implements the Pages gRPC service: each stream's batches are
// decoded, checked and applied to the store of the migration named in the
// stream's open message.
type Service struct {
	migrationpb.UnimplementedPagesServer
	cfg ServiceConfig
}

// NewService returns a Pages service.
func NewService(cfg ServiceConfig) (*Service, error) {
	if cfg.Lookup == nil {
		return nil, errors.New("page service: no Lookup")
	}
	if len(cfg.Codecs) == 0 {
		cfg.Codecs = pagestream.Codecs()
	}
	if cfg.Limits == (pagestream.Limits{}) {
		cfg.Limits = pagestream.DefaultLimits()
	}
	if err := cfg.Limits.Validate(); err != nil {
		return nil, fmt.Errorf("page service: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Workers == 0 {
		cfg.Workers = min(max(runtime.GOMAXPROCS(0), 2), 4)
	}
	if cfg.Workers < 1 {
		return nil, fmt.Errorf("page service: %d workers", cfg.Workers)
	}
	return &Service{cfg: cfg}, nil
}

// Stream implements migrationpb.PagesServer.
func (s *Service) Stream(stream migrationpb.Pages_StreamServer) error {
	first, err := stream.Recv()
	if err != nil {
		if errors.Is(err, io.EOF) {
			return status.Error(codes.InvalidArgument, "page stream: closed before its open message")
		}
		return err
	}
	releaseWire(first)
	open := first.GetOpen()
	if open == nil {
		return status.Error(codes.InvalidArgument, "page stream: the first message must open the stream")
	}
	log := s.cfg.Logger.With("migration", open.GetMigrationId())
	store, err := s.cfg.Lookup(open.GetMigrationId())
	if err != nil {
		code := codes.Internal
		if errors.Is(err, ErrUnknownMigration) {
			code = codes.NotFound
		}
		return status.Errorf(code, "page stream: migration %q: %v", open.GetMigrationId(), err)
	}
	codec := open.GetCodec()
	if !slices.Contains(s.cfg.Codecs, codec) {
		return status.Errorf(codes.InvalidArgument, "page stream: codec %s is not accepted here (accepted: %v)",
			pagestream.CodecName(codec), s.cfg.Codecs)
	}
	lim := s.cfg.Limits
	lim.PageSize = store.ps
	dec, err := pagestream.NewDecoder(codec, lim)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "page stream: %v", err)
	}
	ack := &migrationpb.PageAck{}
	log.Debug("page stream open", "codec", pagestream.CodecName(codec))
	err = s.serve(stream, dec, store, ack, log)
	store.EndStream(err)
	return err
}

// serve applies the batches of an open stream until it ends. A goroutine
// receives them and checks them in order (Decoder.Accept). Workers
// decompress them and write them where they go (into a shadow process,
// for a migration target) several at a time, and record them in the
// store in stream order. This goroutine acknowledges them in order.
func (s *Service) serve(stream migrationpb.Pages_StreamServer, dec *pagestream.Decoder, store *Store, ack *migrationpb.PageAck, log *slog.Logger) error {
	if err := stream.Send(ack); err != nil {
		return err
	}
	workers := s.cfg.Workers
	items := make(chan *item, 2*workers) // every batch not yet acknowledged, in order
	work := make(chan *item)
	stop := make(chan struct{})
	p := &pipeline{store: store, writing: map[*item]struct{}{}}
	defer func() {
		close(stop)
		// No batch is written into its process after the stream's end:
		// the target may discard that process next.
		p.stop()
		go func() { // the receiver ends with the stream, after this returns
			for it := range items {
				<-it.done
				it.release()
			}
		}()
	}()
	go s.receive(stream, dec, items, work, stop)
	for range workers {
		go p.work(work)
	}
	for it := range items {
		<-it.done
		switch {
		case it.eof:
			ack.Final = true
			log.Debug("page stream done", "batches", ack.Batches, "pages", ack.PagesData, "zero", ack.PagesZero,
				"gone", ack.PagesGone, "raw", ack.BytesRaw, "wire", ack.BytesWire)
			return stream.Send(ack)
		case it.err != nil:
			it.release()
			if it.refused {
				log.Warn("page batch refused", "err", it.err)
			}
			return it.err
		}
		b := it.b
		ack.Seq = b.Seq
		ack.Batches++
		ack.PagesData += b.DataPages()
		ack.PagesZero += b.ZeroPages()
		ack.PagesGone += b.GonePages()
		ack.BytesRaw += b.DataPages() * uint64(b.PageSize())
		ack.BytesWire += uint64(b.WireBytes)
		store.Applied(b.Seq)
		it.release()
		if err := stream.Send(ack); err != nil {
			return err
		}
	}
	return nil
}

// item is one message of a stream on its way through serve: a batch, the
// end of the stream, or why the stream broke.
type item struct {
	b   *pagestream.Batch
	eof bool
	err error
	// refused says err is the batch's (it was refused), not the stream's.
	refused bool
	// wire is the message b came in: an uncompressed batch's pages are
	// used where they are, in its buffer, freed only with the batch.
	wire *migrationpb.PageStreamRequest

	prev *item // the batch before in the stream, nil for the first
	// recorded is closed once the batch is recorded in the store, or
	// failed (err) or was skipped (failed) before.
	recorded chan struct{}
	failed   bool // this batch or one before it failed
	// done is closed when the item is finished: written, or failed.
	done chan struct{}
}

func newItem(prev *item) *item {
	return &item{prev: prev, recorded: make(chan struct{}), done: make(chan struct{})}
}

// finish ends an item that goes to no worker.
func (it *item) finish() {
	it.failed = it.failed || it.err != nil || it.eof
	close(it.recorded)
	close(it.done)
}

func (it *item) release() {
	if it.b != nil {
		it.b.Release()
	}
	if it.wire != nil {
		releaseWire(it.wire)
	}
}

// span returns the batch's address range, from its first run to the end
// of its last.
func (it *item) span() (start, end uint64) {
	runs := it.b.Runs
	last := runs[len(runs)-1]
	return runs[0].Addr, last.Addr + last.Pages*uint64(it.b.PageSize())
}

// overlaps reports whether the batches of it and o may touch a same page.
func (it *item) overlaps(o *item) bool {
	if it.b.Pid != o.b.Pid {
		return false
	}
	s1, e1 := it.span()
	s2, e2 := o.span()
	return s1 < e2 && s2 < e1
}

// errSkipped fails a batch after one before it failed; serve reports that
// one, and never this error.
var errSkipped = errors.New("page stream: batch skipped after an earlier failure")

// pipeline is the workers' shared state: the store, and the batches being
// written.
type pipeline struct {
	store   *Store
	mu      sync.Mutex
	writing map[*item]struct{}
	stopped bool // no batch starts writing
}

// stop waits for the batches being written and keeps others from
// starting.
func (p *pipeline) stop() {
	p.mu.Lock()
	p.stopped = true
	var wait []*item
	for it := range p.writing {
		wait = append(wait, it)
	}
	p.mu.Unlock()
	for _, it := range wait {
		<-it.done
	}
}

// work decompresses, records and writes the batches it is handed, which
// come in stream order.
func (p *pipeline) work(in <-chan *item) {
	for it := range in {
		it.err = p.process(it)
		close(it.done)
	}
}

// process takes one batch through: decompressing, then recording once
// the batch before is recorded, then writing once the earlier batches
// still being written whose spans overlap are written (the latest round
// wins wherever a page is written twice).
func (p *pipeline) process(it *item) error {
	err := it.b.Inflate()
	if err != nil {
		err = status.Errorf(batchCode(err), "page stream: %v", err)
		it.refused = true
	}
	if it.prev != nil {
		<-it.prev.recorded
		if it.prev.failed {
			err, it.refused = errSkipped, false
		}
		it.prev = nil // else every batch of the stream stays reachable
	}
	write, wait, err := p.record(it, err)
	it.failed = err != nil
	close(it.recorded)
	if err != nil {
		return err
	}
	defer func() {
		p.mu.Lock()
		delete(p.writing, it)
		p.mu.Unlock()
	}()
	for _, o := range wait {
		<-o.done
	}
	if err := write(); err != nil {
		it.refused = true
		return status.Errorf(storeCode(err), "page stream: %v", err)
	}
	return nil
}

// record records it in the store unless err (its failure so far) is set
// and returns its write and the batches being written that it must wait
// for.
func (p *pipeline) record(it *item, err error) (write func() error, wait []*item, _ error) {
	if err != nil {
		return nil, nil, err
	}
	if err = fault.Point(fault.TargetBatch); err == nil { // test-only; nil unless armed
		write, err = p.store.Record(it.b)
	}
	if err != nil {
		it.refused = true
		return nil, nil, status.Errorf(storeCode(err), "page stream: %v", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		it.refused = false
		return nil, nil, errSkipped
	}
	for o := range p.writing {
		if it.overlaps(o) {
			wait = append(wait, o)
		}
	}
	p.writing[it] = struct{}{}
	return write, wait, nil
}

// receive reads the stream's messages and checks them in order. Each goes
// to items, in order, and the batches also to work, until the stream ends
// or breaks (the last item says which), or stop is closed.
func (s *Service) receive(stream migrationpb.Pages_StreamServer, dec *pagestream.Decoder, items, work chan<- *item, stop <-chan struct{}) {
	defer close(items)
	defer close(work)
	var prev *item
	for {
		it := newItem(prev)
		m, err := stream.Recv()
		switch {
		case errors.Is(err, io.EOF):
			it.eof = true
		case err != nil:
			it.err = err
		default:
			it.wire = m
			it.b, it.err = accept(dec, m)
			it.refused = it.err != nil
		}
		select {
		case items <- it:
		case <-stop:
			it.release()
			return
		}
		if it.eof || it.err != nil {
			it.finish()
			return
		}
		select {
		case work <- it:
		case <-stop:
			it.err = errSkipped
			it.finish()
			return
		}
		prev = it
	}
}

// accept checks one message of a stream.
func accept(dec *pagestream.Decoder, m *migrationpb.PageStreamRequest) (*pagestream.Batch, error) {
	pb := m.GetBatch()
	if pb == nil {
		return nil, status.Error(codes.InvalidArgument, "page stream: a second open message")
	}
	b, err := dec.Accept(pb)
	if err != nil {
		return nil, status.Errorf(batchCode(err), "page stream: %v", err)
	}
	return b, nil
}

// batchCode maps a decoder error to a gRPC code.
func batchCode(err error) codes.Code {
	switch pagestream.ErrorKind(err) {
	case pagestream.ErrCorrupt:
		return codes.DataLoss
	case pagestream.ErrSequence:
		return codes.FailedPrecondition
	case pagestream.ErrTooLarge:
		return codes.ResourceExhausted
	}
	return codes.InvalidArgument
}

// storeCode maps a store error to a gRPC code.
func storeCode(err error) codes.Code {
	switch {
	case errors.Is(err, ErrNoSpace):
		return codes.ResourceExhausted
	case errors.Is(err, ErrStaleRound):
		return codes.FailedPrecondition
	case errors.Is(err, ErrClosed):
		return codes.Aborted
	}
	return codes.Internal
}
