package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"google.golang.org/protobuf/proto"
)

// Errors returned (wrapped, with the file and the cause) by readers; test
// for them with errors.Is.
var (
	// ErrBadMagic: the file does not start with the magic of its format.
	ErrBadMagic = errors.New("bad magic")
	// ErrVersion: the file is of a format version (or uses flags) this
	// phaul does not read.
	ErrVersion = errors.New("unsupported format version")
	// ErrChecksum: a CRC-32C does not match the bytes it covers.
	ErrChecksum = errors.New("checksum mismatch")
	// ErrTruncated: the file ends before the data its header announces.
	ErrTruncated = errors.New("truncated")
	// ErrKind: the file holds another kind of message than the one asked for.
	ErrKind = errors.New("wrong file kind")
	// ErrCorrupt: the content is well framed but does not make sense.
	ErrCorrupt = errors.New("corrupt image")
)

// Version is the format version written in every header and in
// Inventory.FormatVersion. Readers accept only this version.
const Version = 1

const (
	// HeaderSize is the size of the header of a framed message file.
	HeaderSize = 32
	// MaxPayloadSize bounds the payload of a framed message file, so that a
	// corrupt length cannot make a reader allocate gigabytes.
	MaxPayloadSize = 256 << 20
)

// Kind identifies the message a framed file holds.
type Kind uint16

// The kinds of framed files.
const (
	KindInventory Kind = 1 // inventory.img: imagepb.Inventory
	KindFiles     Kind = 2 // files.img: imagepb.FileTable
	KindProcess   Kind = 3 // process-PID.img: imagepb.Process
	KindPageMap   Kind = 4 // pagemap-PID.img: imagepb.PageMap
)

func (k Kind) String() string {
	switch k {
	case KindInventory:
		return "inventory"
	case KindFiles:
		return "files"
	case KindProcess:
		return "process"
	case KindPageMap:
		return "pagemap"
	}
	return fmt.Sprintf("kind(%d)", uint16(k))
}

var (
	frameMagic = []byte("PHAULIMG")
	castagnoli = crc32.MakeTable(crc32.Castagnoli)
)

// header is the decoded fixed header of a framed file.
type header struct {
	kind       Kind
	length     uint64
	payloadCRC uint32
}

func corruptf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// parseHeader checks the header at the start of b, which holds the first
// bytes of a file (fewer than HeaderSize when the file is that short). It
// checks everything the header alone can tell, not the payload.
func parseHeader(b []byte) (header, error) {
	n := min(len(b), len(frameMagic))
	if !bytes.Equal(b[:n], frameMagic[:n]) {
		return header{}, fmt.Errorf("%w: file starts with %q, want %q", ErrBadMagic, b[:n], frameMagic)
	}
	if len(b) < HeaderSize {
		return header{}, fmt.Errorf("%w: %d bytes, the header alone is %d", ErrTruncated, len(b), HeaderSize)
	}
	le := binary.LittleEndian
	// The version comes before the header checksum: a future version may lay
	// out the rest of its header differently.
	if v := le.Uint16(b[8:]); v != Version {
		return header{}, fmt.Errorf("%w: version %d, this phaul reads version %d", ErrVersion, v, Version)
	}
	if got, want := crc32.Checksum(b[:28], castagnoli), le.Uint32(b[28:]); got != want {
		return header{}, fmt.Errorf("%w: header CRC-32C is %#08x, header says %#08x", ErrChecksum, got, want)
	}
	h := header{
		kind:       Kind(le.Uint16(b[10:])),
		length:     le.Uint64(b[16:]),
		payloadCRC: le.Uint32(b[24:]),
	}
	if h.kind < KindInventory || h.kind > KindPageMap {
		return header{}, fmt.Errorf("%w: unknown kind %d", ErrKind, uint16(h.kind))
	}
	if flags := le.Uint32(b[12:]); flags != 0 {
		return header{}, fmt.Errorf("%w: unknown flags %#x", ErrVersion, flags)
	}
	if h.length > MaxPayloadSize {
		return header{}, corruptf("payload length %d exceeds the limit of %d", h.length, MaxPayloadSize)
	}
	return h, nil
}

// checkPayload checks payload against header h.
func checkPayload(h header, payload []byte) error {
	if got := crc32.Checksum(payload, castagnoli); got != h.payloadCRC {
		return fmt.Errorf("%w: payload CRC-32C is %#08x, header says %#08x", ErrChecksum, got, h.payloadCRC)
	}
	return nil
}

// EncodeFrame returns a framed file holding payload as a message of kind k.
func EncodeFrame(k Kind, payload []byte) []byte {
	b := make([]byte, HeaderSize+len(payload))
	le := binary.LittleEndian
	copy(b, frameMagic)
	le.PutUint16(b[8:], Version)
	le.PutUint16(b[10:], uint16(k))
	le.PutUint64(b[16:], uint64(len(payload)))
	le.PutUint32(b[24:], crc32.Checksum(payload, castagnoli))
	le.PutUint32(b[28:], crc32.Checksum(b[:28], castagnoli))
	copy(b[HeaderSize:], payload)
	return b
}

// DecodeFrame checks the framing of a whole file's bytes and returns its
// kind and payload (a sub-slice of data). It does not decode the payload.
func DecodeFrame(data []byte) (Kind, []byte, error) {
	h, err := parseHeader(data)
	if err != nil {
		return 0, nil, err
	}
	rest := uint64(len(data) - HeaderSize)
	if rest < h.length {
		return 0, nil, fmt.Errorf("%w: payload is %d bytes, header says %d", ErrTruncated, rest, h.length)
	}
	if rest > h.length {
		return 0, nil, corruptf("%d bytes after the payload", rest-h.length)
	}
	payload := data[HeaderSize:]
	if err := checkPayload(h, payload); err != nil {
		return 0, nil, err
	}
	return h.kind, payload, nil
}

func unmarshalPayload(k, want Kind, payload []byte, m proto.Message) error {
	if k != want {
		return fmt.Errorf("%w: file holds %v, want %v", ErrKind, k, want)
	}
	if err := proto.Unmarshal(payload, m); err != nil {
		return corruptf("decode %v: %v", k, err)
	}
	return nil
}

// bare strips the *fs.PathError from err: callers wrap errors with the
// path themselves, and naming it twice helps nobody.
func bare(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// readFrame reads the framed file at path: header first, then exactly the
// payload it announces, so a corrupt file never costs more memory than
// MaxPayloadSize. Errors are not wrapped with the path.
func readFrame(path string) (Kind, []byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, nil, bare(err)
	}
	defer f.Close()
	var hb [HeaderSize]byte
	n, err := io.ReadFull(f, hb[:])
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return 0, nil, err
	}
	h, err := parseHeader(hb[:n])
	if err != nil {
		return 0, nil, err
	}
	// Refuse a short regular file before allocating for its payload.
	if st, err := f.Stat(); err == nil && st.Mode().IsRegular() && uint64(st.Size()) < HeaderSize+h.length {
		return 0, nil, fmt.Errorf("%w: payload is %d bytes, header says %d", ErrTruncated, st.Size()-HeaderSize, h.length)
	}
	payload := make([]byte, h.length)
	n, err = io.ReadFull(f, payload)
	if err == io.ErrUnexpectedEOF || err == io.EOF {
		return 0, nil, fmt.Errorf("%w: payload is %d bytes, header says %d", ErrTruncated, n, h.length)
	}
	if err != nil {
		return 0, nil, err
	}
	var one [1]byte
	if n, _ := f.Read(one[:]); n > 0 {
		return 0, nil, corruptf("bytes after the payload")
	}
	if err := checkPayload(h, payload); err != nil {
		return 0, nil, err
	}
	return h.kind, payload, nil
}

// readMessage reads the framed file at path into m, which must be of kind
// want. Errors are not wrapped with the path.
func readMessage(path string, want Kind, m proto.Message) error {
	k, payload, err := readFrame(path)
	if err != nil {
		return err
	}
	return unmarshalPayload(k, want, payload, m)
}

// marshalFrame encodes m as a framed file of kind k.
func marshalFrame(k Kind, m proto.Message) ([]byte, error) {
	payload, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return nil, err
	}
	if len(payload) > MaxPayloadSize {
		return nil, fmt.Errorf("%v message is %d bytes, more than the limit of %d", k, len(payload), MaxPayloadSize)
	}
	return EncodeFrame(k, payload), nil
}

// writeAtomic creates path with the bytes write puts in a temporary file of
// the same directory, then renames it into place. With sync, the file is
// fsynced before the rename and the directory after it. Errors are not
// wrapped with the path.
func writeAtomic(path string, sync bool, write func(f *os.File) error) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return bare(err)
	}
	tmp := f.Name()
	err = write(f)
	if err == nil && sync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if sync {
		return syncDir(filepath.Dir(path))
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
