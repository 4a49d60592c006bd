package protocol

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/phaul/phaul/protocol/migrationpb"
)

// Protocol versions of the migration services. This build speaks every
// version in [MinVersion, Version]; two ends talk when their ranges overlap,
// and then speak the highest version both know.
const (
	Version    uint32 = 2
	MinVersion uint32 = 2
)

// ErrRefused is matched by the error a source gets when the target refused
// its Hello.
var ErrRefused = errors.New("target refused the migration")

// Local is what one end knows about itself for the handshake.
type Local struct {
	PhaulVersion string
	Host         *migrationpb.HostInfo
	// Codecs this end can use for pages, most preferred first.
	Codecs []migrationpb.Codec
	// RequiredFeatures are the kernel features this end needs to restore a
	// process (names as in internal/feature); a target missing one refuses.
	RequiredFeatures []string
	// AllowCPUFlagMismatch is the source's waiver (see HelloRequest).
	AllowCPUFlagMismatch bool
}

// NewHelloRequest builds the source's Hello.
func NewHelloRequest(l Local) *migrationpb.HelloRequest {
	return &migrationpb.HelloRequest{
		ProtocolVersion:      Version,
		MinProtocolVersion:   MinVersion,
		PhaulVersion:         l.PhaulVersion,
		Host:                 l.Host,
		Codecs:               slices.Clone(l.Codecs),
		AllowCpuFlagMismatch: l.AllowCPUFlagMismatch,
	}
}

// NegotiateHello is the target's answer to req, given what the target is.
// It refuses, with the first reason found, when the versions do not
// overlap, the page sizes or architectures differ, the target's CPU lacks
// xsave components or (unless waived) instruction-set flags the source's
// CPU has, the target lacks a required kernel feature, or no codec is
// common.
func NegotiateHello(req *migrationpb.HelloRequest, l Local) *migrationpb.HelloResponse {
	resp := &migrationpb.HelloResponse{
		PhaulVersion: l.PhaulVersion,
		Host:         l.Host,
	}
	refuse := func(format string, args ...any) *migrationpb.HelloResponse {
		resp.Accepted = false
		resp.Reason = fmt.Sprintf(format, args...)
		return resp
	}
	src, dst := req.GetHost(), l.Host
	switch {
	case req.GetProtocolVersion() < MinVersion:
		return refuse("source speaks protocol %d, the target needs at least %d: upgrade phaul on the source",
			req.GetProtocolVersion(), MinVersion)
	case req.GetMinProtocolVersion() > Version:
		return refuse("source needs protocol %d or newer, the target speaks at most %d: upgrade phaul on the target",
			req.GetMinProtocolVersion(), Version)
	case req.GetMinProtocolVersion() > req.GetProtocolVersion():
		return refuse("source sent a bad version range [%d, %d]", req.GetMinProtocolVersion(), req.GetProtocolVersion())
	case src == nil:
		return refuse("source sent no host information")
	case dst == nil:
		return refuse("target has no host information")
	}
	resp.ProtocolVersion = min(Version, req.GetProtocolVersion())

	if src.GetArch() != dst.GetArch() {
		return refuse("architecture differs: source %q, target %q", src.GetArch(), dst.GetArch())
	}
	if src.GetPageSize() != dst.GetPageSize() {
		return refuse("page size differs: source %d, target %d", src.GetPageSize(), dst.GetPageSize())
	}
	if missing := src.GetXsaveFeatures() &^ dst.GetXsaveFeatures(); missing != 0 {
		return refuse("target CPU lacks xsave state components %#x the source uses (source XCR0 %#x, target %#x)",
			missing, src.GetXsaveFeatures(), dst.GetXsaveFeatures())
	}
	if missing := missingISAFlags(src.GetCpuFlags(), dst.GetCpuFlags()); len(missing) > 0 {
		msg := fmt.Sprintf("target CPU lacks instruction-set flags of the source: %s", strings.Join(missing, " "))
		if !req.GetAllowCpuFlagMismatch() {
			return refuse("%s (the process may use them; allow with the CPU-flag waiver)", msg)
		}
		resp.Warnings = append(resp.Warnings, msg)
	}
	var lacking []string
	for _, f := range l.RequiredFeatures {
		if !slices.Contains(dst.GetKernelFeatures(), f) {
			lacking = append(lacking, f)
		}
	}
	if len(lacking) > 0 {
		return refuse("target kernel lacks features needed to restore: %s", strings.Join(lacking, ", "))
	}
	if src.GetKernelRelease() != dst.GetKernelRelease() {
		resp.Warnings = append(resp.Warnings, fmt.Sprintf("kernel differs: source %s, target %s",
			src.GetKernelRelease(), dst.GetKernelRelease()))
	}
	for _, c := range req.GetCodecs() {
		if c != migrationpb.Codec_CODEC_UNSPECIFIED && slices.Contains(l.Codecs, c) {
			resp.Codec = c
			break
		}
	}
	if resp.Codec == migrationpb.Codec_CODEC_UNSPECIFIED {
		return refuse("no common page codec: source offers %v, target accepts %v", req.GetCodecs(), l.Codecs)
	}
	resp.Accepted = true
	return resp
}

// CheckHelloResponse returns nil when the target accepted, else an error
// matching ErrRefused with the target's reason.
func CheckHelloResponse(resp *migrationpb.HelloResponse) error {
	if resp.GetAccepted() {
		if resp.GetProtocolVersion() < MinVersion || resp.GetProtocolVersion() > Version {
			return fmt.Errorf("hello: target chose protocol %d, outside [%d, %d]", resp.GetProtocolVersion(), MinVersion, Version)
		}
		return nil
	}
	reason := resp.GetReason()
	if reason == "" {
		reason = "no reason given"
	}
	return fmt.Errorf("%w: %s", ErrRefused, reason)
}

// isaFlags are the /proc/cpuinfo flags that name instructions a process
// can select by CPUID and would fault on (SIGILL) where missing; flags about
// the machine (hypervisor, constant_tsc, bug lists) do not matter.
// isaFamilies are prefixes naming whole families (avx512f, avx_vnni, ...).
var (
	isaFlags = []string{
		"pni", "ssse3", "fma", "f16c", "adx", "aes", "vaes", "pclmulqdq", "vpclmulqdq",
		"sha_ni", "popcnt", "movbe", "abm", "rdrand", "rdseed", "gfni", "cx16",
		"xsave", "xsavec", "xsaveopt", "xsaves", "fsgsbase", "rdpid", "clflushopt",
		"clwb", "movdiri", "movdir64b", "serialize", "pku", "ospke",
	}
	isaFamilies = []string{"sse", "avx", "amx", "bmi"}
)

// isISAFlag reports whether a cpuinfo flag names user-visible instructions.
func isISAFlag(f string) bool {
	if slices.Contains(isaFlags, f) {
		return true
	}
	for _, p := range isaFamilies {
		if strings.HasPrefix(f, p) {
			return true
		}
	}
	return false
}

// missingISAFlags returns the instruction-set flags in src but not in dst.
func missingISAFlags(src, dst []string) []string {
	var missing []string
	for _, f := range src {
		if isISAFlag(f) && !slices.Contains(dst, f) {
			missing = append(missing, f)
		}
	}
	return missing
}
