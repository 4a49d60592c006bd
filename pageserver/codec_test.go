package pageserver

import (
	"bytes"
	"testing"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/protocol/migrationpb"
)

func encoded(t testing.TB, m *migrationpb.PageStreamRequest) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sampleBatch() *migrationpb.PageStreamRequest {
	return &migrationpb.PageStreamRequest{Msg: &migrationpb.PageStreamRequest_Batch{Batch: &migrationpb.PageBatch{
		Seq: 3, Pid: 7, Round: 1, Codec: migrationpb.Codec_CODEC_S2, RawSize: 8192, Crc32C: 0xdeadbeef,
		Runs:    []*migrationpb.PageRun{{Addr: 0x1000, NrPages: 2, Kind: migrationpb.PageKind_PAGE_KIND_DATA}},
		Payload: bytes.Repeat([]byte{1, 2, 3}, 1000),
	}}}
}

// countHeld is the number of buffers kept for received messages.
func countHeld() int {
	n := 0
	held.Range(func(any, any) bool { n++; return true })
	return n
}

// TestWireCodec: a batch decodes to what the standard codec gives, with
// the payload in the received buffer, held until released.
func TestWireCodec(t *testing.T) {
	wc := wireCodec{std: stdCodec()}
	for _, m := range []*migrationpb.PageStreamRequest{
		sampleBatch(),
		{Msg: &migrationpb.PageStreamRequest_Open{Open: &migrationpb.PageStreamOpen{MigrationId: "x", Codec: 2}}},
		{Msg: &migrationpb.PageStreamRequest_Batch{Batch: &migrationpb.PageBatch{Seq: 1}}}, // no payload
	} {
		b := encoded(t, m)
		var got migrationpb.PageStreamRequest
		if err := wc.Unmarshal(mem.BufferSlice{mem.SliceBuffer(b)}, &got); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(&got, m) {
			t.Errorf("decoded %v, want %v", &got, m)
		}
		if p := got.GetBatch().GetPayload(); len(p) > 0 {
			i := bytes.Index(b, p)
			b[i] ^= 0xff // the payload is the received buffer: it sees this
			if p[0] != b[i] {
				t.Error("payload was copied")
			}
			if countHeld() != 1 {
				t.Errorf("%d buffers held", countHeld())
			}
		}
		releaseWire(&got)
		if countHeld() != 0 {
			t.Errorf("%d buffers held after release", countHeld())
		}
	}
	// Other messages go to the standard codec.
	var ack migrationpb.PageAck
	if err := wc.Unmarshal(mem.BufferSlice{mem.SliceBuffer(encoded(t, sampleBatch()))}, &ack); err == nil && countHeld() != 0 {
		t.Error("a buffer held for another message type")
	}
}

func TestSplitPayloadOddInputs(t *testing.T) {
	m := sampleBatch()
	b := encoded(t, m)
	// An open after the batch wins the oneof.
	open := encoded(t, &migrationpb.PageStreamRequest{Msg: &migrationpb.PageStreamRequest_Open{Open: &migrationpb.PageStreamOpen{MigrationId: "y"}}})
	for _, in := range [][]byte{
		append(bytes.Clone(b), open...),
		append(bytes.Clone(b), b...), // two batches: merged by proto
		b[:len(b)-1],                 // truncated
		{},
	} {
		checkSplit(t, in)
	}
}

// checkSplit fails unless decoding in through splitPayload gives what
// proto.Unmarshal gives.
func checkSplit(t *testing.T, in []byte) {
	t.Helper()
	var want migrationpb.PageStreamRequest
	werr := proto.Unmarshal(in, &want)
	rest, payload, ok := splitPayload(in)
	if !ok {
		return // the codec decodes in as it is
	}
	var got migrationpb.PageStreamRequest
	gerr := proto.Unmarshal(rest, &got)
	if (werr == nil) != (gerr == nil) {
		t.Fatalf("error %v, proto says %v", gerr, werr)
	}
	if werr != nil {
		return
	}
	if got.GetBatch() != nil {
		got.GetBatch().Payload = payload
	}
	if !proto.Equal(&got, &want) {
		t.Fatalf("split decodes to %v, proto to %v", &got, &want)
	}
}

// FuzzSplitPayload: for any input, the codec's split decodes to what
// proto.Unmarshal does.
func FuzzSplitPayload(f *testing.F) {
	f.Add(encoded(f, sampleBatch()))
	f.Add(encoded(f, &migrationpb.PageStreamRequest{Msg: &migrationpb.PageStreamRequest_Open{Open: &migrationpb.PageStreamOpen{MigrationId: "m"}}}))
	f.Fuzz(func(t *testing.T, in []byte) { checkSplit(t, in) })
}
