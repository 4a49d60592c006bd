package bench

import (
	"fmt"
	"io"
	"strings"
)

// ProgressPrinter returns a Config.Progress that shows a session's
// progress on w: a bar redrawn in place when w is a terminal, else one
// line per run.
func ProgressPrinter(w io.Writer, terminal bool) func(Progress) {
	return func(p Progress) {
		if p.Last == nil && p.Bandwidth != nil {
			fmt.Fprintf(w, "bench: bandwidth: %s\n", p.Bandwidth)
		}
		if terminal {
			const width = 30
			filled := 0
			if p.Total > 0 {
				filled = width * p.Done / p.Total
			}
			last := ""
			if p.Last != nil {
				last = describeRun(*p.Last)
			}
			if len(last) > 70 {
				last = last[:67] + "..."
			}
			fmt.Fprintf(w, "\r\033[K[%s%s] %d/%d %s", strings.Repeat("#", filled), strings.Repeat(".", width-filled), p.Done, p.Total, last)
			if p.Done == p.Total {
				fmt.Fprintln(w)
			}
			return
		}
		if p.Last == nil {
			fmt.Fprintf(w, "bench: %d runs\n", p.Total)
			return
		}
		fmt.Fprintf(w, "bench: %d/%d %s\n", p.Done, p.Total, describeRun(*p.Last))
	}
}

// describeRun is a one-line account of a run.
func describeRun(r Run) string {
	what := fmt.Sprintf("%s, %s %s, %d pages/s, #%d", r.Config, r.Workload, sizeString(r.MemBytes), r.DirtyRate, r.Repeat+1)
	if r.Err != "" {
		msg, _, _ := strings.Cut(r.Err, "\n")
		return what + ": FAILED: " + msg
	}
	app := "–"
	if r.AppDowntimeMS != nil {
		app = fmt.Sprintf("%.1f ms", *r.AppDowntimeMS)
	}
	if r.ClientStallMS != nil {
		app += fmt.Sprintf(", client stall %.1f ms", *r.ClientStallMS)
	}
	return fmt.Sprintf("%s: app downtime %s, frozen %.1f ms, total %.0f ms, %d rounds, %.1f MiB", what, app, r.FrozenMS, r.TotalMS, r.Rounds, float64(r.Bytes)/(1<<20))
}
