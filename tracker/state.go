package tracker

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"

	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/protocol/imagepb"
)

// StateFile is the name of the tracker state in a pre-dump directory.
const StateFile = "tracker.img"

// The state file is one framed imagepb.TrackerState:
//
//	offset size
//	     0    8  magic "PHAULTRK"
//	     8    2  version (stateVersion)
//	    10    6  reserved: 0
//	    16    8  payload length N (at most maxStateSize)
//	    24    4  CRC-32C of the payload
//	    28    4  CRC-32C of bytes 0..27
//	    32    N  payload: protobuf encoding of the TrackerState
const (
	stateVersion    = 1
	stateHeaderSize = 32
	// maxStateSize bounds the payload: 8 bytes of digest per page of up to
	// 128 GiB of memory.
	maxStateSize = 512 << 20
)

var stateMagic = []byte("PHAULTRK")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrNoState reports a directory without tracker state. It matches
// fs.ErrNotExist.
var ErrNoState = fmt.Errorf("no tracker state: %w", fs.ErrNotExist)

// ErrBadState reports a tracker state file that is damaged or of another
// version.
var ErrBadState = errors.New("bad tracker state")

// writeState writes st to dir/StateFile atomically.
func writeState(dir string, st *imagepb.TrackerState) error {
	path := filepath.Join(dir, StateFile)
	payload, err := proto.Marshal(st)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	hdr := make([]byte, stateHeaderSize)
	le := binary.LittleEndian
	copy(hdr, stateMagic)
	le.PutUint16(hdr[8:], stateVersion)
	le.PutUint64(hdr[16:], uint64(len(payload)))
	le.PutUint32(hdr[24:], crc32.Checksum(payload, castagnoli))
	le.PutUint32(hdr[28:], crc32.Checksum(hdr[:28], castagnoli))

	f, err := os.CreateTemp(dir, "."+StateFile+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	_, err = f.Write(append(hdr, payload...))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// ReadState reads the tracker state of the pre-dump directory dir. A
// directory without one gives an error matching ErrNoState.
func ReadState(dir string) (*imagepb.TrackerState, error) {
	path := filepath.Join(dir, StateFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", dir, ErrNoState)
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	st, err := decodeState(b)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return st, nil
}

func decodeState(b []byte) (*imagepb.TrackerState, error) {
	le := binary.LittleEndian
	switch {
	case len(b) < stateHeaderSize:
		return nil, fmt.Errorf("%w: %d bytes, shorter than the header", ErrBadState, len(b))
	case !bytes.Equal(b[:8], stateMagic):
		return nil, fmt.Errorf("%w: magic %q", ErrBadState, b[:8])
	case le.Uint16(b[8:]) != stateVersion:
		return nil, fmt.Errorf("%w: version %d, want %d", ErrBadState, le.Uint16(b[8:]), stateVersion)
	case crc32.Checksum(b[:28], castagnoli) != le.Uint32(b[28:]):
		return nil, fmt.Errorf("%w: header checksum", ErrBadState)
	}
	n := le.Uint64(b[16:])
	if n > maxStateSize || n != uint64(len(b)-stateHeaderSize) {
		return nil, fmt.Errorf("%w: payload of %d bytes, file holds %d", ErrBadState, n, len(b)-stateHeaderSize)
	}
	payload := b[stateHeaderSize:]
	if crc32.Checksum(payload, castagnoli) != le.Uint32(b[24:]) {
		return nil, fmt.Errorf("%w: payload checksum", ErrBadState)
	}
	st := new(imagepb.TrackerState)
	if err := proto.Unmarshal(payload, st); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadState, err)
	}
	return st, nil
}
