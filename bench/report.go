package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/phaul/phaul/pagestream"
)

// Run is the outcome of one measured migration.
type Run struct {
	// Config names the compared configuration ("phaul", "track=hash", ...).
	Config string `json:"config"`
	// Variant is the configuration in full.
	Variant Variant `json:"variant"`
	// Workload is "heap" or "random" (the built-in workload's page
	// contents) or "cmd" (the user's command).
	Workload string `json:"workload"`
	// MemBytes and DirtyRate describe the workload.
	MemBytes  int64 `json:"mem_bytes"`
	DirtyRate int   `json:"dirty_pages_per_sec"`
	Threads   int   `json:"threads"`
	Repeat    int   `json:"repeat"`
	// AppDowntimeMS is the largest gap between the workload's heartbeats
	// around the migration; nil when the workload has no heartbeats.
	AppDowntimeMS *float64 `json:"app_downtime_ms"`
	// AppGapEndMS is when that largest gap ended, in ms from the start of
	// the migration (compare with TotalMS: a gap ending near the end is
	// the freeze; one ending earlier happened during the rounds).
	AppGapEndMS float64 `json:"app_gap_end_ms,omitempty"`
	// TCPClients is the number of TCP clients connected through the
	// migration (besides one UDP client); 0 without clients.
	TCPClients int `json:"tcp_clients,omitempty"`
	// ClientStallMS is the largest stall a connected TCP client saw: the
	// largest of the clients' largest gaps between two messages received
	// that overlap the migration. Nil when no client was measured.
	ClientStallMS *float64 `json:"client_stall_ms"`
	// UDPGapMS is the UDP client's largest gap between two answers, when
	// it overlaps the migration (else nil).
	UDPGapMS *float64 `json:"udp_gap_ms"`
	// Clients is what each client saw, the UDP client last.
	Clients []ClientResult `json:"clients,omitempty"`
	// FrozenMS is phaul's own account: source freeze to target resume.
	FrozenMS float64 `json:"frozen_ms"`
	// Phases splits FrozenMS (phaul's downtime_phases, in ms).
	Phases  map[string]float64 `json:"downtime_phases,omitempty"`
	TotalMS float64            `json:"total_ms"`
	// CleanupMS is the source's work after the migration (phaul's
	// cleanup_ms): the original's memory freed, the network lock removed.
	CleanupMS float64 `json:"cleanup_ms"`
	Bytes     uint64  `json:"bytes_on_wire"`
	Pages     uint64  `json:"pages_sent"`
	PagesZero uint64  `json:"pages_zero"`
	Rounds    int     `json:"rounds"`
	Tracker   string  `json:"tracker,omitempty"`
	// RestoreMS is the target's restore time as phaul reports it.
	RestoreMS float64 `json:"target_restore_ms"`
	// RoundBytes, RoundPages and RoundMS are per-round figures, round 0
	// first, the final (frozen) round last.
	RoundBytes []uint64  `json:"round_bytes,omitempty"`
	RoundPages []uint64  `json:"round_pages,omitempty"`
	RoundMS    []float64 `json:"round_ms,omitempty"`
	// CPU seconds spent by phaul on each side: the migrate process on the
	// source, the serve process on the target (during the migration).
	SourceCPU float64 `json:"source_cpu_s"`
	TargetCPU float64 `json:"target_cpu_s"`
	// BoundMS is the run's bandwidth bound (Bandwidth.Bound: the memory
	// over the slowest of the measured read, link and compression rates)
	// and BoundRatio TotalMS over it, whose target is at most
	// BoundFactor; both 0 when the bound is not known.
	BoundMS    float64 `json:"bound_ms,omitempty"`
	BoundRatio float64 `json:"total_bound_ratio,omitempty"`
	// Checked is set when the workload verified all of its memory after
	// the migration.
	Checked bool `json:"self_check_ok"`
	// Err is set when the run failed; failed runs are reported, not hidden.
	Err string `json:"error,omitempty"`
}

// Results is a whole bench session.
type Results struct {
	Started time.Time `json:"started"`
	Host    string    `json:"host"`
	Kernel  string    `json:"kernel"`
	Command string    `json:"command"`
	// Bandwidth is what the machine's read, link and compression stages
	// did, measured before the runs (nil when not measured).
	Bandwidth *Bandwidth `json:"bandwidth,omitempty"`
	// Notes say what was not run, and why.
	Notes []string `json:"notes,omitempty"`
	Runs  []Run    `json:"runs"`
}

// Summary is the statistics of one metric over repeated runs.
type Summary struct {
	N                int
	Median, Min, Max float64
	P25, P75         float64
}

// Summarize returns the statistics of xs (nil-safe).
func Summarize(xs []float64) Summary {
	if len(xs) == 0 {
		return Summary{}
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	q := func(p float64) float64 {
		pos := p * float64(len(s)-1)
		lo := int(math.Floor(pos))
		hi := int(math.Ceil(pos))
		return s[lo] + (s[hi]-s[lo])*(pos-float64(lo))
	}
	return Summary{N: len(s), Median: q(0.5), Min: s[0], Max: s[len(s)-1], P25: q(0.25), P75: q(0.75)}
}

// group is the runs of one (config, memory, dirty rate) point.
type group struct {
	config   string
	variant  Variant
	workload string
	mem      int64
	dirty    int
	runs     []Run
	failed   int
}

func groups(runs []Run) []*group {
	var out []*group
	idx := map[string]*group{}
	for _, r := range runs {
		k := fmt.Sprintf("%s|%s|%d|%d", r.Config, r.Workload, r.MemBytes, r.DirtyRate)
		g := idx[k]
		if g == nil {
			g = &group{config: r.Config, variant: r.Variant, workload: r.Workload, mem: r.MemBytes, dirty: r.DirtyRate}
			idx[k] = g
			out = append(out, g)
		}
		if r.Err != "" {
			g.failed++
			continue
		}
		g.runs = append(g.runs, r)
	}
	sort.SliceStable(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.config != b.config {
			return a.config < b.config
		}
		if a.workload != b.workload {
			return a.workload < b.workload
		}
		if a.mem != b.mem {
			return a.mem < b.mem
		}
		return a.dirty < b.dirty
	})
	return out
}

func metric(rs []Run, f func(Run) float64) Summary {
	xs := make([]float64, 0, len(rs))
	for _, r := range rs {
		xs = append(xs, f(r))
	}
	return Summarize(xs)
}

// optMetric summarizes a figure that some runs lack (nil).
func optMetric(rs []Run, f func(Run) *float64) Summary {
	var xs []float64
	for _, r := range rs {
		if v := f(r); v != nil {
			xs = append(xs, *v)
		}
	}
	return Summarize(xs)
}

func appDowntime(r Run) *float64 { return r.AppDowntimeMS }
func clientStall(r Run) *float64 { return r.ClientStallMS }

// phaseNames returns the phase names found in runs, in the order phaul
// goes through them (known names first), then any other sorted.
func phaseNames(runs []Run) []string {
	order := []string{"final_round_ms", "collect_ms", "state_ms", "ready_ms", "commit_ms"}
	have := map[string]bool{}
	for _, r := range runs {
		for k := range r.Phases {
			have[k] = true
		}
	}
	var out []string
	for _, k := range order {
		if have[k] {
			out = append(out, k)
			delete(have, k)
		}
	}
	var rest []string
	for k := range have {
		rest = append(rest, k)
	}
	sort.Strings(rest)
	return append(out, rest...)
}

// WriteMarkdown writes the report: one table row per configuration point,
// medians with their spread (min–max), where the frozen time went, the
// notes, and every failure spelled out.
func WriteMarkdown(w io.Writer, res *Results) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# phaul bench\n\n%s, kernel %s, started %s\n\n`%s`\n\n",
		res.Host, res.Kernel, res.Started.UTC().Format(time.RFC3339), res.Command)
	b.WriteString("Medians over the repeats, with min–max. App downtime is the largest gap between the workload's own heartbeats around the migration; client stall is the largest gap between two messages a connected TCP client received during it; frozen is phaul's source-freeze-to-target-resume figure; CPU is phaul's, in seconds, on the source (migrate) and the target (serve). – means not measured.\n\n")
	b.WriteString("| config | workload | memory | dirty pages/s | runs | app downtime ms | client stall ms | frozen ms | total ms | MiB on wire | rounds | source CPU s | target CPU s |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	gs := groups(res.Runs)
	for _, g := range gs {
		runs := fmt.Sprintf("%d", len(g.runs))
		if g.failed > 0 {
			runs += fmt.Sprintf(" (+%d failed)", g.failed)
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
			g.config, g.workload, sizeString(g.mem), g.dirty, runs,
			cell(optMetric(g.runs, appDowntime), 1),
			cell(optMetric(g.runs, clientStall), 1),
			cell(metric(g.runs, func(r Run) float64 { return r.FrozenMS }), 1),
			cell(metric(g.runs, func(r Run) float64 { return r.TotalMS }), 0),
			cell(metric(g.runs, func(r Run) float64 { return float64(r.Bytes) / (1 << 20) }), 1),
			cell(metric(g.runs, func(r Run) float64 { return float64(r.Rounds) }), 0),
			cell(metric(g.runs, func(r Run) float64 { return r.SourceCPU }), 2),
			cell(metric(g.runs, func(r Run) float64 { return r.TargetCPU }), 2))
	}
	if lines := clientLines(gs); len(lines) > 0 {
		b.WriteString("\n## What connected clients saw\n\n" + strings.Join(lines, "\n") + "\n")
	}
	if names := phaseNames(res.Runs); len(names) > 0 {
		b.WriteString("\n## Where the frozen time went\n\nMedian milliseconds of each phase of phaul's downtime.\n\n| config | workload | memory | dirty pages/s |")
		for _, n := range names {
			b.WriteString(" " + strings.TrimSuffix(n, "_ms") + " |")
		}
		b.WriteString("\n|---|---|---|---|" + strings.Repeat("---|", len(names)) + "\n")
		for _, g := range gs {
			if len(g.runs) == 0 {
				continue
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %d |", g.config, g.workload, sizeString(g.mem), g.dirty)
			for _, n := range names {
				s := optMetric(g.runs, func(r Run) *float64 {
					if v, ok := r.Phases[n]; ok {
						return &v
					}
					return nil
				})
				if s.N == 0 {
					b.WriteString(" – |")
				} else {
					fmt.Fprintf(&b, " %.1f |", s.Median)
				}
			}
			b.WriteString("\n")
		}
	}
	if lines := boundLines(res.Bandwidth, gs); len(lines) > 0 {
		b.WriteString(strings.Join(lines, "\n") + "\n")
	}
	if len(res.Notes) > 0 {
		b.WriteString("\n## Notes\n\n")
		for _, n := range res.Notes {
			b.WriteString("- " + n + "\n")
		}
	}
	var failures []string
	for _, r := range res.Runs {
		if r.Err != "" {
			failures = append(failures, fmt.Sprintf("- %s, %s, %s, %d pages/s, repeat %d: %s", r.Config, r.Workload, sizeString(r.MemBytes), r.DirtyRate, r.Repeat,
				strings.ReplaceAll(r.Err, "\n", " ")))
		}
	}
	if len(failures) > 0 {
		b.WriteString("\n## Failed runs\n\n" + strings.Join(failures, "\n") + "\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// boundLines is the "Bandwidth bound" section: the measured rates, and
// for each point its median total time against its bound (nothing
// without measured rates).
func boundLines(bw *Bandwidth, gs []*group) []string {
	if bw == nil {
		return nil
	}
	out := []string{"", "## Bandwidth bound", "",
		fmt.Sprintf("Measured here before the runs, in MB/s (10^6 bytes/s) of raw memory: read %s (process_vm_readv of %s in %s batches), "+
			"link %s (one TCP connection from the source host to the target host, %s)%s. "+
			"Bound = memory ÷ the slowest of read, link and compression (for the point's codec and data); ratio = median total ÷ bound; the target is a ratio ≤ %.1f.",
			formatMBps(bw.ReadMBps), sizeString(bw.ReadBytes), sizeString(ReadBatchBytes), formatMBps(bw.LinkMBps), sizeString(bw.LinkBytes),
			compressPhrase(bw.Compress), BoundFactor),
		"",
		"| config | workload | memory | dirty pages/s | total ms | bound ms | limited by | ratio | target met |",
		"|---|---|---|---|---|---|---|---|---|"}
	for _, g := range gs {
		total := metric(g.runs, func(r Run) float64 { return r.TotalMS })
		bound, ok := bw.Bound(g.mem, g.variant.Compress, g.workload)
		totalCell, boundCell, limit, ratio, met := "–", "–", "–", "–", "–"
		if total.N > 0 {
			totalCell = fmt.Sprintf("%.0f", total.Median)
		}
		if ok {
			boundCell, limit = fmt.Sprintf("%.0f", bound.MS), bound.Limit
		}
		if ok && total.N > 0 {
			r := total.Median / bound.MS
			ratio, met = fmt.Sprintf("%.2f", r), "no"
			if r <= BoundFactor {
				met = "yes"
			}
		}
		out = append(out, fmt.Sprintf("| %s | %s | %s | %d | %s | %s | %s | %s | %s |",
			g.config, g.workload, sizeString(g.mem), g.dirty, totalCell, boundCell, limit, ratio, met))
	}
	return out
}

// compressPhrase lists the compression rates for boundLines.
func compressPhrase(cs []CompressRate) string {
	if len(cs) == 0 {
		return ""
	}
	var parts []string
	for _, c := range cs {
		parts = append(parts, fmt.Sprintf("%s on %s pages %s (to %.0f%%)", c.Codec, c.Data, formatMBps(c.MBps), 100*c.Ratio))
	}
	return fmt.Sprintf(", compression %s (%s batches, %d workers)", strings.Join(parts, ", "),
		sizeString(pagestream.DefaultBatchBytes), pagestream.DefaultWorkers)
}

// clientLines says, for each point with clients, how their stall compares
// with the process's own downtime and phaul's frozen time (medians).
func clientLines(gs []*group) []string {
	var out []string
	for _, g := range gs {
		stall := optMetric(g.runs, clientStall)
		if stall.N == 0 {
			continue
		}
		clients := 0
		for _, r := range g.runs {
			clients = max(clients, r.TCPClients)
		}
		line := fmt.Sprintf("- %s, %s, %s, %d pages/s: the %d TCP clients stalled %.1f ms (median of %d)",
			g.config, g.workload, sizeString(g.mem), g.dirty, clients, stall.Median, stall.N)
		if down := optMetric(g.runs, appDowntime); down.N > 0 {
			line += fmt.Sprintf(", %s the %.1f ms the process itself was stopped", compare(stall.Median, down.Median), down.Median)
		}
		frozen := metric(g.runs, func(r Run) float64 { return r.FrozenMS })
		line += fmt.Sprintf(" and %s phaul's frozen time (%.1f ms)", compare(stall.Median, frozen.Median), frozen.Median)
		if udp := optMetric(g.runs, func(r Run) *float64 { return r.UDPGapMS }); udp.N > 0 {
			line += fmt.Sprintf("; the UDP echo went %.1f ms without an answer", udp.Median)
		}
		out = append(out, line+".")
	}
	return out
}

// compare says how a compares with b: "5.0 ms more than", "2.0 ms less
// than" or "as long as".
func compare(a, b float64) string {
	switch d := a - b; {
	case d >= 0.05:
		return fmt.Sprintf("%.1f ms more than", d)
	case d <= -0.05:
		return fmt.Sprintf("%.1f ms less than", -d)
	default:
		return "as long as"
	}
}

// cell formats a summary as "median (min–max)", or – without data.
func cell(s Summary, prec int) string {
	if s.N == 0 {
		return "–"
	}
	return fmt.Sprintf("%.*f (%.*f–%.*f)", prec, s.Median, prec, s.Min, prec, s.Max)
}

func sizeString(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20:
		return fmt.Sprintf("%d MiB", n>>20)
	case n == 0:
		return "–"
	default:
		return fmt.Sprintf("%d B", n)
	}
}

// WriteAll writes results.json, report.md and the plots into dir.
func WriteAll(dir string, res *Results) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var written []string
	put := func(name string, write func(io.Writer) error) error {
		path := filepath.Join(dir, name)
		f, err := os.Create(path)
		if err != nil {
			return err
		}
		if err := write(f); err != nil {
			f.Close()
			return fmt.Errorf("write %s: %w", path, err)
		}
		if err := f.Close(); err != nil {
			return err
		}
		written = append(written, path)
		return nil
	}
	if err := put("results.json", func(w io.Writer) error {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}); err != nil {
		return written, err
	}
	if err := put("report.md", func(w io.Writer) error { return WriteMarkdown(w, res) }); err != nil {
		return written, err
	}
	for _, p := range Plots(res) {
		p := p
		if err := put(p.File, p.WriteSVG); err != nil {
			return written, err
		}
	}
	return written, nil
}
