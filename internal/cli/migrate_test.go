package cli

import "testing"

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
