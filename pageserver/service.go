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

// serve applies the batches of an open stream until it ends.
func (s *Service) serve(stream migrationpb.Pages_StreamServer, dec *pagestream.Decoder, store *Store, ack *migrationpb.PageAck, log *slog.Logger) error {
	if err := stream.Send(ack); err != nil {
		return err
	}
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			ack.Final = true
			log.Debug("page stream done", "batches", ack.Batches, "pages", ack.PagesData, "zero", ack.PagesZero,
				"gone", ack.PagesGone, "raw", ack.BytesRaw, "wire", ack.BytesWire)
			return stream.Send(ack)
		}
		if err != nil {
			return err
		}
		err = s.apply(dec, store, m, ack)
		releaseWire(m)
		if err != nil {
			log.Warn("page batch refused", "err", err)
			return err
		}
		if err := stream.Send(ack); err != nil {
			return err
		}
	}
}

// apply decodes one message of a stream and applies its batch, adding it
// to the totals of ack.
func (s *Service) apply(dec *pagestream.Decoder, store *Store, m *migrationpb.PageStreamRequest, ack *migrationpb.PageAck) error {
	pb := m.GetBatch()
	if pb == nil {
		return status.Error(codes.InvalidArgument, "page stream: a second open message")
	}
	b, err := dec.Decode(pb)
	if err != nil {
		return status.Errorf(batchCode(err), "page stream: %v", err)
	}
	defer b.Release()
	err = fault.Point(fault.TargetBatch) // test-only; nil unless armed
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
