package cli

import (
	"context"
	"fmt"

	"github.com/spf13/pflag"

	"github.com/phaul/phaul/engine"
	"github.com/phaul/phaul/tracker"
)

func init() {
	register(&command{
		name:    "pre-dump",
		summary: "copy a running process's memory, then only what changed (iterative migration)",
		usage:   "-t PID -D DIR [--prev DIR] [--track auto|softdirty|uffdwp|hash] [--stop-tracking] [--json]",
		flags: func(fs *pflag.FlagSet) func(context.Context, *Env, []string) error {
			pid := fs.IntP("tree", "t", 0, "PID of the process to pre-dump (required)")
			dir := fs.StringP("images-dir", "D", "", "directory to write the pre-dump to (required, unless --stop-tracking with --prev)")
			prev := fs.String("prev", "", "the previous pre-dump of the chain: copy only what changed since")
			track := fs.String("track", tracker.Auto, "dirty-page tracking: auto, softdirty, uffdwp or hash")
			stop := fs.Bool("stop-tracking", false, "remove tracking from the process afterwards (with --prev and no -D: only that)")
			asJSON := fs.Bool("json", false, "print the result as JSON")
			verbose := fs.CountP("verbose", "v", "log progress to stderr (-vv for debug)")
			return func(ctx context.Context, env *Env, args []string) error {
				if len(args) > 0 {
					return usageError("unexpected argument %q", args[0])
				}
				if *pid == 0 {
					return usageError("-t PID is required")
				}
				if *dir == "" && !(*stop && *prev != "") {
					return usageError("-D DIR is required (or --stop-tracking --prev DIR to only end tracking)")
				}
				if *track != tracker.Auto {
					if err := tracker.Supported(*track); err != nil {
						return usageError("--track %s: %v", *track, err)
					}
				}
				res, err := engine.PreDump(ctx, engine.PreDumpOptions{
					Pid: *pid, Dir: *dir, Parent: *prev, Track: *track, StopTracking: *stop,
					Logger: newLogger(env, *verbose),
				})
				if err != nil {
					return err
				}
				if *asJSON {
					return printJSON(env.Stdout, res)
				}
				if *dir == "" {
					fmt.Fprintf(env.Stdout, "tracking (%s) removed from %d\n", res.Tracker, res.Pid)
					return nil
				}
				from := "first of a chain"
				if res.Parent != "" {
					from = "since " + res.Parent
				}
				if res.Reset != "" {
					from += " (copied in full: " + res.Reset + ")"
				}
				fmt.Fprintf(env.Stdout, "pre-dumped %d to %s, round %d (%s), %s: %d pages written (%s), %d zero, %d unchanged, %d of %d present pages dirty, frozen %.1f ms, total %.1f ms\n",
					res.Pid, *dir, res.Round, res.Tracker, from, res.PagesWritten, humanBytes(res.BytesWritten),
					res.PagesZero, res.PagesInParent, res.PagesDirty, res.PagesPresent, res.FrozenMS, res.DurationMS)
				if res.TrackingStopped {
					fmt.Fprintf(env.Stdout, "tracking removed from %d\n", res.Pid)
				}
				return nil
			}
		},
	})
}
