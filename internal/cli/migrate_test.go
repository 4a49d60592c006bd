package cli

import (
	"strings"
	"testing"
)

func TestParseRate(t *testing.T) {
	for _, c := range []struct {
		in   string
		want float64
	}{
		{"50M", 50e6}, {"50MB/s", 50e6}, {"1G", 1e9}, {"800Mbit", 100e6}, {"1.5K", 1500}, {"4096", 4096}, {"10kbit/s", 1250},
	} {
		got, err := parseRate(c.in)
		if err != nil || got != c.want {
			t.Errorf("parseRate(%q) = %v, %v; want %v", c.in, got, err, c.want)
		}
	}
	for _, bad := range []string{"", "fast", "-5M", "0", "M", "1T", "Inf"} {
		if got, err := parseRate(bad); err == nil {
			t.Errorf("parseRate(%q) = %v, want an error", bad, got)
		}
	}
}

func TestTimeoutFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"migrate", "--to", "127.0.0.1:1", "--freeze-timeout", "0s", "1"}, "--freeze-timeout must be positive"},
		{[]string{"migrate", "--to", "127.0.0.1:1", "--freeze-timeout", "-1s", "1"}, "--freeze-timeout must be positive"},
		{[]string{"serve", "--source-timeout", "0s"}, "--source-timeout must be positive"},
		{[]string{"help", "migrate"}, "--freeze-timeout duration"},
		{[]string{"help", "serve"}, "--source-timeout duration"},
	} {
		code, stdout, stderr := runCmd(tc.args...)
		if out := stdout + stderr; !strings.Contains(out, tc.want) || (tc.args[0] != "help" && code != 2) {
			t.Errorf("phaul %s: exit %d, output %q; want %q", strings.Join(tc.args, " "), code, out, tc.want)
		}
	}
}
