package source

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/phaul/phaul/pagestream"
)

// DefaultFreezeTimeout is how long the target may take to answer one step
// of a migration (Config.FreezeTimeout). Inside the freeze window the
// original waits, stopped, for each answer, so this is what a hung target
// can cost it before the migration rolls back. Measured here for a 1 GiB
// process the slowest such step, Restore (the target's "ready"), takes
// 9-115 ms, the final state 4-40 ms, the commit 1-10 ms: 30 s leaves two
// orders of magnitude for a slow target, large states and action scripts
// there.
const DefaultFreezeTimeout = 30 * time.Second

// abortTimeout bounds the Abort sent to the target after a failure (best
// effort: it is sent after the original runs again).
const abortTimeout = 5 * time.Second

// stepPages is TimeoutError.Step of a page stream the target stopped
// acknowledging.
const stepPages = "pages"

// ErrTargetTimeout is matched (errors.Is) by the error of a step the
// target did not answer within its deadline (a *TimeoutError).
var ErrTargetTimeout = errors.New("the target did not answer in time")

// TimeoutError is a step of a migration the target did not answer within
// its deadline: a target that stopped answering but keeps the connection
// open.
type TimeoutError struct {
	// Step is the request of the Control service waited for ("Freeze",
	// "Restore", "Commit", ...), or "pages" for page batches sent and
	// never acknowledged.
	Step string
	// After is how long the source waited.
	After time.Duration
}

func (e *TimeoutError) Error() string {
	if e.Step == stepPages {
		return fmt.Sprintf("target acknowledged no page batch within %v", e.After)
	}
	return fmt.Sprintf("target did not answer %s within %v", e.Step, e.After)
}

// Is makes the error match ErrTargetTimeout.
func (e *TimeoutError) Is(target error) bool { return target == ErrTargetTimeout }

// call runs fn, one request of step to the target, with a deadline of d
// from now. When the deadline (and not ctx) ended it, the error is a
// *TimeoutError. gRPC passes the deadline on: the target may end the
// request at it too, and its answer (DeadlineExceeded) can come a moment
// before the source's own timer fires.
func call(ctx context.Context, step string, d time.Duration, fn func(context.Context) error) error {
	te := &TimeoutError{Step: step, After: d}
	sctx, cancel := context.WithTimeoutCause(ctx, d, te)
	defer cancel()
	err := fn(sctx)
	if err != nil && ctx.Err() == nil && (context.Cause(sctx) == te || status.Code(err) == codes.DeadlineExceeded) {
		return te
	}
	return err
}

// stallLimit is how long page batches may wait for their acknowledgement
// before the stream counts as stalled: the step deadline, or longer when a
// bandwidth limit makes one batch take longer than a fraction of it.
func stallLimit(d time.Duration, bandwidth float64) time.Duration {
	if bandwidth > 0 {
		// A batch holds up to DefaultBatchBytes on the wire; a few of
		// them may queue behind the pacing.
		if paced := time.Duration(4 * pagestream.DefaultBatchBytes / bandwidth * float64(time.Second)); paced > d {
			return paced
		}
	}
	return d
}

// pageStats is what watchPages reads of a page stream.
type pageStats interface {
	Stats() pagestream.Stats
}

// watchPages watches a page stream for as long as it runs: when batches
// stay unacknowledged (the stream busy, no acknowledgement coming) for
// limit, it calls cancel with a *TimeoutError, which must abort the
// stream. Time without batches in flight (the source reading memory, a
// round that found nothing) does not count. stop ends the watch.
func watchPages(s pageStats, limit time.Duration, cancel context.CancelCauseFunc) (stop func()) {
	tick := min(max(limit/10, 10*time.Millisecond), time.Second)
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		t := time.NewTicker(tick)
		defer t.Stop()
		last, at := s.Stats(), time.Now()
		var stalled time.Duration
		for {
			select {
			case <-done:
				return
			case <-t.C:
				st, now := s.Stats(), time.Now()
				elapsed := now.Sub(at)
				// Busy grows with the wall clock only while batches are
				// in flight: all of this interval, with no ack, is a
				// stall.
				if st.Batches == last.Batches && st.Busy-last.Busy >= elapsed*9/10 {
					stalled += elapsed
				} else {
					stalled = 0
				}
				last, at = st, now
				if stalled >= limit {
					cancel(&TimeoutError{Step: stepPages, After: limit})
					return
				}
			}
		}
	}()
	return func() {
		close(done)
		<-exited
	}
}
