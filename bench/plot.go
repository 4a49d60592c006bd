package bench

import (
	"fmt"
	"html"
	"io"
	"math"
	"sort"
	"strings"
)

// Series is one line of a plot.
type Series struct {
	Label  string
	Points [][2]float64 // x, y; sorted by x when drawn
}

// Plot is a line chart.
type Plot struct {
	File   string
	Title  string
	XLabel string
	YLabel string
	Series []Series
}

// Plots builds the standard plots of a bench session: downtime against
// memory size (with the clients' stall, when measured), downtime against
// dirty rate, and bytes per round. A plot with no data is left out.
func Plots(res *Results) []Plot {
	gs := groups(res.Runs)
	byMem := map[string]*Series{}
	byDirty := map[string]*Series{}
	var rounds []Series
	var memKeys, dirtyKeys []string
	stalls := false
	for _, g := range gs {
		if len(g.runs) == 0 {
			continue
		}
		cfg := g.config
		if g.workload != "heap" {
			cfg += " (" + g.workload + ")"
		}
		if down := optMetric(g.runs, appDowntime); down.N > 0 {
			k := fmt.Sprintf("%s, %d pages/s", cfg, g.dirty)
			if byMem[k] == nil {
				byMem[k] = &Series{Label: k}
				memKeys = append(memKeys, k)
			}
			byMem[k].Points = append(byMem[k].Points, [2]float64{float64(g.mem) / (1 << 20), down.Median})
			k = fmt.Sprintf("%s, %s", cfg, sizeString(g.mem))
			if byDirty[k] == nil {
				byDirty[k] = &Series{Label: k}
				dirtyKeys = append(dirtyKeys, k)
			}
			byDirty[k].Points = append(byDirty[k].Points, [2]float64{float64(g.dirty), down.Median})
		}
		if stall := optMetric(g.runs, clientStall); stall.N > 0 {
			stalls = true
			k := fmt.Sprintf("%s, %d pages/s, client stall", cfg, g.dirty)
			if byMem[k] == nil {
				byMem[k] = &Series{Label: k}
				memKeys = append(memKeys, k)
			}
			byMem[k].Points = append(byMem[k].Points, [2]float64{float64(g.mem) / (1 << 20), stall.Median})
		}
		// Median bytes of each round over the repeats.
		maxRounds := 0
		for _, r := range g.runs {
			maxRounds = max(maxRounds, len(r.RoundBytes))
		}
		s := Series{Label: fmt.Sprintf("%s, %s, %d pages/s", cfg, sizeString(g.mem), g.dirty)}
		for i := 0; i < maxRounds; i++ {
			var xs []float64
			for _, r := range g.runs {
				if i < len(r.RoundBytes) {
					xs = append(xs, float64(r.RoundBytes[i])/(1<<20))
				}
			}
			s.Points = append(s.Points, [2]float64{float64(i), Summarize(xs).Median})
		}
		if len(s.Points) > 0 {
			rounds = append(rounds, s)
		}
	}
	collect := func(keys []string, m map[string]*Series) []Series {
		var out []Series
		for _, k := range keys {
			out = append(out, *m[k])
		}
		return out
	}
	var plots []Plot
	if len(memKeys) > 0 {
		p := Plot{File: "downtime-vs-memory.svg", Title: "Downtime the application saw, by memory size",
			XLabel: "memory (MiB)", YLabel: "app downtime (ms, median)", Series: collect(memKeys, byMem)}
		if stalls {
			p.Title, p.YLabel = "Downtime the application and its clients saw, by memory size", "app downtime, client stall (ms, median)"
		}
		plots = append(plots, p)
	}
	if len(dirtyKeys) > 0 {
		plots = append(plots, Plot{File: "downtime-vs-dirty-rate.svg", Title: "Downtime the application saw, by dirty rate",
			XLabel: "pages written per second", YLabel: "app downtime (ms, median)", Series: collect(dirtyKeys, byDirty)})
	}
	if len(rounds) > 0 {
		plots = append(plots, Plot{File: "bytes-per-round.svg", Title: "Memory sent per pre-copy round",
			XLabel: "round", YLabel: "MiB (median)", Series: rounds})
	}
	return plots
}

// niceTicks returns about n round tick values covering [lo, hi].
func niceTicks(lo, hi float64, n int) []float64 {
	if hi <= lo {
		hi = lo + 1
	}
	raw := (hi - lo) / float64(n)
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	step := mag
	for _, m := range []float64{1, 2, 5, 10} {
		if m*mag >= raw {
			step = m * mag
			break
		}
	}
	var ticks []float64
	for v := math.Floor(lo/step) * step; v <= hi+step/2; v += step {
		ticks = append(ticks, v)
	}
	return ticks
}

var palette = []string{"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"}

// WriteSVG draws the plot.
func (p Plot) WriteSVG(w io.Writer) error {
	const W, H = 720.0, 440.0
	const left, right, top, bottom = 70.0, 220.0, 40.0, 50.0
	pw, ph := W-left-right, H-top-bottom
	xmin, xmax, ymin, ymax := math.Inf(1), math.Inf(-1), 0.0, math.Inf(-1)
	for _, s := range p.Series {
		for _, pt := range s.Points {
			xmin, xmax = math.Min(xmin, pt[0]), math.Max(xmax, pt[0])
			ymax = math.Max(ymax, pt[1])
		}
	}
	if math.IsInf(xmin, 1) {
		return fmt.Errorf("plot %s: no data", p.File)
	}
	if xmax == xmin {
		xmin, xmax = xmin-1, xmax+1
	}
	if ymax <= 0 {
		ymax = 1
	}
	xt, yt := niceTicks(xmin, xmax, 5), niceTicks(0, ymax, 5)
	xmin, xmax = math.Min(xmin, xt[0]), math.Max(xmax, xt[len(xt)-1])
	ymax = yt[len(yt)-1]
	X := func(v float64) float64 { return left + (v-xmin)/(xmax-xmin)*pw }
	Y := func(v float64) float64 { return top + ph - (v-ymin)/(ymax-ymin)*ph }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" font-family="sans-serif" font-size="12">`+"\n", W, H)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%.0f" y="22" font-size="15">%s</text>`+"\n", left, html.EscapeString(p.Title))
	for _, v := range xt {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", X(v), top, X(v), top+ph)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", X(v), top+ph+16, fmtTick(v))
	}
	for _, v := range yt {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", left, Y(v), left+pw, Y(v))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end">%s</text>`+"\n", left-6, Y(v)+4, fmtTick(v))
	}
	fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="none" stroke="#333"/>`+"\n", left, top, pw, ph)
	fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", left+pw/2, H-12, html.EscapeString(p.XLabel))
	fmt.Fprintf(&b, `<text transform="translate(18 %.1f) rotate(-90)" text-anchor="middle">%s</text>`+"\n", top+ph/2, html.EscapeString(p.YLabel))
	for i, s := range p.Series {
		c := palette[i%len(palette)]
		pts := append([][2]float64(nil), s.Points...)
		sort.Slice(pts, func(i, j int) bool { return pts[i][0] < pts[j][0] })
		var line []string
		for _, pt := range pts {
			line = append(line, fmt.Sprintf("%.1f,%.1f", X(pt[0]), Y(pt[1])))
			fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>`+"\n", X(pt[0]), Y(pt[1]), c)
		}
		fmt.Fprintf(&b, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2"/>`+"\n", strings.Join(line, " "), c)
		ly := top + 10 + float64(i)*18
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="2"/>`+"\n", left+pw+12, ly, left+pw+30, ly, c)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f">%s</text>`+"\n", left+pw+36, ly+4, html.EscapeString(s.Label))
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

func fmtTick(v float64) string {
	if v == math.Trunc(v) {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%g", math.Round(v*1000)/1000)
}
