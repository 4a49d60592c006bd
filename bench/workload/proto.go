package workload

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

// Mode is what a TCP connection exercises (see the package comment).
type Mode uint8

// The connection modes.
const (
	// ModeNormal: both ends send a message every interval and read
	// promptly.
	ModeNormal Mode = iota
	// ModeLazyServer: the server reads the connection only in bursts, so
	// the client's data waits in the server's receive queue.
	ModeLazyServer
	// ModeBulk: the server writes large messages as fast as the socket
	// takes them and the client reads slowly, so the server's send queue
	// stays full.
	ModeBulk
)

var modeNames = [...]string{ModeNormal: "normal", ModeLazyServer: "lazy-server", ModeBulk: "bulk"}

// String returns the mode's name: normal, lazy-server or bulk.
func (m Mode) String() string {
	if int(m) < len(modeNames) {
		return modeNames[m]
	}
	return fmt.Sprintf("mode(%d)", uint8(m))
}

// ParseMode parses a mode name as String returns it.
func ParseMode(s string) (Mode, error) {
	for m, name := range modeNames {
		if s == name {
			return Mode(m), nil
		}
	}
	return 0, fmt.Errorf("unknown mode %q (normal, lazy-server, bulk)", s)
}

// Errors a TCP or UDP client reports; its Err and Close errors match one
// of them with errors.Is.
var (
	// ErrSequence: a message was missing, duplicated or out of order.
	ErrSequence = errors.New("sequence violation")
	// ErrCorrupt: a message's payload or length differed from what its
	// sender derives for it, or a frame could not be parsed.
	ErrCorrupt = errors.New("corrupt data")
	// ErrClosed: the connection ended (end of file, reset, ...) before
	// the orderly close completed. The underlying error is wrapped too,
	// so errors.Is(err, syscall.ECONNRESET) tells a reset.
	ErrClosed = errors.New("connection closed early")
	// ErrCount: the two ends disagree on how many messages went across.
	ErrCount = errors.New("message count mismatch")
)

// Frame types.
const (
	frameHello    = 1
	frameData     = 2
	frameBye      = 3
	frameByeAck   = 4
	frameDatagram = 5
)

// Directions a payload is derived for.
const (
	dirUp   = 'c' // client to server
	dirDown = 's' // server to client
	dirUDP  = 'u' // UDP request (echoed as is)
)

const (
	headerLen = 16
	helloLen  = 16
	byeAckLen = 16
	// maxPayload bounds a frame so that a corrupt length cannot make a
	// reader allocate gigabytes.
	maxPayload = 1 << 20
	magic0     = 'p'
	magic1     = 'w'
)

// header is a frame's fixed part:
//
//	0  'p' 'w'  magic
//	2  u8       type
//	3  u8       0 (reserved)
//	4  u32      payload length
//	8  u64      sequence number (or count, see the package comment)
//
// all big-endian.
type header struct {
	typ byte
	len uint32
	seq uint64
}

func (h header) put(b []byte) {
	b[0], b[1], b[2], b[3] = magic0, magic1, h.typ, 0
	binary.BigEndian.PutUint32(b[4:], h.len)
	binary.BigEndian.PutUint64(b[8:], h.seq)
}

func parseHeader(b []byte) (header, error) {
	if b[0] != magic0 || b[1] != magic1 || b[3] != 0 {
		return header{}, fmt.Errorf("%w: bad frame header % x", ErrCorrupt, b[:headerLen])
	}
	h := header{typ: b[2], len: binary.BigEndian.Uint32(b[4:]), seq: binary.BigEndian.Uint64(b[8:])}
	if h.len > maxPayload {
		return header{}, fmt.Errorf("%w: frame of %d bytes (type %d, seq %d)", ErrCorrupt, h.len, h.typ, h.seq)
	}
	return h, nil
}

// frameReader reads frames from a stream, reusing its buffer: a payload
// is valid until the next call.
type frameReader struct {
	r   io.Reader
	hdr [headerLen]byte
	buf []byte
}

func (fr *frameReader) next() (header, []byte, error) {
	if _, err := io.ReadFull(fr.r, fr.hdr[:]); err != nil {
		return header{}, nil, err
	}
	h, err := parseHeader(fr.hdr[:])
	if err != nil {
		return header{}, nil, err
	}
	if cap(fr.buf) < int(h.len) {
		fr.buf = make([]byte, h.len)
	}
	p := fr.buf[:h.len]
	if _, err := io.ReadFull(fr.r, p); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return header{}, nil, err
	}
	return h, p, nil
}

// appendFrame appends a frame with payload p to b.
func appendFrame(b []byte, typ byte, seq uint64, p []byte) []byte {
	var hdr [headerLen]byte
	header{typ: typ, len: uint32(len(p)), seq: seq}.put(hdr[:])
	return append(append(b, hdr[:]...), p...)
}

// hello is the first frame of a TCP connection, from the client:
//
//	0  u64  connection id
//	8  u32  interval in microseconds (0: the default)
//	12 u8   mode
//	13 3×0  reserved
type hello struct {
	id       uint64
	interval time.Duration
	mode     Mode
}

func (h hello) frame() []byte {
	p := make([]byte, helloLen)
	binary.BigEndian.PutUint64(p, h.id)
	binary.BigEndian.PutUint32(p[8:], uint32(h.interval.Microseconds()))
	p[12] = byte(h.mode)
	return appendFrame(nil, frameHello, 0, p)
}

func parseHello(h header, p []byte) (hello, error) {
	if h.typ != frameHello || len(p) != helloLen {
		return hello{}, fmt.Errorf("%w: expected a hello frame, got type %d of %d bytes", ErrCorrupt, h.typ, len(p))
	}
	hl := hello{
		id:       binary.BigEndian.Uint64(p),
		interval: time.Duration(binary.BigEndian.Uint32(p[8:])) * time.Microsecond,
		mode:     Mode(p[12]),
	}
	if int(hl.mode) >= len(modeNames) {
		return hello{}, fmt.Errorf("%w: unknown mode %d in hello", ErrCorrupt, p[12])
	}
	return hl, nil
}

// byeAckFrame is the server's answer to a bye: how many data messages it
// received from the client and how many it sent.
func byeAckFrame(received, sent uint64) []byte {
	p := make([]byte, byeAckLen)
	binary.BigEndian.PutUint64(p, received)
	binary.BigEndian.PutUint64(p[8:], sent)
	return appendFrame(nil, frameByeAck, 0, p)
}

// mix is splitmix64's finaliser: a good 64-bit hash of x.
func mix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}

func payloadSeed(id uint64, dir byte, seq uint64) uint64 {
	return mix(mix(id^uint64(dir)<<56) ^ seq)
}

// payloadLen is the length of the payload of data message seq of
// connection id in direction dir.
func payloadLen(mode Mode, id uint64, dir byte, seq uint64) int {
	h := mix(payloadSeed(id, dir, seq))
	switch {
	case dir == dirDown && mode == ModeBulk:
		return 16<<10 + int(h%(48<<10+1)) // 16 to 64 KiB
	case dir == dirUDP:
		return 16 + int(h%241)
	default:
		return 16 + int(h%1009)
	}
}

// fillPayload fills p with the bytes of data message seq of connection id
// in direction dir.
func fillPayload(p []byte, id uint64, dir byte, seq uint64) {
	x := payloadSeed(id, dir, seq) | 1
	var w [8]byte
	for i := 0; i < len(p); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(w[:], x)
		copy(p[i:], w[:])
	}
}

// payloadGen builds and checks payloads, reusing one buffer.
type payloadGen struct{ buf []byte }

func (g *payloadGen) make(n int, id uint64, dir byte, seq uint64) []byte {
	if cap(g.buf) < n {
		g.buf = make([]byte, n)
	}
	p := g.buf[:n]
	fillPayload(p, id, dir, seq)
	return p
}

// check returns nil if p is the payload of message seq, or an ErrCorrupt
// error naming the first wrong byte.
func (g *payloadGen) check(p []byte, want int, id uint64, dir byte, seq uint64) error {
	if len(p) != want {
		return fmt.Errorf("%w: message %d has %d bytes, expected %d", ErrCorrupt, seq, len(p), want)
	}
	exp := g.make(want, id, dir, seq)
	for i := range p {
		if p[i] != exp[i] {
			return fmt.Errorf("%w: message %d differs at byte %d of %d (0x%02x, expected 0x%02x)", ErrCorrupt, seq, i, len(p), p[i], exp[i])
		}
	}
	return nil
}

// checkSeq returns nil if got is the expected sequence number, or an
// ErrSequence error saying what went wrong.
func checkSeq(got, want uint64) error {
	switch {
	case got == want:
		return nil
	case got > want:
		return fmt.Errorf("%w: got message %d, expected %d (%d missing)", ErrSequence, got, want, got-want)
	default:
		return fmt.Errorf("%w: got message %d again or out of order, expected %d", ErrSequence, got, want)
	}
}

// appendDatagram appends UDP request seq of client id to b: a header of
// type datagram, the id (u64) and the payload.
func appendDatagram(b []byte, gen *payloadGen, id, seq uint64) []byte {
	n := payloadLen(ModeNormal, id, dirUDP, seq)
	var hdr [headerLen]byte
	header{typ: frameDatagram, len: uint32(8 + n), seq: seq}.put(hdr[:])
	b = append(b, hdr[:]...)
	b = binary.BigEndian.AppendUint64(b, id)
	return append(b, gen.make(n, id, dirUDP, seq)...)
}

// checkDatagram parses and checks a datagram appendDatagram built.
func checkDatagram(p []byte, gen *payloadGen) (id, seq uint64, err error) {
	if len(p) < headerLen+8 {
		return 0, 0, fmt.Errorf("%w: datagram of %d bytes", ErrCorrupt, len(p))
	}
	h, err := parseHeader(p)
	if err != nil {
		return 0, 0, err
	}
	if h.typ != frameDatagram || int(h.len) != len(p)-headerLen {
		return 0, 0, fmt.Errorf("%w: datagram of %d bytes has type %d and length %d", ErrCorrupt, len(p), h.typ, h.len)
	}
	id = binary.BigEndian.Uint64(p[headerLen:])
	err = gen.check(p[headerLen+8:], payloadLen(ModeNormal, id, dirUDP, h.seq), id, dirUDP, h.seq)
	return id, h.seq, err
}
