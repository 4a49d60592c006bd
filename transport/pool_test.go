package transport

import "testing"

func TestBufferPool(t *testing.T) {
	p := newBufferPool()
	for _, size := range []int{1, 255, 256, 257, 4096, 4097, 1 << 20, 1<<24 - 1, 1 << 24} {
		b := p.Get(size)
		if len(*b) != size || cap(*b) < size {
			t.Fatalf("Get(%d): len %d cap %d", size, len(*b), cap(*b))
		}
		(*b)[size-1] = 7
		p.Put(b)
	}
	// Larger than every class: a fresh buffer, dropped on Put.
	b := p.Get(1<<24 + 1)
	if len(*b) != 1<<24+1 {
		t.Fatalf("large Get: len %d", len(*b))
	}
	p.Put(b)
	// A buffer whose capacity is not a class size serves smaller requests
	// only.
	odd := make([]byte, 3000)
	p.Put(&odd)
	for range 10 {
		got := p.Get(2048)
		if cap(*got) < 2048 {
			t.Fatalf("Get(2048) returned a buffer of capacity %d", cap(*got))
		}
		g2 := p.Get(4096)
		if cap(*g2) < 4096 {
			t.Fatalf("Get(4096) returned a buffer of capacity %d", cap(*g2))
		}
	}
}
