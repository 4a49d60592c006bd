package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/phaul/phaul/bench"
	"github.com/phaul/phaul/bench/workload"
	"github.com/phaul/phaul/internal/sys"
)

func init() {
	register(&command{
		name:    "demo",
		summary: "migrate a built-in workload between two local hosts (namespaces), and show that it carried on",
		usage:   "[--mem SIZE] [--dirty PAGES/S]",
		flags: func(fs *pflag.FlagSet) func(context.Context, *Env, []string) error {
			mem := fs.String("mem", "256M", "memory the workload fills")
			dirty := fs.Int("dirty", 1000, "pages the workload rewrites per second")
			return func(ctx context.Context, env *Env, args []string) error {
				if len(args) > 0 {
					return usageError("unexpected argument %q", args[0])
				}
				if _, err := workload.ParseSize(*mem); err != nil {
					return usageError("%v", err)
				}
				return runDemo(ctx, env, *mem, *dirty)
			}
		},
	})
}

func runDemo(ctx context.Context, env *Env, mem string, dirty int) error {
	if os.Geteuid() != 0 {
		return errors.New("the demo needs root (namespaces, ptrace, clone3 with a chosen PID)")
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	// Children get only their stdio, never what phaul inherited.
	if err := sys.CloseOnExecFrom(3); err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "phaul-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	say := func(format string, args ...any) { fmt.Fprintf(env.Stdout, "demo: "+format+"\n", args...) }

	// 1. Two hosts: network namespaces on one bridge.
	hosts, err := bench.NewHosts(ctx, self, work)
	if err != nil {
		return err
	}
	defer hosts.Close()
	src, tgt := hosts.Source, hosts.Target
	say("hosts: source %s (namespace %s), target %s (namespace %s, its own PID namespace)", src.Addr, src.NS, tgt.Addr, tgt.NS)

	// 2. The target daemon, and the workload on the source.
	serve, err := hosts.StartServe(ctx, 7070, "serve.log")
	if err != nil {
		return err
	}
	serveLog := serve.Log
	wl, err := hosts.Start(src.Command(ctx, self, workloadCommand, "--mem", mem, "--dirty", fmt.Sprint(dirty), "--heartbeat", "10ms"), "workload.log")
	if err != nil {
		return fmt.Errorf("start the workload: %w", err)
	}
	logPath := wl.Log
	pid := wl.Cmd.Process.Pid
	say("workload PID %d on the source: %s of memory, %d pages/s rewritten, a heartbeat every 10 ms", pid, mem, dirty)
	if _, err := bench.WaitLine(ctx, logPath, "READY", 60*time.Second); err != nil {
		return err
	}
	time.Sleep(500 * time.Millisecond)
	_ = sys.Kill(pid, sys.SIGUSR1)
	line, err := bench.WaitLine(ctx, logPath, "CHECK seq=1 ", 60*time.Second)
	if err != nil {
		return err
	}
	say("self-check on the source: %s", line)

	// 3. Migrate, with the rounds shown as they go.
	say("phaul migrate --to %s %d", serve.Addr, pid)
	mig := src.Command(ctx, self, "migrate", "--to", serve.Addr, "--insecure", "--json", fmt.Sprint(pid))
	mig.Stderr = env.Stdout
	out, err := mig.Output()
	if err != nil {
		return fmt.Errorf("migration failed: %w (target log: %s)", err, serveLog)
	}
	var res struct {
		DowntimeMS float64 `json:"downtime_ms"`
		TotalMS    float64 `json:"total_ms"`
		Rounds     int     `json:"rounds"`
		BytesSent  uint64  `json:"bytes_sent"`
		PagesSent  uint64  `json:"pages_sent"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		return fmt.Errorf("migrate said %q: %w", out, err)
	}
	say("migrated: downtime %.1f ms, total %.0f ms, %d rounds, %s on the wire for %d pages",
		res.DowntimeMS, res.TotalMS, res.Rounds, humanBytes(res.BytesSent), res.PagesSent)

	// 4. The workload proves it carried on, on the target.
	moved := serve.Lookup(pid)
	if moved == 0 {
		return fmt.Errorf("no process with PID %d on the target", pid)
	}
	say("on the target the workload is PID %d in its namespace (%d seen from here); the original on the source is gone: %v",
		pid, moved, !bench.Alive(pid))
	_ = sys.Kill(moved, sys.SIGUSR1)
	line, err = bench.WaitLine(ctx, logPath, "CHECK seq=2 ", 60*time.Second)
	if err != nil {
		return err
	}
	if !strings.Contains(line, " OK ") {
		return fmt.Errorf("self-check on the target failed: %s", line)
	}
	say("self-check on the target: %s", line)
	time.Sleep(200 * time.Millisecond)
	beat, _ := bench.LastLine(logPath, "BEAT ")
	say("heartbeats go on: %s (maxgap is the pause the workload itself saw)", beat)
	_ = sys.Kill(moved, sys.SIGTERM)
	if _, err := bench.WaitLine(ctx, logPath, "EXIT", 10*time.Second); err == nil {
		say("the workload exited cleanly on the target")
	}
	say("cleaning up the hosts; done")
	return nil
}
