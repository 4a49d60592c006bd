package hostinfo

import (
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
)

func TestParseCPUInfo(t *testing.T) {
	const text = `processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) CPU @ 2.20GHz
flags		: fpu sse sse2 avx xsave

processor	: 1
vendor_id	: OtherVendor
flags		: fpu
`
	c, err := ParseCPUInfo(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	if c.Vendor != "GenuineIntel" || c.Model != "Intel(R) Xeon(R) CPU @ 2.20GHz" {
		t.Errorf("vendor %q model %q", c.Vendor, c.Model)
	}
	if want := []string{"fpu", "sse", "sse2", "avx", "xsave"}; !slices.Equal(c.Flags, want) {
		t.Errorf("flags %q, want %q (only the first processor)", c.Flags, want)
	}
}

// TestXCR0 checks XGETBV against what the kernel reports in /proc/cpuinfo.
func TestXCR0(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("xsave is x86 only")
	}
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c, err := ParseCPUInfo(f)
	if err != nil {
		t.Fatal(err)
	}
	x := XCR0()
	t.Logf("XCR0 = %#x", x)
	if !slices.Contains(c.Flags, "xsave") {
		if x != 0 {
			t.Fatalf("XCR0 %#x without xsave", x)
		}
		return
	}
	if x&3 != 3 {
		t.Errorf("XCR0 %#x lacks x87 or SSE state", x)
	}
	if has := slices.Contains(c.Flags, "avx"); has != (x&4 != 0) {
		t.Errorf("cpuinfo avx=%v but XCR0 %#x", has, x)
	}
	if has := slices.Contains(c.Flags, "avx512f"); has != (x&0xe0 == 0xe0) {
		t.Errorf("cpuinfo avx512f=%v but XCR0 %#x", has, x)
	}
}
