package pagestream

import (
	"errors"
	"fmt"
	"hash/crc32"
	"strings"

	"github.com/phaul/phaul/protocol/migrationpb"
)

// Codec is the compression of a batch payload.
type Codec = migrationpb.Codec

// The codecs.
const (
	CodecNone = migrationpb.Codec_CODEC_NONE
	CodecS2   = migrationpb.Codec_CODEC_S2
	CodecZstd = migrationpb.Codec_CODEC_ZSTD
)

// DefaultCodec is the codec a migration uses unless told otherwise.
const DefaultCodec = CodecS2

// Codecs lists the codecs this build implements, in order of preference.
func Codecs() []Codec { return []Codec{CodecS2, CodecZstd, CodecNone} }

// ParseCodec turns a user's codec name (s2, zstd, none) into a Codec.
func ParseCodec(name string) (Codec, error) {
	switch strings.ToLower(name) {
	case "s2":
		return CodecS2, nil
	case "zstd":
		return CodecZstd, nil
	case "none":
		return CodecNone, nil
	}
	return 0, fmt.Errorf("%w: unknown codec %q (want s2, zstd or none)", ErrCodec, name)
}

// CodecName is the user's name of c (s2, zstd, none).
func CodecName(c Codec) string {
	switch c {
	case CodecS2:
		return "s2"
	case CodecZstd:
		return "zstd"
	case CodecNone:
		return "none"
	}
	return fmt.Sprintf("codec(%d)", int32(c))
}

func knownCodec(c Codec) bool { return c == CodecS2 || c == CodecZstd || c == CodecNone }

// Errors returned for bad batches. Each error from Decoder.Decode matches
// exactly one of them (errors.Is).
var (
	// ErrMalformed: the batch's structure is wrong (runs, lengths, ids).
	ErrMalformed = errors.New("malformed page batch")
	// ErrTooLarge: the batch exceeds the decoder's Limits.
	ErrTooLarge = errors.New("page batch too large")
	// ErrCodec: unknown codec, or not the stream's.
	ErrCodec = errors.New("page batch codec refused")
	// ErrSequence: the sequence number is not the next one.
	ErrSequence = errors.New("page batch out of sequence")
	// ErrCorrupt: the payload does not decompress to the declared length
	// or its checksum does not match.
	ErrCorrupt = errors.New("corrupt page batch")
)

// castagnoli is the CRC-32C table (hardware accelerated on amd64/arm64).
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Checksum returns the CRC-32C of b, as batches carry it.
func Checksum(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// Kind says what a run of pages holds.
type Kind uint8

// Page kinds.
const (
	// Data pages travel in the batch's payload.
	Data Kind = iota
	// Zero pages are all zero; the target keeps them as holes.
	Zero
	// Gone pages are no longer the process's (unmapped or dropped since
	// an earlier round); the target forgets them.
	Gone
)

func (k Kind) String() string {
	switch k {
	case Data:
		return "data"
	case Zero:
		return "zero"
	case Gone:
		return "gone"
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// Run is Pages pages of one kind starting at Addr.
type Run struct {
	Addr  uint64
	Pages uint64
	Kind  Kind
}

// Batch is a verified, decompressed page batch.
type Batch struct {
	Seq   uint64
	Pid   int32
	Round uint32
	// Runs in increasing address order, not overlapping.
	Runs []Run
	// Data holds the pages of the data runs, in run order. It is valid
	// until Release: it belongs to the decoder's pool or, for an
	// uncompressed batch, is the message's payload (do not change the
	// message before).
	Data []byte
	// Codec and WireBytes describe the payload as received.
	Codec     Codec
	WireBytes int

	pageSize  int
	dataPages uint64
	payload   []byte  // still compressed: Data is to come (Inflate)
	buf       *[]byte // pooled backing of Data
}

// PageSize is the page size the batch was decoded with.
func (b *Batch) PageSize() int { return b.pageSize }

// DataPages and ZeroPages count the batch's pages of each kind.
func (b *Batch) DataPages() uint64 { return b.dataPages }

// ZeroPages counts the batch's zero pages.
func (b *Batch) ZeroPages() uint64 { return b.count(Zero) }

// GonePages counts the batch's gone pages.
func (b *Batch) GonePages() uint64 { return b.count(Gone) }

func (b *Batch) count(k Kind) uint64 {
	var n uint64
	for _, r := range b.Runs {
		if r.Kind == k {
			n += r.Pages
		}
	}
	return n
}

// Each calls fn for every run in order, with the run's pages for a data
// run and nil for the others. It stops at the first error and returns it.
func (b *Batch) Each(fn func(r Run, data []byte) error) error {
	off := 0
	for _, r := range b.Runs {
		var data []byte
		if r.Kind == Data {
			n := int(r.Pages) * b.pageSize
			data = b.Data[off : off+n : off+n]
			off += n
		}
		if err := fn(r, data); err != nil {
			return err
		}
	}
	return nil
}

// Release returns the batch's buffer to the pool; Data is invalid after.
// Release is idempotent.
func (b *Batch) Release() {
	if b.buf != nil {
		putBuffer(b.buf)
		b.buf = nil
	}
	b.Data, b.payload = nil, nil
}
