package pagestream

import (
	"fmt"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"

	"github.com/phaul/phaul/protocol/migrationpb"
)

// Encoder compresses batch payloads with one codec. It is safe for
// concurrent use.
type Encoder struct {
	codec Codec
	zstd  *zstd.Encoder
}

// NewEncoder returns an encoder for codec; concurrency is the number of
// goroutines that will call Encode at once (it sizes zstd's state).
func NewEncoder(codec Codec, concurrency int) (*Encoder, error) {
	e := &Encoder{codec: codec}
	switch codec {
	case CodecNone, CodecS2:
	case CodecZstd:
		z, err := zstd.NewWriter(nil,
			zstd.WithEncoderLevel(zstd.SpeedFastest),
			zstd.WithEncoderConcurrency(max(1, concurrency)),
			zstd.WithEncoderCRC(false), // the batch has its own checksum
			zstd.WithZeroFrames(true),
		)
		if err != nil {
			return nil, fmt.Errorf("zstd encoder: %w", err)
		}
		e.zstd = z
	default:
		return nil, fmt.Errorf("%w: codec %s is not implemented", ErrCodec, CodecName(codec))
	}
	return e, nil
}

// Codec is the encoder's codec.
func (e *Encoder) Codec() Codec { return e.codec }

// Encode compresses raw into dst (reused when large enough) and returns the
// payload and its codec. When compression does not shrink raw, the payload
// is raw itself and the codec CodecNone.
func (e *Encoder) Encode(dst, raw []byte) ([]byte, Codec) {
	var out []byte
	switch e.codec {
	case CodecS2:
		if n := s2.MaxEncodedLen(len(raw)); n > 0 && cap(dst) < n {
			dst = make([]byte, n)
		}
		out = s2.Encode(dst[:cap(dst)], raw)
	case CodecZstd:
		out = e.zstd.EncodeAll(raw, dst[:0])
	default:
		return raw, CodecNone
	}
	if len(out) >= len(raw) {
		return raw, CodecNone
	}
	return out, e.codec
}

// Close releases the encoder's state.
func (e *Encoder) Close() error {
	if e.zstd != nil {
		return e.zstd.Close()
	}
	return nil
}

// BuildBatch makes the wire form of a batch: runs in increasing address
// order and data holding the pages of the data runs, in order. It does not
// look for zero pages (Sender does). The payload may share dst's memory.
func BuildBatch(enc *Encoder, dst []byte, seq uint64, pid int32, round uint32, runs []Run, data []byte) *migrationpb.PageBatch {
	m := &migrationpb.PageBatch{
		Seq:     seq,
		Pid:     pid,
		Round:   round,
		Runs:    make([]*migrationpb.PageRun, len(runs)),
		RawSize: uint64(len(data)),
	}
	for i, r := range runs {
		m.Runs[i] = pbRun(r)
	}
	if len(data) > 0 {
		m.Payload, m.Codec = enc.Encode(dst, data)
		m.Crc32C = Checksum(m.Payload)
	} else {
		m.Codec = CodecNone
	}
	return m
}

func pbRun(r Run) *migrationpb.PageRun {
	return &migrationpb.PageRun{Addr: r.Addr, NrPages: r.Pages, Kind: pbKind(r.Kind)}
}

// pbKind maps a Kind to its wire value.
func pbKind(k Kind) migrationpb.PageKind {
	switch k {
	case Data:
		return migrationpb.PageKind_PAGE_KIND_DATA
	case Zero:
		return migrationpb.PageKind_PAGE_KIND_ZERO
	case Gone:
		return migrationpb.PageKind_PAGE_KIND_GONE
	}
	return migrationpb.PageKind_PAGE_KIND_UNSPECIFIED
}
