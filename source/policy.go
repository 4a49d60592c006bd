package source

import (
	"fmt"
	"time"
)

// Decision is what the policy says after a pre-copy round.
type Decision int

const (
	// Continue: run another pre-copy round.
	Continue Decision = iota
	// Freeze: what is still dirty fits the downtime budget (or the rounds
	// are exhausted and the user chose to stop anyway): freeze and send the
	// rest.
	Freeze
	// Abort: the process dirties memory faster than the link can carry it
	// and the user chose to give up rather than exceed the budget.
	Abort
)

func (d Decision) String() string {
	switch d {
	case Continue:
		return "continue"
	case Freeze:
		return "freeze"
	case Abort:
		return "abort"
	}
	return fmt.Sprintf("Decision(%d)", int(d))
}

// OnNoConverge says what to do when the rounds do not converge.
type OnNoConverge int

const (
	// NoConvergeFreeze freezes anyway, accepting a longer downtime.
	NoConvergeFreeze OnNoConverge = iota
	// NoConvergeAbort gives up; the process keeps running on the source.
	NoConvergeAbort
)

// Policy is the stop rule of the pre-copy rounds. Like QEMU's, it stops
// when the bytes still dirty can be sent within the downtime budget at the
// measured bandwidth; unlike a fixed page count (P.Haul) or a single round
// (go-criu's phaul), it adapts to the link and the workload.
type Policy struct {
	// Downtime is the budget for the pause the process sees.
	Downtime time.Duration
	// FixedCost is the part of the downtime that does not depend on the
	// dirty pages (freezing, walking the page tables for the final round,
	// collecting the state, restoring threads and descriptors, the
	// commit); it is taken off the budget.
	FixedCost time.Duration
	// MaxRounds bounds the pre-copy rounds (round 0 included).
	MaxRounds int
	// Stalled is how many consecutive rounds may fail to shrink the dirty
	// set before the rounds count as not converging.
	Stalled int
	// OnNoConverge says what happens then, or at MaxRounds.
	OnNoConverge OnNoConverge
}

// DefaultPolicy returns the defaults of phaul migrate. The fixed cost is
// what a 1 GiB, 9-thread process's downtime spent apart from sending its
// last pages on a 2-vCPU VM: 15-20 ms (collecting 3-4 ms, the state's
// transfer 2-5, the restore 8-9, the commit 2-3, and the final round's
// walk of the page tables 2-5). With 5 ms, the rule froze with 150-180
// pages left for the final round and 27 ms of downtime.
func DefaultPolicy() Policy {
	return Policy{Downtime: 25 * time.Millisecond, FixedCost: 15 * time.Millisecond, MaxRounds: 30, Stalled: 3}
}

// Round is what the policy knows about one finished pre-copy round.
type Round struct {
	// DirtyBytes are the bytes written since the round started: what the
	// next round (or the final one) must send.
	DirtyBytes uint64
	// Bandwidth is the measured rate at which pages reach the target, in
	// bytes of memory (not of wire) per second: compression counts.
	Bandwidth float64
	// Duration of the round.
	Duration time.Duration
	// Unmeasured says DirtyBytes is no measurement: a round that copied
	// every page (the first) cannot tell what the process writes meanwhile.
	Unmeasured bool
}

// ExpectedDowntime is the pause a freeze after round r would cause.
func (p Policy) ExpectedDowntime(r Round) time.Duration {
	if r.Bandwidth <= 0 {
		if r.DirtyBytes == 0 {
			return p.FixedCost
		}
		return time.Duration(1<<63 - 1)
	}
	send := time.Duration(float64(r.DirtyBytes) / r.Bandwidth * float64(time.Second))
	return p.FixedCost + send
}

// Decide returns the decision after the rounds so far (oldest first) and
// the reason, for the progress report.
func (p Policy) Decide(rounds []Round) (Decision, string) {
	if len(rounds) == 0 {
		return Continue, "no round yet"
	}
	last := rounds[len(rounds)-1]
	exp := p.ExpectedDowntime(last)
	if last.Unmeasured && (p.MaxRounds <= 0 || len(rounds) < p.MaxRounds) {
		return Continue, "this round copied everything; the next one measures what the process writes"
	}
	if exp <= p.Downtime {
		return Freeze, fmt.Sprintf("expected downtime %v fits the budget %v", exp.Round(time.Microsecond), p.Downtime)
	}
	notConverging := ""
	switch {
	case p.MaxRounds > 0 && len(rounds) >= p.MaxRounds:
		notConverging = fmt.Sprintf("%d rounds done (the maximum) and expected downtime is still %v", len(rounds), exp.Round(time.Microsecond))
	case p.Stalled > 0 && stalled(rounds, p.Stalled):
		notConverging = fmt.Sprintf("the dirty set has not shrunk for %d rounds (%d bytes dirty): the process writes memory as fast as it can be sent", p.Stalled, last.DirtyBytes)
	}
	if notConverging == "" {
		return Continue, fmt.Sprintf("expected downtime %v exceeds the budget %v", exp.Round(time.Microsecond), p.Downtime)
	}
	if p.OnNoConverge == NoConvergeAbort {
		return Abort, notConverging
	}
	return Freeze, notConverging + "; freezing anyway"
}

// stalled reports whether the last n rounds each left at least as much
// dirty memory as the round before them.
func stalled(rounds []Round, n int) bool {
	if len(rounds) < n+1 {
		return false
	}
	for i := len(rounds) - n; i < len(rounds); i++ {
		if rounds[i].DirtyBytes < rounds[i-1].DirtyBytes {
			return false
		}
	}
	return true
}
