package pageserver

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"

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
// receives and decodes them (decompression, checksum) while this one
// applies them in order and acknowledges each: decoding the next batch
// overlaps writing this one where it goes (a shadow process, for a
// migration target).
func (s *Service) serve(stream migrationpb.Pages_StreamServer, dec *pagestream.Decoder, store *Store, ack *migrationpb.PageAck, log *slog.Logger) error {
	if err := stream.Send(ack); err != nil {
		return err
	}
	decoded := make(chan decodedBatch, decodeAhead)
	stop := make(chan struct{})
	defer func() {
		close(stop)
		go func() { // the receiver ends with the stream, after this returns
			for d := range decoded {
				d.release()
			}
		}()
	}()
	go s.receive(stream, dec, decoded, stop)
	for d := range decoded {
		switch {
		case d.eof:
			ack.Final = true
			log.Debug("page stream done", "batches", ack.Batches, "pages", ack.PagesData, "zero", ack.PagesZero,
				"gone", ack.PagesGone, "raw", ack.BytesRaw, "wire", ack.BytesWire)
			return stream.Send(ack)
		case d.err != nil:
			d.release()
			if d.refused {
				log.Warn("page batch refused", "err", d.err)
			}
			return d.err
		}
		err := s.apply(store, d.b, ack)
		d.release()
		if err != nil {
			log.Warn("page batch refused", "err", err)
			return err
		}
		if err := stream.Send(ack); err != nil {
			return err
		}
	}
	return nil
}

// decodeAhead is how many decoded batches may wait for their turn to be
// applied.
const decodeAhead = 2

// decodedBatch is what the receiving goroutine hands on: a batch, the end
// of the stream, or why it broke.
type decodedBatch struct {
	b       *pagestream.Batch
	eof     bool
	err     error
	refused bool // err is the batch's, not the stream's
	// wire is the message b came in: an uncompressed batch's pages are
	// used where they are, in its buffer, freed only with the batch.
	wire *migrationpb.PageStreamRequest
}

func (d decodedBatch) release() {
	if d.b != nil {
		d.b.Release()
	}
	if d.wire != nil {
		releaseWire(d.wire)
	}
}

// receive reads and decodes the stream's messages into out until the
// stream ends or breaks (the last item says which), or stop is closed.
func (s *Service) receive(stream migrationpb.Pages_StreamServer, dec *pagestream.Decoder, out chan<- decodedBatch, stop <-chan struct{}) {
	defer close(out)
	for {
		var d decodedBatch
		m, err := stream.Recv()
		switch {
		case errors.Is(err, io.EOF):
			d.eof = true
		case err != nil:
			d.err = err
		default:
			d.b, d.err = decode(dec, m)
			d.refused, d.wire = d.err != nil, m
		}
		select {
		case out <- d:
		case <-stop:
			d.release()
			return
		}
		if d.eof || d.err != nil {
			return
		}
	}
}

// decode checks and decodes one message of a stream.
func decode(dec *pagestream.Decoder, m *migrationpb.PageStreamRequest) (*pagestream.Batch, error) {
	pb := m.GetBatch()
	if pb == nil {
		return nil, status.Error(codes.InvalidArgument, "page stream: a second open message")
	}
	b, err := dec.Decode(pb)
	if err != nil {
		return nil, status.Errorf(batchCode(err), "page stream: %v", err)
	}
	return b, nil
}

// apply applies one decoded batch, adding it to the totals of ack.
func (s *Service) apply(store *Store, b *pagestream.Batch, ack *migrationpb.PageAck) error {
	err := fault.Point(fault.TargetBatch) // test-only; nil unless armed
	if err == nil {
		err = store.Apply(b)
	}
	ack.Seq = b.Seq
	ack.Batches++
	ack.PagesData += b.DataPages()
	ack.PagesZero += b.ZeroPages()
	ack.PagesGone += b.GonePages()
	ack.BytesRaw += uint64(len(b.Data))
	ack.BytesWire += uint64(b.WireBytes)
	if err != nil {
		return status.Errorf(storeCode(err), "page stream: %v", err)
	}
	return nil
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
