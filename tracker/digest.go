package tracker

import (
	"encoding/binary"
	"math/bits"
)

// Multipliers of the page digest: odd 64-bit constants with well-mixed
// bits (the fractional parts of sqrt(2), sqrt(3), sqrt(5) and sqrt(7),
// forced odd).
const (
	mulA = 0x6a09e667f3bcc909
	mulB = 0xbb67ae8584caa73b
	mulC = 0x3c6ef372fe94f82b
	mulD = 0xa54ff53a5f1d36f1
)

// pageDigest returns a 64-bit digest of one page (any length multiple of
// 32 bytes works). It is not cryptographic: it only has to change when a
// page's contents change, which a random 64-bit function misses with
// probability 2^-64 per changed page. The loop keeps four independent
// lanes so that the multiplications of one step overlap; each lane folds
// 8 bytes with a multiply, a rotation and a second multiply, and the
// lanes are mixed into one value at the end.
//
// A digest is never 0, the value that stands for "no page".
func pageDigest(p []byte) uint64 {
	a, b, c, d := uint64(mulA), uint64(mulB), uint64(mulC), uint64(mulD)
	for len(p) >= 32 {
		a = bits.RotateLeft64(a+binary.LittleEndian.Uint64(p[0:])*mulB, 31) * mulA
		b = bits.RotateLeft64(b+binary.LittleEndian.Uint64(p[8:])*mulB, 31) * mulA
		c = bits.RotateLeft64(c+binary.LittleEndian.Uint64(p[16:])*mulB, 31) * mulA
		d = bits.RotateLeft64(d+binary.LittleEndian.Uint64(p[24:])*mulB, 31) * mulA
		p = p[32:]
	}
	h := bits.RotateLeft64(a, 1) + bits.RotateLeft64(b, 7) + bits.RotateLeft64(c, 12) + bits.RotateLeft64(d, 18)
	for _, v := range [4]uint64{a, b, c, d} {
		h = (h ^ bits.RotateLeft64(v*mulC, 29)*mulD) * mulA
	}
	// Final avalanche: every input bit affects every output bit.
	h ^= h >> 33
	h *= mulC
	h ^= h >> 29
	h *= mulD
	h ^= h >> 32
	if h == 0 {
		h = 1
	}
	return h
}
