package tracker

import (
	"math/rand"
	"os"
	"path/filepath"
	"testing"
)

// pageSet is the naive model of Ranges: a set of page numbers.
type pageSet map[uint64]bool

func (s pageSet) ranges() Ranges {
	var rs []Range
	for p := range s {
		rs = append(rs, Range{p * PageSize, (p + 1) * PageSize})
	}
	return Normalize(rs)
}

func randomSet(r *rand.Rand) (pageSet, Ranges) {
	s := pageSet{}
	var rs []Range
	// Mostly a few ranges; sometimes many, for the skipping in Intersect
	// and Subtract.
	count, space := 6, 40
	if r.Intn(3) == 0 {
		count, space = 30, 160
	}
	for i := r.Intn(count); i > 0; i-- {
		start := uint64(r.Intn(space))
		n := uint64(r.Intn(6) + 1)
		rs = append(rs, Range{start * PageSize, (start + n) * PageSize})
		for p := start; p < start+n; p++ {
			s[p] = true
		}
	}
	return s, Normalize(rs)
}

func canonical(t *testing.T, rs Ranges) {
	t.Helper()
	for i, r := range rs {
		if r.End <= r.Start || (i > 0 && rs[i-1].End >= r.Start) {
			t.Fatalf("not canonical: %v", rs)
		}
	}
}

// TestRangesModel checks Normalize, Union, Intersect, Subtract and
// Contains against sets of page numbers.
func TestRangesModel(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	for i := 0; i < 2000; i++ {
		sa, a := randomSet(r)
		sb, b := randomSet(r)
		canonical(t, a)
		union, inter, diff := pageSet{}, pageSet{}, pageSet{}
		for p := range sa {
			union[p] = true
			if sb[p] {
				inter[p] = true
			} else {
				diff[p] = true
			}
		}
		for p := range sb {
			union[p] = true
		}
		for name, c := range map[string]struct {
			got  Ranges
			want pageSet
		}{
			"union": {Union(a, b), union}, "intersect": {Intersect(a, b), inter}, "subtract": {Subtract(a, b), diff},
		} {
			canonical(t, c.got)
			if w := c.want.ranges(); c.got.String() != w.String() {
				t.Fatalf("%s(%v, %v) = %v, want %v", name, a, b, c.got, w)
			}
			if c.got.Pages() != uint64(len(c.want)) {
				t.Fatalf("%s: %d pages, want %d", name, c.got.Pages(), len(c.want))
			}
		}
		for p := uint64(0); p < 170; p++ {
			if a.Contains(p*PageSize+7) != sa[p] {
				t.Fatalf("%v.Contains(page %d) = %v", a, p, !sa[p])
			}
		}
	}
}

func TestSoftDirtyEntry(t *testing.T) {
	const zero = 0x1234
	for _, tc := range []struct {
		e    uint64
		want bool
	}{
		{1<<63 | 1<<55 | 77, true}, // present, soft-dirty
		{1<<63 | 77, false},        // present, clean
		{1 << 55, true},            // hole of a new mapping
		{1<<62 | 1<<55 | 5, true},  // swapped, soft-dirty
		{1<<62 | 5, false},         // swapped, clean
		{1<<63 | zero, true},       // the zero page: dropped and read again
		{0, false},                 // nothing
	} {
		if got := softDirty(tc.e, zero); got != tc.want {
			t.Errorf("softDirty(%#x) = %v, want %v", tc.e, got, tc.want)
		}
	}
	if softDirty(1<<63, 0) {
		t.Errorf("pfn 0 taken for the zero page when it is unknown")
	}
}

func TestStateFile(t *testing.T) {
	dir := t.TempDir()
	if _, err := ReadState(dir); err == nil {
		t.Fatal("state read from an empty directory")
	}
	b := &base{name: Hash, pid: 42, startTime: 7}
	st := b.state()
	st.Uffd, st.UffdInode = 5, 99
	if err := writeState(dir, st); err != nil {
		t.Fatal(err)
	}
	got, err := ReadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.GetPid() != 42 || got.GetBackend() != Hash || got.GetUffd() != 5 || got.GetUffdInode() != 99 || got.GetStartTime() != 7 {
		t.Errorf("read back %v", got)
	}
	raw, err := os.ReadFile(filepath.Join(dir, StateFile))
	if err != nil {
		t.Fatal(err)
	}
	for i := range raw {
		bad := append([]byte(nil), raw...)
		bad[i] ^= 0x40
		if _, err := decodeState(bad); err == nil {
			t.Fatalf("flipping byte %d went unnoticed", i)
		}
	}
	if _, err := decodeState(raw[:len(raw)-1]); err == nil {
		t.Fatal("truncated state accepted")
	}
}
