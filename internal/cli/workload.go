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
		usage:   "[--mem SIZE] [--dirty PAGES/S] [--writers N] [--heartbeat D] [--random]",
		hidden:  true,
		flags: func(fs *pflag.FlagSet) func(context.Context, *Env, []string) error {
			mem := fs.String("mem", "64M", "memory to fill")
			dirty := fs.Int("dirty", 1000, "pages rewritten per second")
			writers := fs.Int("writers", 2, "writer goroutines")
			hb := fs.Duration("heartbeat", 10*time.Millisecond, "heartbeat interval")
			random := fs.Bool("random", false, "incompressible data")
			return func(ctx context.Context, env *Env, args []string) error {
				size, err := workload.ParseSize(*mem)
				if err != nil {
					return usageError("%v", err)
				}
				if st := workload.Run(workload.Config{MemBytes: size, DirtyPagesPerSec: *dirty, Writers: *writers,
					Heartbeat: *hb, Random: *random}, env.Stdout); st != 0 {
					return exitError(st)
				}
				return nil
			}
		},
	})
}
