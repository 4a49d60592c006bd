package cli

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"

	"github.com/spf13/pflag"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/phaul/phaul/bench/workload"
	"github.com/phaul/phaul/internal/feature"
	"github.com/phaul/phaul/internal/hostinfo"
	"github.com/phaul/phaul/pageserver"
	"github.com/phaul/phaul/pagestream"
	"github.com/phaul/phaul/protocol"
	"github.com/phaul/phaul/protocol/migrationpb"
	"github.com/phaul/phaul/transport"
)

func init() {
	register(&command{
		name:    "serve",
		summary: "run the migration target: accept migrations from `phaul migrate` on other hosts",
		usage:   "[--listen ADDR] [--tls-cert F --tls-key F --tls-ca F] [--insecure] [--json-log] [-v]",
		flags: func(fs *pflag.FlagSet) func(context.Context, *Env, []string) error {
			var o serveOptions
			fs.StringVar(&o.listen, "listen", transport.DefaultListen,
				"host:port to listen on; off loopback it needs TLS (or --insecure)")
			fs.StringVar(&o.tls.CertFile, "tls-cert", "", "this host's certificate (PEM), for mutual TLS")
			fs.StringVar(&o.tls.KeyFile, "tls-key", "", "the key of --tls-cert (PEM)")
			fs.StringVar(&o.tls.CAFile, "tls-ca", "", "the CA that signs the sources' certificates (PEM); clients without one are refused")
			fs.BoolVar(&o.insecure, "insecure", false, "allow connections without TLS off loopback (anyone reaching the port can migrate onto this host)")
			fs.BoolVar(&o.jsonLog, "json-log", false, "log JSON lines instead of text")
			fs.IntVar(&o.maxSessions, "max-sessions", transport.DefaultMaxSessions, "connections served at once; more are refused")
			fs.StringVar(&o.pageMemory, "page-memory", "0", "memory for received pages, all migrations together (e.g. 8G; 0: no limit)")
			fs.StringVar(&o.spillDir, "spill-dir", "", "keep pages in an unlinked file in this directory when --page-memory is exhausted")
			fs.CountVarP(&o.verbose, "verbose", "v", "log more (-v: debug)")
			return func(ctx context.Context, env *Env, args []string) error {
				if len(args) > 0 {
					return usageError("unexpected argument %q", args[0])
				}
				if o.tls.Enabled() && (o.tls.CertFile == "" || o.tls.KeyFile == "" || o.tls.CAFile == "") {
					return usageError("--tls-cert, --tls-key and --tls-ca go together")
				}
				mem, err := workload.ParseSize(o.pageMemory)
				if err != nil {
					return usageError("--page-memory: %v", err)
				}
				o.pageMemoryBytes = mem
				return runServe(ctx, env, o, nil)
			}
		},
	})
}

// serveOptions are the flags of `phaul serve`.
type serveOptions struct {
	listen          string
	tls             transport.TLSFiles
	insecure        bool
	jsonLog         bool
	maxSessions     int
	pageMemory      string
	pageMemoryBytes int64
	spillDir        string
	verbose         int

	// host returns this host's facts for Hello (tests replace it).
	host func() *migrationpb.HostInfo
}

// serveLogger logs at info level (debug with -v), as text or JSON lines.
func serveLogger(env *Env, jsonLog bool, verbose int) *slog.Logger {
	opts := &slog.HandlerOptions{Level: slog.LevelInfo}
	if verbose > 0 {
		opts.Level = slog.LevelDebug
	}
	if jsonLog {
		return slog.New(slog.NewJSONHandler(env.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(env.Stderr, opts))
}

// runServe serves until ctx is done (SIGINT, SIGTERM). ready, if set, is
// called with the bound address once the listener is up.
func runServe(ctx context.Context, env *Env, o serveOptions, ready func(net.Addr)) error {
	log := serveLogger(env, o.jsonLog, o.verbose)
	if o.spillDir != "" && o.pageMemoryBytes == 0 {
		log.Warn("--spill-dir has no effect without --page-memory")
	}
	cfg := transport.ServerConfig{
		Listen:      o.listen,
		MaxSessions: o.maxSessions,
		Config:      transport.Config{TLS: o.tls, Insecure: o.insecure, Logger: log},
	}
	l, err := transport.Listen(cfg)
	if err != nil {
		return err
	}
	defer l.Close()
	if o.host == nil {
		o.host = hostinfo.Collect
	}
	h := o.host()
	local := protocol.Local{
		PhaulVersion:     Version,
		Host:             h,
		Codecs:           pagestream.Codecs(),
		RequiredFeatures: requiredFeatures(),
	}
	log.Info("host", "kernel", h.GetKernelRelease(), "xsave", fmt.Sprintf("%#x", h.GetXsaveFeatures()),
		"cpu", h.GetCpuModel(), "features", len(h.GetKernelFeatures()))
	srv := &server{
		local:    local,
		log:      log,
		budget:   pageserver.NewBudget(o.pageMemoryBytes),
		spillDir: o.spillDir,
	}
	if ready != nil {
		ready(l.Addr())
	}
	err = l.Serve(ctx, srv.session)
	log.Info("stopped")
	return err
}

// requiredFeatures names the kernel features a restore cannot do without.
func requiredFeatures() []string {
	var names []string
	for _, f := range feature.Features() {
		if f.Need == feature.Required {
			names = append(names, f.Name)
		}
	}
	return names
}

// server is the target daemon: what every session shares.
type server struct {
	local    protocol.Local
	log      *slog.Logger
	budget   *pageserver.Budget
	spillDir string
}

// session serves one connection: the Control and Pages services on gRPC
// over its streams, with the migrations started on it. They end with it.
func (s *server) session(ctx context.Context, sess *transport.Session) {
	ss := &serveSession{
		srv:        s,
		log:        s.log.With("peer", sess.Peer().String()),
		migrations: map[string]*pageserver.Store{},
	}
	defer ss.discardAll()
	pages, err := pageserver.NewService(pageserver.ServiceConfig{
		Lookup: ss.store,
		Codecs: s.local.Codecs,
		Logger: ss.log,
	})
	if err != nil {
		ss.log.Error("page service", "err", err)
		return
	}
	g := grpc.NewServer(append(transport.GRPCServerOptions(), pageserver.GRPCServerOptions()...)...)
	migrationpb.RegisterControlServer(g, ss)
	migrationpb.RegisterPagesServer(g, pages)
	if err := sess.ServeGRPC(ctx, g); err != nil && !errors.Is(err, context.Canceled) {
		ss.log.Warn("session ended", "err", err)
	}
}

// serveSession is the Control service of one connection. For now it
// answers Hello, starts and aborts migrations (each a page store) and
// reports rounds; the rest of the migration comes with the engine.
type serveSession struct {
	migrationpb.UnimplementedControlServer
	srv *server
	log *slog.Logger

	mu         sync.Mutex
	hello      bool // a Hello was accepted
	migrations map[string]*pageserver.Store
}

// Hello implements migrationpb.ControlServer.
func (ss *serveSession) Hello(_ context.Context, req *migrationpb.HelloRequest) (*migrationpb.HelloResponse, error) {
	resp := protocol.NegotiateHello(req, ss.srv.local)
	if !resp.GetAccepted() {
		ss.log.Warn("hello refused", "reason", resp.GetReason(), "source_version", req.GetPhaulVersion(),
			"source_kernel", req.GetHost().GetKernelRelease())
		return resp, nil
	}
	ss.mu.Lock()
	ss.hello = true
	ss.mu.Unlock()
	ss.log.Info("hello", "source_version", req.GetPhaulVersion(), "source_host", req.GetHost().GetHostname(),
		"protocol", resp.GetProtocolVersion(), "codec", pagestream.CodecName(resp.GetCodec()), "warnings", resp.GetWarnings())
	return resp, nil
}

// StartMigration implements migrationpb.ControlServer.
func (ss *serveSession) StartMigration(_ context.Context, req *migrationpb.StartMigrationRequest) (*migrationpb.StartMigrationResponse, error) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if !ss.hello {
		return nil, status.Error(codes.FailedPrecondition, "start migration: no accepted Hello on this connection")
	}
	if req.GetPid() <= 0 {
		return nil, status.Errorf(codes.InvalidArgument, "start migration: pid %d", req.GetPid())
	}
	store, err := pageserver.NewStore(pageserver.Config{
		PageSize: int(ss.srv.local.Host.GetPageSize()),
		Budget:   ss.srv.budget,
		SpillDir: ss.srv.spillDir,
	})
	if err != nil {
		return nil, status.Errorf(codes.Internal, "start migration: %v", err)
	}
	var b [8]byte
	rand.Read(b[:])
	id := fmt.Sprintf("%d-%s", req.GetPid(), hex.EncodeToString(b[:]))
	ss.migrations[id] = store
	ss.log.Info("migration started", "migration", id, "pid", req.GetPid(), "processes", len(req.GetPids()),
		"codec", pagestream.CodecName(req.GetOptions().GetCodec()))
	return &migrationpb.StartMigrationResponse{MigrationId: id}, nil
}

// RoundDone implements migrationpb.ControlServer: it reports what the
// store holds.
func (ss *serveSession) RoundDone(_ context.Context, req *migrationpb.RoundDoneRequest) (*migrationpb.RoundDoneResponse, error) {
	store, err := ss.store(req.GetMigrationId())
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "round done: %v", err)
	}
	st := store.Stats()
	r := req.GetStats()
	ss.log.Info("round", "migration", req.GetMigrationId(), "round", r.GetRound(), "pages", r.GetPagesData(),
		"zero", r.GetPagesZero(), "wire_bytes", r.GetBytesWire(), "stored", st.PagesData, "memory", st.MemoryBytes, "spilled", st.SpillBytes)
	return &migrationpb.RoundDoneResponse{PagesStored: st.PagesData}, nil
}

// Abort implements migrationpb.ControlServer: the migration's pages are
// dropped. Aborting an unknown migration succeeds (Abort is idempotent).
func (ss *serveSession) Abort(_ context.Context, req *migrationpb.AbortRequest) (*migrationpb.AbortResponse, error) {
	ss.mu.Lock()
	store := ss.migrations[req.GetMigrationId()]
	delete(ss.migrations, req.GetMigrationId())
	ss.mu.Unlock()
	if store != nil {
		ss.discard(req.GetMigrationId(), store, "aborted: "+req.GetReason())
	}
	return &migrationpb.AbortResponse{}, nil
}

// store is the page service's lookup.
func (ss *serveSession) store(id string) (*pageserver.Store, error) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	s := ss.migrations[id]
	if s == nil {
		return nil, fmt.Errorf("%w %q", pageserver.ErrUnknownMigration, id)
	}
	return s, nil
}

// discard drops a migration's pages.
func (ss *serveSession) discard(id string, store *pageserver.Store, why string) {
	st := store.Stats()
	if err := store.Close(); err != nil {
		ss.log.Warn("discard migration", "migration", id, "err", err)
	}
	ss.log.Info("migration discarded", "migration", id, "why", why, "pages", st.PagesData, "batches", st.Batches)
}

// discardAll drops the migrations left when the connection ends.
func (ss *serveSession) discardAll() {
	ss.mu.Lock()
	ms := ss.migrations
	ss.migrations = map[string]*pageserver.Store{}
	ss.mu.Unlock()
	for id, store := range ms {
		ss.discard(id, store, "connection ended")
	}
}
