package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/topology"
	"github.com/phaul/phaul/pagestream"
)

// sampleBandwidth: the link is the slowest stage for heap data with s2,
// compression for random data.
func sampleBandwidth() *Bandwidth {
	return &Bandwidth{ReadMBps: 4000, ReadBytes: 256 << 20, LinkMBps: 1000, LinkBytes: 512 << 20,
		Compress: []CompressRate{
			{Codec: "s2", Data: "heap", MBps: 2000, Bytes: 256 << 20, Ratio: 0.1},
			{Codec: "s2", Data: "random", MBps: 500, Bytes: 256 << 20, Ratio: 1},
			{Codec: "zstd", Data: "heap", MBps: 800, Bytes: 256 << 20, Ratio: 0.05},
		}}
}

func TestBound(t *testing.T) {
	const mem = 256 << 20
	slowRead := sampleBandwidth()
	slowRead.ReadMBps = 100
	noLink := sampleBandwidth()
	noLink.LinkMBps = 0
	for _, tc := range []struct {
		name        string
		bw          *Bandwidth
		mem         int64
		codec, data string
		ms          float64 // 0: no bound
		limit       string
	}{
		{"default codec, heap", sampleBandwidth(), mem, "", "heap", mem / 1e6, "link"},
		{"s2 named", sampleBandwidth(), mem, "s2", "heap", mem / 1e6, "link"},
		{"random data", sampleBandwidth(), mem, "", "random", mem / 5e5, "compress"},
		{"no compression", sampleBandwidth(), mem, "none", "random", mem / 1e6, "link"},
		{"zstd", sampleBandwidth(), mem, "zstd", "heap", mem / 8e5, "compress"},
		{"slow read", slowRead, mem, "", "heap", mem / 1e5, "read"},
		{"zstd on random not measured", sampleBandwidth(), mem, "zstd", "random", 0, ""},
		{"link not measured", noLink, mem, "", "heap", 0, ""},
		{"a command's memory is unknown", sampleBandwidth(), 0, "", "cmd", 0, ""},
		{"nothing measured", nil, mem, "", "heap", 0, ""},
	} {
		b, ok := tc.bw.Bound(tc.mem, tc.codec, tc.data)
		if ok != (tc.ms > 0) || math.Abs(b.MS-tc.ms) > 1e-9 || b.Limit != tc.limit {
			t.Errorf("%s: bound %+v %v, want %.3f ms limited by %q", tc.name, b, ok, tc.ms, tc.limit)
		}
	}
}

func TestBoundRun(t *testing.T) {
	bw := sampleBandwidth()
	run := Run{Workload: "heap", MemBytes: 256 << 20, TotalMS: 402.653184}
	boundRun(bw, &run)
	if math.Abs(run.BoundMS-268.435456) > 1e-9 || math.Abs(run.BoundRatio-1.5) > 1e-9 {
		t.Errorf("bound %v ms, ratio %v; want 268.435456 ms, 1.5", run.BoundMS, run.BoundRatio)
	}
	failed := Run{Workload: "heap", MemBytes: 256 << 20, TotalMS: 400, Err: "no"}
	boundRun(bw, &failed)
	if failed.BoundMS != 0 || failed.BoundRatio != 0 {
		t.Errorf("a failed run got a bound: %+v", failed)
	}
}

func TestCompressKinds(t *testing.T) {
	kinds := func(cfg Config) string {
		t.Helper()
		cases, err := plan(context.Background(), withDefaults(cfg), &Results{})
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, k := range compressKinds(cases) {
			out = append(out, fmt.Sprintf("%s/%v", k.codec, k.random))
		}
		return strings.Join(out, " ")
	}
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{}, "s2/false"},
		{Config{Random: true}, "s2/true"},
		{Config{Compare: []string{"compress=none,zstd,s2", "data=random,heap"}}, "s2/false zstd/false s2/true zstd/true"},
		{Config{Compare: []string{"compress=none"}}, ""},
		{Config{Cmd: "sleep 100"}, ""},
	} {
		if got := kinds(tc.cfg); got != tc.want {
			t.Errorf("%+v: measures %q, want %q", tc.cfg, got, tc.want)
		}
	}
}

// boundSample is two points of 256 MiB, heap (s2) and random (s2), with
// totals of 300, 400, 500 ms; a point of zstd on random data, which has
// no measured rate; and a user's command.
func boundSample() *Results {
	res := &Results{Started: time.Unix(1700000000, 0), Host: "h", Kernel: "6.18", Bandwidth: sampleBandwidth()}
	for _, data := range []string{"heap", "random"} {
		for rep, total := range []float64{500, 300, 400} {
			res.Runs = append(res.Runs, Run{Config: "phaul", Workload: data, MemBytes: 256 << 20, DirtyRate: 1000,
				Repeat: rep, TotalMS: total, Variant: Variant{Name: "phaul", Engine: "phaul", Random: data == "random"}})
		}
	}
	res.Runs = append(res.Runs,
		Run{Config: "zstd", Workload: "random", MemBytes: 256 << 20, TotalMS: 900,
			Variant: Variant{Name: "zstd", Engine: "phaul", Compress: "zstd", Random: true}},
		Run{Config: "phaul", Workload: "cmd", TotalMS: 100, Variant: Variant{Name: "phaul", Engine: "phaul"}})
	for i := range res.Runs {
		boundRun(res.Bandwidth, &res.Runs[i])
	}
	return res
}

// TestBoundReport: the report's bound table gives each point its median
// total, its bound, the stage that limits it and the ratio, and
// results.json carries the rates and each run's bound.
func TestBoundReport(t *testing.T) {
	dir := t.TempDir()
	if _, err := WriteAll(dir, boundSample()); err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(filepath.Join(dir, "report.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"## Bandwidth bound", "read 4000 ", "link 1000 ", "s2 on heap pages 2000 (to 10%)", "s2 on random pages 500 (to 100%)",
		"zstd on heap pages 800 (to 5%)", "ratio ≤ 1.3"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("the report lacks %q:\n%s", want, md)
		}
	}
	rows := tableRows(string(md), "| config | workload | memory | dirty pages/s | total ms | bound ms |")
	type row struct{ total, bound, limit, ratio, met string }
	want := map[string]row{
		// Median 400 ms over 268 ms (link): 1.49.
		"phaul heap": {"400", "268", "link", "1.49", "no"},
		// 400 ms over 537 ms (s2 on random data): 0.75.
		"phaul random": {"400", "537", "compress", "0.75", "yes"},
		"zstd random":  {"900", "–", "–", "–", "–"},
		"phaul cmd":    {"100", "–", "–", "–", "–"},
	}
	if len(rows) != len(want) {
		t.Fatalf("%d rows, want %d:\n%s", len(rows), len(want), md)
	}
	for _, r := range rows {
		k := r["config"] + " " + r["workload"]
		got := row{r["total ms"], r["bound ms"], r["limited by"], r["ratio"], r["target met"]}
		if w, ok := want[k]; !ok || got != w {
			t.Errorf("%s: %+v, want %+v", k, got, w)
		}
	}
	var back Results
	b, err := os.ReadFile(filepath.Join(dir, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Bandwidth == nil || back.Bandwidth.LinkMBps != 1000 || len(back.Bandwidth.Compress) != 3 || back.Bandwidth.Compress[1].MBps != 500 {
		t.Errorf("results.json bandwidth: %+v", back.Bandwidth)
	}
	for _, key := range []string{`"read_MBps": 4000`, `"link_MBps": 1000`, `"compress_MBps": 2000`, `"bound_ms": 268.435456`} {
		if !bytes.Contains(b, []byte(key)) {
			t.Errorf("results.json lacks %s", key)
		}
	}
	if r := back.Runs[1]; math.Abs(r.BoundRatio-300/268.435456) > 1e-9 {
		t.Errorf("run %+v: ratio %v", r, r.BoundRatio)
	}
	// Without measured rates there is no section.
	var plain strings.Builder
	res := boundSample()
	res.Bandwidth = nil
	if err := WriteMarkdown(&plain, res); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(plain.String(), "Bandwidth bound") {
		t.Errorf("a bound section without rates:\n%s", plain.String())
	}
}

// TestProgressPrintsBandwidthOnce: the rates are printed once, before the
// first run.
func TestProgressPrintsBandwidthOnce(t *testing.T) {
	const line = "bench: bandwidth: read 4000 MB/s, link 1000 MB/s, compress s2/heap 2000 MB/s (ratio 0.10), " +
		"compress s2/random 500 MB/s (ratio 1.00), compress zstd/heap 800 MB/s (ratio 0.05)\n"
	for _, terminal := range []bool{false, true} {
		var b bytes.Buffer
		p := ProgressPrinter(&b, terminal)
		bw := sampleBandwidth()
		p(Progress{Total: 2, Bandwidth: bw})
		p(Progress{Done: 1, Total: 2, Last: &Run{Config: "phaul", Workload: "heap"}, Bandwidth: bw})
		p(Progress{Done: 2, Total: 2, Last: &Run{Config: "phaul", Workload: "heap"}, Bandwidth: bw})
		if n := strings.Count(b.String(), "bench: bandwidth:"); n != 1 || !strings.HasPrefix(b.String(), line) {
			t.Errorf("terminal %v: printed the rates %d times:\n%s", terminal, n, b.String())
		}
	}
}

// plausible fails unless v MB/s lies in [lo, hi].
func plausible(t *testing.T, what string, v, lo, hi float64) {
	t.Helper()
	t.Logf("%s: %.0f MB/s", what, v)
	if !(v >= lo && v <= hi) {
		t.Errorf("%s: %.1f MB/s, want %.0f–%.0f", what, v, lo, hi)
	}
}

func TestMeasureRead(t *testing.T) {
	v, err := MeasureRead(context.Background(), ReadMeasureBytes)
	if err != nil {
		t.Fatal(err)
	}
	// A memory copy: far more than a disk, far less than a terabyte/s.
	plausible(t, "read", v, 100, 1e6)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := MeasureRead(ctx, 16<<20); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v", err)
	}
	if _, err := MeasureRead(context.Background(), 100); err == nil {
		t.Error("read less than a page")
	}
}

func TestMeasureCompress(t *testing.T) {
	for _, tc := range []struct {
		codec  pagestream.Codec
		random bool
		n      int64
		// The compressed size over the raw size.
		ratioLo, ratioHi float64
	}{
		{pagestream.CodecS2, false, CompressMeasureBytes, 0, 0.5},
		// Incompressible: batches go raw.
		{pagestream.CodecS2, true, 64 << 20, 0.99, 1},
		{pagestream.CodecZstd, false, 16 << 20, 0, 0.5},
	} {
		c, err := MeasureCompress(context.Background(), tc.codec, tc.random, 256<<20, tc.n)
		if err != nil {
			t.Fatal(err)
		}
		name := c.Codec + "/" + c.Data
		plausible(t, name, c.MBps, 20, 1e6)
		if c.Bytes != tc.n || c.Ratio < tc.ratioLo || c.Ratio > tc.ratioHi || c.Codec != pagestream.CodecName(tc.codec) ||
			(c.Data == "random") != tc.random {
			t.Errorf("%s: %+v", name, c)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := MeasureCompress(ctx, pagestream.CodecS2, false, 16<<20, 16<<20); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v", err)
	}
}

// TestMeasureLink measures the loopback here and, as root with iproute2,
// the link between two hosts of a topology like the bench's.
func TestMeasureLink(t *testing.T) {
	v, err := MeasureLink(context.Background(), nil, nil, 128<<20)
	if err != nil {
		t.Fatal(err)
	}
	plausible(t, "loopback", v, 20, 1e6)
	if os.Geteuid() != 0 {
		t.Skip("two hosts need root")
	}
	n, err := topology.New(context.Background(), "source", "target")
	if errors.Is(err, topology.ErrNoIP) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	v, err = MeasureLink(context.Background(), n.Host("source"), n.Host("target"), 256<<20)
	if err != nil {
		t.Fatal(err)
	}
	plausible(t, "source → target", v, 20, 1e6)
	// Cancelled mid-way, it ends at once.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := MeasureLink(ctx, n.Host("source"), n.Host("target"), 1<<40); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("cancelled: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("took %v to stop", d)
	}
}
