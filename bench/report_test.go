package bench

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func ms(v float64) *float64 { return &v }

const sampleNote = "CRIU comparisons skipped: criu is not on the PATH."

func sample() *Results {
	res := &Results{Started: time.Unix(1700000000, 0), Host: "h", Kernel: "6.18", Command: "phaul bench",
		Notes: []string{sampleNote}}
	for _, mem := range []int64{256 << 20, 1 << 30} {
		for rep := 0; rep < 3; rep++ {
			res.Runs = append(res.Runs, Run{Config: "uffdwp/s2", Workload: "heap", MemBytes: mem, DirtyRate: 1000, Repeat: rep,
				AppDowntimeMS: ms(float64(10+rep) + float64(mem>>30)*7), FrozenMS: float64(8 + rep), TotalMS: 1000, Bytes: 100 << 20, Rounds: 3,
				SourceCPU: 0.25 * float64(rep+1), TargetCPU: 0.5 + float64(rep),
				Phases:     map[string]float64{"final_round_ms": 2, "commit_ms": float64(rep), "new_phase_ms": 1},
				RoundBytes: []uint64{90 << 20, 8 << 20, 2 << 20}})
			if mem == 256<<20 {
				// Clients connected: their stall, and the UDP echo's
				// gap in two of the three runs.
				r := &res.Runs[len(res.Runs)-1]
				r.TCPClients, r.ClientStallMS = 3, ms(float64(40+10*rep))
				if rep > 0 {
					r.UDPGapMS = ms(float64(60 + rep))
				}
			}
		}
	}
	res.Runs = append(res.Runs, Run{Config: "uffdwp/s2", Workload: "heap", MemBytes: 1 << 30, DirtyRate: 1000, Repeat: 3, Err: "target refused:\nno room"})
	// A user's command: no heartbeats, so no app downtime.
	res.Runs = append(res.Runs, Run{Config: "phaul", Workload: "cmd", FrozenMS: 30, TotalMS: 500, Bytes: 1 << 20, Rounds: 2})
	return res
}

func TestSummarize(t *testing.T) {
	s := Summarize([]float64{5, 1, 3, 2, 4})
	if s.N != 5 || s.Median != 3 || s.Min != 1 || s.Max != 5 || s.P25 != 2 || s.P75 != 4 {
		t.Errorf("%+v", s)
	}
	if s := Summarize([]float64{1, 2}); s.Median != 1.5 {
		t.Errorf("even count median %v", s.Median)
	}
	if s := Summarize(nil); s.N != 0 || s.Median != 0 {
		t.Errorf("empty %+v", s)
	}
}

// TestReportAgreesWithJSON writes everything, then checks that the
// Markdown medians are those of the JSON runs, that the failed run is
// reported, and that every plot is well-formed, non-empty SVG.
func TestReportAgreesWithJSON(t *testing.T) {
	dir := t.TempDir()
	files, err := WriteAll(dir, sample())
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 5 {
		t.Fatalf("wrote %v", files)
	}
	var back Results
	b, err := os.ReadFile(filepath.Join(dir, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(filepath.Join(dir, "report.md"))
	if err != nil {
		t.Fatal(err)
	}
	rows := tableRows(string(md), "| config |")
	gs := groups(back.Runs)
	if len(rows) != len(gs) {
		t.Fatalf("%d table rows for %d groups:\n%s", len(rows), len(gs), md)
	}
	for i, g := range gs {
		row := rows[i]
		if row["config"] != g.config || row["workload"] != g.workload || row["memory"] != sizeString(g.mem) {
			t.Errorf("row %d is %v, group %s/%s/%s", i, row, g.config, g.workload, sizeString(g.mem))
		}
		check := func(col string, xs []float64, prec int) {
			t.Helper()
			want := "–"
			if s := Summarize(xs); s.N > 0 {
				want = fmt.Sprintf("%.*f (%.*f–%.*f)", prec, s.Median, prec, s.Min, prec, s.Max)
			}
			if row[col] != want {
				t.Errorf("%s %s %s: report says %q, JSON gives %q", g.config, sizeString(g.mem), col, row[col], want)
			}
		}
		var app, stall, frozen, src, tgt, mib []float64
		for _, r := range g.runs {
			if r.AppDowntimeMS != nil {
				app = append(app, *r.AppDowntimeMS)
			}
			if r.ClientStallMS != nil {
				stall = append(stall, *r.ClientStallMS)
			}
			frozen = append(frozen, r.FrozenMS)
			src = append(src, r.SourceCPU)
			tgt = append(tgt, r.TargetCPU)
			mib = append(mib, float64(r.Bytes)/(1<<20))
		}
		check("app downtime ms", app, 1)
		check("frozen ms", frozen, 1)
		check("source CPU s", src, 2)
		check("target CPU s", tgt, 2)
		check("MiB on wire", mib, 1)
		check("client stall ms", stall, 1)
	}
	if !strings.Contains(string(md), "+1 failed") || !strings.Contains(string(md), "target refused: no room") {
		t.Errorf("failed run not reported:\n%s", md)
	}
	// Medians of the 256 MiB runs: stall 50, app downtime 11, frozen 9,
	// UDP gap 61.5; the 1 GiB runs have no clients.
	want := "## What connected clients saw\n\n- uffdwp/s2, heap, 256 MiB, 1000 pages/s: the 3 TCP clients stalled 50.0 ms (median of 3), " +
		"39.0 ms more than the 11.0 ms the process itself was stopped and 41.0 ms more than phaul's frozen time (9.0 ms); " +
		"the UDP echo went 61.5 ms without an answer.\n\n"
	if !strings.Contains(string(md), want) {
		t.Errorf("no client sentence %q:\n%s", want, md)
	}
	if !strings.Contains(string(md), "## Notes\n\n- "+sampleNote) {
		t.Errorf("notes not reported:\n%s", md)
	}
	phases := tableRows(string(md), "| config | workload | memory | dirty pages/s | final_round |")
	if len(phases) != 3 || phases[0]["commit"] != "–" || phases[1]["commit"] != "1.0" || phases[1]["new_phase"] != "1.0" || phases[2]["final_round"] != "2.0" {
		t.Errorf("phase table %v", phases)
	}
	for _, f := range files {
		if !strings.HasSuffix(f, ".svg") {
			continue
		}
		svg, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := xml.Unmarshal(svg, new(struct{})); err != nil {
			t.Errorf("%s is not well-formed XML: %v", f, err)
		}
		if bytes.Count(svg, []byte("<polyline")) == 0 || bytes.Count(svg, []byte("<circle")) == 0 {
			t.Errorf("%s draws no data", f)
		}
	}
}

func TestNiceTicks(t *testing.T) {
	ticks := niceTicks(0, 97, 5)
	if ticks[0] != 0 || ticks[len(ticks)-1] < 97 || len(ticks) > 8 {
		t.Errorf("ticks %v", ticks)
	}
}

// tableRows parses the Markdown table whose header line starts with
// header into one map per row, keyed by the column names.
func tableRows(md, header string) []map[string]string {
	lines := strings.Split(md, "\n")
	for i, l := range lines {
		if !strings.HasPrefix(l, header) {
			continue
		}
		split := func(l string) []string {
			var out []string
			for _, c := range strings.Split(strings.Trim(l, "|"), "|") {
				out = append(out, strings.TrimSpace(c))
			}
			return out
		}
		cols := split(l)
		var rows []map[string]string
		for _, r := range lines[i+2:] {
			if !strings.HasPrefix(r, "|") {
				break
			}
			row := map[string]string{}
			for j, c := range split(r) {
				if j < len(cols) {
					row[cols[j]] = c
				}
			}
			rows = append(rows, row)
		}
		return rows
	}
	return nil
}
