package cli

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/phaul/phaul/internal/feature"
)

// runCheckCmd runs `phaul ARGS...` and returns the exit status and output.
func runCheckCmd(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(args, &Env{Stdout: &out, Stderr: &errOut})
	return code, out.String(), errOut.String()
}

// checkWantStatus derives the exit status of a full `phaul check` from the
// probes themselves.
func checkWantStatus() int {
	for _, f := range feature.Features() {
		if f.Need == feature.Required && f.Probe() != nil {
			return 1
		}
	}
	return 0
}

func TestCheckText(t *testing.T) {
	code, out, stderr := runCheckCmd(t, "check")
	if want := checkWantStatus(); code != want {
		t.Fatalf("exit status %d, want %d; stderr %q", code, want, stderr)
	}
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	byName := map[string]string{}
	for _, l := range lines {
		if name, _, ok := strings.Cut(l, " "); ok {
			byName[name] = l
		}
	}
	for _, f := range feature.Features() {
		l, ok := byName[f.Name]
		if !ok {
			t.Errorf("no line for %s in\n%s", f.Name, out)
			continue
		}
		status := "ok"
		if err := f.Probe(); errors.Is(err, feature.ErrNotSupported) {
			status = "absent"
		} else if err != nil {
			status = "error"
		}
		if fields := strings.Fields(l); len(fields) < 3 || fields[1] != status || fields[2] != f.Need.String() {
			t.Errorf("line %q: want status %s, need %s", l, status, f.Need)
		}
	}
	last := lines[len(lines)-1]
	if !strings.HasPrefix(last, "dump/restore: ") || !strings.Contains(last, "live migration: ") {
		t.Errorf("last line %q is no summary", last)
	}
	if feature.UffdWPAsync() == nil && feature.PagemapScan() == nil && !strings.Contains(last, "uffd-wp") {
		t.Errorf("summary %q does not offer uffd-wp tracking", last)
	}
}

func TestCheckJSON(t *testing.T) {
	code, out, stderr := runCheckCmd(t, "check", "--json")
	if want := checkWantStatus(); code != want {
		t.Fatalf("exit status %d, want %d; stderr %q", code, want, stderr)
	}
	var rep checkReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, out)
	}
	fs := feature.Features()
	if len(rep.Features) != len(fs) {
		t.Fatalf("%d features in JSON, want %d", len(rep.Features), len(fs))
	}
	for i, f := range fs {
		c := rep.Features[i]
		err := f.Probe()
		if c.Name != f.Name || c.Need != f.Need.String() || c.OK != (err == nil) || c.Follows == "" {
			t.Errorf("feature %d: %+v (probe says %v)", i, c, err)
		}
		if (c.Error != "") != (err != nil) {
			t.Errorf("%s: error %q, probe says %v", c.Name, c.Error, err)
		}
	}
	v := rep.Verdict
	if v == nil {
		t.Fatal("no verdict")
	}
	if v.DumpRestore != (code == 0) || v.DumpRestore != (len(v.MissingRequired) == 0) {
		t.Errorf("verdict %+v with exit status %d", v, code)
	}
	if n := len(v.DirtyTracking); n == 0 || v.DirtyTracking[n-1] != "hash" {
		t.Errorf("dirty tracking %v: hash must always be offered", v.DirtyTracking)
	}
	if rep.Kernel == "" || v.Summary == "" {
		t.Errorf("kernel %q, summary %q", rep.Kernel, v.Summary)
	}
}

func TestCheckFeatureFlag(t *testing.T) {
	code, out, _ := runCheckCmd(t, "check", "--json", "--feature", feature.NamePidMax)
	var rep checkReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Features) != 1 || rep.Features[0].Name != feature.NamePidMax || rep.Verdict != nil {
		t.Errorf("report %+v", rep)
	}
	if want := map[bool]int{true: 0, false: 1}[feature.PidMax() == nil]; code != want {
		t.Errorf("exit status %d, want %d", code, want)
	}

	// An absent optional feature asked for by name fails the command.
	code, out, stderr := runCheckCmd(t, "check", "--feature", feature.NameSoftDirty+","+feature.NamePidMax)
	wantCode := 0
	if feature.SoftDirty() != nil {
		wantCode = 1
	}
	if code != wantCode {
		t.Errorf("soft-dirty: exit status %d, want %d (stderr %q)", code, wantCode, stderr)
	}
	if strings.Count(out, "\n") != 4 || strings.Contains(out, "dump/restore") {
		t.Errorf("output for two features:\n%s", out)
	}

	code, _, stderr = runCheckCmd(t, "check", "--feature", "no-such-feature")
	if code != 2 || !strings.Contains(stderr, `unknown feature "no-such-feature"`) {
		t.Errorf("unknown feature: exit status %d, stderr %q", code, stderr)
	}
	if code, _, _ := runCheckCmd(t, "check", "extra"); code != 2 {
		t.Errorf("extra argument: exit status %d, want 2", code)
	}
}

func TestCheckHelp(t *testing.T) {
	code, out, _ := runCheckCmd(t, "check", "--help")
	if code != 0 {
		t.Fatalf("exit status %d", code)
	}
	for _, want := range []string{"--json", "--feature", "exit 1", "required"} {
		if !strings.Contains(out, want) {
			t.Errorf("help lacks %q:\n%s", want, out)
		}
	}
	for _, f := range feature.Features() {
		if !strings.Contains(out, f.Name) {
			t.Errorf("help does not name %s", f.Name)
		}
	}
}

// fakeCheckProbes makes every feature present except those in absent (reported
// missing) and broken (the probe could not run), for the duration of t.
func fakeCheckProbes(t *testing.T, absent, broken []string) {
	t.Helper()
	isIn := func(list []string, name string) bool {
		for _, n := range list {
			if n == name {
				return true
			}
		}
		return false
	}
	orig := probeFeature
	t.Cleanup(func() { probeFeature = orig })
	probeFeature = func(f *feature.Feature) feature.Result {
		switch {
		case isIn(absent, f.Name):
			return feature.Result{Name: f.Name, Detail: "gone", Err: &feature.NotSupportedError{
				Feature: f.Name, Reason: "gone", Consequence: f.Absent}}
		case isIn(broken, f.Name):
			return feature.Result{Name: f.Name, Err: errors.New("could not start a child")}
		}
		return feature.Result{Name: f.Name, OK: true, Detail: "fine"}
	}
}

func TestCheckExitStatus(t *testing.T) {
	for _, tc := range []struct {
		name           string
		absent, broken []string
		code           int
		summary        string
	}{
		{"all present", nil, nil, 0,
			"dump/restore: yes; live migration: yes (dirty tracking: soft-dirty or uffd-wp; established TCP connections move too)"},
		{"soft-dirty absent", []string{feature.NameSoftDirty}, nil, 0,
			"dump/restore: yes; live migration: yes (dirty tracking: uffd-wp; established TCP connections move too)"},
		{"no cheap tracking, no tcp repair",
			[]string{feature.NameSoftDirty, feature.NamePagemapScan, feature.NameTCPRepair}, nil, 0,
			"dump/restore: yes; live migration: yes (dirty tracking: content hashes only, rounds cost CPU; established TCP connections cannot move)"},
		{"optional broken", nil, []string{feature.NameRseqConfig}, 0, "dump/restore: yes"},
		{"required absent", []string{feature.NamePtraceSeize, feature.NameClone3SetTid}, nil, 1,
			"dump/restore: no (missing ptrace-seize, clone3-set-tid); live migration: no"},
		{"required broken", nil, []string{feature.NamePidfdGetfd}, 1,
			"dump/restore: no (missing pidfd-getfd); live migration: no"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fakeCheckProbes(t, tc.absent, tc.broken)
			code, out, stderr := runCheckCmd(t, "check")
			if code != tc.code {
				t.Errorf("exit status %d, want %d; stderr %q", code, tc.code, stderr)
			}
			lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
			if last := lines[len(lines)-1]; !strings.HasPrefix(last, tc.summary) {
				t.Errorf("summary %q, want %q", last, tc.summary)
			}
			if tc.code != 0 && !strings.Contains(stderr, "required kernel features missing") {
				t.Errorf("stderr %q does not say what is missing", stderr)
			}
			for _, n := range tc.broken {
				if !strings.Contains(out, n+" ") || !strings.Contains(out, "could not start a child") {
					t.Errorf("output does not report the broken probe %s:\n%s", n, out)
				}
			}

			code, out, _ = runCheckCmd(t, "check", "--json")
			var rep checkReport
			if err := json.Unmarshal([]byte(out), &rep); err != nil {
				t.Fatal(err)
			}
			if code != tc.code || rep.Verdict == nil || !strings.HasPrefix(rep.Verdict.Summary, tc.summary) {
				t.Errorf("--json: exit status %d, verdict %+v", code, rep.Verdict)
			}
		})
	}
}
