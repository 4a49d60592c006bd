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

func sample() *Results {
	res := &Results{Started: time.Unix(1700000000, 0), Host: "h", Kernel: "6.18", Command: "phaul bench"}
	for _, mem := range []int64{256 << 20, 1 << 30} {
		for rep := 0; rep < 3; rep++ {
			res.Runs = append(res.Runs, Run{Config: "uffdwp/s2", MemBytes: mem, DirtyRate: 1000, Repeat: rep,
				AppDowntimeMS: float64(10 + rep), FrozenMS: float64(8 + rep), TotalMS: 1000, Bytes: 100 << 20, Rounds: 3,
				RoundBytes: []uint64{90 << 20, 8 << 20, 2 << 20}})
		}
	}
	res.Runs = append(res.Runs, Run{Config: "uffdwp/s2", MemBytes: 1 << 30, DirtyRate: 1000, Repeat: 3, Err: "target refused: no room"})
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
	for _, g := range groups(back.Runs) {
		want := Summarize(func() []float64 {
			var xs []float64
			for _, r := range g.runs {
				xs = append(xs, r.AppDowntimeMS)
			}
			return xs
		}())
		cell := strings.TrimSpace(strings.Split(strings.Split(string(md), "| "+sizeString(g.mem)+" | ")[1], "|")[2])
		if !strings.HasPrefix(cell, fmt.Sprintf("%.1f (", want.Median)) {
			t.Errorf("%s: report says %q, JSON median %v", sizeString(g.mem), cell, want.Median)
		}
	}
	if !strings.Contains(string(md), "+1 failed") || !strings.Contains(string(md), "target refused: no room") {
		t.Errorf("failed run not reported:\n%s", md)
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
