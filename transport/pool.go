package transport

import (
	"math/bits"
	"sync"

	"google.golang.org/grpc/mem"
)

// BufferPool returns the buffer pool of session gRPC clients and servers.
// Unlike gRPC's default pool it does not clear a buffer it hands out
// again: gRPC overwrites every byte it asks for (a frame read in full, a
// message marshalled in full), and clearing cost 5% of a page-receiving
// target's CPU (the megabytes of a batch cleared once per frame and once
// per message).
func BufferPool() mem.BufferPool { return pool }

var pool = newBufferPool()

// Size classes are powers of two from 2^minClass to 2^maxClass bytes;
// larger buffers are not kept.
const (
	minClass = 8
	maxClass = 24
)

type bufferPool struct {
	classes [maxClass - minClass + 1]sync.Pool
}

func newBufferPool() *bufferPool { return &bufferPool{} }

// class returns the index of the smallest class holding size bytes, or -1
// if it is larger than every class.
func class(size int) int {
	if size <= 1<<minClass {
		return 0
	}
	c := bits.Len(uint(size-1)) - minClass
	if c > maxClass-minClass {
		return -1
	}
	return c
}

// Get implements mem.BufferPool.
func (p *bufferPool) Get(size int) *[]byte {
	c := class(size)
	if c < 0 {
		b := make([]byte, size)
		return &b
	}
	if b, ok := p.classes[c].Get().(*[]byte); ok {
		*b = (*b)[:size]
		return b
	}
	b := make([]byte, size, 1<<(c+minClass))
	return &b
}

// Put implements mem.BufferPool. A buffer goes back to the class its
// capacity fills; one that fills none is dropped.
func (p *bufferPool) Put(b *[]byte) {
	n := cap(*b)
	if n < 1<<minClass || n > 1<<maxClass {
		return
	}
	c := bits.Len(uint(n)) - 1 - minClass // the largest class n holds
	p.classes[c].Put(b)
}
