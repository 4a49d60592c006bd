package tracker

import (
	"fmt"
	"sort"
	"strings"
)

// PageSize is the size of the pages tracked.
const PageSize = 4096

// Range is the address range [Start, End), page aligned.
type Range struct {
	Start, End uint64
}

// Pages returns the number of pages in r.
func (r Range) Pages() uint64 { return (r.End - r.Start) / PageSize }

func (r Range) String() string { return fmt.Sprintf("%#x-%#x", r.Start, r.End) }

// Ranges is a set of pages: ranges sorted by address that neither overlap
// nor touch. The functions of this package that return a Ranges keep that
// form; Normalize makes it from any list.
type Ranges []Range

// Normalize returns the set of pages covered by rs, in canonical form.
func Normalize(rs []Range) Ranges {
	s := append([]Range(nil), rs...)
	sort.Slice(s, func(i, j int) bool { return s[i].Start < s[j].Start })
	var out Ranges
	for _, r := range s {
		out.Add(r.Start, r.End)
	}
	return out
}

// Add appends [start, end), which must not start before the last range
// does, merging it with the last range when they overlap or touch: the way
// to build a set in address order.
func (rs *Ranges) Add(start, end uint64) {
	if end <= start {
		return
	}
	if n := len(*rs); n > 0 {
		last := &(*rs)[n-1]
		if start <= last.End {
			last.End = max(last.End, end)
			return
		}
	}
	*rs = append(*rs, Range{Start: start, End: end})
}

// Contains reports whether the page holding addr is in the set.
func (rs Ranges) Contains(addr uint64) bool {
	i := sort.Search(len(rs), func(i int) bool { return rs[i].End > addr })
	return i < len(rs) && rs[i].Start <= addr
}

// Pages returns the number of pages in the set.
func (rs Ranges) Pages() uint64 {
	var n uint64
	for _, r := range rs {
		n += r.Pages()
	}
	return n
}

// Union returns the pages in a or in b.
func Union(a, b Ranges) Ranges {
	var out Ranges
	for len(a) > 0 || len(b) > 0 {
		var r Range
		if len(b) == 0 || (len(a) > 0 && a[0].Start <= b[0].Start) {
			r, a = a[0], a[1:]
		} else {
			r, b = b[0], b[1:]
		}
		out.Add(r.Start, r.End)
	}
	return out
}

// Intersect returns the pages in both a and b. What one set holds before
// the other's next range is skipped by binary search, so that a few
// ranges (one mapping's) against a long set (a round's dirty pages) cost
// little.
func Intersect(a, b Ranges) Ranges {
	var out Ranges
	for len(a) > 0 && len(b) > 0 {
		if a[0].End <= b[0].Start {
			a = a[endingAfter(a, b[0].Start):]
			continue
		}
		if b[0].End <= a[0].Start {
			b = b[endingAfter(b, a[0].Start):]
			continue
		}
		start, end := max(a[0].Start, b[0].Start), min(a[0].End, b[0].End)
		out.Add(start, end)
		if a[0].End < b[0].End {
			a = a[1:]
		} else {
			b = b[1:]
		}
	}
	return out
}

// endingAfter returns the index of the first range of rs that ends after
// addr (len(rs) if none does).
func endingAfter(rs Ranges, addr uint64) int {
	return sort.Search(len(rs), func(i int) bool { return rs[i].End > addr })
}

// Subtract returns the pages in a but not in b.
func Subtract(a, b Ranges) Ranges {
	var out Ranges
	for _, r := range a {
		start := r.Start
		b = b[endingAfter(b, start):]
		for i := 0; i < len(b) && b[i].Start < r.End; i++ {
			out.Add(start, min(b[i].Start, r.End))
			start = max(start, b[i].End)
		}
		out.Add(start, r.End)
	}
	return out
}

func (rs Ranges) String() string {
	parts := make([]string, len(rs))
	for i, r := range rs {
		parts[i] = r.String()
	}
	return "[" + strings.Join(parts, " ") + "]"
}
