package source

import (
	"strings"
	"testing"
	"time"
)

const mib = 1 << 20

func TestPolicyDecide(t *testing.T) {
	base := DefaultPolicy() // 25 ms budget, 15 ms fixed, 30 rounds, 3 stalled
	abort := base
	abort.OnNoConverge = NoConvergeAbort
	gbps := 1e9
	for _, tc := range []struct {
		name   string
		p      Policy
		rounds []Round
		want   Decision
		reason string
	}{
		{"nothing yet", base, nil, Continue, "no round"},
		{"idle process", base, []Round{{DirtyBytes: 0, Bandwidth: gbps}}, Freeze, "fits"},
		// 10 MB at 1 GB/s = 10 ms + 15 ms fixed = 25 ms: exactly the budget.
		{"exactly the budget", base, []Round{{DirtyBytes: 10e6, Bandwidth: gbps}}, Freeze, "fits"},
		{"just over", base, []Round{{DirtyBytes: 10e6 + 4096, Bandwidth: gbps}}, Continue, "exceeds"},
		{"first round of a big process", base, []Round{{DirtyBytes: 1024 * mib, Bandwidth: gbps}}, Continue, "exceeds"},
		{"shrinking", base, []Round{
			{DirtyBytes: 1024 * mib, Bandwidth: gbps}, {DirtyBytes: 64 * mib, Bandwidth: gbps},
			{DirtyBytes: 8 * mib, Bandwidth: gbps}}, Freeze, "fits"},
		{"slow link: same dirty set waits", base, []Round{{DirtyBytes: 8 * mib, Bandwidth: 100e6}}, Continue, "exceeds"},
		{"zero bandwidth measured", base, []Round{{DirtyBytes: 4096, Bandwidth: 0}}, Continue, "exceeds"},
		{"stalled, freeze anyway", base, []Round{
			{DirtyBytes: 100 * mib, Bandwidth: gbps}, {DirtyBytes: 100 * mib, Bandwidth: gbps},
			{DirtyBytes: 110 * mib, Bandwidth: gbps}, {DirtyBytes: 120 * mib, Bandwidth: gbps}}, Freeze, "not shrunk"},
		{"stalled, abort", abort, []Round{
			{DirtyBytes: 100 * mib, Bandwidth: gbps}, {DirtyBytes: 100 * mib, Bandwidth: gbps},
			{DirtyBytes: 110 * mib, Bandwidth: gbps}, {DirtyBytes: 120 * mib, Bandwidth: gbps}}, Abort, "not shrunk"},
		{"two flat rounds are not yet stalled", base, []Round{
			{DirtyBytes: 100 * mib, Bandwidth: gbps}, {DirtyBytes: 100 * mib, Bandwidth: gbps},
			{DirtyBytes: 100 * mib, Bandwidth: gbps}}, Continue, "exceeds"},
		{"round limit", Policy{Downtime: 25 * time.Millisecond, MaxRounds: 2}, []Round{
			{DirtyBytes: 100 * mib, Bandwidth: gbps}, {DirtyBytes: 50 * mib, Bandwidth: gbps}}, Freeze, "maximum"},
		{"round limit, abort", Policy{Downtime: 25 * time.Millisecond, MaxRounds: 2, OnNoConverge: NoConvergeAbort}, []Round{
			{DirtyBytes: 100 * mib, Bandwidth: gbps}, {DirtyBytes: 50 * mib, Bandwidth: gbps}}, Abort, "maximum"},
		{"a full copy measures nothing", base, []Round{{DirtyBytes: 0, Bandwidth: gbps, Unmeasured: true}}, Continue, "measures"},
		{"a full copy at the round limit", Policy{Downtime: 25 * time.Millisecond, MaxRounds: 1},
			[]Round{{DirtyBytes: 0, Bandwidth: gbps, Unmeasured: true}}, Freeze, "fits"},
		{"a bigger budget stops earlier", Policy{Downtime: 300 * time.Millisecond}, []Round{{DirtyBytes: 250e6, Bandwidth: gbps}}, Freeze, "fits"},
	} {
		got, reason := tc.p.Decide(tc.rounds)
		if got != tc.want || !strings.Contains(reason, tc.reason) {
			t.Errorf("%s: Decide = %v (%q), want %v (…%s…)", tc.name, got, reason, tc.want, tc.reason)
		}
	}
}

func TestExpectedDowntime(t *testing.T) {
	p := Policy{FixedCost: 2 * time.Millisecond}
	if got := p.ExpectedDowntime(Round{DirtyBytes: 1e9, Bandwidth: 2e9}); got != 502*time.Millisecond {
		t.Errorf("1 GB at 2 GB/s: %v", got)
	}
	if got := p.ExpectedDowntime(Round{}); got != 2*time.Millisecond {
		t.Errorf("nothing dirty, no bandwidth: %v", got)
	}
}
