package predump

import (
	"fmt"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/tracker"
)

// ImageSink records a round as the page map and pages file of one process
// in an image directory: WritePages, ZeroPages and KeepPages become
// PAGES_HERE, PAGES_ZERO and PAGES_IN_PARENT runs.
type ImageSink struct {
	w *image.PageWriter
}

// NewImageSink starts writing the pages of pid into the image directory dir.
func NewImageSink(dir string, pid int) (*ImageSink, error) {
	w, err := image.Dir{Path: dir}.NewPageWriter(pid)
	if err != nil {
		return nil, err
	}
	return &ImageSink{w: w}, nil
}

// WritePages implements Sink.
func (s *ImageSink) WritePages(addr uint64, data []byte) error { return s.w.AddRun(addr, data) }

// ZeroPages implements Sink.
func (s *ImageSink) ZeroPages(addr, n uint64) error { return s.w.AddZeroRun(addr, n) }

// KeepPages implements Sink.
func (s *ImageSink) KeepPages(addr, n uint64) error { return s.w.AddParentRun(addr, n) }

// Done writes the pages file and the page map.
func (s *ImageSink) Done() error { return s.w.Close() }

// Abort discards what was written; it does nothing after Done.
func (s *ImageSink) Abort() { s.w.Abort() }

// Stats returns what the writer recorded.
func (s *ImageSink) Stats() image.PageStats { return s.w.Stats() }

// Recorded returns the pages the image directory dir holds for pid (every
// run of its page map, whatever its source): the Previous of the round
// that continues it.
func Recorded(dir string, pid int) (tracker.Ranges, error) {
	pm, err := image.Dir{Path: dir}.ReadPageMap(pid)
	if err != nil {
		return nil, fmt.Errorf("pages recorded in %s: %w", dir, err)
	}
	var out tracker.Ranges
	for _, r := range pm.GetRuns() {
		out.Add(r.GetAddr(), r.GetAddr()+r.GetNrPages()*PageSize)
	}
	return out, nil
}
