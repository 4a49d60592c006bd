package source

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/phaul/phaul/internal/hostinfo"
	"github.com/phaul/phaul/internal/testutil"
	"github.com/phaul/phaul/pageserver"
	"github.com/phaul/phaul/pagestream"
	"github.com/phaul/phaul/protocol"
	"github.com/phaul/phaul/protocol/migrationpb"
	"github.com/phaul/phaul/tracker"
	"github.com/phaul/phaul/transport"
)

// childEnv makes the test binary the migrated process: it writes its
// memory for ever (see TestMain).
const childEnv = "PHAUL_SOURCE_TEST_CHILD"

func TestMain(m *testing.M) {
	if ready := os.Getenv(childEnv); ready != "" {
		child(ready)
	}
	// go test may leave a descriptor to it open here: the child would
	// inherit it, and a migration refuses it.
	if err := testutil.CloseInheritedFds(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	os.Exit(m.Run())
}

// child keeps rewriting 8 MiB, a page at a time, after creating the file
// ready.
func child(ready string) {
	mem := make([]byte, 8<<20)
	for i := range mem {
		mem[i] = byte(i)
	}
	if f, err := os.Create(ready); err == nil {
		f.Close()
	}
	for i := 0; ; i++ {
		mem[(i*4096)%len(mem)]++
		if i%64 == 0 {
			time.Sleep(time.Millisecond)
		}
	}
}

// startChild starts the migrated process (stdio on /dev/null: nothing a
// migration would refuse) and kills it when the test ends.
func startChild(t *testing.T) int {
	t.Helper()
	ready := filepath.Join(t.TempDir(), "ready")
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), childEnv+"="+ready)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(ready); err == nil {
			return cmd.Process.Pid
		}
		if time.Now().After(deadline) {
			t.Fatal("the child never got ready")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// fakeTarget is a target that stores pages but builds nothing: its
// Control answers every step at once, except the one it was told to hang
// at (until the request is cancelled) or stall at (until the test ends).
// Its Freeze takes the state but does not restore, as before the two were
// one request: the source asks for the restore with Restore.
type fakeTarget struct {
	migrationpb.UnimplementedControlServer
	local   protocol.Local
	hangAt  string
	stall   bool
	release chan struct{}
	reached chan struct{} // closed when hangAt is reached
	once    sync.Once

	mu     sync.Mutex
	store  *pageserver.Store
	aborts int
	// deaf is set when hangAt is "pages" and the last pre-copy round but
	// one is done: from then on no page batch is acknowledged.
	deaf atomic.Bool
}

// lastRound is the last pre-copy round of the tests' policy.
const lastRound = 1

// deafStream is a page stream whose acknowledgements stop when its
// target turns deaf.
type deafStream struct {
	grpc.ServerStream
	f *fakeTarget
}

func (s *deafStream) SendMsg(m any) error {
	if s.f.deaf.Load() {
		s.f.once.Do(func() { close(s.f.reached) })
		select {
		case <-s.f.release:
		case <-s.Context().Done():
		}
		return status.Error(codes.Unavailable, "deaf")
	}
	return s.ServerStream.SendMsg(m)
}

func (f *fakeTarget) step(ctx context.Context, method string) error {
	if method != f.hangAt {
		return nil
	}
	f.once.Do(func() { close(f.reached) })
	if f.stall {
		<-f.release
		return status.Error(codes.Unavailable, "released")
	}
	<-ctx.Done()
	return status.FromContextError(ctx.Err()).Err()
}

func (f *fakeTarget) Hello(_ context.Context, req *migrationpb.HelloRequest) (*migrationpb.HelloResponse, error) {
	return protocol.NegotiateHello(req, f.local), nil
}

func (f *fakeTarget) StartMigration(context.Context, *migrationpb.StartMigrationRequest) (*migrationpb.StartMigrationResponse, error) {
	st, err := pageserver.NewStore(pageserver.Config{PageSize: 4096})
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.store = st
	f.mu.Unlock()
	return &migrationpb.StartMigrationResponse{MigrationId: "m1"}, nil
}

func (f *fakeTarget) lookup(id string) (*pageserver.Store, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if id != "m1" || f.store == nil {
		return nil, pageserver.ErrUnknownMigration
	}
	return f.store, nil
}

func (f *fakeTarget) BeginRound(ctx context.Context, _ *migrationpb.BeginRoundRequest) (*migrationpb.BeginRoundResponse, error) {
	return &migrationpb.BeginRoundResponse{}, f.step(ctx, "BeginRound")
}

func (f *fakeTarget) RoundDone(ctx context.Context, req *migrationpb.RoundDoneRequest) (*migrationpb.RoundDoneResponse, error) {
	if f.hangAt == "pages" && req.GetStats().GetRound() == lastRound-1 {
		f.deaf.Store(true)
	}
	return &migrationpb.RoundDoneResponse{}, f.step(ctx, "RoundDone")
}

func (f *fakeTarget) Freeze(ctx context.Context, _ *migrationpb.FreezeRequest) (*migrationpb.FreezeResponse, error) {
	return &migrationpb.FreezeResponse{}, f.step(ctx, "Freeze")
}

func (f *fakeTarget) Restore(ctx context.Context, _ *migrationpb.RestoreRequest) (*migrationpb.RestoreResponse, error) {
	return &migrationpb.RestoreResponse{}, f.step(ctx, "Restore")
}

func (f *fakeTarget) Commit(ctx context.Context, _ *migrationpb.CommitRequest) (*migrationpb.CommitResponse, error) {
	if err := f.step(ctx, "Commit"); err != nil {
		return nil, err
	}
	return &migrationpb.CommitResponse{Resumed: true}, nil
}

func (f *fakeTarget) Abort(context.Context, *migrationpb.AbortRequest) (*migrationpb.AbortResponse, error) {
	f.mu.Lock()
	f.aborts++
	f.mu.Unlock()
	return &migrationpb.AbortResponse{}, nil
}

// startFakeTarget serves a fakeTarget on loopback and returns its address.
func startFakeTarget(t *testing.T, f *fakeTarget) string {
	t.Helper()
	f.local = protocol.Local{PhaulVersion: "test", Host: hostinfo.Collect(), Codecs: pagestream.Codecs()}
	f.release, f.reached = make(chan struct{}), make(chan struct{})
	l, err := transport.Listen(transport.ServerConfig{Listen: "127.0.0.1:0", Config: transport.Config{Logger: discardLogger()}})
	if err != nil {
		t.Fatal(err)
	}
	pages, err := pageserver.NewService(pageserver.ServiceConfig{Lookup: f.lookup, Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = l.Serve(ctx, func(ctx context.Context, sess *transport.Session) {
			deafen := grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
				return h(srv, &deafStream{ServerStream: ss, f: f})
			})
			g := grpc.NewServer(append(transport.GRPCServerOptions(), append(pageserver.GRPCServerOptions(), deafen)...)...)
			migrationpb.RegisterControlServer(g, f)
			migrationpb.RegisterPagesServer(g, pages)
			_ = sess.ServeGRPC(ctx, g)
		})
	}()
	t.Cleanup(func() {
		close(f.release)
		cancel()
		l.Close()
		<-served
		f.mu.Lock()
		if f.store != nil {
			f.store.Close()
		}
		f.mu.Unlock()
	})
	return l.Addr().String()
}

// procState returns the process's state letter and tracer.
func procState(t *testing.T, pid int) (byte, string) {
	t.Helper()
	st, err := testutil.ReadProcStat(pid)
	if err != nil {
		t.Fatalf("the original %d: %v", pid, err)
	}
	status, err := testutil.ProcStatus(pid, pid)
	if err != nil {
		t.Fatalf("the original %d: %v", pid, err)
	}
	return st.State, status["TracerPid"]
}

// waitState waits until ok says the process's state is as wanted.
func waitState(t *testing.T, pid int, what string, ok func(state byte, tracer string) bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		state, tracer := procState(t, pid)
		if ok(state, tracer) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the original has state %c and tracer %s, want it %s", state, tracer, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestRunTargetHangs migrates a real process to a target that stops
// answering at one step, with the connection open: Run must end at the
// step's deadline, name the step and the time, and leave the original
// running and untraced (before the commit), or stopped and untraced for
// the operator (the commit's answer never came).
func TestRunTargetHangs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: ptrace of the migrated process")
	}
	const d = 500 * time.Millisecond
	for _, c := range []struct {
		hangAt string
		stall  bool
		want   string
		// unknown: the commit's outcome is unknown, the original stays
		// stopped.
		unknown bool
	}{
		{hangAt: "Freeze", want: "restore on the target: target did not answer Freeze within 500ms; rolled back, the process runs here"},
		{hangAt: "Restore", stall: true, want: "restore on the target: target did not answer Restore within 500ms; rolled back, the process runs here"},
		{hangAt: "RoundDone", want: "round 0: target: target did not answer RoundDone within 500ms; rolled back, the process runs here"},
		{hangAt: "pages", want: "round 1: target acknowledged no page batch within 500ms; rolled back, the process runs here"},
		{hangAt: "Commit", stall: true, unknown: true, want: "commit outcome unknown: target did not answer Commit within 500ms; the original"},
	} {
		name := c.hangAt + map[bool]string{false: "/hang", true: "/stall"}[c.stall]
		t.Run(name, func(t *testing.T) {
			pid := startChild(t)
			f := &fakeTarget{hangAt: c.hangAt, stall: c.stall}
			addr := startFakeTarget(t, f)
			pol := DefaultPolicy()
			pol.MaxRounds = lastRound + 1
			done := make(chan error, 1)
			var reachedAt time.Time
			go func() {
				_, err := Run(context.Background(), Config{Pid: pid, Target: addr, Policy: pol, FreezeTimeout: d, Logger: discardLogger()})
				done <- err
			}()
			select {
			case <-f.reached:
				reachedAt = time.Now()
			case err := <-done:
				t.Fatalf("Run ended before the target hung: %v", err)
			case <-time.After(20 * time.Second):
				t.Fatal("the migration never reached " + c.hangAt)
			}
			var err error
			select {
			case err = <-done:
			case <-time.After(d + 10*time.Second):
				t.Fatal("Run did not end")
			}
			took := time.Since(reachedAt)
			t.Logf("Run ended %v after the target hung: %v", took.Round(time.Millisecond), err)
			if err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrTargetTimeout) {
				t.Fatalf("error %v, want one matching ErrTargetTimeout with %q", err, c.want)
			}
			// The deadline, then at most the Abort's (answered at once).
			if took < d-50*time.Millisecond || took > d+2*time.Second {
				t.Errorf("Run ended %v after the target hung, want about %v", took, d)
			}
			f.mu.Lock()
			aborts := f.aborts
			f.mu.Unlock()
			if c.unknown {
				if !errors.Is(err, ErrCommitUnknown) || aborts != 0 {
					t.Errorf("unknown commit: %v, %d aborts sent", err, aborts)
				}
				waitState(t, pid, "stopped (T) and untraced", func(s byte, tr string) bool { return s == 'T' && tr == "0" })
				// It stays stopped.
				time.Sleep(200 * time.Millisecond)
				if s, tr := procState(t, pid); s != 'T' || tr != "0" {
					t.Errorf("the original has state %c and tracer %s after a while, want it stopped", s, tr)
				}
				return
			}
			if aborts != 1 {
				t.Errorf("%d aborts sent to the target, want 1", aborts)
			}
			waitState(t, pid, "running and untraced", func(s byte, tr string) bool { return s != 'T' && s != 't' && tr == "0" })
			fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
			for _, fd := range fds {
				if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); strings.Contains(l, "userfaultfd") {
					t.Errorf("the original still holds descriptor %s: %s", fd.Name(), l)
				}
			}
			// It runs: its CPU time grows.
			before := cpuTime(t, pid)
			time.Sleep(100 * time.Millisecond)
			if after := cpuTime(t, pid); after <= before {
				t.Errorf("the original does not run: CPU time %v then %v", before, after)
			}
		})
	}
}

// cpuTime returns the CPU time the process's main thread used.
func cpuTime(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/schedstat", pid))
	if err != nil {
		t.Fatal(err)
	}
	var ns int64
	if _, err := fmt.Sscan(string(b), &ns); err != nil {
		t.Fatalf("schedstat %q: %v", b, err)
	}
	return time.Duration(ns)
}

// TestRunTrackingRefused migrates a process whose memory is already
// tracked (tracking starts while the target is greeted): Run must fail
// naming the cause, tell the target to abort, and leave the process
// running with the other tracking as it was.
func TestRunTrackingRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: ptrace of the migrated process")
	}
	testutil.SkipIfNotSupported(t, tracker.Supported(tracker.UffdWP))
	pid := startChild(t)
	other, err := tracker.Start(context.Background(), pid, tracker.Options{Backend: tracker.UffdWP})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Stop()
	f := &fakeTarget{}
	addr := startFakeTarget(t, f)
	_, err = Run(context.Background(), Config{Pid: pid, Target: addr, Policy: DefaultPolicy(), Track: tracker.UffdWP, Logger: discardLogger()})
	if !errors.Is(err, tracker.ErrAlreadyTracked) || !strings.Contains(err.Error(), "start tracking") {
		t.Fatalf("Run: %v, want a start-tracking error matching ErrAlreadyTracked", err)
	}
	f.mu.Lock()
	aborts := f.aborts
	f.mu.Unlock()
	if aborts != 1 {
		t.Errorf("%d aborts sent to the target, want 1", aborts)
	}
	waitState(t, pid, "running, untraced", func(state byte, tracer string) bool { return state != 'T' && state != 't' && tracer == "0" })
	// The other tracking still works.
	if _, err := other.Round(context.Background()); err != nil {
		t.Errorf("the other tracker after the refused migration: %v", err)
	}
}

// TestThreadList checks the TIDs a round's layout carries: every thread,
// the main thread's first.
func TestThreadList(t *testing.T) {
	done := make(chan struct{})
	defer close(done)
	// Threads of their own, which stay until the test ends (threads the
	// runtime starts or ends meanwhile are not checked).
	own := make(chan int)
	for range 3 {
		go func() {
			runtime.LockOSThread()
			own <- syscall.Gettid()
			<-done
		}()
	}
	want := []int{<-own, <-own, <-own}
	pid := os.Getpid()
	tids, err := threadList(pid)
	if err != nil {
		t.Fatal(err)
	}
	if len(tids) < 4 || tids[0] != pid {
		t.Fatalf("threads %v: want the main thread %d first, and more", tids, pid)
	}
	for _, tid := range want {
		if !slices.Contains(tids, tid) {
			t.Errorf("thread %d missing from %v", tid, tids)
		}
	}
	if _, err := threadList(1 << 30); err == nil {
		t.Error("no error for a process that does not exist")
	}
}
