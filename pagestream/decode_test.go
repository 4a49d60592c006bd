package pagestream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"runtime"
	"strings"
	"testing"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/protocol/migrationpb"
)

const ps = 4096

// pages returns n pages that compress somewhat.
func pages(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 2))
	b := make([]byte, n*ps)
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], uint64(r.IntN(1000)))
	}
	return b
}

func encoder(t testing.TB, c Codec) *Encoder {
	t.Helper()
	e, err := NewEncoder(c, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// validBatch is a batch of 3 data pages, 2 zero pages and 1 data page.
func validBatch(t testing.TB, c Codec, seq uint64) (*migrationpb.PageBatch, []byte) {
	data := pages(seq, 4)
	runs := []Run{
		{Addr: 0x400000, Pages: 3},
		{Addr: 0x403000, Pages: 2, Kind: Zero},
		{Addr: 0x500000, Pages: 1},
	}
	return BuildBatch(encoder(t, c), nil, seq, 7, 1, runs, data), data
}

func TestRoundTrip(t *testing.T) {
	for _, c := range Codecs() {
		t.Run(CodecName(c), func(t *testing.T) {
			d, err := NewDecoder(c, DefaultLimits())
			if err != nil {
				t.Fatal(err)
			}
			for seq := uint64(1); seq <= 3; seq++ {
				m, data := validBatch(t, c, seq)
				if m.Codec != c {
					t.Fatalf("encoded with %s, want %s", CodecName(m.Codec), CodecName(c))
				}
				b, err := d.Decode(m)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(b.Data, data) {
					t.Fatal("data differs")
				}
				if b.DataPages() != 4 || b.ZeroPages() != 2 || b.Pid != 7 || b.Round != 1 || b.Seq != seq {
					t.Fatalf("batch %+v", b)
				}
				var got []uint64
				b.Each(func(r Run, data []byte) error {
					got = append(got, r.Addr, uint64(len(data)))
					return nil
				})
				want := []uint64{0x400000, 3 * ps, 0x403000, 0, 0x500000, ps}
				if !slicesEqual(got, want) {
					t.Fatalf("runs %x, want %x", got, want)
				}
				b.Release()
				b.Release()
			}
		})
	}
}

func slicesEqual(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestIncompressibleFallsBackToNone: random pages go out uncompressed and
// a stream of any codec accepts that.
func TestIncompressibleFallsBackToNone(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 1))
	data := make([]byte, 4*ps)
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	for _, c := range []Codec{CodecS2, CodecZstd} {
		m := BuildBatch(encoder(t, c), nil, 1, 1, 0, []Run{{Addr: 0, Pages: 4}}, data)
		if m.Codec != CodecNone {
			t.Errorf("%s: random data sent as %s", CodecName(c), CodecName(m.Codec))
		}
		d, _ := NewDecoder(c, DefaultLimits())
		b, err := d.Decode(m)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b.Data, data) {
			t.Fatal("data differs")
		}
		b.Release()
	}
}

// TestHostile feeds one bad batch per check and expects its error kind.
func TestHostile(t *testing.T) {
	type tc struct {
		name   string
		stream Codec
		mutate func(m *migrationpb.PageBatch)
		kind   error
		text   string
	}
	s2Bomb := func(m *migrationpb.PageBatch) {
		// An S2 block whose header claims 1 GiB.
		var hdr [binary.MaxVarintLen64]byte
		n := binary.PutUvarint(hdr[:], 1<<30)
		m.Payload = append(hdr[:n], 0, 0, 0, 0)
	}
	zstdBomb := func(m *migrationpb.PageBatch) {
		// 64 MiB of zeros in a few KiB, declared as the batch's 16 KiB.
		enc, _ := zstd.NewWriter(nil)
		defer enc.Close()
		m.Payload = enc.EncodeAll(make([]byte, 64<<20), nil)
	}
	zstdNoSize := func(m *migrationpb.PageBatch) {
		// A streamed frame of several blocks has no content size.
		var buf bytes.Buffer
		enc, _ := zstd.NewWriter(&buf)
		enc.Write(make([]byte, 1<<20))
		enc.Close()
		m.Payload = buf.Bytes()
	}
	cases := []tc{
		{"sequence gap", CodecS2, func(m *migrationpb.PageBatch) { m.Seq = 2 }, ErrSequence, "expected 1"},
		{"sequence replay", CodecS2, func(m *migrationpb.PageBatch) { m.Seq = 0 }, ErrSequence, "batch 0"},
		{"pid zero", CodecS2, func(m *migrationpb.PageBatch) { m.Pid = 0 }, ErrMalformed, "pid 0"},
		{"unknown codec", CodecS2, func(m *migrationpb.PageBatch) { m.Codec = 9 }, ErrCodec, "unknown codec 9"},
		{"unspecified codec", CodecS2, func(m *migrationpb.PageBatch) { m.Codec = 0 }, ErrCodec, "unknown codec 0"},
		{"other codec than the stream's", CodecZstd, nil, ErrCodec, "codec s2 on a stream opened with zstd"},
		{"no runs", CodecS2, func(m *migrationpb.PageBatch) { m.Runs = nil }, ErrMalformed, "no runs"},
		{"unknown kind", CodecS2, func(m *migrationpb.PageBatch) { m.Runs[1].Kind = 7 }, ErrMalformed, "unknown kind"},
		{"empty run", CodecS2, func(m *migrationpb.PageBatch) { m.Runs[1].NrPages = 0 }, ErrMalformed, "no pages"},
		{"unaligned", CodecS2, func(m *migrationpb.PageBatch) { m.Runs[0].Addr++ }, ErrMalformed, "not page aligned"},
		{"overlap", CodecS2, func(m *migrationpb.PageBatch) { m.Runs[1].Addr = 0x402000 }, ErrMalformed, "overlaps"},
		{"descending", CodecS2, func(m *migrationpb.PageBatch) { m.Runs[2].Addr = 0x1000 }, ErrMalformed, "overlaps or precedes"},
		{"address overflow", CodecS2, func(m *migrationpb.PageBatch) {
			m.Runs[2].Addr = 1<<64 - ps
			m.Runs[2].NrPages = 2
		}, ErrMalformed, "reach past"},
		{"past user space", CodecS2, func(m *migrationpb.PageBatch) { m.Runs[1].NrPages = 1 << 50 }, ErrMalformed, "reach past"},
		{"too many zero pages", CodecS2, func(m *migrationpb.PageBatch) { m.Runs[1].NrPages = DefaultMaxPages }, ErrTooLarge, "more than"},
		{"too many runs", CodecS2, func(m *migrationpb.PageBatch) {
			m.Runs = m.Runs[:0]
			for i := range DefaultMaxRuns + 1 {
				m.Runs = append(m.Runs, &migrationpb.PageRun{Addr: uint64(i) * ps, NrPages: 1, Kind: migrationpb.PageKind_PAGE_KIND_ZERO})
			}
		}, ErrTooLarge, "runs, at most"},
		{"too much data", CodecS2, func(m *migrationpb.PageBatch) { m.Runs[2].NrPages = DefaultMaxRawBytes / ps }, ErrTooLarge, "data pages, at most"},
		{"raw size lies", CodecS2, func(m *migrationpb.PageBatch) { m.RawSize -= ps }, ErrMalformed, "raw size"},
		{"payload too long", CodecS2, func(m *migrationpb.PageBatch) { m.Payload = make([]byte, 1<<20) }, ErrMalformed, "payload of"},
		{"checksum", CodecS2, func(m *migrationpb.PageBatch) { m.Crc32C ^= 1 }, ErrCorrupt, "checksum"},
		{"flipped payload byte", CodecNone, func(m *migrationpb.PageBatch) { m.Payload[100] ^= 0x40 }, ErrCorrupt, "checksum"},
		{"short none payload", CodecNone, func(m *migrationpb.PageBatch) { m.Payload = m.Payload[:len(m.Payload)-1] }, ErrCorrupt, "payload bytes"},
		{"truncated s2", CodecS2, func(m *migrationpb.PageBatch) { m.Payload = m.Payload[:len(m.Payload)/2] }, ErrCorrupt, "s2"},
		{"s2 bomb", CodecS2, s2Bomb, ErrCorrupt, "decodes to 1073741824"},
		{"s2 garbage", CodecS2, func(m *migrationpb.PageBatch) { m.Payload = []byte{0xff, 0xff, 0xff} }, ErrCorrupt, "s2"},
		{"zstd bomb", CodecZstd, zstdBomb, ErrCorrupt, "declares 67108864"},
		{"zstd without size", CodecZstd, zstdNoSize, ErrCorrupt, "known false"},
		{"zstd truncated", CodecZstd, func(m *migrationpb.PageBatch) { m.Payload = m.Payload[:len(m.Payload)-3] }, ErrCorrupt, "zstd"},
		{"zstd garbage", CodecZstd, func(m *migrationpb.PageBatch) { m.Payload = []byte("not zstd at all") }, ErrCorrupt, "zstd header"},
		{"zero batch with payload", CodecS2, func(m *migrationpb.PageBatch) {
			m.Runs = m.Runs[1:2]
			m.RawSize = 0
			m.Codec = CodecNone
			m.Payload = []byte{1}
		}, ErrMalformed, "payload"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			enc := CodecS2
			if strings.HasPrefix(c.name, "zstd") {
				enc = CodecZstd
			}
			if c.stream == CodecNone {
				enc = CodecNone
			}
			m, _ := validBatch(t, enc, 1)
			if m.Codec != enc {
				t.Fatalf("test batch encoded as %s", CodecName(m.Codec))
			}
			if c.mutate != nil {
				c.mutate(m)
			}
			if c.text != "checksum" {
				// A hostile peer sends a valid checksum with anything:
				// every other check must hold on its own.
				m.Crc32C = Checksum(m.Payload)
			}
			d, err := NewDecoder(c.stream, DefaultLimits())
			if err != nil {
				t.Fatal(err)
			}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			b, err := d.Decode(m)
			runtime.ReadMemStats(&after)
			if err == nil {
				b.Release()
				t.Fatal("accepted")
			}
			if !errors.Is(err, c.kind) || ErrorKind(err) != c.kind {
				t.Fatalf("error %q: want kind %v, got %v", err, c.kind, ErrorKind(err))
			}
			if !strings.Contains(err.Error(), c.text) {
				t.Errorf("error %q does not say %q", err, c.text)
			}
			if d.Next() != 1 {
				t.Errorf("sequence advanced to %d on a refused batch", d.Next())
			}
			// Bombs must not cost more than the declared size.
			if n := after.TotalAlloc - before.TotalAlloc; strings.Contains(c.name, "bomb") && n > 1<<20 {
				t.Errorf("decoding allocated %d bytes", n)
			}

			// Accepting and inflating apart refuses the batch as
			// Decode does, at one of the two steps.
			d, _ = NewDecoder(c.stream, DefaultLimits())
			b, err = d.Accept(m)
			if err == nil {
				if err = b.Inflate(); err == nil {
					b.Release()
					t.Fatal("Accept and Inflate accepted")
				}
				if b.Data != nil {
					t.Error("a batch that failed to inflate has data")
				}
			}
			if ErrorKind(err) != c.kind || !strings.Contains(err.Error(), c.text) {
				t.Errorf("Accept+Inflate: error %q, want kind %v saying %q", err, c.kind, c.text)
			}
		})
	}
}

// TestAcceptInflate: a batch accepted, then inflated, is the batch Decode
// gives; Accept takes the sequence number.
func TestAcceptInflate(t *testing.T) {
	for _, c := range Codecs() {
		t.Run(CodecName(c), func(t *testing.T) {
			d, _ := NewDecoder(c, DefaultLimits())
			m, data := validBatch(t, c, 1)
			b, err := d.Accept(m)
			if err != nil {
				t.Fatal(err)
			}
			defer b.Release()
			if d.Next() != 2 {
				t.Errorf("next sequence %d after Accept, want 2", d.Next())
			}
			if b.DataPages() != 4 || b.ZeroPages() != 2 || b.WireBytes != len(m.Payload) {
				t.Errorf("accepted batch: %d data, %d zero pages, %d wire bytes", b.DataPages(), b.ZeroPages(), b.WireBytes)
			}
			for range 2 { // a second Inflate changes nothing
				if err := b.Inflate(); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(b.Data, data) {
					t.Fatal("inflated data differs from what was sent")
				}
			}
			if _, err := d.Accept(m); !errors.Is(err, ErrSequence) {
				t.Errorf("replay: %v", err)
			}
		})
	}
}

// TestSequenceAdvances: a refused batch does not consume its number, the
// next good one does.
func TestSequenceAdvances(t *testing.T) {
	d, _ := NewDecoder(CodecS2, DefaultLimits())
	m, _ := validBatch(t, CodecS2, 1)
	m.Crc32C++
	if _, err := d.Decode(m); !errors.Is(err, ErrCorrupt) {
		t.Fatal(err)
	}
	m, _ = validBatch(t, CodecS2, 1)
	b, err := d.Decode(m)
	if err != nil {
		t.Fatal(err)
	}
	b.Release()
	if _, err := d.Decode(m); !errors.Is(err, ErrSequence) {
		t.Fatalf("replay: %v", err)
	}
}

func TestLimitsValidate(t *testing.T) {
	bad := []func(*Limits){
		func(l *Limits) { l.PageSize = 3000 },
		func(l *Limits) { l.MaxRawBytes = 1 << 30 },
		func(l *Limits) { l.MaxRawBytes = 100 },
		func(l *Limits) { l.MaxRuns = 0 },
		func(l *Limits) { l.MaxPages = 0 },
		func(l *Limits) { l.MaxAddr = 12345 },
	}
	for i, f := range bad {
		l := DefaultLimits()
		f(&l)
		if _, err := NewDecoder(CodecS2, l); err == nil {
			t.Errorf("limits %d accepted: %+v", i, l)
		}
	}
	if _, err := NewDecoder(0, DefaultLimits()); !errors.Is(err, ErrCodec) {
		t.Errorf("unspecified stream codec: %v", err)
	}
}

func TestParseCodec(t *testing.T) {
	for _, c := range Codecs() {
		got, err := ParseCodec(strings.ToUpper(CodecName(c)))
		if err != nil || got != c {
			t.Errorf("%s: %v %v", CodecName(c), got, err)
		}
	}
	if _, err := ParseCodec("gzip"); !errors.Is(err, ErrCodec) {
		t.Errorf("gzip: %v", err)
	}
}

// TestS2MaxEncodedLenBound: what the encoder produces always passes the
// decoder's length bound, for each codec, also for random data.
func TestEncodedLenBound(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 3))
	raw := make([]byte, 64*ps)
	for i := range raw {
		raw[i] = byte(r.Uint32())
	}
	if n := len(s2.Encode(nil, raw)); n > maxEncodedLen(CodecS2, len(raw)) {
		t.Errorf("s2: %d > bound", n)
	}
	z, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest))
	defer z.Close()
	if n := len(z.EncodeAll(raw, nil)); n > maxEncodedLen(CodecZstd, len(raw)) {
		t.Errorf("zstd: %d > bound %d", n, maxEncodedLen(CodecZstd, len(raw)))
	}
}

// FuzzDecode decodes arbitrary messages on streams of each codec: it must
// never panic, and what it accepts must be consistent.
func FuzzDecode(f *testing.F) {
	for _, c := range Codecs() {
		m, _ := validBatch(f, c, 1)
		b, _ := proto.Marshal(m)
		f.Add(b)
		m.Crc32C++
		b, _ = proto.Marshal(m)
		f.Add(b)
	}
	m, _ := validBatch(f, CodecZstd, 1)
	m.Runs = m.Runs[1:2]
	m.Payload, m.RawSize, m.Crc32C, m.Codec = nil, 0, 0, CodecNone
	b, _ := proto.Marshal(m)
	f.Add(b)
	lim := DefaultLimits()
	lim.MaxRawBytes = 1 << 20 // keep each input cheap
	f.Fuzz(func(t *testing.T, in []byte) {
		var m migrationpb.PageBatch
		if proto.Unmarshal(in, &m) != nil {
			return
		}
		for _, c := range Codecs() {
			d, err := NewDecoder(c, lim)
			if err != nil {
				t.Fatal(err)
			}
			m.Seq = 1
			b, err := d.Decode(&m)
			if err != nil {
				if ErrorKind(err) == nil {
					t.Fatalf("error of no kind: %v", err)
				}
				continue
			}
			if uint64(len(b.Data)) != m.RawSize || Checksum(m.Payload) != m.Crc32C {
				t.Fatalf("accepted inconsistent batch: %d bytes, raw size %d", len(b.Data), m.RawSize)
			}
			var data uint64
			end := uint64(0)
			for i, r := range b.Runs {
				if r.Addr%ps != 0 || r.Pages == 0 || (i > 0 && r.Addr < end) {
					t.Fatalf("accepted bad run %+v", r)
				}
				end = r.Addr + r.Pages*ps
				if r.Kind == Data {
					data += r.Pages
				}
			}
			if data != b.DataPages() {
				t.Fatalf("data pages %d, runs say %d", b.DataPages(), data)
			}
			b.Release()
		}
	})
}

// FuzzDecompress aims at the decompressors: any payload, declared as the
// raw size of a fixed run layout.
func FuzzDecompress(f *testing.F) {
	for _, c := range Codecs() {
		m, _ := validBatch(f, c, 1)
		f.Add(uint8(c), m.Payload, uint8(4))
	}
	f.Fuzz(func(t *testing.T, codec uint8, payload []byte, n uint8) {
		if n == 0 {
			return
		}
		c := Codec(codec % 4)
		m := &migrationpb.PageBatch{
			Seq: 1, Pid: 1, Codec: c, Payload: payload,
			Runs:    []*migrationpb.PageRun{{Addr: 0, NrPages: uint64(n), Kind: migrationpb.PageKind_PAGE_KIND_DATA}},
			RawSize: uint64(n) * ps,
		}
		d, _ := NewDecoder(CodecS2, DefaultLimits())
		if c == CodecZstd {
			d, _ = NewDecoder(CodecZstd, DefaultLimits())
		}
		b, err := d.Decode(m)
		if err == nil {
			t.Fatalf("a payload with checksum 0 passed: %d bytes", len(b.Data))
		}
		if ErrorKind(err) == nil {
			t.Fatalf("error of no kind: %v", err)
		}
	})
}
