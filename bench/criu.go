package bench

import (
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"time"
)

// criuVersion matches the version line of `criu --version`
// ("Version: 3.17.1").
var criuVersion = regexp.MustCompile(`Version:\s*(\d+)\.(\d+)(?:\.(\d+))?`)

// ProbeCRIU says whether a CRIU that can run the comparisons is on the
// PATH: only 4.x counts (3.x dies on this kernel's three-part vDSO). It
// returns the version found, and a reason when it cannot be used.
func ProbeCRIU(ctx context.Context) (version string, reason string) {
	path, err := exec.LookPath("criu")
	if err != nil {
		return "", "criu is not on the PATH"
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").CombinedOutput()
	m := criuVersion.FindSubmatch(out)
	if m == nil {
		return "", fmt.Sprintf("`%s --version` gave no version (%v): %q", path, err, out)
	}
	version = string(m[1]) + "." + string(m[2])
	if len(m[3]) > 0 {
		version += "." + string(m[3])
	}
	if major, _ := strconv.Atoi(string(m[1])); major < 4 {
		return version, fmt.Sprintf("criu %s at %s is older than 4.x (3.x fails on kernels with the three-part vDSO)", version, path)
	}
	return version, ""
}

// criuNote is the report's note for CRIU variants that were asked for.
// CRIU runs themselves are not driven by phaul bench yet: with a usable
// CRIU the note says so rather than reporting numbers that were never
// measured.
func criuNote(version, reason string) string {
	if reason != "" {
		return "CRIU comparisons skipped: " + reason + "."
	}
	return fmt.Sprintf("CRIU comparisons skipped: criu %s is usable, but phaul bench does not drive CRIU runs yet.", version)
}
