package protocol

import (
	"errors"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/protocol/migrationpb"
)

func host() *migrationpb.HostInfo {
	return &migrationpb.HostInfo{
		PageSize:       4096,
		KernelRelease:  "6.18.0",
		KernelFeatures: []string{"ptrace-seize", "process-vm", "clone3-set-tid"},
		XsaveFeatures:  0x207,
		CpuFlags:       []string{"fpu", "sse", "sse2", "avx", "avx2", "bmi2", "hypervisor"},
		Arch:           "amd64",
	}
}

func local() Local {
	return Local{
		PhaulVersion:     "1.0",
		Host:             host(),
		Codecs:           []migrationpb.Codec{migrationpb.Codec_CODEC_S2, migrationpb.Codec_CODEC_NONE},
		RequiredFeatures: []string{"ptrace-seize", "clone3-set-tid"},
	}
}

func TestNegotiateHello(t *testing.T) {
	cases := []struct {
		name   string
		req    func(*migrationpb.HelloRequest)
		target func(*Local)
		reason string // empty: accepted
	}{
		{"same host", nil, nil, ""},
		{"source too old", func(r *migrationpb.HelloRequest) { r.ProtocolVersion, r.MinProtocolVersion = 0, 0 }, nil, "upgrade phaul on the source"},
		{"source too new", func(r *migrationpb.HelloRequest) { r.ProtocolVersion, r.MinProtocolVersion = 9, 8 }, nil, "upgrade phaul on the target"},
		{"bad range", func(r *migrationpb.HelloRequest) { r.ProtocolVersion, r.MinProtocolVersion = Version, Version+1 }, nil, "upgrade phaul on the target"},
		{"older protocol", func(r *migrationpb.HelloRequest) { r.ProtocolVersion, r.MinProtocolVersion = MinVersion-1, 1 }, nil, "upgrade phaul on the source"},
		{"no host", func(r *migrationpb.HelloRequest) { r.Host = nil }, nil, "no host information"},
		{"page size", func(r *migrationpb.HelloRequest) { r.Host.PageSize = 16384 }, nil, "page size differs: source 16384, target 4096"},
		{"arch", func(r *migrationpb.HelloRequest) { r.Host.Arch = "arm64" }, nil, "architecture differs"},
		{"xsave", func(r *migrationpb.HelloRequest) { r.Host.XsaveFeatures = 0x2e7 }, nil, "lacks xsave state components 0xe0"},
		{"xsave subset is fine", nil, func(l *Local) { l.Host.XsaveFeatures = 0x2ff }, ""},
		{"cpu flag", func(r *migrationpb.HelloRequest) { r.Host.CpuFlags = append(r.Host.CpuFlags, "avx512f", "sha_ni") }, nil, "lacks instruction-set flags of the source: avx512f sha_ni"},
		{"cpu flag waived", func(r *migrationpb.HelloRequest) {
			r.Host.CpuFlags = append(r.Host.CpuFlags, "avx512f")
			r.AllowCpuFlagMismatch = true
		}, nil, ""},
		{"machine flags do not matter", func(r *migrationpb.HelloRequest) { r.Host.CpuFlags = append(r.Host.CpuFlags, "constant_tsc", "vmx") }, nil, ""},
		{"target lacks a required feature", nil, func(l *Local) { l.Host.KernelFeatures = l.Host.KernelFeatures[:2] }, "lacks features needed to restore: clone3-set-tid"},
		{"no common codec", func(r *migrationpb.HelloRequest) { r.Codecs = []migrationpb.Codec{migrationpb.Codec_CODEC_ZSTD} }, nil, "no common page codec"},
		{"no codec offered", func(r *migrationpb.HelloRequest) { r.Codecs = nil }, nil, "no common page codec"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			src := local()
			src.Codecs = []migrationpb.Codec{migrationpb.Codec_CODEC_ZSTD, migrationpb.Codec_CODEC_S2}
			req := NewHelloRequest(src)
			req.Host = proto.Clone(req.Host).(*migrationpb.HostInfo)
			if c.req != nil {
				c.req(req)
			}
			l := local()
			if c.target != nil {
				c.target(&l)
			}
			resp := NegotiateHello(req, l)
			err := CheckHelloResponse(resp)
			if c.reason == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if resp.Codec != migrationpb.Codec_CODEC_S2 || resp.ProtocolVersion != Version {
					t.Errorf("codec %v, protocol %d", resp.Codec, resp.ProtocolVersion)
				}
				return
			}
			if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), c.reason) {
				t.Fatalf("got %v, want a refusal saying %q", err, c.reason)
			}
		})
	}
}

func TestNegotiateWarnings(t *testing.T) {
	req := NewHelloRequest(local())
	req.Host.KernelRelease = "6.1.0"
	req.Host.CpuFlags = append(req.Host.CpuFlags, "avx512f")
	req.AllowCpuFlagMismatch = true
	resp := NegotiateHello(req, local())
	if !resp.Accepted || len(resp.Warnings) != 2 {
		t.Fatalf("%v", resp)
	}
	if w := strings.Join(resp.Warnings, "; "); !strings.Contains(w, "avx512f") || !strings.Contains(w, "6.1.0") {
		t.Errorf("warnings %q", w)
	}
}

func TestCheckHelloResponse(t *testing.T) {
	if err := CheckHelloResponse(&migrationpb.HelloResponse{Accepted: false}); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "no reason given") {
		t.Errorf("%v", err)
	}
	if err := CheckHelloResponse(&migrationpb.HelloResponse{Accepted: true, ProtocolVersion: Version + 1}); err == nil {
		t.Error("accepted with a protocol we do not speak")
	}
}
