package transport

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/types/known/wrapperspb"
)

// TestCodecRoundTrip marshals messages below and above gRPC's pooling
// threshold and decodes them back; a large one is marshalled into one
// pooled buffer, whose bytes are the message whatever the buffer held
// before (the pool does not clear).
func TestCodecRoundTrip(t *testing.T) {
	c := Codec()
	// Leave a dirty buffer of the size class a 1 MiB message uses.
	dirty := pool.Get(1<<20 + 64)
	for i := range *dirty {
		(*dirty)[i] = 0xAA
	}
	pool.Put(dirty)
	for _, n := range []int{0, 100, 1 << 20} {
		payload := bytes.Repeat([]byte{7}, n)
		data, err := c.Marshal(wrapperspb.Bytes(payload))
		if err != nil {
			t.Fatalf("%d bytes: %v", n, err)
		}
		if n == 1<<20 && len(data) != 1 {
			t.Errorf("%d bytes: marshalled into %d buffers, want 1", n, len(data))
		}
		var got wrapperspb.BytesValue
		if err := c.Unmarshal(data, &got); err != nil {
			t.Fatalf("%d bytes: unmarshal: %v", n, err)
		}
		if !bytes.Equal(got.GetValue(), payload) {
			t.Errorf("%d bytes: round trip changed the payload (%d bytes back)", n, len(got.GetValue()))
		}
		data.Free()
	}
	if _, err := c.Marshal(struct{}{}); err == nil {
		t.Error("a value that is no protobuf message was marshalled")
	}
}
