package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/phaul/phaul/bench"
	"github.com/phaul/phaul/bench/workload"
	"github.com/phaul/phaul/internal/sys"
)

func init() {
	register(&command{
		name:    "bench",
		summary: "measure migrations: app-observed downtime, client stall, frozen time, total time, bytes, rounds, CPU; report and plots",
		usage:   "[--mem SIZES] [--dirty RATES] [--threads N] [--repeat N] [--compare KEY=V1,V2]... [--tcp-clients N] [--cmd CMD] [--out DIR] [--json]",
		flags: func(fs *pflag.FlagSet) func(context.Context, *Env, []string) error {
			mems := fs.StringSlice("mem", []string{"64M", "256M"}, "memory sizes of the built-in workload")
			dirty := fs.IntSlice("dirty", bench.DefaultDirtyRates, "dirty rates of the built-in workload, pages rewritten per second")
			threads := fs.Int("threads", 2, "writer threads of the built-in workload")
			repeat := fs.Int("repeat", 3, "runs of each configuration (medians and spreads are over these)")
			random := fs.Bool("random", false, "the workload's pages hold random (incompressible) data instead of heap-like data")
			compare := fs.StringArray("compare", nil, bench.CompareHelp)
			workloads := fs.StringSlice("workload", []string{"mem"}, "workloads: mem (built-in, heartbeats) and tcp (the same, with --tcp-clients clients, 3 if not given)")
			tcpClients := fs.Int("tcp-clients", 0, "connect `N` TCP clients (and one UDP client) to the workload through every migration (0: none).\n"+
				"The workload then also serves TCP and UDP on a service address, and the clients\n"+
				"connect from a third host, in modes normal, lazy-server, bulk in turn; phaul\n"+
				"migrate runs with --tcp-established and an action script (serve too) that\n"+
				"moves the address to the target. Each run waits until every client has\n"+
				"traffic before the migration and again after it, then closes them in order,\n"+
				"each checking that every message went through exactly once; a client error\n"+
				"fails the run. Recorded: client_stall_ms (the largest gap between two\n"+
				"messages a TCP client received that overlaps the migration: the stall a\n"+
				"connected client saw, to compare with the app downtime) and udp_gap_ms")
			cmdLine := fs.String("cmd", "", "run this shell command as the workload instead (one process; its own downtime is not measured)")
			heartbeat := fs.Duration("heartbeat", 10*time.Millisecond, "heartbeat interval of the built-in workload (the resolution of the app downtime)")
			warmup := fs.Duration("warmup", 500*time.Millisecond, "how long the workload runs before it is migrated")
			out := fs.String("out", "", "write results.json, report.md, the plots (*.svg) and the logs (logs/) into this directory")
			asJSON := fs.Bool("json", false, "print the results as JSON instead of the Markdown report")
			return func(ctx context.Context, env *Env, args []string) error {
				if len(args) > 0 {
					return usageError("unexpected argument %q", args[0])
				}
				cfg := bench.Config{DirtyRates: *dirty, Threads: *threads, Random: *random, Repeat: *repeat,
					Compare: *compare, Workloads: *workloads, TCPClients: *tcpClients, Cmd: *cmdLine, Heartbeat: *heartbeat,
					Warmup: *warmup, CommandLine: commandLine(fs)}
				for _, m := range *mems {
					n, err := workload.ParseSize(m)
					if err != nil || n == 0 {
						return usageError("--mem %q: want sizes such as 64M,1G", m)
					}
					cfg.Mems = append(cfg.Mems, n)
				}
				for _, d := range cfg.DirtyRates {
					if d < 0 {
						return usageError("--dirty %d: rates are pages per second, 0 or more", d)
					}
				}
				if _, err := bench.ParseCompare(cfg.Compare, bench.Variant{}); err != nil {
					return usageError("%v", err)
				}
				if *repeat < 1 || *threads < 1 {
					return usageError("--repeat and --threads take 1 or more")
				}
				if *tcpClients < 0 || *tcpClients > 1000 {
					return usageError("--tcp-clients %d: 0 to 1000", *tcpClients)
				}
				if *tcpClients > 0 && *cmdLine != "" {
					return usageError("--tcp-clients needs the built-in workload, not --cmd")
				}
				return runBench(ctx, env, cfg, *out, *asJSON)
			}
		},
	})
}

func runBench(ctx context.Context, env *Env, cfg bench.Config, out string, asJSON bool) error {
	if os.Geteuid() != 0 {
		return errors.New("the bench needs root (namespaces, ptrace, clone3 with a chosen PID)")
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	cfg.Phaul = self
	if out != "" {
		cfg.Dir = filepath.Join(out, "logs")
	}
	terminal := false
	if f, ok := env.Stderr.(*os.File); ok {
		terminal = sys.IsTerminal(int(f.Fd()))
	}
	cfg.Progress = bench.ProgressPrinter(env.Stderr, terminal)
	res, runErr := bench.RunBench(ctx, cfg)
	if len(res.Runs) == 0 && runErr != nil {
		return runErr
	}
	if out != "" {
		files, err := bench.WriteAll(out, res)
		if err != nil {
			return err
		}
		fmt.Fprintf(env.Stderr, "bench: wrote %s\n", strings.Join(files, ", "))
	}
	if asJSON {
		err = printJSON(env.Stdout, res)
	} else {
		err = bench.WriteMarkdown(env.Stdout, res)
	}
	if err != nil {
		return err
	}
	if runErr != nil {
		return runErr
	}
	failed := 0
	for _, r := range res.Runs {
		if r.Err != "" {
			failed++
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d runs failed (see the report)", failed, len(res.Runs))
	}
	return nil
}

// commandLine spells out the bench's command line from the flags given.
func commandLine(fs *pflag.FlagSet) string {
	parts := []string{"phaul bench"}
	fs.Visit(func(f *pflag.Flag) {
		if sv, ok := f.Value.(pflag.SliceValue); ok && f.Value.Type() == "stringArray" {
			for _, v := range sv.GetSlice() {
				parts = append(parts, fmt.Sprintf("--%s %s", f.Name, shellQuote(v)))
			}
			return
		}
		v := f.Value.String()
		if sv, ok := f.Value.(pflag.SliceValue); ok {
			v = strings.Join(sv.GetSlice(), ",")
		}
		if f.Value.Type() == "bool" {
			parts = append(parts, "--"+f.Name)
			return
		}
		parts = append(parts, fmt.Sprintf("--%s %s", f.Name, shellQuote(v)))
	})
	return strings.Join(parts, " ")
}

func shellQuote(s string) string {
	if s != "" && !strings.ContainsAny(s, " \t\n'\"\\$`|&;<>()*?[]{}~#!") {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
