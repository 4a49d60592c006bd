package source

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/phaul/phaul/pagestream"
	"github.com/phaul/phaul/protocol/migrationpb"
)

// slowControl is a Control service whose Freeze waits: until its request
// is cancelled (hang) or until the test ends (stall, a handler stuck for
// good). It records what its handler saw of the caller's deadline.
type slowControl struct {
	migrationpb.UnimplementedControlServer
	stall    bool
	release  chan struct{}
	deadline atomic.Bool // the request carried a deadline
	ended    chan error  // the handler's end (hang only)
}

func (c *slowControl) Freeze(ctx context.Context, _ *migrationpb.FreezeRequest) (*migrationpb.FreezeResponse, error) {
	_, ok := ctx.Deadline()
	c.deadline.Store(ok)
	if c.stall {
		<-c.release
		return nil, status.Error(codes.Unavailable, "released")
	}
	<-ctx.Done()
	c.ended <- ctx.Err()
	return nil, status.FromContextError(ctx.Err()).Err()
}

// serveBufconn serves the services registered by register in memory and
// returns a client connection to them.
func serveBufconn(t *testing.T, register func(*grpc.Server)) *grpc.ClientConn {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	g := grpc.NewServer()
	register(g)
	go func() { _ = g.Serve(lis) }()
	cc, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cc.Close()
		g.Stop()
	})
	return cc
}

// TestCallDeadline: a request the target does not answer ends at the step
// deadline with a TimeoutError naming the step and the time, whether the
// target notices the deadline (gRPC passes it on) or is stuck for good;
// the caller's own cancellation is not a timeout.
func TestCallDeadline(t *testing.T) {
	for _, stall := range []bool{false, true} {
		name := map[bool]string{false: "hang", true: "stall"}[stall]
		t.Run(name, func(t *testing.T) {
			ctl := &slowControl{stall: stall, release: make(chan struct{}), ended: make(chan error, 1)}
			defer close(ctl.release)
			cc := serveBufconn(t, func(g *grpc.Server) { migrationpb.RegisterControlServer(g, ctl) })
			client := migrationpb.NewControlClient(cc)
			const d = 300 * time.Millisecond
			start := time.Now()
			err := call(context.Background(), "Freeze", d, func(ctx context.Context) error {
				_, err := client.Freeze(ctx, &migrationpb.FreezeRequest{MigrationId: "m"})
				return err
			})
			took := time.Since(start)
			var te *TimeoutError
			if !errors.As(err, &te) || !errors.Is(err, ErrTargetTimeout) || te.Step != "Freeze" || te.After != d {
				t.Fatalf("err = %v (%T), want a TimeoutError of Freeze after %v", err, err, d)
			}
			if msg := err.Error(); msg != "target did not answer Freeze within 300ms" {
				t.Errorf("message %q", msg)
			}
			if took < d || took > d+time.Second {
				t.Errorf("returned after %v, want %v", took, d)
			}
			if !ctl.deadline.Load() {
				t.Error("the target's handler saw no deadline")
			}
			if !stall {
				select {
				case herr := <-ctl.ended:
					// Cancelled at the deadline: by the source's
					// RST_STREAM, or its own timer, whichever first.
					if !errors.Is(herr, context.DeadlineExceeded) && !errors.Is(herr, context.Canceled) {
						t.Errorf("the target's handler ended with %v", herr)
					}
				case <-time.After(2 * time.Second):
					t.Error("the target's handler was not cancelled")
				}
			}

			// Cancelled by the caller (Ctrl-C): not a timeout.
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(50*time.Millisecond, cancel)
			err = call(ctx, "Freeze", d, func(ctx context.Context) error {
				_, err := client.Freeze(ctx, &migrationpb.FreezeRequest{MigrationId: "m"})
				return err
			})
			if errors.Is(err, ErrTargetTimeout) || status.Code(err) != codes.Canceled {
				t.Errorf("cancelled by the caller: %v", err)
			}
		})
	}
	// An answer in time passes through.
	if err := call(context.Background(), "Freeze", time.Second, func(context.Context) error { return nil }); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	if err := call(context.Background(), "Freeze", time.Second, func(context.Context) error { return boom }); err != boom {
		t.Fatalf("an error of the step: %v", err)
	}
}

// fakeStats is a page stream's figures, as a function of time.
type fakeStats func() pagestream.Stats

func (f fakeStats) Stats() pagestream.Stats { return f() }

// TestWatchPagesRules: the watch fires only when batches stay in flight
// without an acknowledgement for the limit; acknowledgements, and time
// with nothing in flight, do not count.
func TestWatchPagesRules(t *testing.T) {
	const limit = 200 * time.Millisecond
	run := func(t *testing.T, stats func(start time.Time) pagestream.Stats) (fired bool, after time.Duration) {
		ctx, cancel := context.WithCancelCause(context.Background())
		defer cancel(nil)
		start := time.Now()
		stop := watchPages(fakeStats(func() pagestream.Stats { return stats(start) }), limit, cancel)
		defer stop()
		select {
		case <-ctx.Done():
		case <-time.After(4 * limit):
			return false, 0
		}
		var te *TimeoutError
		if !errors.As(context.Cause(ctx), &te) || te.Step != stepPages || te.After != limit {
			t.Fatalf("cancelled with %v", context.Cause(ctx))
		}
		if !strings.Contains(te.Error(), "acknowledged no page batch within 200ms") {
			t.Errorf("message %q", te.Error())
		}
		return true, time.Since(start)
	}
	t.Run("stalled", func(t *testing.T) {
		fired, after := run(t, func(start time.Time) pagestream.Stats {
			return pagestream.Stats{Batches: 3, Busy: time.Since(start)}
		})
		if !fired || after < limit || after > 2*limit {
			t.Errorf("fired %v after %v, want after about %v", fired, after, limit)
		}
	})
	t.Run("acknowledged", func(t *testing.T) {
		var acks atomic.Uint64
		fired, _ := run(t, func(start time.Time) pagestream.Stats {
			return pagestream.Stats{Batches: acks.Add(1), Busy: time.Since(start)}
		})
		if fired {
			t.Error("fired while batches were acknowledged")
		}
	})
	t.Run("idle", func(t *testing.T) {
		fired, _ := run(t, func(time.Time) pagestream.Stats { return pagestream.Stats{Batches: 3, Busy: time.Second} })
		if fired {
			t.Error("fired with nothing in flight")
		}
	})
	t.Run("half-busy", func(t *testing.T) {
		// In flight half of the time, never acknowledged: the target
		// keeps up, the source is slow.
		fired, _ := run(t, func(start time.Time) pagestream.Stats {
			return pagestream.Stats{Batches: 3, Busy: time.Since(start) / 2}
		})
		if fired {
			t.Error("fired though nothing stayed in flight for the limit")
		}
	})
	if got := stallLimit(time.Second, 0); got != time.Second {
		t.Errorf("stallLimit without a bandwidth limit: %v", got)
	}
	if got := stallLimit(time.Second, 100<<10); got < 40*time.Second {
		t.Errorf("stallLimit at 100 KiB/s: %v, want room for a few 1 MiB batches", got)
	}
}

// deafPages is a Pages service that opens a stream and then never
// acknowledges a batch: a target stuck with the connection open.
type deafPages struct {
	migrationpb.UnimplementedPagesServer
}

func (deafPages) Stream(s migrationpb.Pages_StreamServer) error {
	if _, err := s.Recv(); err != nil {
		return err
	}
	if err := s.Send(&migrationpb.PageAck{}); err != nil {
		return err
	}
	for {
		if _, err := s.Recv(); err != nil {
			return err
		}
	}
}

// TestWatchPagesSender: a real sender whose target stops acknowledging:
// the round's Done returns once the watch aborts the stream, and the
// sender's Close does not wait for the target.
func TestWatchPagesSender(t *testing.T) {
	cc := serveBufconn(t, func(g *grpc.Server) { migrationpb.RegisterPagesServer(g, deafPages{}) })
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	s, err := pagestream.Open(ctx, migrationpb.NewPagesClient(cc), "m", pagestream.SenderConfig{Codec: pagestream.CodecNone})
	if err != nil {
		t.Fatal(err)
	}
	const limit = 300 * time.Millisecond
	stop := watchPages(s, limit, cancel)
	defer stop()
	sink := s.Sink(1, 0)
	page := make([]byte, 4096)
	page[0] = 1
	start := time.Now()
	err = sink.WritePages(0x10000, page)
	if err == nil {
		err = sink.Done()
	}
	took := time.Since(start)
	var te *TimeoutError
	if err == nil || !errors.As(context.Cause(ctx), &te) {
		t.Fatalf("round ended with %v, stream cause %v", err, context.Cause(ctx))
	}
	if took < limit || took > limit+2*time.Second {
		t.Errorf("the round ended after %v, want about %v", took, limit)
	}
	m := &migration{streamCtx: ctx, log: discardLogger()}
	if got := m.pageErr(err); got != te {
		t.Errorf("pageErr(%v) = %v, want the timeout", err, got)
	}
	done := make(chan struct{})
	go func() { _ = s.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close waits for the deaf target")
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
