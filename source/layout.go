package source

import (
	"github.com/phaul/phaul/protocol/imagepb"
	"github.com/phaul/phaul/tracker"
)

// layoutRanges returns the address ranges of a round's layout: what the
// target maps before the round's pages arrive. A round sends no page
// outside them (predump.Options.Layout): the process may map memory
// between reading its layout and reading its pages, and the target would
// have nowhere to put those.
func layoutRanges(vmas []*imagepb.VMA) tracker.Ranges {
	rs := make([]tracker.Range, 0, len(vmas))
	for _, v := range vmas {
		rs = append(rs, tracker.Range{Start: v.GetStart(), End: v.GetEnd()})
	}
	return tracker.Normalize(rs)
}
