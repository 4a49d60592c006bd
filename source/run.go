package source

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/engine"
	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/internal/actionscript"
	"github.com/phaul/phaul/internal/hostinfo"
	"github.com/phaul/phaul/netsock"
	"github.com/phaul/phaul/pagestream"
	"github.com/phaul/phaul/predump"
	"github.com/phaul/phaul/protocol"
	"github.com/phaul/phaul/protocol/imagepb"
	"github.com/phaul/phaul/protocol/migrationpb"
	"github.com/phaul/phaul/tracker"
	"github.com/phaul/phaul/transport"
)

// Config describes a migration.
type Config struct {
	Pid    int
	Target string // host:port of phaul serve
	TLS    transport.TLSFiles
	// Insecure allows a plain TCP connection to a non-loopback target.
	Insecure bool
	Policy   Policy
	// Codec is "s2" (default), "zstd" or "none".
	Codec string
	// Track is the tracker backend ("" for the best available).
	Track string
	// Bandwidth limits the page stream, in bytes per second (0: none).
	Bandwidth float64
	ShellJob  bool
	// TCPEstablished lets established TCP connections move (CRIU's
	// --tcp-established); without it a process that has some is refused
	// before anything is copied.
	TCPEstablished bool
	// Scripts are the operator's action scripts (nil: none).
	Scripts *actionscript.Runner
	// FreezeTimeout bounds the wait for each answer of the target
	// (DefaultFreezeTimeout when 0): the final round's page batches, the
	// final state (Freeze), the restore (Restore: the target is ready)
	// and the Commit, while the original waits frozen, and every request
	// of the rounds before. A step that times out before the commit rolls
	// the migration back (the original runs on here); a Commit that times
	// out leaves the outcome unknown (ErrCommitUnknown).
	FreezeTimeout time.Duration
	// Progress, when set, receives each round's figures as it ends.
	Progress func(RoundReport)
	Logger   *slog.Logger
	// PhaulVersion is sent in the Hello.
	PhaulVersion string
}

// RoundReport is one pre-copy round, as phaul migrate reports it.
type RoundReport struct {
	Round      int     `json:"round"`
	Pages      uint64  `json:"pages_sent"`
	PagesZero  uint64  `json:"pages_zero"`
	Bytes      uint64  `json:"bytes_sent"`
	DurationMS float64 `json:"duration_ms"`
	RateMBps   float64 `json:"rate_mb_per_s"`
	DirtyRate  float64 `json:"dirty_pages_per_sec"`
	ExpectedMS float64 `json:"expected_downtime_ms"`
	Decision   string  `json:"decision"`
	Reason     string  `json:"reason"`
	Final      bool    `json:"final,omitempty"`
}

// Result is what a migration did.
type Result struct {
	Pid        int     `json:"pid"`
	DowntimeMS float64 `json:"downtime_ms"`
	// TotalMS runs from the start to the target's confirmation that the
	// process runs there, the original killed: the migration's time.
	TotalMS float64 `json:"total_ms"`
	// CleanupMS is the source's work after that: the kernel freeing the
	// original's memory (tens of milliseconds per GiB), its connections
	// closed, the network lock removed, the post-resume scripts.
	CleanupMS float64       `json:"cleanup_ms"`
	Rounds    int           `json:"rounds"`
	BytesSent uint64        `json:"bytes_sent"`
	PagesSent uint64        `json:"pages_sent"`
	PagesZero uint64        `json:"pages_zero"`
	Tracker   string        `json:"tracker"`
	PerRound  []RoundReport `json:"per_round"`
	RestoreMS float64       `json:"target_restore_ms"`
	// Phases splits the downtime: where the frozen time went.
	Phases   Phases        `json:"downtime_phases"`
	Downtime time.Duration `json:"-"`

	completed time.Time // the target confirmed, the original killed
}

// Phases are the steps of the downtime window, in milliseconds, in order.
type Phases struct {
	// FinalRoundMS is the last pre-copy round, run on the frozen process.
	FinalRoundMS float64 `json:"final_round_ms"`
	// CollectMS is the rest of the freeze up to a complete state:
	// stopping the threads and reading the process's state (threads,
	// mappings, descriptors), less what ran alongside the final round.
	CollectMS float64 `json:"collect_ms"`
	// StateMS is sending that state to the target and its answer coming
	// back: the request's time less the target's ReadyMS.
	StateMS float64 `json:"state_ms"`
	// ReadyMS is the target applying the final pages and the state, as
	// it measured it (from the state's arrival to ready).
	ReadyMS float64 `json:"ready_ms"`
	// CommitMS is the commit round trip: the process runs there when it
	// ends.
	CommitMS float64 `json:"commit_ms"`
	// ScriptsMS is the time the source's action scripts took inside the
	// window (network-lock, post-dump), counted apart from the steps
	// around them.
	ScriptsMS float64 `json:"scripts_ms"`
}

// ErrCommitUnknown reports that the commit request got no answer: the
// target may or may not run the process. The original is left stopped,
// never resumed and never killed, for the operator to decide.
var ErrCommitUnknown = errors.New("commit outcome unknown")

// ErrCommitRefused reports that the target refused the commit outright
// (it discarded what it built): the original runs on here.
var ErrCommitRefused = errors.New("the target refused the commit")

// refuseEstablished refuses a process with established TCP connections,
// naming them: they move only with --tcp-established.
func refuseEstablished(pid int) error {
	eps, err := engine.Endpoints(pid)
	if err != nil {
		return fmt.Errorf("list the sockets: %w", err)
	}
	var names []string
	for _, ep := range eps {
		if ep.TCPState == netsock.Established {
			names = append(names, fmt.Sprintf("%v %v-%v", ep.Proto, ep.Local, ep.Peer))
		}
	}
	if len(names) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %d established connection(s): %s; migrate them with --tcp-established",
		netsock.ErrEstablishedNotAllowed, len(names), strings.Join(names, ", "))
}

// Run migrates a running process to the target. On any failure before the
// commit the target discards what it built and the process runs on here as
// before; after a successful commit the original is killed.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if cfg.FreezeTimeout == 0 {
		cfg.FreezeTimeout = DefaultFreezeTimeout
	}
	if cfg.FreezeTimeout < 0 {
		return nil, fmt.Errorf("migrate %d: negative freeze timeout %v", cfg.Pid, cfg.FreezeTimeout)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "migrate", "pid", cfg.Pid)
	start := time.Now()
	codec := pagestream.CodecS2
	if cfg.Codec != "" {
		c, err := pagestream.ParseCodec(cfg.Codec)
		if err != nil {
			return nil, err
		}
		codec = c
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", cfg.Pid)); err != nil {
		return nil, fmt.Errorf("migrate %d: %w", cfg.Pid, engine.ErrNoProcess)
	}
	if !cfg.TCPEstablished {
		if err := refuseEstablished(cfg.Pid); err != nil {
			return nil, fmt.Errorf("migrate %d: %w", cfg.Pid, err)
		}
	}
	// Protobuf's set-up of the state's message types, off the downtime.
	go protocol.WarmUp()
	// What the hello tells of this host is collected while connecting
	// (the kernel feature probes take tens of milliseconds).
	hostc := make(chan *migrationpb.HostInfo, 1)
	go func() { hostc <- hostinfo.Collect() }()
	sess, err := transport.Dial(ctx, transport.ClientConfig{Address: cfg.Target,
		Config: transport.Config{TLS: cfg.TLS, Insecure: cfg.Insecure, Logger: log}})
	if err != nil {
		return nil, fmt.Errorf("migrate %d: connect to %s: %w", cfg.Pid, cfg.Target, err)
	}
	defer sess.Close()
	cc, err := sess.DialGRPC()
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	control := migrationpb.NewControlClient(cc)
	// Tracking starts while the target is greeted and readies the
	// migration; it is stopped again unless the rounds take it over.
	type tracking struct {
		t   tracker.Tracker
		err error
	}
	trackc := make(chan tracking, 1)
	go func() {
		t, err := tracker.Start(ctx, cfg.Pid, tracker.Options{Backend: cfg.Track, Logger: log})
		trackc <- tracking{t, err}
	}()
	received := false // from trackc; then m.run owns the tracker
	defer func() {
		if !received {
			if tr := <-trackc; tr.err == nil {
				if err := tr.t.Stop(); err != nil {
					log.Warn("stop tracking", "err", err)
				}
			}
		}
	}()
	host := <-hostc
	var hello *migrationpb.HelloResponse
	err = call(ctx, "Hello", cfg.FreezeTimeout, func(ctx context.Context) (err error) {
		hello, err = control.Hello(ctx, protocol.NewHelloRequest(protocol.Local{
			PhaulVersion: cfg.PhaulVersion, Host: host, Codecs: []pagestream.Codec{codec, pagestream.CodecNone},
		}))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("migrate %d: hello: %w", cfg.Pid, err)
	}
	if err := protocol.CheckHelloResponse(hello); err != nil {
		return nil, fmt.Errorf("migrate %d: %w", cfg.Pid, err)
	}
	var started *migrationpb.StartMigrationResponse
	err = call(ctx, "StartMigration", cfg.FreezeTimeout, func(ctx context.Context) (err error) {
		started, err = control.StartMigration(ctx, &migrationpb.StartMigrationRequest{Pid: int32(cfg.Pid),
			Options: &migrationpb.MigrationOptions{Codec: hello.GetCodec(), DowntimeBudgetNs: uint64(cfg.Policy.Downtime),
				MaxRounds: uint32(cfg.Policy.MaxRounds), ShellJob: cfg.ShellJob}})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("migrate %d: start: %w", cfg.Pid, err)
	}
	m := &migration{cfg: cfg, log: log, id: started.GetMigrationId(), control: control, xsave: host.GetXsaveFeatures()}
	tr := <-trackc
	received = true
	if tr.err != nil {
		m.abort(tr.err.Error())
		return nil, fmt.Errorf("migrate %d: start tracking: %w", cfg.Pid, tr.err)
	}
	res, err := m.run(ctx, migrationpb.NewPagesClient(cc), hello.GetCodec(), tr.t)
	if err != nil {
		if !errors.Is(err, ErrCommitUnknown) && !errors.Is(err, ErrCommitRefused) {
			m.abort(err.Error())
			if errors.Is(err, ErrTargetTimeout) {
				// Say what became of the process: the user waited
				// for a target that did not answer.
				if m.resumeErr != nil {
					return nil, fmt.Errorf("migrate %d: %w; rolled back, but resuming the original failed: %v", cfg.Pid, err, m.resumeErr)
				}
				return nil, fmt.Errorf("migrate %d: %w; rolled back, the process runs here", cfg.Pid, err)
			}
		}
		return nil, fmt.Errorf("migrate %d: %w", cfg.Pid, err)
	}
	if res.completed.IsZero() { // killing the original failed
		res.completed = time.Now()
	}
	res.TotalMS = ms(res.completed.Sub(start))
	res.CleanupMS = ms(time.Since(res.completed))
	return res, nil
}

// migration is the source's state of one migration.
type migration struct {
	cfg     Config
	log     *slog.Logger
	id      string
	control migrationpb.ControlClient
	xsave   uint64
	layout  []byte            // the layout the target has (last BeginRound)
	threads []*imagepb.Thread // the TIDs the layout holds
	// streamCtx is the page stream's context; its cause is a
	// *TimeoutError when watchPages aborted the stream.
	streamCtx context.Context
	// resumeErr is the error of resuming the original in a rollback.
	resumeErr error
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// abort tells the target to discard the migration (best effort: a target
// that is gone has discarded it already, one that does not answer within
// abortTimeout discards it when the connection ends).
func (m *migration) abort(reason string) {
	ctx, cancel := context.WithTimeout(context.Background(), min(abortTimeout, m.cfg.FreezeTimeout))
	defer cancel()
	if _, err := m.control.Abort(ctx, &migrationpb.AbortRequest{MigrationId: m.id, Reason: reason}); err != nil {
		m.log.Warn("abort on the target failed", "err", err)
	}
}

// call sends one request of step to the target, with the step deadline.
func (m *migration) call(ctx context.Context, step string, fn func(context.Context) error) error {
	return call(ctx, step, m.cfg.FreezeTimeout, fn)
}

// pageErr returns the *TimeoutError that aborted the page stream when err
// came from that abort, and err otherwise.
func (m *migration) pageErr(err error) error {
	var te *TimeoutError
	if err != nil && errors.As(context.Cause(m.streamCtx), &te) && !errors.Is(err, ErrTargetTimeout) {
		m.log.Debug("page stream aborted", "err", err)
		return te
	}
	return err
}

// beginRound sends the process's layout for round, unless the target has
// it already: the final round runs in the downtime, and a process's layout
// rarely changes between its last rounds. The layout holds the TIDs of the
// threads too, for the target to create them ahead of the restore; tids
// nil (the final round) means those of the round before.
func (m *migration) beginRound(ctx context.Context, round int, vmas []*imagepb.VMA, tids []int) error {
	if tids != nil {
		m.threads = m.threads[:0]
		for _, tid := range tids {
			m.threads = append(m.threads, &imagepb.Thread{Tid: int32(tid)})
		}
	}
	blob, err := proto.MarshalOptions{Deterministic: true}.Marshal(&imagepb.Process{Pid: int32(m.cfg.Pid), Vmas: vmas, Threads: m.threads})
	if err != nil {
		return err
	}
	if bytes.Equal(blob, m.layout) {
		return nil
	}
	err = m.call(ctx, "BeginRound", func(ctx context.Context) error {
		_, err := m.control.BeginRound(ctx, &migrationpb.BeginRoundRequest{MigrationId: m.id, Round: uint32(round),
			Layouts: []*migrationpb.ProcessBlob{{Pid: int32(m.cfg.Pid), Image: blob}}, XsaveFeatures: m.xsave})
		return err
	})
	if err != nil {
		return fmt.Errorf("round %d: target: %w", round, err)
	}
	m.layout = blob
	return nil
}

func (m *migration) run(ctx context.Context, pages migrationpb.PagesClient, codec pagestream.Codec, t tracker.Tracker) (_ *Result, rerr error) {
	cfg := m.cfg
	pid := int32(cfg.Pid)
	parked := false
	defer func() {
		if !parked {
			if err := t.Stop(); err != nil {
				m.log.Warn("stop tracking", "err", err)
			}
		}
	}()
	// The page stream ends with the migration, or when the target leaves
	// its batches unacknowledged (watchPages), or, after a failure, at
	// once: a target that does not answer must not keep Close waiting.
	streamCtx, stopStream := context.WithCancelCause(ctx)
	defer stopStream(nil)
	m.streamCtx = streamCtx
	opening := time.AfterFunc(cfg.FreezeTimeout, func() {
		stopStream(&TimeoutError{Step: "the page stream", After: cfg.FreezeTimeout})
	})
	sender, err := pagestream.Open(streamCtx, pages, m.id, pagestream.SenderConfig{Codec: codec, Bandwidth: cfg.Bandwidth})
	if !opening.Stop() && err == nil {
		_ = sender.Close() // opened as the deadline cancelled it
		err = streamCtx.Err()
	}
	if err != nil {
		return nil, m.pageErr(err)
	}
	stopWatch := watchPages(sender, stallLimit(cfg.FreezeTimeout, cfg.Bandwidth), stopStream)
	defer func() {
		stopWatch()
		failed := rerr != nil
		if failed {
			stopStream(errors.New("migration failed"))
		}
		// The final acknowledgement of a healthy target comes at once.
		t := time.AfterFunc(cfg.FreezeTimeout, func() { stopStream(&TimeoutError{Step: stepPages, After: cfg.FreezeTimeout}) })
		defer t.Stop()
		if err := sender.Close(); err != nil && !failed {
			m.log.Debug("close the page stream", "err", err)
		}
	}()
	res := &Result{Pid: cfg.Pid, Tracker: t.Backend()}
	var prev, deferred tracker.Ranges // recorded by the target; mapped too late for a round's layout
	var rounds []Round
	bufs := new(predump.Buffers) // every round reads into the same memory
	round := 0
	for ; ; round++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		vmas, err := engine.Layout(cfg.Pid)
		if err != nil {
			return nil, fmt.Errorf("layout for round %d: %w", round, err)
		}
		tids, err := threadList(cfg.Pid)
		if err != nil {
			return nil, fmt.Errorf("threads for round %d: %w", round, err)
		}
		if err := m.beginRound(ctx, round, vmas, tids); err != nil {
			return nil, err
		}
		before := sender.Stats()
		t0 := time.Now()
		r, err := predump.Run(ctx, t, sender.Sink(pid, uint32(round)), predump.Options{Previous: prev, Layout: layoutRanges(vmas), Deferred: deferred, Buffers: bufs})
		if err != nil {
			return nil, fmt.Errorf("round %d: %w", round, m.pageErr(err))
		}
		prev, deferred = r.Recorded, r.Deferred
		d := sender.Stats().Sub(before)
		took := time.Since(t0)
		m.log.Debug("round", "round", round, "scan", r.Scan, "copy", r.Copy, "took", took, "busy", d.Busy, "pages", r.PagesWritten)
		if err := m.call(ctx, "RoundDone", func(ctx context.Context) error {
			_, err := m.control.RoundDone(ctx, &migrationpb.RoundDoneRequest{MigrationId: m.id, Stats: &migrationpb.RoundStats{
				Round: uint32(round), PagesData: d.PagesData, PagesZero: d.PagesZero, BytesRaw: d.RawBytes, BytesWire: d.WireBytes,
				DurationNs: uint64(took), PagesDirty: r.PagesDirty, Bandwidth: uint64(d.RawRate())}})
			return err
		}); err != nil {
			return nil, fmt.Errorf("round %d: target: %w", round, err)
		}
		// What the next round will send is what was written while this one
		// ran; a round that copied everything tells nothing of that.
		bw := d.RawRate()
		if bw == 0 && len(rounds) > 0 {
			bw = rounds[len(rounds)-1].Bandwidth
		}
		rounds = append(rounds, Round{DirtyBytes: r.PagesDirty * 4096, Bandwidth: bw, Duration: took, Unmeasured: round == 0})
		decision, reason := cfg.Policy.Decide(rounds)
		rep := RoundReport{Round: round, Pages: d.PagesData, PagesZero: d.PagesZero, Bytes: d.WireBytes,
			DurationMS: ms(took), RateMBps: bw / 1e6, DirtyRate: r.DirtyRate,
			ExpectedMS: ms(cfg.Policy.ExpectedDowntime(rounds[len(rounds)-1])), Decision: decision.String(), Reason: reason}
		res.PerRound = append(res.PerRound, rep)
		if cfg.Progress != nil {
			cfg.Progress(rep)
		}
		if decision == Abort {
			return nil, fmt.Errorf("the rounds do not converge: %s", reason)
		}
		if decision == Freeze {
			break
		}
	}

	// The final round runs on the frozen process: the tracker is parked
	// here and taken up again by the freeze.
	dir, err := os.MkdirTemp("", "phaul-migrate-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	if err := t.Park(dir); err != nil {
		return nil, fmt.Errorf("park tracking: %w", err)
	}
	parked = true
	round++
	var final *predump.Result
	var finalSink *pagestream.Sink
	before := sender.Stats()
	var lastStart, lastEnd time.Time
	fz, err := engine.Freeze(ctx, engine.FreezeOptions{Pid: cfg.Pid, ShellJob: cfg.ShellJob, TrackerDir: dir, Logger: m.log,
		KeepTracking: true, TCPEstablished: cfg.TCPEstablished, FlagsBeforeFreeze: true,
		LastRound: func(ctx context.Context, t tracker.Tracker, vmas []*imagepb.VMA) error {
			if t == nil {
				return errors.New("tracking state lost before the final round")
			}
			lastStart = time.Now()
			defer func() { lastEnd = time.Now() }()
			if err := m.beginRound(ctx, round, vmas, nil); err != nil {
				return err
			}
			layoutDone := time.Now()
			// Not waiting for the target's acknowledgement: the final
			// state names the last batch, and the target applies it
			// before restoring, while the state is collected here.
			finalSink = sender.FinalSink(pid, uint32(round))
			r, err := predump.Run(ctx, t, finalSink, predump.Options{Previous: prev, Deferred: deferred, Buffers: bufs})
			if err != nil {
				return fmt.Errorf("final round: %w", m.pageErr(err))
			}
			final = r
			m.log.Debug("final round", "layout", layoutDone.Sub(lastStart), "scan", r.Scan, "copy", r.Copy, "pages", r.PagesWritten)
			return nil
		}})
	if err != nil {
		// Freeze resumed the process. If it failed before taking up the
		// parked tracking (which marks the state consumed, and removes the
		// tracking when it resumes the process), remove that here.
		if st, serr := tracker.ReadState(dir); serr == nil && !st.GetConsumed() {
			if t, terr := tracker.Resume(context.Background(), cfg.Pid, dir, tracker.Options{Logger: m.log}); terr == nil {
				_ = t.Stop()
			}
		}
		return nil, err
	}
	frozenAt := fz.At
	eps, _, err := engine.ImageEndpoints(fz.State.Files)
	if err != nil {
		_ = fz.Resume()
		return nil, err
	}
	scripts := cfg.Scripts.With(append(actionscript.SocketEnv(eps), "PHAUL_SIDE=source",
		"PHAUL_PID="+strconv.Itoa(cfg.Pid), "PHAUL_MIGRATION_ID="+m.id, "PHAUL_TARGET="+cfg.Target)...)
	done := false
	// Hold runs while the target restores (see below): holdDone is nil
	// until it starts, closed when holdErr is its outcome.
	var holdDone chan struct{}
	var holdErr error
	defer func() {
		if !done {
			// The scripts first: a service address moved away comes back
			// while the connections are still held.
			bg, cancel := context.WithTimeout(context.Background(), actionscript.DefaultTimeout)
			defer cancel()
			if err := scripts.Run(bg, actionscript.Rollback); err != nil {
				m.log.Error("rollback", "err", err)
			}
			resume := fz.Resume
			if holdDone != nil {
				<-holdDone
				if holdErr == nil {
					// Before the commit: the process runs nowhere else.
					resume = fz.ResumeHeld
				}
			}
			if err := resume(); err != nil { // tracking removed too
				m.resumeErr = err
				m.log.Error("resume the original", "err", err)
			}
		}
	}()
	var scriptTime time.Duration
	runScript := func(a actionscript.Action) error {
		t0 := time.Now()
		err := scripts.Run(ctx, a)
		scriptTime += time.Since(t0)
		return err
	}
	if err := runScript(actionscript.NetworkLock); err != nil {
		return nil, err
	}
	collected := time.Now()
	res.Phases.FinalRoundMS = ms(lastEnd.Sub(lastStart))
	res.Phases.CollectMS = max(0, ms(collected.Sub(frozenAt)-scriptTime)-res.Phases.FinalRoundMS)
	lockScript := scriptTime
	st, err := finalState(fz)
	if err != nil {
		return nil, err
	}
	st.PagesThrough = finalSink.LastSeq()
	// The dump is complete: the source's part of moving a service
	// address (giving it up) comes before the target takes it up.
	if err := runScript(actionscript.PostDump); err != nil {
		return nil, err
	}
	// The original is readied for the commit window (Hold: its signals
	// queued again, a SIGSTOP queued, the userfaultfd taken out) while
	// the target restores, instead of after: the tracer thread is idle
	// meanwhile. A rollback then resumes it with ResumeHeld.
	holdDone = make(chan struct{})
	go func() { holdErr = fz.Hold(); close(holdDone) }()
	// The state, and the restore: the target answers when it is ready.
	var rr *migrationpb.RestoreResponse
	if err := m.call(ctx, "Freeze", func(ctx context.Context) error {
		resp, err := m.control.Freeze(ctx, &migrationpb.FreezeRequest{MigrationId: m.id, State: st, Restore: true})
		rr = resp.GetRestored()
		return err
	}); err != nil {
		return nil, fmt.Errorf("restore on the target: %w", err)
	}
	if rr == nil {
		// A target that only takes the state: ask for the restore.
		if err := m.call(ctx, "Restore", func(ctx context.Context) (err error) {
			rr, err = m.control.Restore(ctx, &migrationpb.RestoreRequest{MigrationId: m.id})
			return err
		}); err != nil {
			return nil, fmt.Errorf("restore on the target: %w", err)
		}
	}
	readyAt := time.Now()
	res.RestoreMS = float64(rr.GetRestoreNs()) / 1e6
	res.Phases.ReadyMS = res.RestoreMS
	// The target's own time apart, the rest is marshalling and transfer.
	res.Phases.StateMS = max(0, ms(readyAt.Sub(collected)-(scriptTime-lockScript))-res.RestoreMS)
	res.Phases.ScriptsMS = ms(scriptTime)
	// The commit window: from here an unanswered request leaves the
	// outcome unknown, and the original must neither run nor die.
	// Hold keeps the tracking registered, the userfaultfd out of the
	// process; Kill or Resume removes the rest.
	<-holdDone
	if holdErr != nil { // let go from here on (Resume, or phaul dying), it stays stopped
		return nil, holdErr
	}
	// Not ctx: an interrupt must not cut the commit short; its deadline
	// does.
	var cr *migrationpb.CommitResponse
	err = m.call(context.Background(), "Commit", func(ctx context.Context) (err error) {
		cr, err = m.control.Commit(ctx, &migrationpb.CommitRequest{MigrationId: m.id})
		return err
	})
	if status.Code(err) == codes.Aborted {
		// Refused outright: nothing runs there. Roll back here.
		done = true
		if err := scripts.Run(context.Background(), actionscript.Rollback); err != nil {
			m.log.Error("rollback", "err", err)
		}
		if err := fz.ResumeHeld(); err != nil { // tracking removed too
			m.log.Error("resume the original", "err", err)
		}
		return nil, fmt.Errorf("%w: %v", ErrCommitRefused, status.Convert(err).Message())
	}
	if err == nil && !cr.GetResumed() {
		err = errors.New("the target answered the commit without resuming the process")
	}
	if err != nil {
		done = true
		// Held: let go, it takes the SIGSTOP queued by Hold.
		if err := fz.Resume(); err != nil {
			m.log.Error("release the original", "err", err)
		}
		return nil, fmt.Errorf("%w: %w; the original (PID %d) is left stopped with SIGSTOP: check whether it runs on %s, then kill it here or resume it with SIGCONT",
			ErrCommitUnknown, err, cfg.Pid, cfg.Target)
	}
	res.Downtime = time.Since(frozenAt)
	res.DowntimeMS = ms(res.Downtime)
	res.Phases.CommitMS = ms(time.Since(readyAt))
	done = true
	// The target learns that the original is gone, and acknowledges the
	// final round, while the original's threads exit.
	confirmed := func() {
		if err := m.call(context.Background(), "Confirm", func(ctx context.Context) error {
			_, err := m.control.Confirm(ctx, &migrationpb.ConfirmRequest{MigrationId: m.id})
			return err
		}); err != nil {
			m.log.Warn("confirm", "err", err)
		}
		// The final round, now that the target acknowledged it:
		// outside the downtime.
		if err := sender.WaitAcked(finalSink.LastSeq()); err != nil {
			m.log.Warn("final round acknowledgement", "err", err)
		}
		res.completed = time.Now()
	}
	killAt := time.Now()
	if err := fz.KillWhile(confirmed); err != nil {
		m.log.Error("kill the original after commit", "err", err)
	}
	m.log.Debug("original gone, target confirmed", "took", time.Since(killAt))
	// The process runs there: what fails from here is reported, not
	// undone. The scripts have their own time limit.
	if err := scripts.Run(context.Background(), actionscript.PostResume); err != nil {
		m.log.Error("after the commit", "err", err)
	}
	if err := fz.Unlock(); err != nil {
		m.log.Error("remove the network lock of the original", "err", err)
	}
	if err := scripts.Run(context.Background(), actionscript.NetworkUnlock); err != nil {
		m.log.Error("after the commit", "err", err)
	}
	finalStats := sender.Stats().Sub(before)
	res.PerRound = append(res.PerRound, RoundReport{Round: round, Pages: finalStats.PagesData, PagesZero: finalStats.PagesZero,
		Bytes: finalStats.WireBytes, DirtyRate: final.DirtyRate, Decision: "final", Final: true})
	if cfg.Progress != nil {
		cfg.Progress(res.PerRound[len(res.PerRound)-1])
	}
	total := sender.Stats()
	res.Rounds = len(res.PerRound)
	res.BytesSent, res.PagesSent, res.PagesZero = total.WireBytes, total.PagesData, total.PagesZero
	return res, nil
}

// threadList returns the TIDs of pid's threads, the main thread's first.
func threadList(pid int) ([]int, error) {
	tids, err := ptrace.ListThreads(pid)
	if err != nil {
		return nil, err
	}
	slices.Sort(tids)
	if i := slices.Index(tids, pid); i > 0 {
		copy(tids[1:i+1], tids[:i])
		tids[0] = pid
	}
	return tids, nil
}

// finalState packs the frozen process's state for the target.
func finalState(fz *engine.Frozen) (*migrationpb.FinalState, error) {
	inv, err := proto.Marshal(&imagepb.Inventory{RootPid: int32(fz.Pid), Processes: []*imagepb.ProcessEntry{fz.State.Entry},
		XsaveFeatures: fz.XsaveFeatures, ShellJob: fz.State.ShellJob, PageSize: 4096})
	if err != nil {
		return nil, err
	}
	p, err := proto.Marshal(fz.State.Process)
	if err != nil {
		return nil, err
	}
	files, err := proto.Marshal(fz.State.Files)
	if err != nil {
		return nil, err
	}
	return &migrationpb.FinalState{Inventory: inv, FileTable: files,
		Processes: []*migrationpb.ProcessBlob{{Pid: int32(fz.Pid), Image: p}}}, nil
}
