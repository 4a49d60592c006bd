package engine

import (
	"fmt"
	"testing"
)

// TestNextFromParent splits runs of pages into pieces to read and pieces
// found in the parent, and checks that the pieces cover the runs exactly,
// in order, alternating as the predicate says.
func TestNextFromParent(t *testing.T) {
	runs := func() []pageRange {
		return []pageRange{{Addr: 0x1000, Pages: 4}, {Addr: 0x10000, Pages: 3}, {Addr: 0x20000, Pages: 1}}
	}
	var pages []uint64
	for _, r := range runs() {
		for i := uint64(0); i < r.Pages; i++ {
			pages = append(pages, r.Addr+i*pageSize)
		}
	}
	for mask := 0; mask < 1<<len(pages); mask++ {
		inParent := map[uint64]bool{}
		for i, p := range pages {
			if mask&(1<<i) != 0 {
				inParent[p] = true
			}
		}
		var got []string
		rest := runs()
		for len(rest) > 0 {
			var read []pageRange
			var parent pageRange
			read, parent, rest = nextFromParent(rest, func(a uint64) bool { return inParent[a] })
			for _, r := range read {
				for i := uint64(0); i < r.Pages; i++ {
					got = append(got, fmt.Sprintf("r%x", r.Addr+i*pageSize))
				}
			}
			for i := uint64(0); i < parent.Pages; i++ {
				got = append(got, fmt.Sprintf("p%x", parent.Addr+i*pageSize))
			}
		}
		var want []string
		for _, p := range pages {
			if inParent[p] {
				want = append(want, fmt.Sprintf("p%x", p))
			} else {
				want = append(want, fmt.Sprintf("r%x", p))
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("mask %b: pieces %v, want %v", mask, got, want)
		}
	}
	if read, parent, rest := nextFromParent(runs(), nil); len(read) != 3 || parent.Pages != 0 || rest != nil {
		t.Errorf("without a parent: %v %v %v", read, parent, rest)
	}
}
