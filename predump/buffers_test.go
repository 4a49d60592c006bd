package predump

import "testing"

// TestBuffers: a kept buffer serves a later round that needs no more than
// it holds, at most readBuffers are kept, and a nil Buffers allocates.
func TestBuffers(t *testing.T) {
	var b Buffers
	first := b.get(BatchSize)
	if len(first) != BatchSize {
		t.Fatalf("got %d bytes, want %d", len(first), BatchSize)
	}
	b.put(first)
	small := b.get(3 * PageSize)
	if len(small) != 3*PageSize || &small[0] != &first[0] {
		t.Fatal("a smaller round did not get the kept buffer")
	}
	b.put(small)
	if got := b.get(BatchSize); &got[0] != &first[0] || len(got) != BatchSize {
		t.Fatal("a buffer put back resliced did not serve a full batch again")
	}
	b.put(first)
	if big := b.get(2 * BatchSize); &big[0] == &first[0] {
		t.Fatal("a buffer too small was handed out")
	}
	for range readBuffers + 2 {
		b.put(make([]byte, PageSize))
	}
	if len(b.free) != readBuffers {
		t.Fatalf("%d buffers kept, at most %d", len(b.free), readBuffers)
	}
	var none *Buffers
	none.put(first)
	if got := none.get(PageSize); len(got) != PageSize {
		t.Fatalf("nil Buffers: got %d bytes", len(got))
	}
}
