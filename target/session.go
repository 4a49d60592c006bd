package target

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/engine"
	"github.com/phaul/phaul/internal/actionscript"
	"github.com/phaul/phaul/internal/fault"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/pageserver"
	"github.com/phaul/phaul/pagestream"
	"github.com/phaul/phaul/protocol"
	"github.com/phaul/phaul/protocol/imagepb"
	"github.com/phaul/phaul/protocol/migrationpb"
)

// Config is what every session of a daemon shares.
type Config struct {
	Local  protocol.Local
	Budget *pageserver.Budget
	Logger *slog.Logger
	// Scripts are the operator's action scripts (nil: none).
	Scripts *actionscript.Runner
	// SourceTimeout is how long a migration's source may stay silent (no
	// request, no page batch, none in progress) before the migration is
	// discarded as if the connection had ended: a source that hangs but
	// keeps the connection open (answering its keepalives) must not hold a
	// shadow process and its network lock here for ever. 0 means
	// DefaultSourceTimeout.
	SourceTimeout time.Duration
}

// DefaultSourceTimeout is Config.SourceTimeout's default. A healthy source
// is silent only while it works on its own between two requests: a round's
// scan of a large process, an action script (a minute at most by default).
// A source that is gone, or whose host is, ends the connection instead
// (TCP, or the transport's keepalive within a minute).
const DefaultSourceTimeout = 5 * time.Minute

// maxEnded bounds the migrations a session remembers after their end.
const maxEnded = 256

// Session is the Control service of one connection.
type Session struct {
	migrationpb.UnimplementedControlServer
	cfg Config
	log *slog.Logger

	mu         sync.Mutex
	hello      bool
	migrations map[string]*migration
	// ended remembers how migrations of this connection ended, so that a
	// late request of the source gets a definite answer: above all a
	// Commit after the migration was discarded, which must be refused
	// (the source then resumes its original), never left unknown.
	ended map[string]ending
}

// ending is how a migration ended.
type ending struct {
	committed bool
	why       string
}

// NewSession returns the Control service for one connection.
func NewSession(cfg Config, log *slog.Logger) *Session {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.SourceTimeout == 0 {
		cfg.SourceTimeout = DefaultSourceTimeout
	}
	// Protobuf's set-up of the state's message types, off the downtime.
	go protocol.WarmUp()
	return &Session{cfg: cfg, log: log, migrations: map[string]*migration{}, ended: map[string]ending{}}
}

// phase is where a migration stands on the target.
type phase int

const (
	started   phase = iota
	frozen          // the final state arrived
	ready           // restored, stopped, waiting for Commit
	committed       // the process runs here
	discarded       // rolled back before the commit; only forgetting is left
)

// migration is one migration's state on the target.
type migration struct {
	id    string
	log   *slog.Logger
	store *pageserver.Store

	mu      sync.Mutex
	phase   phase
	xsave   uint64
	shadows map[int32]*engine.Shadow
	final   map[int32]engine.State
	frozeAt time.Time
	// scripts run with the migration's details once the final state is
	// known; locked is set once the network-lock point was reached, from
	// when a rollback runs the rollback scripts.
	scripts *actionscript.Runner
	locked  bool
	// why the migration was discarded (phase discarded).
	why string
	// forgotten is set once forget has begun.
	forgotten bool
	// closed is closed when the migration is forgotten.
	closed chan struct{}

	// act guards the source's activity, which the silence watch reads.
	act  sync.Mutex
	busy int       // requests being handled
	last time.Time // when the source was last heard of
}

// heard records that the source was heard of (a page batch, the end of a
// request).
func (m *migration) heard() {
	m.act.Lock()
	m.last = time.Now()
	m.act.Unlock()
}

// silent reports whether the source has been silent for d, with no
// request in progress.
func (m *migration) silent(d time.Duration) bool {
	m.act.Lock()
	defer m.act.Unlock()
	return m.busy == 0 && time.Since(m.last) >= d
}

// usable returns the error of a request to a migration that was discarded.
//
// Precondition: m.mu held.
func (m *migration) usable() error {
	if m.phase == discarded {
		return status.Errorf(codes.Aborted, "the target discarded migration %q: %s", m.id, m.why)
	}
	return nil
}

// Hello implements migrationpb.ControlServer.
func (s *Session) Hello(_ context.Context, req *migrationpb.HelloRequest) (*migrationpb.HelloResponse, error) {
	resp := protocol.NegotiateHello(req, s.cfg.Local)
	if !resp.GetAccepted() {
		s.log.Warn("hello refused", "reason", resp.GetReason(), "source_version", req.GetPhaulVersion(),
			"source_kernel", req.GetHost().GetKernelRelease())
		return resp, nil
	}
	s.mu.Lock()
	s.hello = true
	s.mu.Unlock()
	s.log.Info("hello", "source_version", req.GetPhaulVersion(), "source_host", req.GetHost().GetHostname(),
		"protocol", resp.GetProtocolVersion(), "codec", pagestream.CodecName(resp.GetCodec()), "warnings", resp.GetWarnings())
	return resp, nil
}

// StartMigration implements migrationpb.ControlServer.
func (s *Session) StartMigration(_ context.Context, req *migrationpb.StartMigrationRequest) (*migrationpb.StartMigrationResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.hello {
		return nil, status.Error(codes.FailedPrecondition, "start migration: no accepted Hello on this connection")
	}
	if req.GetPid() <= 0 {
		return nil, status.Errorf(codes.InvalidArgument, "start migration: pid %d", req.GetPid())
	}
	if n := len(req.GetPids()); n > 1 {
		return nil, status.Errorf(codes.Unimplemented, "start migration: a tree of %d processes (only single processes move yet)", n)
	}
	store, err := pageserver.NewStore(pageserver.Config{
		PageSize: int(s.cfg.Local.Host.GetPageSize()),
		Budget:   s.cfg.Budget,
		// The shadows hold the pages: the store only follows them.
		StateOnly: true,
	})
	if err != nil {
		return nil, status.Errorf(codes.Internal, "start migration: %v", err)
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	id := fmt.Sprintf("%d-%s", req.GetPid(), hex.EncodeToString(b[:]))
	m := &migration{id: id, store: store, log: s.log.With("migration", id),
		shadows: map[int32]*engine.Shadow{}, final: map[int32]engine.State{}, scripts: s.cfg.Scripts,
		closed: make(chan struct{}), last: time.Now()}
	store.SetBatchHook(m.apply)
	s.migrations[id] = m
	go s.watch(m)
	m.log.Info("migration started", "pid", req.GetPid(), "codec", pagestream.CodecName(req.GetOptions().GetCodec()))
	return &migrationpb.StartMigrationResponse{MigrationId: id}, nil
}

// apply writes a verified batch into the shadow of its process.
func (m *migration) apply(b *pagestream.Batch) error {
	m.heard()
	m.mu.Lock()
	sh := m.shadows[b.Pid]
	m.mu.Unlock()
	if sh == nil {
		return fmt.Errorf("pages of process %d before its layout (BeginRound)", b.Pid)
	}
	return b.Each(func(r pagestream.Run, data []byte) error {
		switch r.Kind {
		case pagestream.Data:
			return sh.WritePages(r.Addr, data)
		case pagestream.Zero:
			return sh.ZeroPages(r.Addr, r.Pages)
		case pagestream.Gone:
			return sh.DropPages(r.Addr, r.Pages)
		}
		return fmt.Errorf("page run of kind %v", r.Kind)
	})
}

// enter returns a migration of this connection for a request, which
// counts as in progress (the source is not silent) until leave is called.
// A migration that ended gives its ending's error.
func (s *Session) enter(id string) (m *migration, leave func(), err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m = s.migrations[id]
	if m == nil {
		if e, ok := s.ended[id]; ok {
			if e.committed {
				return nil, nil, status.Errorf(codes.FailedPrecondition, "migration %q is over: the process runs here", id)
			}
			return nil, nil, status.Errorf(codes.Aborted, "the target discarded migration %q: %s", id, e.why)
		}
		return nil, nil, status.Errorf(codes.NotFound, "unknown migration %q", id)
	}
	m.act.Lock()
	m.busy++
	m.act.Unlock()
	return m, func() {
		m.act.Lock()
		m.busy--
		m.last = time.Now()
		m.act.Unlock()
	}, nil
}

// watch discards m once its source has been silent for the session's
// SourceTimeout, until m is forgotten.
func (s *Session) watch(m *migration) {
	limit := s.cfg.SourceTimeout
	t := time.NewTicker(min(max(limit/8, 10*time.Millisecond), time.Second))
	defer t.Stop()
	for {
		select {
		case <-m.closed:
			return
		case <-t.C:
		}
		if !m.silent(limit) || !m.mu.TryLock() {
			continue // a request holds it: not silent
		}
		// Checked again under m.mu: a request that entered since then
		// waits for m.mu, and finds the migration discarded.
		if !m.silent(limit) {
			m.mu.Unlock()
			continue
		}
		why := fmt.Sprintf("the source sent nothing for %v", limit)
		if m.phase != committed {
			m.log.Warn("discarding the migration: its source went silent", "after", limit, "phase", m.phase.String())
			m.rollbackLocked(why)
		}
		m.mu.Unlock()
		s.forget(m, why)
		return
	}
}

func (p phase) String() string {
	switch p {
	case started:
		return "rounds"
	case frozen:
		return "frozen"
	case ready:
		return "ready"
	case committed:
		return "committed"
	case discarded:
		return "discarded"
	}
	return fmt.Sprintf("phase(%d)", int(p))
}

// Store is the page service's lookup.
func (s *Session) Store(id string) (*pageserver.Store, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.migrations[id]
	if m == nil {
		return nil, fmt.Errorf("%w %q", pageserver.ErrUnknownMigration, id)
	}
	return m.store, nil
}

func decodeProcess(b []byte) (*imagepb.Process, error) {
	p := &imagepb.Process{}
	if err := proto.Unmarshal(b, p); err != nil {
		return nil, err
	}
	return p, nil
}

// BeginRound implements migrationpb.ControlServer: the shadow of each
// process is created, or brought to the round's layout.
func (s *Session) BeginRound(ctx context.Context, req *migrationpb.BeginRoundRequest) (*migrationpb.BeginRoundResponse, error) {
	m, leave, err := s.enter(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	defer leave()
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(); err != nil {
		return nil, err
	}
	if m.phase != started {
		return nil, status.Errorf(codes.FailedPrecondition, "begin round %d: the migration is past its rounds", req.GetRound())
	}
	m.xsave = req.GetXsaveFeatures()
	for _, blob := range req.GetLayouts() {
		p, err := decodeProcess(blob.GetImage())
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "begin round %d: layout of %d: %v", req.GetRound(), blob.GetPid(), err)
		}
		pid := blob.GetPid()
		sh := m.shadows[pid]
		if sh == nil {
			sh, err = engine.NewShadow(ctx, engine.ShadowOptions{Pid: int(pid), Vmas: p.GetVmas(), XsaveFeatures: m.xsave,
				Logger: m.log})
			if err != nil {
				code := codes.Internal
				if errors.Is(err, engine.ErrPidTaken) {
					code = codes.AlreadyExists
				}
				return nil, status.Errorf(code, "begin round %d: %v", req.GetRound(), err)
			}
			m.shadows[pid] = sh
			m.log.Info("shadow created", "pid", pid, "vmas", len(p.GetVmas()))
		} else if err := sh.SetLayout(p.GetVmas()); err != nil {
			return nil, status.Errorf(codes.Internal, "begin round %d: layout of %d: %v", req.GetRound(), pid, err)
		}
		// The threads, ahead of the restore (a source that does not send
		// them leaves it all to the restore).
		if ths := p.GetThreads(); len(ths) > 0 {
			tids := make([]int, len(ths))
			for i, th := range ths {
				tids[i] = int(th.GetTid())
			}
			if err := sh.SetThreads(tids); err != nil {
				// The restore creates what is missing then, or fails
				// with the reason.
				m.log.Warn("threads not created ahead", "pid", pid, "err", err)
			}
		}
	}
	return &migrationpb.BeginRoundResponse{}, nil
}

// RoundDone implements migrationpb.ControlServer: it reports what the
// store holds.
func (s *Session) RoundDone(_ context.Context, req *migrationpb.RoundDoneRequest) (*migrationpb.RoundDoneResponse, error) {
	m, leave, err := s.enter(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	defer leave()
	st := m.store.Stats()
	r := req.GetStats()
	m.log.Info("round", "round", r.GetRound(), "pages", r.GetPagesData(), "zero", r.GetPagesZero(),
		"wire_bytes", r.GetBytesWire(), "stored", st.PagesData)
	return &migrationpb.RoundDoneResponse{PagesStored: st.PagesData, PagesApplied: st.PagesData}, nil
}

// Freeze implements migrationpb.ControlServer: the final state arrives,
// after the final round's pages when it names them, and with
// req.Restore the shadows take it at once (see Restore).
func (s *Session) Freeze(ctx context.Context, req *migrationpb.FreezeRequest) (*migrationpb.FreezeResponse, error) {
	arrived := time.Now()
	m, leave, err := s.enter(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	defer leave()
	st := req.GetState()
	// Before m.mu: applying pages takes it.
	if seq := st.GetPagesThrough(); seq > 0 {
		if err := m.store.WaitApplied(ctx, seq); err != nil {
			if ctx.Err() != nil {
				return nil, status.FromContextError(ctx.Err()).Err()
			}
			return nil, status.Errorf(codes.FailedPrecondition, "freeze: the final round's pages: %v", err)
		}
	}
	inv := &imagepb.Inventory{}
	if err := proto.Unmarshal(st.GetInventory(), inv); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "freeze: inventory: %v", err)
	}
	files := &imagepb.FileTable{}
	if err := proto.Unmarshal(st.GetFileTable(), files); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "freeze: file table: %v", err)
	}
	entries := map[int32]*imagepb.ProcessEntry{}
	for _, e := range inv.GetProcesses() {
		entries[e.GetPid()] = e
	}
	m.mu.Lock()
	err = m.takeFinal(st, inv, files, entries, arrived)
	var resp *migrationpb.RestoreResponse
	if err == nil && req.GetRestore() {
		resp, err = m.restoreLocked(ctx)
	}
	m.mu.Unlock()
	switch {
	case err != nil:
		return nil, err
	case !req.GetRestore():
		return &migrationpb.FreezeResponse{}, nil
	}
	if err := answerReady(ctx); err != nil {
		return nil, err
	}
	return &migrationpb.FreezeResponse{Restored: resp}, nil
}

// takeFinal keeps the final state of the frozen tree for the restore.
func (m *migration) takeFinal(st *migrationpb.FinalState, inv *imagepb.Inventory, files *imagepb.FileTable,
	entries map[int32]*imagepb.ProcessEntry, arrived time.Time) error {
	if err := m.usable(); err != nil {
		return err
	}
	if m.phase != started {
		return status.Error(codes.FailedPrecondition, "freeze: already frozen")
	}
	eps, _, err := engine.ImageEndpoints(files)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "freeze: file table: %v", err)
	}
	pids := make([]string, 0, len(st.GetProcesses()))
	for _, blob := range st.GetProcesses() {
		pids = append(pids, strconv.Itoa(int(blob.GetPid())))
	}
	m.scripts = m.scripts.With(append(actionscript.SocketEnv(eps), "PHAUL_SIDE=target",
		"PHAUL_PID="+strings.Join(pids, " "), "PHAUL_MIGRATION_ID="+m.id)...)
	for _, blob := range st.GetProcesses() {
		p, err := decodeProcess(blob.GetImage())
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "freeze: process %d: %v", blob.GetPid(), err)
		}
		if m.shadows[blob.GetPid()] == nil {
			return status.Errorf(codes.FailedPrecondition, "freeze: process %d has no shadow", blob.GetPid())
		}
		m.final[blob.GetPid()] = engine.State{Process: p, Files: files, Entry: entries[blob.GetPid()], ShellJob: inv.GetShellJob()}
	}
	m.phase = frozen
	m.frozeAt = arrived
	return nil
}

// Restore implements migrationpb.ControlServer: every shadow takes its
// final state and waits, stopped, for Commit.
func (s *Session) Restore(ctx context.Context, req *migrationpb.RestoreRequest) (*migrationpb.RestoreResponse, error) {
	m, leave, err := s.enter(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	defer leave()
	m.mu.Lock()
	resp, err := m.restoreLocked(ctx)
	m.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if err := answerReady(ctx); err != nil {
		return nil, err
	}
	return resp, nil
}

// restoreLocked has every shadow take its final state; they wait,
// stopped, for Commit.
func (m *migration) restoreLocked(ctx context.Context) (*migrationpb.RestoreResponse, error) {
	if err := m.usable(); err != nil {
		return nil, err
	}
	if m.phase != frozen {
		return nil, status.Error(codes.FailedPrecondition, "restore: no final state")
	}
	if err := fault.PointContext(ctx, fault.TargetRestore); err != nil { // test-only; nil unless armed
		return nil, status.Errorf(codes.Internal, "restore: %v", err)
	}
	resp := &migrationpb.RestoreResponse{}
	m.locked = true // from here a shadow may hold a lock, and the scripts may have acted
	for pid, st := range m.final {
		if _, err := m.shadows[pid].Ready(ctx, st); err != nil {
			// Ready discarded it; forget removes its lock.
			return nil, status.Errorf(codes.Internal, "restore %d: %v", pid, err)
		}
		resp.Pids = append(resp.Pids, pid)
	}
	if err := m.scripts.Run(ctx, actionscript.NetworkLock); err != nil {
		return nil, status.Errorf(codes.Internal, "restore: %v", err)
	}
	m.phase = ready
	resp.RestoreNs = uint64(time.Since(m.frozeAt))
	m.log.Info("ready", "pids", resp.Pids, "since_freeze", time.Since(m.frozeAt))
	return resp, nil
}

// answerReady is the last step of a restore, with m.mu released: a test
// may stop the answer here (fault.TargetReady).
func answerReady(ctx context.Context) error {
	if err := fault.PointContext(ctx, fault.TargetReady); err != nil { // test-only; nil unless armed
		return status.Errorf(codes.Internal, "ready: %v", err)
	}
	return nil
}

// Commit implements migrationpb.ControlServer: the restored processes run.
// A repeated Commit answers like the first.
func (s *Session) Commit(_ context.Context, req *migrationpb.CommitRequest) (*migrationpb.CommitResponse, error) {
	m, leave, err := s.enter(req.GetMigrationId())
	if status.Code(err) == codes.FailedPrecondition && s.committed(req.GetMigrationId()) {
		return &migrationpb.CommitResponse{Resumed: true}, nil
	}
	if err != nil {
		return nil, err
	}
	defer leave()
	m.mu.Lock()
	defer m.mu.Unlock()
	switch m.phase {
	case committed:
		return &migrationpb.CommitResponse{Resumed: true}, nil
	case discarded:
		return nil, m.usable()
	case ready:
	default:
		return nil, status.Error(codes.FailedPrecondition, "commit: not ready")
	}
	// A refusal before anything runs is definite (Aborted): the source
	// may resume its original at once.
	refuse := func(why error) error {
		m.rollbackLocked("commit refused: " + why.Error())
		go s.forget(m, "commit refused")
		return status.Errorf(codes.Aborted, "commit: %v; the target discarded the migration", why)
	}
	if err := m.scripts.Run(context.Background(), actionscript.PreResume); err != nil {
		return nil, refuse(err)
	}
	resumed := 0
	for pid, sh := range m.shadows {
		if err := sh.Resume(); err != nil {
			if resumed == 0 {
				return nil, refuse(fmt.Errorf("resume %d: %w", pid, err))
			}
			return nil, status.Errorf(codes.Internal, "commit: resume %d: %v", pid, err)
		}
		resumed++
		go reap(m.log, int(pid))
	}
	m.phase = committed
	m.log.Info("committed: the processes run here", "since_freeze", time.Since(m.frozeAt))
	// The processes run: a failing script is reported, not undone.
	for _, a := range []actionscript.Action{actionscript.NetworkUnlock, actionscript.PostResume} {
		if err := m.scripts.Run(context.Background(), a); err != nil {
			m.log.Error("after the commit", "err", err)
		}
	}
	return &migrationpb.CommitResponse{Resumed: true}, nil
}

// reap waits for a migrated process (a child of this daemon) to exit, so
// that it does not stay a zombie holding its PID. It waits for that PID
// only: waiting for any child would steal the ptrace stops of shadows
// other migrations are building.
func reap(log *slog.Logger, pid int) {
	_, ws, err := sys.Wait4(pid, 0)
	if err != nil {
		log.Warn("wait for migrated process", "pid", pid, "err", err)
		return
	}
	log.Info("migrated process ended", "pid", pid, "status", ws)
}

// Confirm implements migrationpb.ControlServer: the source killed the
// original; the target forgets the migration.
func (s *Session) Confirm(_ context.Context, req *migrationpb.ConfirmRequest) (*migrationpb.ConfirmResponse, error) {
	m, leave, err := s.enter(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	defer leave()
	m.mu.Lock()
	ok := m.phase == committed
	m.mu.Unlock()
	if !ok {
		return nil, status.Error(codes.FailedPrecondition, "confirm: not committed")
	}
	s.forget(m, "confirmed")
	return &migrationpb.ConfirmResponse{}, nil
}

// Abort implements migrationpb.ControlServer: everything of the migration
// is discarded (unless it was committed). Idempotent.
func (s *Session) Abort(_ context.Context, req *migrationpb.AbortRequest) (*migrationpb.AbortResponse, error) {
	s.mu.Lock()
	m := s.migrations[req.GetMigrationId()]
	s.mu.Unlock()
	if m == nil {
		return &migrationpb.AbortResponse{}, nil
	}
	m.mu.Lock()
	done := m.phase == committed
	m.mu.Unlock()
	if done {
		return nil, status.Error(codes.FailedPrecondition, "abort: already committed; the process runs here")
	}
	s.forget(m, "aborted: "+req.GetReason())
	return &migrationpb.AbortResponse{}, nil
}

// committed reports whether migration id of this connection ended
// committed.
func (s *Session) committed(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ended[id].committed
}

// forget drops a migration: shadows not committed are killed, pages freed.
// A request that comes later gets an answer from how it ended.
// Idempotent.
func (s *Session) forget(m *migration, why string) {
	m.mu.Lock()
	if m.phase != committed {
		m.rollbackLocked(why)
	}
	m.shadows = nil
	end := ending{committed: m.phase == committed, why: m.why}
	first := !m.forgotten
	m.forgotten = true
	m.mu.Unlock()
	if !first {
		return
	}
	s.mu.Lock()
	delete(s.migrations, m.id)
	if len(s.ended) >= maxEnded {
		for id := range s.ended {
			delete(s.ended, id)
			break
		}
	}
	s.ended[m.id] = end
	s.mu.Unlock()
	close(m.closed)
	st := m.store.Stats()
	if err := m.store.Close(); err != nil {
		m.log.Warn("close page store", "err", err)
	}
	m.log.Info("migration closed", "why", why, "pages", st.PagesData)
}

// rollbackLocked discards the shadows, runs the rollback scripts if the
// network-lock point was reached, and only then removes the shadows'
// network locks, so that the connections' address has left this host
// before their packets meet no socket here. Idempotent.
//
// Precondition: m.mu held, m not committed.
func (m *migration) rollbackLocked(why string) {
	if m.phase != discarded {
		m.phase, m.why = discarded, why
	}
	for _, sh := range m.shadows {
		sh.Discard()
	}
	if !m.locked {
		return
	}
	m.locked = false
	if err := m.scripts.Run(context.Background(), actionscript.Rollback, "PHAUL_REASON="+why); err != nil {
		m.log.Error("rollback", "err", err)
	}
	for pid, sh := range m.shadows {
		if err := sh.Unlock(); err != nil {
			m.log.Error("remove the network lock", "pid", pid, "err", err)
		}
	}
}

// Close discards the migrations of the connection; called when it ends.
func (s *Session) Close() {
	s.mu.Lock()
	var ms []*migration
	for _, m := range s.migrations {
		ms = append(ms, m)
	}
	s.mu.Unlock()
	for _, m := range ms {
		s.forget(m, "connection ended")
	}
}
