package cli

import (
	"context"
	"time"

	"github.com/spf13/pflag"

	"github.com/phaul/phaul/bench/workload"
)

// workloadCommand is the name of the hidden subcommand that runs the
// built-in workload (package bench/workload).
const workloadCommand = "__workload"

func init() {
	register(&command{
		name:    workloadCommand,
		summary: "run the built-in workload (used by demo and bench)",
		usage:   "[--mem SIZE] [--dirty PAGES/S] [--writers N] [--heartbeat D] [--random] [--pause D [--pause-after D]] [--listen ADDR] [--udp ADDR]",
		hidden:  true,
		flags: func(fs *pflag.FlagSet) func(context.Context, *Env, []string) error {
			mem := fs.String("mem", "64M", "memory to fill")
			dirty := fs.Int("dirty", 1000, "pages rewritten per second")
			writers := fs.Int("writers", 2, "writer goroutines")
			hb := fs.Duration("heartbeat", 10*time.Millisecond, "heartbeat interval")
			random := fs.Bool("random", false, "incompressible data")
			pause := fs.Duration("pause", 0, "length of a self-pause (no writes, no heartbeats, no network sends): on SIGUSR2, and once at --pause-after")
			pauseAfter := fs.Duration("pause-after", 0, "pause once this long after READY (0: only on SIGUSR2)")
			listen := fs.String("listen", "", "serve the workload's TCP protocol on this address (host:port)")
			udp := fs.String("udp", "", "answer the workload's UDP datagrams on this address (host:port)")
			return func(ctx context.Context, env *Env, args []string) error {
				size, err := workload.ParseSize(*mem)
				if err != nil {
					return usageError("%v", err)
				}
				if st := workload.Run(workload.Config{MemBytes: size, DirtyPagesPerSec: *dirty, Writers: *writers,
					Heartbeat: *hb, Random: *random, Pause: *pause, PauseAfter: *pauseAfter, Listen: *listen, UDP: *udp}, env.Stdout); st != 0 {
					return exitError(st)
				}
				return nil
			}
		},
	})
}
