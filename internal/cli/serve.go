package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/spf13/pflag"
	"google.golang.org/grpc"

	"github.com/phaul/phaul/bench/workload"
	"github.com/phaul/phaul/internal/actionscript"
	"github.com/phaul/phaul/internal/feature"
	"github.com/phaul/phaul/internal/hostinfo"
	"github.com/phaul/phaul/pageserver"
	"github.com/phaul/phaul/pagestream"
	"github.com/phaul/phaul/protocol"
	"github.com/phaul/phaul/protocol/migrationpb"
	"github.com/phaul/phaul/target"
	"github.com/phaul/phaul/transport"
)

func init() {
	register(&command{
		name:    "serve",
		summary: "run the migration target: accept migrations from `phaul migrate` on other hosts",
		usage:   "[--listen ADDR] [--tls-cert F --tls-key F --tls-ca F] [--insecure] [--action-script F]... [--source-timeout 5m] [--json-log] [-v]",
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
			fs.StringVar(&o.pageMemory, "page-memory", "0", "memory that received pages may take in the processes being rebuilt here, all migrations together; a migration that needs more is refused (e.g. 8G; 0: no limit)")
			fs.CountVarP(&o.verbose, "verbose", "v", "log more (-v: debug)")
			fs.StringArrayVar(&o.scripts, "action-script", nil, actionScriptHelp("target", "network-lock, pre-resume, network-unlock, post-resume, rollback"))
			fs.DurationVar(&o.sourceTimeout, "source-timeout", target.DefaultSourceTimeout,
				"discard a migration (kill its shadow process, remove its network lock) whose source sent nothing for this long while keeping the connection open; a source that is gone ends the connection sooner")
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
				if o.sourceTimeout <= 0 {
					return usageError("--source-timeout must be positive")
				}
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
	verbose         int
	scripts         []string
	sourceTimeout   time.Duration

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
	cfg := transport.ServerConfig{
		Listen:      o.listen,
		MaxSessions: o.maxSessions,
		Config:      transport.Config{TLS: o.tls, Insecure: o.insecure, Logger: log},
	}
	scripts, err := actionscript.New(o.scripts)
	if err != nil {
		return usageError("%v", err)
	}
	scripts.Logger = log
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
		local:   local,
		log:     log,
		budget:  pageserver.NewBudget(o.pageMemoryBytes),
		scripts: scripts,

		sourceTimeout: o.sourceTimeout,
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
	local   protocol.Local
	log     *slog.Logger
	budget  *pageserver.Budget
	scripts *actionscript.Runner
	// sourceTimeout is target.Config.SourceTimeout.
	sourceTimeout time.Duration
}

// session serves one connection: the Control and Pages services on gRPC
// over its streams, with the migrations started on it. Migrations not yet
// committed end with it.
func (s *server) session(ctx context.Context, sess *transport.Session) {
	log := s.log.With("peer", sess.Peer().String())
	ctl := target.NewSession(target.Config{Local: s.local, Budget: s.budget,
		Scripts: s.scripts.With("PHAUL_SOURCE=" + sess.Peer().String()), SourceTimeout: s.sourceTimeout}, log)
	defer ctl.Close()
	pages, err := pageserver.NewService(pageserver.ServiceConfig{
		Lookup: ctl.Store,
		Codecs: s.local.Codecs,
		Logger: log,
	})
	if err != nil {
		log.Error("page service", "err", err)
		return
	}
	g := grpc.NewServer(append(transport.GRPCServerOptions(), pageserver.GRPCServerOptions()...)...)
	migrationpb.RegisterControlServer(g, ctl)
	migrationpb.RegisterPagesServer(g, pages)
	if err := sess.ServeGRPC(ctx, g); err != nil && !errors.Is(err, context.Canceled) {
		log.Warn("session ended", "err", err)
	}
}
