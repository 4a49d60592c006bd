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
)

// Run is the outcome of one measured migration (or dump/restore).
type Run struct {
	// Config names the compared configuration ("uffdwp/s2/25ms", "criu", ...).
	Config string `json:"config"`
	// MemBytes and DirtyRate describe the workload.
	MemBytes  int64 `json:"mem_bytes"`
	DirtyRate int   `json:"dirty_pages_per_sec"`
	Threads   int   `json:"threads"`
	Repeat    int   `json:"repeat"`
	// AppDowntimeMS is the largest gap between the workload's heartbeats.
	AppDowntimeMS float64 `json:"app_downtime_ms"`
	// ClientStallMS is the largest gap a connected client saw (0 if none).
	ClientStallMS float64 `json:"client_stall_ms,omitempty"`
	// FrozenMS is phaul's own account: source freeze to target resume.
	FrozenMS float64 `json:"frozen_ms"`
	TotalMS  float64 `json:"total_ms"`
	Bytes    uint64  `json:"bytes_on_wire"`
	Rounds   int     `json:"rounds"`
	// RoundBytes and RoundMS are per-round figures, round 0 first.
	RoundBytes []uint64  `json:"round_bytes,omitempty"`
	RoundMS    []float64 `json:"round_ms,omitempty"`
	// CPU seconds spent by phaul on each side.
	SourceCPU float64 `json:"source_cpu_s"`
	TargetCPU float64 `json:"target_cpu_s"`
	// Err is set when the run failed; failed runs are reported, not hidden.
	Err string `json:"error,omitempty"`
}

// Results is a whole bench session.
type Results struct {
	Started time.Time `json:"started"`
	Host    string    `json:"host"`
	Kernel  string    `json:"kernel"`
	Command string    `json:"command"`
	Runs    []Run     `json:"runs"`
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
	config string
	mem    int64
	dirty  int
	runs   []Run
	failed int
}

func groups(runs []Run) []*group {
	var out []*group
	idx := map[string]*group{}
	for _, r := range runs {
		k := fmt.Sprintf("%s|%d|%d", r.Config, r.MemBytes, r.DirtyRate)
		g := idx[k]
		if g == nil {
			g = &group{config: r.Config, mem: r.MemBytes, dirty: r.DirtyRate}
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

// WriteMarkdown writes the report: one table row per configuration point,
// medians with their spread (min–max), and every failure spelled out.
func WriteMarkdown(w io.Writer, res *Results) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# phaul bench\n\n%s, kernel %s, started %s\n\n`%s`\n\n",
		res.Host, res.Kernel, res.Started.UTC().Format(time.RFC3339), res.Command)
	b.WriteString("Medians over the repeats, with min–max. App downtime is the largest gap between the workload's own heartbeats; frozen is phaul's source-freeze-to-target-resume figure.\n\n")
	b.WriteString("| config | memory | dirty pages/s | runs | app downtime ms | client stall ms | frozen ms | total ms | bytes on wire | rounds |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|\n")
	for _, g := range groups(res.Runs) {
		cell := func(f func(Run) float64, prec int) string {
			s := metric(g.runs, f)
			if s.N == 0 {
				return "–"
			}
			return fmt.Sprintf("%.*f (%.*f–%.*f)", prec, s.Median, prec, s.Min, prec, s.Max)
		}
		runs := fmt.Sprintf("%d", len(g.runs))
		if g.failed > 0 {
			runs += fmt.Sprintf(" (+%d failed)", g.failed)
		}
		fmt.Fprintf(&b, "| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s |\n",
			g.config, sizeString(g.mem), g.dirty, runs,
			cell(func(r Run) float64 { return r.AppDowntimeMS }, 1),
			cell(func(r Run) float64 { return r.ClientStallMS }, 1),
			cell(func(r Run) float64 { return r.FrozenMS }, 1),
			cell(func(r Run) float64 { return r.TotalMS }, 0),
			cell(func(r Run) float64 { return float64(r.Bytes) / (1 << 20) }, 1)+" MiB",
			cell(func(r Run) float64 { return float64(r.Rounds) }, 0))
	}
	var failures []string
	for _, r := range res.Runs {
		if r.Err != "" {
			failures = append(failures, fmt.Sprintf("- %s, %s, %d pages/s, repeat %d: %s", r.Config, sizeString(r.MemBytes), r.DirtyRate, r.Repeat, r.Err))
		}
	}
	if len(failures) > 0 {
		b.WriteString("\n## Failed runs\n\n" + strings.Join(failures, "\n") + "\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func sizeString(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20:
		return fmt.Sprintf("%d MiB", n>>20)
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
