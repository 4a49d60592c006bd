package workload

import (
	"bufio"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func newState(pages int, random bool) *state {
	s := &state{mem: make([]byte, pages*pageSize), gens: make([]atomic.Uint32, pages), random: random}
	for i := 0; i < pages; i++ {
		s.fill(i, 1)
	}
	return s
}

func TestCheckCatchesStaleMisplacedAndCorruptPages(t *testing.T) {
	for _, random := range []bool{false, true} {
		s := newState(4, random)
		for i := 0; i < 4; i++ {
			if err := s.check(i); err != nil {
				t.Fatalf("fresh page %d: %v", i, err)
			}
		}
		// Stale: the page was rewritten, memory shows the old generation.
		old := append([]byte(nil), s.mem[pageSize:2*pageSize]...)
		s.fill(1, 2)
		copy(s.mem[pageSize:], old)
		if err := s.check(1); err == nil || !strings.Contains(err.Error(), "stale") {
			t.Errorf("stale page not caught: %v", err)
		}
		// Misplaced: page 3 holds page 2's bytes.
		copy(s.mem[3*pageSize:4*pageSize], s.mem[2*pageSize:3*pageSize])
		if err := s.check(3); err == nil {
			t.Error("misplaced page not caught")
		}
		// Corrupt: one byte flipped.
		s.mem[100] ^= 1
		if err := s.check(0); err == nil {
			t.Error("corrupt page not caught")
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"4096": 4096, "64M": 64 << 20, "1G": 1 << 30, "256MiB": 256 << 20, "8k": 8 << 10} {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "x", "-1", "1T"} {
		if _, err := ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q) accepted", bad)
		}
	}
}

func TestParseBeat(t *testing.T) {
	b, ok := ParseBeat("BEAT seq=12 writes=340 maxgap_ms=140.0 gap_ms=12.345 t_ms=1700000000123.456")
	if !ok || b.Seq != 12 || b.GapMS != 12.345 || b.MaxGapMS != 140 || b.Time.UnixMicro() != 1700000000123456 {
		t.Errorf("%+v %v", b, ok)
	}
	// The network counters at the end of the line change nothing.
	b, ok = ParseBeat("BEAT seq=12 writes=340 maxgap_ms=140.0 gap_ms=12.345 t_ms=1700000000123.456 tcp_conns=3 tcp_errors=0 udp=17 udp_errors=0")
	if !ok || b.Seq != 12 || b.GapMS != 12.345 || b.MaxGapMS != 140 || b.Time.UnixMicro() != 1700000000123456 {
		t.Errorf("with network counters: %+v %v", b, ok)
	}
	for _, bad := range []string{"BEAT seq=1 writes=2 maxgap_ms=3", "CHECK seq=1 OK", ""} {
		if _, ok := ParseBeat(bad); ok {
			t.Errorf("ParseBeat(%q) accepted", bad)
		}
	}
}

// TestPauseShowsInBeats runs the workload with a self-pause of a known
// length and checks that its heartbeats report that gap.
func TestPauseShowsInBeats(t *testing.T) {
	if testing.Short() {
		t.Skip("takes a second")
	}
	r, w := io.Pipe()
	go Run(Config{MemBytes: 1 << 20, DirtyPagesPerSec: 1000, Heartbeat: 5 * time.Millisecond,
		Pause: 200 * time.Millisecond, PauseAfter: 100 * time.Millisecond}, w)
	defer r.Close()
	sc := bufio.NewScanner(r)
	var maxGap float64
	deadline := time.Now().Add(5 * time.Second)
	for sc.Scan() && time.Now().Before(deadline) {
		if b, ok := ParseBeat(sc.Text()); ok {
			maxGap = max(maxGap, b.GapMS)
			if b.Seq >= 100 {
				break
			}
		}
	}
	if maxGap < 200 || maxGap > 300 { // generous above: a loaded machine delays the wake-up
		t.Errorf("largest gap %.1f ms, the workload paused 200 ms", maxGap)
	}
}
