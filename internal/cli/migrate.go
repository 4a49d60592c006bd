package cli

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/phaul/phaul/internal/actionscript"
	"github.com/phaul/phaul/source"
	"github.com/phaul/phaul/transport"
)

func init() {
	register(&command{
		name:    "migrate",
		summary: "move a running process to another host (phaul serve there), with a pause of milliseconds",
		usage:   "--to HOST:PORT PID [--downtime 25ms] [--max-rounds N] [--bandwidth LIMIT] [--compress s2|zstd|none] [--track ...] [--tcp-established] [--action-script F]... [--freeze-timeout 30s] [--tls-* F | --insecure] [--json]",
		flags: func(fs *pflag.FlagSet) func(context.Context, *Env, []string) error {
			to := fs.String("to", "", "address of the target's phaul serve, host:port (required)")
			pol := source.DefaultPolicy()
			downtime := fs.Duration("downtime", pol.Downtime, "downtime budget: freeze once what is still dirty can be sent within it at the measured bandwidth")
			maxRounds := fs.Int("max-rounds", pol.MaxRounds, "most pre-copy rounds before freezing (or aborting, see --on-no-converge)")
			onNoConverge := fs.String("on-no-converge", "stop", "when rounds stop shrinking or hit --max-rounds: stop (freeze anyway, longer pause) or abort (process stays here)")
			bandwidth := fs.String("bandwidth", "", "limit the page stream to this many bytes per second on the wire, e.g. 50M or 800Mbit (K, M, G are powers of 1000; default: no limit)")
			compress := fs.String("compress", "s2", "page compression: s2, zstd or none")
			track := fs.String("track", "auto", "dirty-page tracking: auto, uffdwp, softdirty or hash")
			shell := fs.Bool("shell-job", false, "the process's terminal descriptors are re-bound on the target")
			tcpEst := fs.Bool("tcp-established", false, "move established TCP connections too (held by a network lock while frozen; their address must follow the process, e.g. by an action script); without it such a process is refused")
			scriptPaths := fs.StringArray("action-script", nil, actionScriptHelp("source", "network-lock, post-dump, post-resume, network-unlock, rollback"))
			freezeTimeout := fs.Duration("freeze-timeout", source.DefaultFreezeTimeout, "how long to wait for each answer of the target while the process is frozen "+
				"(the final state with the restore, which waits for the final round's pages, then the commit) and for each request before: a target that does not answer in time "+
				"is treated as failed; before the commit the migration rolls back and the process runs on here, a commit without an answer leaves it stopped for you to decide")
			cert := fs.String("tls-cert", "", "client certificate (mutual TLS)")
			key := fs.String("tls-key", "", "client key")
			ca := fs.String("tls-ca", "", "CA that signed the target's certificate")
			insecure := fs.Bool("insecure", false, "allow plain TCP to a non-loopback target (no authentication: for trusted networks only)")
			asJSON := fs.Bool("json", false, "print the result as JSON")
			verbose := fs.CountP("verbose", "v", "log progress to stderr (-vv for debug)")
			return func(ctx context.Context, env *Env, args []string) error {
				if len(args) != 1 {
					return usageError("one PID expected")
				}
				pid, err := strconv.Atoi(args[0])
				if err != nil || pid <= 0 {
					return usageError("bad PID %q", args[0])
				}
				if *to == "" {
					return usageError("--to HOST:PORT is required")
				}
				if *freezeTimeout <= 0 {
					return usageError("--freeze-timeout must be positive")
				}
				pol.Downtime, pol.MaxRounds = *downtime, *maxRounds
				switch *onNoConverge {
				case "stop":
					pol.OnNoConverge = source.NoConvergeFreeze
				case "abort":
					pol.OnNoConverge = source.NoConvergeAbort
				default:
					return usageError("--on-no-converge takes stop or abort")
				}
				var bw float64
				if *bandwidth != "" {
					if bw, err = parseRate(*bandwidth); err != nil {
						return usageError("--bandwidth: %v", err)
					}
				}
				scripts, err := actionscript.New(*scriptPaths)
				if err != nil {
					return usageError("%v", err)
				}
				trackName := *track
				if trackName == "auto" {
					trackName = ""
				}
				log := newLogger(env, *verbose)
				scripts.Logger = log
				res, err := source.Run(ctx, source.Config{
					Pid: pid, Target: *to, Insecure: *insecure, Policy: pol, Codec: *compress, Track: trackName, Bandwidth: bw,
					ShellJob: *shell, TCPEstablished: *tcpEst, Scripts: scripts, Logger: log, PhaulVersion: Version, FreezeTimeout: *freezeTimeout,
					TLS: transport.TLSFiles{CertFile: *cert, KeyFile: *key, CAFile: *ca},
					Progress: func(r source.RoundReport) {
						if r.Final {
							fmt.Fprintf(env.Stderr, "round %d (final, frozen): %d pages, %s on the wire\n", r.Round, r.Pages, humanBytes(r.Bytes))
							return
						}
						fmt.Fprintf(env.Stderr, "round %d: %d pages (%d zero), %s on the wire in %.0f ms, %.0f MB/s, dirty %.0f pages/s, expected downtime %.1f ms: %s\n",
							r.Round, r.Pages, r.PagesZero, humanBytes(r.Bytes), r.DurationMS, r.RateMBps, r.DirtyRate, r.ExpectedMS, r.Decision)
					},
				})
				if err != nil {
					if ctx.Err() != nil && !errors.Is(err, source.ErrCommitUnknown) {
						// Ctrl-C (or SIGTERM) before the commit: rolled back.
						return fmt.Errorf("interrupted, the process runs on here: %w", err)
					}
					return err
				}
				if *asJSON {
					return printJSON(env.Stdout, res)
				}
				fmt.Fprintf(env.Stdout, "migrated %d to %s: downtime %.1f ms, total %s (then %s of cleanup here), %d rounds, %s on the wire (%d pages, %d zero)\n",
					res.Pid, *to, res.DowntimeMS, time.Duration(res.TotalMS*float64(time.Millisecond)).Round(time.Millisecond),
					time.Duration(res.CleanupMS*float64(time.Millisecond)).Round(time.Millisecond), res.Rounds, humanBytes(res.BytesSent), res.PagesSent, res.PagesZero)
				return nil
			}
		},
	})
}

// parseRate parses a bandwidth: bytes per second with an optional K, M or
// G (powers of 1000), or bits per second with a "bit" suffix ("800Mbit");
// a trailing "/s" or "B" is allowed.
func parseRate(s string) (float64, error) {
	t := strings.TrimSuffix(strings.TrimSpace(s), "/s")
	unit := 1.0
	if u, ok := strings.CutSuffix(t, "bit"); ok {
		t, unit = u, 1.0/8
	} else {
		t = strings.TrimSuffix(t, "B")
	}
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K', 'k':
			unit, t = unit*1e3, t[:n-1]
		case 'M':
			unit, t = unit*1e6, t[:n-1]
		case 'G':
			unit, t = unit*1e9, t[:n-1]
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || v <= 0 || math.IsInf(v, 0) {
		return 0, fmt.Errorf("bad rate %q (use e.g. 50M for 50 MB/s, or 800Mbit)", s)
	}
	return v * unit, nil
}

// actionScriptHelp is the help of --action-script for one side.
func actionScriptHelp(side, points string) string {
	return "run this executable at each point of a migration on the " + side + " (" + points +
		"), with PHAUL_ACTION naming the point and PHAUL_PID, PHAUL_MIGRATION_ID, PHAUL_ADDRESSES (the process's bound addresses), " +
		"PHAUL_CONNECTIONS and PHAUL_LISTENERS in the environment; it must exit 0 (before the commit a failure rolls back). Repeatable"
}
