package cli

import (
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

func TestBenchUsage(t *testing.T) {
	for _, args := range [][]string{
		{"bench", "--compare", "track=nope"},
		{"bench", "--compare", "speed=1,2"},
		{"bench", "--mem", "0"},
		{"bench", "--mem", "lots"},
		{"bench", "--dirty", "-5"},
		{"bench", "--repeat", "0"},
		{"bench", "extra"},
	} {
		if code, _, stderr := runCmd(args...); code != 2 || !strings.Contains(stderr, "usage: phaul bench") {
			t.Errorf("%v: exit %d, stderr %q", args, code, stderr)
		}
	}
	code, out, _ := runCmd("help", "bench")
	for _, want := range []string{"track=auto,uffdwp,softdirty,hash", "compress=s2,zstd,none", "downtime=25ms,100ms", "engine=phaul,criu,criu-lazy", "--out", "--json", "--cmd"} {
		if code != 0 || !strings.Contains(out, want) {
			t.Errorf("help bench lacks %q:\n%s", want, out)
		}
	}
}

func TestBenchCommandLine(t *testing.T) {
	fs := pflag.NewFlagSet("x", pflag.ContinueOnError)
	fs.SortFlags = false // as newFlagSet
	fs.StringSlice("mem", nil, "")
	fs.StringArray("compare", nil, "")
	fs.Bool("json", false, "")
	fs.String("cmd", "", "")
	if err := fs.Parse([]string{"--mem", "16M,64M", "--compare", "track=uffdwp,hash", "--compare", "compress=s2,none", "--json", "--cmd", "sleep 100"}); err != nil {
		t.Fatal(err)
	}
	want := "phaul bench --mem 16M,64M --compare track=uffdwp,hash --compare compress=s2,none --json --cmd 'sleep 100'"
	if got := commandLine(fs); got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}
