package pagestream

import (
	"math/bits"
	"sync"
)

// Buffers come from power-of-two size classes between minClass and
// maxClass bytes; larger requests are allocated and dropped.
const (
	minClassShift = 16 // 64 KiB
	maxClassShift = 26 // 64 MiB
)

var pools [maxClassShift - minClassShift + 1]sync.Pool

// classOf returns the pool index for a buffer of n bytes, or -1.
func classOf(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	shift := bits.Len(uint(n - 1))
	if shift > maxClassShift {
		return -1
	}
	return shift - minClassShift
}

// getBuffer returns a buffer of length n; its capacity may be larger.
func getBuffer(n int) *[]byte {
	c := classOf(n)
	if c < 0 {
		b := make([]byte, n)
		return &b
	}
	if p, ok := pools[c].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<(c+minClassShift))
	return &b
}

// putBuffer returns a buffer obtained from getBuffer to its pool.
func putBuffer(p *[]byte) {
	c := cap(*p)
	if c < 1<<minClassShift || c&(c-1) != 0 || c > 1<<maxClassShift {
		return
	}
	pools[classOf(c)].Put(p)
}
