package image

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

func describe(t *testing.T, dir string, opt Options) string {
	t.Helper()
	cp, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := Describe(&b, cp, opt); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// wantLines checks that out has a line matching each pattern (regular
// expressions; runs of blanks in the pattern match runs of blanks).
func wantLines(t *testing.T, out string, patterns ...string) {
	t.Helper()
	for _, p := range patterns {
		re := regexp.MustCompile("(?m)" + regexp.MustCompile(` +`).ReplaceAllString(p, `\s+`))
		if !re.MatchString(out) {
			t.Errorf("output lacks a line matching %q", p)
		}
	}
	if t.Failed() {
		t.Logf("output:\n%s", out)
	}
}

func TestDescribe(t *testing.T) {
	d := writeSample(t)
	out := describe(t, d.Path, Options{})
	wantLines(t, out,
		`^checkpoint `+regexp.QuoteMeta(d.Path)+`$`,
		`format version 1, phaul test, kernel 6\.18\.0-test, page size 4096`,
		`root pid 100, 3 processes`,
		`^    2 regular wronly\|append 4242 0 /var/log/app\.log`,
		`^process 100 \(ppid 1, pgid 100, sid 100\)$`,
		`comm "worker"`,
		`exe /usr/bin/worker`,
		`cwd /srv \(root /\)`,
		`creds uid 1000/1000/1000/1000 gid 1000/1000/1000/1000 groups \[27 1000\]`,
		// Threads: tid, rip, rsp, sigmask, rseq.
		`^    100 worker 0x0000000000401000 0x00007ffd00000100 0x0000000000001000 0x7f0000000020 \(32 B, sig 0x53053053\)`,
		`^    1100 helper 0x0000000000401234 .* - `,
		// Mappings with pages saved / zero / in parent.
		`^    0x555500000000 0x555500008000 rw-p heap 6 2 0 \[heap\]$`,
		`^    0x7ffd00000000 0x7ffd00004000 rw-p stack 2 2 0 \[stack\]$`,
		`^    5 3 pipe rdonly\|nonblock\|cloexec 0 -$`,
		`^    SIGINT 0x401500 0x4000000 0x0 0x401600$`,
		`^    SIGPIPE SIG_IGN `,
		`pages 5 runs: 8 saved \(32\.0 KiB\), 4 zero, 0 in parent`,
		`^zombie 102 - \(ppid 100, pgid 100, sid 100\) killed by SIGQUIT$`,
		`^total: 3 processes \(2 live\), 4 threads, 4 mappings, pages 16 saved \(64\.0 KiB\), 8 zero, 0 in parent$`,
	)
	if strings.Contains(out, "SIGTERM") {
		t.Error("default sigaction shown")
	}
}

func TestDescribeChain(t *testing.T) {
	img0, img1, img2 := writeThreeLevels(t, t.TempDir())
	out := describe(t, img2, Options{})
	wantLines(t, out,
		`kind pre-dump`,
		`parent `+regexp.QuoteMeta(img1),
		`chain \(3 images, 6 extents\)`,
		`^    0x10000 0x12000 2 `+regexp.QuoteMeta(img1)+` \(depth 1\) at 0x1000$`,
		`^    0x12000 0x14000 2 `+regexp.QuoteMeta(img0)+` \(depth 2\) at 0x3000$`,
		`^    0x20000 0x22000 2 zero \(`+regexp.QuoteMeta(img0)+`, depth 2\)$`,
		`^    0x40000 0x41000 1 `+regexp.QuoteMeta(img2)+` \(depth 0\)`,
	)
	// A broken chain is shown, not fatal.
	if err := os.RemoveAll(img0); err != nil {
		t.Fatal(err)
	}
	wantLines(t, describe(t, img2, Options{}), `chain cannot resolve: .*no such file`)

	var v struct {
		Processes []struct {
			ChainError string `json:"chain_error"`
		} `json:"processes"`
	}
	if err := json.Unmarshal([]byte(describe(t, img2, Options{JSON: true})), &v); err != nil {
		t.Fatal(err)
	}
	if len(v.Processes) != 1 || v.Processes[0].ChainError == "" {
		t.Errorf("JSON lacks the chain error: %+v", v)
	}
}

func TestDescribeJSON(t *testing.T) {
	_, _, img2 := writeThreeLevels(t, t.TempDir())
	for _, dir := range []string{writeSample(t).Path, img2} {
		out := describe(t, dir, Options{JSON: true})
		var v struct {
			Dir       string `json:"dir"`
			Inventory struct {
				RootPid int `json:"root_pid"`
			} `json:"inventory"`
			Processes []struct {
				PID     int `json:"pid"`
				Process *struct {
					Comm    string `json:"comm"`
					Threads []struct {
						Tid int `json:"tid"`
					} `json:"threads"`
				} `json:"process"`
				Pages *struct{ Here, Zero, InParent uint64 } `json:"pages"`
				Chain []struct {
					Image string `json:"image"`
					Depth int    `json:"depth"`
				} `json:"chain"`
			} `json:"processes"`
		}
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			t.Fatalf("invalid JSON: %v\n%s", err, out)
		}
		if v.Dir != dir || v.Inventory.RootPid == 0 || len(v.Processes) == 0 {
			t.Errorf("JSON of %s: %+v", dir, v)
		}
		if dir == img2 {
			if len(v.Processes[0].Chain) != 6 || v.Processes[0].Chain[1].Depth != 2 {
				t.Errorf("chain: %+v", v.Processes[0].Chain)
			}
		} else if p := v.Processes[0].Process; p == nil || p.Comm != "worker" || len(p.Threads) != 2 || v.Processes[0].Pages.Here != 8 {
			t.Errorf("process: %+v", v.Processes[0])
		}
	}
}

func TestDescribeFile(t *testing.T) {
	d := writeSample(t)
	cases := []struct {
		path  string
		kind  string
		lines []string
	}{
		{d.InventoryPath(), "inventory", []string{`: inventory image, format version 1$`, `root pid 100, 3 processes`}},
		{d.FilesPath(), "files", []string{`: files image`, `^    3 pipe rdonly\|nonblock 0 0 - pipe 77, 2 bytes queued$`}},
		{d.ProcessPath(101), "process", []string{`^process 101$`, `^    1101 helper `, `^    5 3 - cloexec - -$`}},
		{d.PageMapPath(100), "pagemap", []string{
			`runs \(5\): 8 saved \(32\.0 KiB\), 4 zero, 0 in parent`,
			`^    0x555500000000 0x555500003000 3 here 0x1000 0x[0-9a-f]{8}$`,
			`^    0x555500003000 0x555500005000 2 zero - -$`,
		}},
		{d.PagesPath(100), "pages", []string{`: pages file, format version 1$`, `pid 100, 8 pages of data \(32\.0 KiB\)`}},
	}
	for _, tc := range cases {
		t.Run(tc.kind, func(t *testing.T) {
			var b bytes.Buffer
			if err := DescribeFile(&b, tc.path, Options{}); err != nil {
				t.Fatal(err)
			}
			wantLines(t, b.String(), tc.lines...)

			b.Reset()
			if err := DescribeFile(&b, tc.path, Options{JSON: true}); err != nil {
				t.Fatal(err)
			}
			var v struct {
				File string `json:"file"`
				Kind string `json:"kind"`
			}
			if err := json.Unmarshal(b.Bytes(), &v); err != nil {
				t.Fatalf("invalid JSON: %v\n%s", err, b.String())
			}
			if v.File != tc.path || v.Kind != tc.kind {
				t.Errorf("JSON says %+v", v)
			}
		})
	}
}

func TestDescribeFileErrors(t *testing.T) {
	d := writeSample(t)
	// Corrupt framing: an error, nothing shown.
	bad := filepath.Join(d.Path, "bad.img")
	if err := os.WriteFile(bad, flipByte(readFile(t, d.FilesPath()), HeaderSize+1), 0o600); err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := DescribeFile(&b, bad, Options{}); !errors.Is(err, ErrChecksum) || b.Len() != 0 {
		t.Fatalf("got %v and %q", err, b.String())
	}
	// Well framed but invalid: shown, then the error.
	p := sampleProcess(100)
	p.Threads = p.Threads[1:]
	payload, err := marshalFrame(KindProcess, p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bad, payload, 0o600); err != nil {
		t.Fatal(err)
	}
	b.Reset()
	err = DescribeFile(&b, bad, Options{})
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "main thread missing") || !strings.Contains(b.String(), "helper") {
		t.Fatalf("got %v and %q", err, b.String())
	}
	if err := DescribeFile(&b, filepath.Join(d.Path, "nope.img"), Options{}); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("got %v", err)
	}
}
