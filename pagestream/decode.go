package pagestream

import (
	"errors"
	"fmt"
	"runtime"
	"sync"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"

	"github.com/phaul/phaul/protocol/migrationpb"
)

// Limits bound what a Decoder accepts in one batch.
type Limits struct {
	// PageSize of both hosts (the Hello made sure they agree).
	PageSize int
	// MaxRawBytes bounds the uncompressed payload (data pages × page size).
	MaxRawBytes int
	// MaxRuns bounds the number of runs.
	MaxRuns int
	// MaxPages bounds the pages of all runs, data and zero, since even
	// zero pages cost the store some bookkeeping.
	MaxPages uint64
	// MaxAddr is the end of the user address space: no run may reach past
	// it.
	MaxAddr uint64
}

// Default limits: room for 16 MiB of data per batch (the sender's default
// is 1 MiB) and 4 GiB of pages in all.
const (
	DefaultMaxRawBytes = 16 << 20
	DefaultMaxRuns     = 1 << 16
	DefaultMaxPages    = 1 << 20
	// DefaultMaxAddr is the x86-64 user address space with 5-level paging.
	DefaultMaxAddr = 1 << 56

	// hardMaxRawBytes caps MaxRawBytes whatever the configuration: it is
	// also the largest buffer the pool keeps.
	hardMaxRawBytes = 1 << maxClassShift
)

// DefaultLimits returns the limits a target uses unless configured.
func DefaultLimits() Limits {
	return Limits{
		PageSize:    4096,
		MaxRawBytes: DefaultMaxRawBytes,
		MaxRuns:     DefaultMaxRuns,
		MaxPages:    DefaultMaxPages,
		MaxAddr:     DefaultMaxAddr,
	}
}

// Validate reports a limit that makes no sense.
func (l Limits) Validate() error {
	switch {
	case l.PageSize < 512 || l.PageSize&(l.PageSize-1) != 0:
		return fmt.Errorf("page stream limits: page size %d is not a power of two >= 512", l.PageSize)
	case l.MaxRawBytes < l.PageSize || l.MaxRawBytes > hardMaxRawBytes:
		return fmt.Errorf("page stream limits: max raw bytes %d outside [page size, %d]", l.MaxRawBytes, hardMaxRawBytes)
	case l.MaxRuns < 1:
		return fmt.Errorf("page stream limits: max runs %d < 1", l.MaxRuns)
	case l.MaxPages < 1:
		return fmt.Errorf("page stream limits: max pages %d < 1", l.MaxPages)
	case l.MaxAddr == 0 || l.MaxAddr%uint64(l.PageSize) != 0:
		return fmt.Errorf("page stream limits: max address %#x is not a non-zero page multiple", l.MaxAddr)
	}
	return nil
}

// Decoder verifies and decompresses the batches of one stream, in order.
// It is not safe for concurrent use.
type Decoder struct {
	lim   Limits
	codec Codec
	next  uint64 // expected sequence number
}

// NewDecoder returns a decoder for a stream opened with codec. Batches may
// use codec or CodecNone.
func NewDecoder(codec Codec, lim Limits) (*Decoder, error) {
	if err := lim.Validate(); err != nil {
		return nil, err
	}
	if !knownCodec(codec) {
		return nil, fmt.Errorf("%w: stream codec %s is not implemented", ErrCodec, CodecName(codec))
	}
	return &Decoder{lim: lim, codec: codec, next: 1}, nil
}

// Next is the sequence number the next batch must carry.
func (d *Decoder) Next() uint64 { return d.next }

// Decode checks m and returns its pages. On error nothing is returned and
// the decoder's sequence does not advance; the error says which check
// failed and matches one of ErrMalformed, ErrTooLarge, ErrCodec,
// ErrSequence and ErrCorrupt. The caller releases the batch.
func (d *Decoder) Decode(m *migrationpb.PageBatch) (*Batch, error) {
	b, err := d.check(m)
	if err == nil {
		err = b.Inflate()
	}
	if err != nil {
		return nil, err
	}
	d.next++
	return b, nil
}

// Accept is Decode without the decompression, for a receiver that
// decompresses on other goroutines: it checks everything else about m
// (the payload's checksum included) and takes its sequence number. The
// batch it returns has no Data until Inflate succeeds; an Inflate that
// fails leaves the stream broken, since the sequence has moved on. The
// caller releases the batch.
func (d *Decoder) Accept(m *migrationpb.PageBatch) (*Batch, error) {
	b, err := d.check(m)
	if err != nil {
		return nil, err
	}
	d.next++
	return b, nil
}

// check checks everything about m but the decompression.
func (d *Decoder) check(m *migrationpb.PageBatch) (*Batch, error) {
	if m.GetSeq() != d.next {
		return nil, fmt.Errorf("%w: batch %d, expected %d", ErrSequence, m.GetSeq(), d.next)
	}
	b, err := checkBatch(m, d.codec, d.lim)
	if err != nil {
		return nil, fmt.Errorf("batch %d: %w", m.GetSeq(), err)
	}
	return b, nil
}

// checkBatch checks everything about m except its sequence number and
// the decompression of its payload.
func checkBatch(m *migrationpb.PageBatch, streamCodec Codec, lim Limits) (*Batch, error) {
	if m.GetPid() <= 0 {
		return nil, fmt.Errorf("%w: pid %d", ErrMalformed, m.GetPid())
	}
	codec := m.GetCodec()
	if !knownCodec(codec) {
		return nil, fmt.Errorf("%w: unknown codec %d", ErrCodec, int32(codec))
	}
	if codec != streamCodec && codec != CodecNone {
		return nil, fmt.Errorf("%w: codec %s on a stream opened with %s", ErrCodec, CodecName(codec), CodecName(streamCodec))
	}
	runs, dataPages, err := checkRuns(m.GetRuns(), lim)
	if err != nil {
		return nil, err
	}
	ps := uint64(lim.PageSize)
	if dataPages > uint64(lim.MaxRawBytes)/ps {
		return nil, fmt.Errorf("%w: %d data pages, at most %d", ErrTooLarge, dataPages, uint64(lim.MaxRawBytes)/ps)
	}
	raw := int(dataPages * ps)
	if m.GetRawSize() != uint64(raw) {
		return nil, fmt.Errorf("%w: raw size %d, the runs hold %d data pages (%d bytes)", ErrMalformed, m.GetRawSize(), dataPages, raw)
	}
	payload := m.GetPayload()
	if limit := maxEncodedLen(codec, raw); len(payload) > limit {
		return nil, fmt.Errorf("%w: %s payload of %d bytes for %d raw bytes (at most %d)", ErrMalformed, CodecName(codec), len(payload), raw, limit)
	}

	b := &Batch{
		Seq:       m.GetSeq(),
		Pid:       m.GetPid(),
		Round:     m.GetRound(),
		Runs:      runs,
		Codec:     codec,
		WireBytes: len(payload),
		pageSize:  lim.PageSize,
		dataPages: dataPages,
	}
	if raw == 0 {
		if len(payload) != 0 || m.GetCrc32C() != 0 {
			return nil, fmt.Errorf("%w: payload or checksum without data pages", ErrMalformed)
		}
		return b, nil
	}
	if codec == CodecNone && len(payload) != raw {
		return nil, fmt.Errorf("%w: %d payload bytes, declared %d", ErrCorrupt, len(payload), raw)
	}
	// The checksum covers the payload as sent: a batch damaged on the
	// way is refused before it reaches the decompressor, and checking
	// the compressed bytes costs a fraction of checking the pages.
	if sum := Checksum(payload); sum != m.GetCrc32C() {
		return nil, fmt.Errorf("%w: checksum %#08x, the batch says %#08x", ErrCorrupt, sum, m.GetCrc32C())
	}
	b.payload = payload
	return b, nil
}

// Inflate decompresses the payload of a batch that Decoder.Accept
// returned into Data; it does nothing for a batch that has its Data. It
// may run on any goroutine, one call per batch at a time. An error
// matches ErrCorrupt (or ErrCodec) and leaves the batch without Data.
func (b *Batch) Inflate() error {
	payload := b.payload
	if payload == nil {
		return nil
	}
	b.payload = nil
	raw := int(b.dataPages) * b.pageSize
	if b.Codec == CodecNone {
		// Uncompressed pages are used where they are, in the message.
		b.Data = payload[:raw:raw]
		return nil
	}
	b.buf = getBuffer(raw)
	data, err := decompress(b.Codec, (*b.buf)[:raw:raw], payload)
	if err != nil {
		b.Release()
		return fmt.Errorf("batch %d: %w", b.Seq, err)
	}
	b.Data = data
	return nil
}

// checkRuns converts and validates the runs: known kinds, page aligned,
// inside the address space, increasing and not overlapping, within the
// limits. It returns the runs and the number of data pages.
func checkRuns(in []*migrationpb.PageRun, lim Limits) ([]Run, uint64, error) {
	if len(in) == 0 {
		return nil, 0, fmt.Errorf("%w: no runs", ErrMalformed)
	}
	if len(in) > lim.MaxRuns {
		return nil, 0, fmt.Errorf("%w: %d runs, at most %d", ErrTooLarge, len(in), lim.MaxRuns)
	}
	ps := uint64(lim.PageSize)
	runs := make([]Run, len(in))
	var end, pages, data uint64
	for i, r := range in {
		addr, n := r.GetAddr(), r.GetNrPages()
		kind, ok := kindOf(r.GetKind())
		switch {
		case !ok:
			return nil, 0, fmt.Errorf("%w: run %d: unknown kind %d", ErrMalformed, i, int32(r.GetKind()))
		case n == 0:
			return nil, 0, fmt.Errorf("%w: run %d at %#x: no pages", ErrMalformed, i, addr)
		case addr%ps != 0:
			return nil, 0, fmt.Errorf("%w: run %d: address %#x not page aligned", ErrMalformed, i, addr)
		case addr >= lim.MaxAddr || n > (lim.MaxAddr-addr)/ps:
			return nil, 0, fmt.Errorf("%w: run %d: %d pages at %#x reach past %#x", ErrMalformed, i, n, addr, lim.MaxAddr)
		case i > 0 && addr < end:
			return nil, 0, fmt.Errorf("%w: run %d at %#x overlaps or precedes the run ending at %#x", ErrMalformed, i, addr, end)
		case n > lim.MaxPages-pages:
			return nil, 0, fmt.Errorf("%w: more than %d pages", ErrTooLarge, lim.MaxPages)
		}
		end = addr + n*ps
		pages += n
		if kind == Data {
			data += n
		}
		runs[i] = Run{Addr: addr, Pages: n, Kind: kind}
	}
	return runs, data, nil
}

// kindOf maps a wire page kind to a Kind.
func kindOf(k migrationpb.PageKind) (Kind, bool) {
	switch k {
	case migrationpb.PageKind_PAGE_KIND_DATA:
		return Data, true
	case migrationpb.PageKind_PAGE_KIND_ZERO:
		return Zero, true
	case migrationpb.PageKind_PAGE_KIND_GONE:
		return Gone, true
	}
	return 0, false
}

// maxEncodedLen is the largest payload a correct encoder produces for raw
// bytes with codec.
func maxEncodedLen(codec Codec, raw int) int {
	switch codec {
	case CodecS2:
		if n := s2.MaxEncodedLen(raw); n > 0 {
			return n
		}
		return 0
	case CodecZstd:
		// ZSTD_compressBound plus room for the frame header and the
		// block headers of stored blocks.
		return raw + raw>>7 + 1024
	}
	return raw
}

// decompress decodes a compressed payload into dst, which has exactly the
// declared raw length; anything decoding to another length is corrupt.
func decompress(codec Codec, dst, payload []byte) ([]byte, error) {
	switch codec {
	case CodecS2:
		n, err := s2.DecodedLen(payload)
		if err != nil {
			return nil, fmt.Errorf("%w: block header: %v", ErrCorrupt, err)
		}
		if n != len(dst) {
			return nil, fmt.Errorf("%w: s2 block decodes to %d bytes, declared %d", ErrCorrupt, n, len(dst))
		}
		out, err := s2.Decode(dst, payload)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrCorrupt, err) // s2 says "s2: ..."
		}
		if len(out) != len(dst) || &out[0] != &dst[0] {
			return nil, fmt.Errorf("%w: s2 block decoded to %d bytes, declared %d", ErrCorrupt, len(out), len(dst))
		}
		return out, nil
	case CodecZstd:
		var h zstd.Header
		if err := h.Decode(payload); err != nil {
			return nil, fmt.Errorf("%w: zstd header: %v", ErrCorrupt, err)
		}
		if h.Skippable || !h.HasFCS || h.FrameContentSize != uint64(len(dst)) {
			return nil, fmt.Errorf("%w: zstd frame declares %d bytes (known %v), batch declares %d", ErrCorrupt, h.FrameContentSize, h.HasFCS, len(dst))
		}
		zd, err := zstdDecoder()
		if err != nil {
			return nil, err
		}
		// The decoder is limited to the capacity of dst: a frame
		// decoding to more is refused, not allocated.
		out, err := zd.DecodeAll(payload, dst[:0])
		if err != nil {
			return nil, fmt.Errorf("%w: zstd: %v", ErrCorrupt, err)
		}
		if len(out) != len(dst) {
			return nil, fmt.Errorf("%w: zstd frame decoded to %d bytes, declared %d", ErrCorrupt, len(out), len(dst))
		}
		return out, nil
	}
	return nil, fmt.Errorf("%w: unknown codec %d", ErrCodec, int32(codec))
}

// zstdDecoder is one decoder for the process; DecodeAll is safe for
// concurrent use.
var zstdDecoder = sync.OnceValues(func() (*zstd.Decoder, error) {
	d, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(runtime.GOMAXPROCS(0)),
		zstd.WithDecodeAllCapLimit(true),
		zstd.WithDecoderMaxMemory(hardMaxRawBytes),
		zstd.WithDecoderMaxWindow(hardMaxRawBytes),
	)
	if err != nil {
		return nil, fmt.Errorf("zstd decoder: %w", err)
	}
	return d, nil
})

// errorKinds lists the sentinels in the order ErrorKind tests them.
var errorKinds = []error{ErrSequence, ErrCodec, ErrTooLarge, ErrCorrupt, ErrMalformed}

// ErrorKind returns the sentinel err matches, or nil.
func ErrorKind(err error) error {
	for _, k := range errorKinds {
		if errors.Is(err, k) {
			return k
		}
	}
	return nil
}
