package hostinfo

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"

	"github.com/phaul/phaul/internal/feature"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/migrationpb"
)

// Collect returns this host's facts. It runs every kernel-feature probe
// (once per process: the results are cached), so the first call takes a
// moment. A fact that cannot be read is left empty.
func Collect() *migrationpb.HostInfo {
	h := &migrationpb.HostInfo{
		PageSize:      uint64(os.Getpagesize()),
		KernelRelease: sys.KernelRelease(),
		XsaveFeatures: XCR0(),
		Arch:          runtime.GOARCH,
	}
	h.Hostname, _ = os.Hostname()
	for _, r := range feature.All() {
		if r.OK {
			h.KernelFeatures = append(h.KernelFeatures, r.Name)
		}
	}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		c, _ := ParseCPUInfo(f)
		f.Close()
		h.CpuVendor, h.CpuModel, h.CpuFlags = c.Vendor, c.Model, c.Flags
	}
	return h
}

// CPUInfo is what /proc/cpuinfo says about the first CPU.
type CPUInfo struct {
	Vendor string   // vendor_id
	Model  string   // model name
	Flags  []string // flags, in the kernel's order
}

// ParseCPUInfo reads the first processor's block of /proc/cpuinfo.
func ParseCPUInfo(r io.Reader) (CPUInfo, error) {
	var c CPUInfo
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	seen := false
	for sc.Scan() {
		line := sc.Text()
		if strings.TrimSpace(line) == "" {
			if seen {
				break
			}
			continue
		}
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		seen = true
		val = strings.TrimSpace(val)
		switch strings.TrimSpace(key) {
		case "vendor_id":
			c.Vendor = val
		case "model name":
			c.Model = val
		case "flags":
			c.Flags = strings.Fields(val)
		}
	}
	if err := sc.Err(); err != nil {
		return c, fmt.Errorf("read cpuinfo: %w", err)
	}
	return c, nil
}
