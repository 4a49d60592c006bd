package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/phaul/phaul/protocol/imagepb"
	"google.golang.org/protobuf/proto"
)

func TestFrameRoundTrip(t *testing.T) {
	for _, payload := range [][]byte{nil, []byte("x"), bytes.Repeat([]byte{0xab}, 100000)} {
		b := EncodeFrame(KindProcess, payload)
		if len(b) != HeaderSize+len(payload) {
			t.Fatalf("frame is %d bytes, want %d", len(b), HeaderSize+len(payload))
		}
		k, got, err := DecodeFrame(b)
		if err != nil {
			t.Fatal(err)
		}
		if k != KindProcess || !bytes.Equal(got, payload) {
			t.Fatalf("got kind %v payload %d bytes, want %v %d bytes", k, len(got), KindProcess, len(payload))
		}
	}
}

// reheader rewrites field bytes of a frame's header and fixes the header
// checksum, so that only the field is wrong.
func reheader(b []byte, edit func(h []byte)) []byte {
	c := bytes.Clone(b)
	edit(c[:HeaderSize])
	binary.LittleEndian.PutUint32(c[28:], crc32.Checksum(c[:28], castagnoli))
	return c
}

func TestReadErrors(t *testing.T) {
	good := readFile(t, writeSample(t).InventoryPath())
	process := readFile(t, writeSample(t).ProcessPath(100))
	le := binary.LittleEndian
	reframe := func(k Kind, m proto.Message) []byte {
		p, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return EncodeFrame(k, p)
	}
	badInv := sampleInventory()
	badInv.RootPid = 0
	futureInv := sampleInventory()
	futureInv.FormatVersion = 7

	cases := []struct {
		name string
		data []byte
		want error
		msg  string // in the error message
	}{
		{"bad magic", flipByte(good, 0), ErrBadMagic, "PHAULIMG"},
		{"pages magic", append([]byte("PHAULPGS"), good[8:]...), ErrBadMagic, ""},
		{"short wrong magic", []byte("PHX"), ErrBadMagic, ""},
		{"payload byte", flipByte(good, HeaderSize+3), ErrChecksum, "payload"},
		{"last payload byte", flipByte(good, len(good)-1), ErrChecksum, "payload"},
		{"header length byte", flipByte(good, 16), ErrChecksum, "header"},
		{"header crc byte", flipByte(good, 29), ErrChecksum, "header"},
		{"payload crc", reheader(good, func(h []byte) { h[24] ^= 1 }), ErrChecksum, "payload"},
		{"empty", nil, ErrTruncated, ""},
		{"at 4", good[:4], ErrTruncated, ""},
		{"at 8", good[:8], ErrTruncated, ""},
		{"at 20", good[:20], ErrTruncated, ""},
		{"at 31", good[:31], ErrTruncated, ""},
		{"at 32", good[:32], ErrTruncated, ""},
		{"at 40", good[:40], ErrTruncated, ""},
		{"last byte", good[:len(good)-1], ErrTruncated, ""},
		{"wrong kind", process, ErrKind, "holds process, want inventory"},
		{"unknown kind", reheader(good, func(h []byte) { le.PutUint16(h[10:], 99) }), ErrKind, "99"},
		{"future version", reheader(good, func(h []byte) { le.PutUint16(h[8:], 2) }), ErrVersion, "version 2"},
		{"version 0", reheader(good, func(h []byte) { le.PutUint16(h[8:], 0) }), ErrVersion, "version 0"},
		{"flags", reheader(good, func(h []byte) { le.PutUint32(h[12:], 1) }), ErrVersion, "flags"},
		{"inventory version", reframe(KindInventory, futureInv), ErrVersion, "version 7"},
		{"huge length", reheader(good, func(h []byte) { le.PutUint64(h[16:], 1<<40) }), ErrCorrupt, "limit"},
		{"length past end", reheader(good, func(h []byte) { le.PutUint64(h[16:], 1<<20) }), ErrTruncated, ""},
		{"trailing bytes", append(bytes.Clone(good), 0), ErrCorrupt, "after the payload"},
		{"not protobuf", EncodeFrame(KindInventory, []byte{0xff, 0xff, 0xff}), ErrCorrupt, "decode"},
		{"invalid content", reframe(KindInventory, badInv), ErrCorrupt, "root pid 0"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := Dir{Path: t.TempDir()}
			if err := os.WriteFile(d.InventoryPath(), tc.data, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := d.ReadInventory()
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), d.InventoryPath()) {
				t.Errorf("error %q does not name the file", err)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q does not say %q", err, tc.msg)
			}
			// The in-memory decoder agrees on framing errors.
			if _, _, derr := DecodeFrame(tc.data); derr != nil && !errors.Is(derr, tc.want) {
				t.Errorf("DecodeFrame: got %v, want %v", derr, tc.want)
			}
		})
	}
}

func TestReadMissingFile(t *testing.T) {
	d := Dir{Path: t.TempDir()}
	_, err := d.ReadProcess(5)
	if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "process-5.img") {
		t.Fatalf("got %v, want a not-exist error naming process-5.img", err)
	}
}

func TestRoundTrips(t *testing.T) {
	d := writeSample(t)
	inv, err := d.ReadInventory()
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(inv, sampleInventory()) {
		t.Errorf("inventory: got %v", inv)
	}
	ft, err := d.ReadFiles()
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(ft, sampleFiles()) {
		t.Errorf("files: got %v", ft)
	}
	p, err := d.ReadProcess(101)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(p, sampleProcess(101)) {
		t.Errorf("process: got %v", p)
	}
	pm, err := d.ReadPageMap(100)
	if err != nil {
		t.Fatal(err)
	}
	if len(pm.GetRuns()) != 5 {
		t.Errorf("page map has %d runs, want 5: %v", len(pm.GetRuns()), pm)
	}
	assertNoTempFiles(t, d.Path)
}

func TestWriteInventoryDefaults(t *testing.T) {
	d := Dir{Path: t.TempDir(), Sync: true}
	inv := sampleInventory()
	inv.FormatVersion, inv.PageSize = 0, 0
	if err := d.WriteInventory(inv); err != nil {
		t.Fatal(err)
	}
	got, err := d.ReadInventory()
	if err != nil {
		t.Fatal(err)
	}
	if got.GetFormatVersion() != Version || got.GetPageSize() != PageSize {
		t.Errorf("got version %d page size %d", got.GetFormatVersion(), got.GetPageSize())
	}
}

func TestWriteRejectsInvalid(t *testing.T) {
	d := Dir{Path: t.TempDir()}
	p := sampleProcess(100)
	p.Threads = nil
	if err := d.WriteProcess(p); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("got %v, want ErrCorrupt", err)
	}
	if _, err := os.Stat(d.ProcessPath(100)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("invalid process was written: %v", err)
	}
	assertNoTempFiles(t, d.Path)
}

func TestWriteReplacesAtomically(t *testing.T) {
	d := writeSample(t)
	ft := &imagepb.FileTable{Files: []*imagepb.File{{Id: 9, Kind: imagepb.FileKind_FILE_REGULAR, Path: "/x"}}}
	if err := d.WriteFiles(ft); err != nil {
		t.Fatal(err)
	}
	got, err := d.ReadFiles()
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, ft) {
		t.Errorf("got %v", got)
	}
	// A write into a directory that does not exist fails and names the file.
	bad := Dir{Path: filepath.Join(d.Path, "nope")}
	if err := bad.WriteFiles(ft); err == nil || !strings.Contains(err.Error(), bad.FilesPath()) {
		t.Errorf("got %v", err)
	}
	assertNoTempFiles(t, d.Path)
}
