package target

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/engine"
	"github.com/phaul/phaul/internal/hostinfo"
	"github.com/phaul/phaul/pageserver"
	"github.com/phaul/phaul/pagestream"
	"github.com/phaul/phaul/protocol"
	"github.com/phaul/phaul/protocol/imagepb"
	"github.com/phaul/phaul/protocol/migrationpb"
)

// newTestSession returns a session whose sources may stay silent for
// limit, with a migration started on it (no shadow: the tests set its
// phase).
func newTestSession(t *testing.T, limit time.Duration) (*Session, string) {
	t.Helper()
	local := protocol.Local{PhaulVersion: "test", Host: hostinfo.Collect(), Codecs: pagestream.Codecs()}
	s := NewSession(Config{Local: local, SourceTimeout: limit}, nil)
	t.Cleanup(s.Close)
	ctx := context.Background()
	hello, err := s.Hello(ctx, protocol.NewHelloRequest(local))
	if err != nil || !hello.GetAccepted() {
		t.Fatalf("hello: %v %v", hello, err)
	}
	started, err := s.StartMigration(ctx, &migrationpb.StartMigrationRequest{Pid: 4242})
	if err != nil {
		t.Fatal(err)
	}
	return s, started.GetMigrationId()
}

// held returns migration id of the session.
func held(s *Session, id string) *migration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.migrations[id]
}

// alive reports whether the session still holds migration id.
func alive(s *Session, id string) bool {
	_, err := s.Store(id)
	return err == nil
}

// waitForgotten waits until the session has forgotten migration id and
// returns how long that took.
func waitForgotten(t *testing.T, s *Session, id string, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for alive(s, id) {
		if time.Since(start) > within {
			t.Fatalf("migration %s still held after %v", id, within)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// TestSilentSource: a migration whose source sends nothing is discarded
// after the session's SourceTimeout, and the source's late requests get a
// definite refusal naming why, not "unknown migration".
func TestSilentSource(t *testing.T) {
	const limit = 300 * time.Millisecond
	s, id := newTestSession(t, limit)
	m := held(s, id)
	took := waitForgotten(t, s, id, 5*time.Second)
	if took < limit-20*time.Millisecond || took > limit+time.Second {
		t.Errorf("discarded after %v, want after about %v", took, limit)
	}
	select {
	case <-m.closed:
	default:
		t.Error("the migration's watch was not told it ended")
	}
	ctx := context.Background()
	_, err := s.RoundDone(ctx, &migrationpb.RoundDoneRequest{MigrationId: id})
	if status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "the source sent nothing for 300ms") {
		t.Errorf("a request after the discard: %v", err)
	}
	_, err = s.Commit(ctx, &migrationpb.CommitRequest{MigrationId: id})
	if status.Code(err) != codes.Aborted {
		t.Errorf("a commit after the discard: %v, want Aborted (a definite refusal)", err)
	}
	if _, err := s.Abort(ctx, &migrationpb.AbortRequest{MigrationId: id}); err != nil {
		t.Errorf("abort after the discard: %v", err)
	}
	_, err = s.RoundDone(ctx, &migrationpb.RoundDoneRequest{MigrationId: "never"})
	if status.Code(err) != codes.NotFound {
		t.Errorf("an unknown migration: %v", err)
	}
}

// TestSourceActivity: requests, page batches and a request in progress
// keep a migration; the silence counts from the end of the last one.
func TestSourceActivity(t *testing.T) {
	const limit = 200 * time.Millisecond
	ctx := context.Background()
	t.Run("requests", func(t *testing.T) {
		s, id := newTestSession(t, limit)
		for end := time.Now().Add(3 * limit); time.Now().Before(end); time.Sleep(limit / 4) {
			if _, err := s.RoundDone(ctx, &migrationpb.RoundDoneRequest{MigrationId: id}); err != nil {
				t.Fatal(err)
			}
		}
		waitForgotten(t, s, id, 5*time.Second)
	})
	t.Run("pages", func(t *testing.T) {
		s, id := newTestSession(t, limit)
		m := held(s, id)
		for end := time.Now().Add(3 * limit); time.Now().Before(end); time.Sleep(limit / 4) {
			// What the page store's batch hook does first.
			m.heard()
			if !alive(s, id) {
				t.Fatal("discarded while pages came")
			}
		}
		waitForgotten(t, s, id, 5*time.Second)
	})
	t.Run("in-progress", func(t *testing.T) {
		s, id := newTestSession(t, limit)
		_, leave, err := s.enter(id)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * limit)
		if !alive(s, id) {
			t.Fatal("discarded while a request was in progress")
		}
		leave()
		if took := waitForgotten(t, s, id, 5*time.Second); took < limit-20*time.Millisecond {
			t.Errorf("discarded %v after the request ended, want %v", took, limit)
		}
	})
}

// TestSilentSourceWhenReady: the silence watch discards a migration the
// source left ready (the shadow restored, waiting for Commit); the Commit
// that comes late is refused, so the source resumes its original. A
// committed migration is only forgotten: a repeated Commit still says it
// runs here.
func TestSilentSourceWhenReady(t *testing.T) {
	const limit = 200 * time.Millisecond
	ctx := context.Background()
	s, id := newTestSession(t, limit)
	m := held(s, id)
	m.mu.Lock()
	m.phase = ready
	m.mu.Unlock()
	waitForgotten(t, s, id, 5*time.Second)
	m.mu.Lock()
	ph, why := m.phase, m.why
	m.mu.Unlock()
	if ph != discarded || !strings.Contains(why, "sent nothing") {
		t.Errorf("phase %v (%q) after the discard", ph, why)
	}
	_, err := s.Commit(ctx, &migrationpb.CommitRequest{MigrationId: id})
	if status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "discarded") {
		t.Errorf("late commit: %v, want Aborted", err)
	}

	s2, id2 := newTestSession(t, limit)
	m2 := held(s2, id2)
	m2.mu.Lock()
	m2.phase = ready
	m2.mu.Unlock()
	if resp, err := s2.Commit(ctx, &migrationpb.CommitRequest{MigrationId: id2}); err != nil || !resp.GetResumed() {
		t.Fatalf("commit: %v %v", resp, err)
	}
	waitForgotten(t, s2, id2, 5*time.Second)
	if resp, err := s2.Commit(ctx, &migrationpb.CommitRequest{MigrationId: id2}); err != nil || !resp.GetResumed() {
		t.Errorf("repeated commit after the migration was forgotten: %v %v", resp, err)
	}
	if _, err := s2.Abort(ctx, &migrationpb.AbortRequest{MigrationId: id2}); err != nil {
		t.Errorf("abort after the end: %v", err)
	}
}

// TestSilentSourceRace: requests racing with the silence watch either
// succeed on a live migration or get the discard's refusal; the watch
// never discards a migration while a request is in progress.
func TestSilentSourceRace(t *testing.T) {
	const limit = 20 * time.Millisecond
	ctx := context.Background()
	for range 8 {
		s, id := newTestSession(t, limit)
		var wg sync.WaitGroup
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 30 {
					_, err := s.RoundDone(ctx, &migrationpb.RoundDoneRequest{MigrationId: id})
					if err != nil {
						if status.Code(err) != codes.Aborted {
							t.Errorf("request: %v", err)
						}
						return
					}
					time.Sleep(time.Duration(i%5) * 5 * time.Millisecond)
				}
			}()
		}
		wg.Wait()
		waitForgotten(t, s, id, 5*time.Second)
	}
}

func TestNewSessionDefaults(t *testing.T) {
	s := NewSession(Config{}, nil)
	if s.cfg.SourceTimeout != DefaultSourceTimeout {
		t.Errorf("SourceTimeout %v", s.cfg.SourceTimeout)
	}
	if _, err := s.Store("x"); !errors.Is(err, pageserver.ErrUnknownMigration) {
		t.Errorf("Store of an unknown migration: %v", err)
	}
}

// TestFreezeWaitsForFinalPages: a final state that names page batches the
// target has not applied waits for them, and fails, naming why, when the
// page stream breaks or the request's deadline comes first; the migration
// is not frozen by a failed Freeze.
func TestFreezeWaitsForFinalPages(t *testing.T) {
	req := func(id string) *migrationpb.FreezeRequest {
		return &migrationpb.FreezeRequest{MigrationId: id, Restore: true,
			State: &migrationpb.FinalState{PagesThrough: 3}}
	}
	t.Run("deadline", func(t *testing.T) {
		s, id := newTestSession(t, time.Minute)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := s.Freeze(ctx, req(id))
		if status.Code(err) != codes.DeadlineExceeded {
			t.Fatalf("freeze without its pages: %v, want DeadlineExceeded", err)
		}
		if took := time.Since(start); took < 40*time.Millisecond {
			t.Errorf("freeze gave up after %v, before its deadline", took)
		}
		if p := held(s, id).phase; p != started {
			t.Errorf("phase %v after a failed freeze", p)
		}
	})
	t.Run("stream broke", func(t *testing.T) {
		s, id := newTestSession(t, time.Minute)
		store, err := s.Store(id)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			_, err := s.Freeze(context.Background(), req(id))
			done <- err
		}()
		select {
		case err := <-done:
			t.Fatalf("freeze did not wait for its pages: %v", err)
		case <-time.After(30 * time.Millisecond):
		}
		store.EndStream(errors.New("checksum mismatch in batch 2"))
		select {
		case err := <-done:
			if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "checksum mismatch in batch 2") {
				t.Errorf("freeze after the stream broke: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("freeze still waits after the page stream broke")
		}
	})
}

// TestBeginRoundThreadsAhead: the threads a round's layout names are
// created in the shadow at once, and a TID in use here does not fail the
// round (the restore creates what is missing, or fails with the reason).
func TestBeginRoundThreadsAhead(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("a shadow process needs root (ptrace, clone3 set_tid)")
	}
	free := func(from int) int {
		for pid := from; ; pid++ {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); errors.Is(err, os.ErrNotExist) {
				return pid
			}
		}
	}
	pid := free(os.Getpid() + 1000)
	thread := free(pid + 1)
	layout, err := engine.Layout(os.Getpid()) // this process's, [vdso] included
	if err != nil {
		t.Fatal(err)
	}
	s, id := newTestSession(t, time.Minute)
	round := func(n int, tids ...int) error {
		p := &imagepb.Process{Pid: int32(pid), Vmas: layout}
		for _, tid := range tids {
			p.Threads = append(p.Threads, &imagepb.Thread{Tid: int32(tid)})
		}
		blob, err := proto.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		_, err = s.BeginRound(context.Background(), &migrationpb.BeginRoundRequest{MigrationId: id, Round: uint32(n),
			Layouts: []*migrationpb.ProcessBlob{{Pid: int32(pid), Image: blob}}})
		return err
	}
	tasks := func() []string {
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		slices.Sort(names)
		return names
	}
	if err := round(0, pid, thread); err != nil {
		t.Fatal(err)
	}
	want := []string{strconv.Itoa(pid), strconv.Itoa(thread)}
	slices.Sort(want)
	if got := tasks(); !slices.Equal(got, want) {
		t.Fatalf("shadow threads after round 0: %v, want %v", got, want)
	}
	// This test's own PID is in use here: logged, not an error.
	if err := round(1, pid, os.Getpid()); err != nil {
		t.Fatalf("round with a TID in use: %v", err)
	}
	if got := tasks(); !slices.Equal(got, want) {
		t.Errorf("shadow threads after a refused thread list: %v, want %v unchanged", got, want)
	}
}
