package workload

import (
	"strings"
	"sync/atomic"
	"testing"
)

func newState(pages int, random bool) *state {
	s := &state{mem: make([]byte, pages*pageSize), gens: make([]atomic.Uint32, pages), random: random}
	for i := 0; i < pages; i++ {
		s.fill(i, 1)
	}
	return s
}

func TestCheckCatchesStaleMisplacedAndCorruptPages(t *testing.T) {
	for _, random := range []bool{false, true} {
		s := newState(4, random)
		for i := 0; i < 4; i++ {
			if err := s.check(i); err != nil {
				t.Fatalf("fresh page %d: %v", i, err)
			}
		}
		// Stale: the page was rewritten, memory shows the old generation.
		old := append([]byte(nil), s.mem[pageSize:2*pageSize]...)
		s.fill(1, 2)
		copy(s.mem[pageSize:], old)
		if err := s.check(1); err == nil || !strings.Contains(err.Error(), "stale") {
			t.Errorf("stale page not caught: %v", err)
		}
		// Misplaced: page 3 holds page 2's bytes.
		copy(s.mem[3*pageSize:4*pageSize], s.mem[2*pageSize:3*pageSize])
		if err := s.check(3); err == nil {
			t.Error("misplaced page not caught")
		}
		// Corrupt: one byte flipped.
		s.mem[100] ^= 1
		if err := s.check(0); err == nil {
			t.Error("corrupt page not caught")
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"4096": 4096, "64M": 64 << 20, "1G": 1 << 30, "256MiB": 256 << 20, "8k": 8 << 10} {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "x", "-1", "1T"} {
		if _, err := ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q) accepted", bad)
		}
	}
}
