package cli

import (
	"context"
	"fmt"

	"github.com/spf13/pflag"

	"github.com/phaul/phaul/engine"
)

func init() {
	register(&command{
		name:    "dump",
		summary: "checkpoint a running process and its descendants into an image directory",
		usage:   "-t PID -D DIR [--prev DIR [--track NAME]] [--leave-running] [--shell-job] [--tcp-established] [--ext-unix-sk[=INODE,...]] [--json]",
		flags: func(fs *pflag.FlagSet) func(context.Context, *Env, []string) error {
			pid := fs.IntP("tree", "t", 0, "PID of the root of the process tree to dump: the process, its children, grandchildren and zombies (required)")
			dir := fs.StringP("images-dir", "D", "", "directory to write the images to (required; created if missing)")
			leave := fs.BoolP("leave-running", "R", false, "resume the process (the whole tree) after the dump instead of killing it")
			shell := fs.Bool("shell-job", false, "allow descriptors on a terminal; restore re-binds them to the restorer's stdio")
			tcpEst := fs.Bool("tcp-established", false, "checkpoint established TCP connections (they are locked and closed silently; restore them where their address is)")
			extUnix := fs.String("ext-unix-sk", "", "allow unix sockets whose peer is outside the image (all, or those with these socket inodes, theirs or their peer's); restore connects them to the peer's name again")
			fs.Lookup("ext-unix-sk").NoOptDefVal = "all"
			prev := fs.String("prev", "", "the last pre-dump (phaul pre-dump): save only the pages changed since")
			track := fs.String("track", "", "the tracking backend the --prev chain must have used")
			asJSON := fs.Bool("json", false, "print the result as JSON")
			verbose := fs.CountP("verbose", "v", "log progress to stderr (-vv for debug)")
			return func(ctx context.Context, env *Env, args []string) error {
				if len(args) > 0 {
					return usageError("unexpected argument %q", args[0])
				}
				if *pid == 0 {
					return usageError("-t PID is required")
				}
				if *dir == "" {
					return usageError("-D DIR is required")
				}
				var ext engine.ExtUnixSk
				if fs.Changed("ext-unix-sk") {
					var err error
					if ext, err = engine.ParseExtUnixSk(*extUnix); err != nil {
						return usageError("%v", err)
					}
				}
				res, err := engine.Dump(ctx, engine.DumpOptions{
					Pid: *pid, Dir: *dir, LeaveRunning: *leave, ShellJob: *shell, TCPEstablished: *tcpEst, ExtUnixSk: ext,
					Parent: *prev, Track: *track, Logger: newLogger(env, *verbose),
				})
				if err != nil {
					return err
				}
				if *asJSON {
					return printJSON(env.Stdout, res)
				}
				fate := "killed"
				if !res.Killed {
					fate = "left running"
				}
				inParent := ""
				if *prev != "" {
					inParent = fmt.Sprintf(", %d unchanged since %s", res.PagesInParent, *prev)
				}
				fmt.Fprintf(env.Stdout, "dumped %d (%s) to %s: %d pages written (%s), %d zero pages elided%s, frozen %.1f ms, total %.1f ms; process %s\n",
					res.Pid, treeSize(res.Processes, res.Threads), *dir, res.PagesWritten, humanBytes(res.BytesWritten), res.PagesZero, inParent,
					res.FrozenMS, res.DurationMS, fate)
				if n := res.ConnectionsLeftOut; n > 0 {
					fmt.Fprintf(env.Stdout, "note: %d connection(s) not accepted yet from clients outside the image were left out; their clients see them fail\n", n)
				}
				return nil
			}
		},
	})
}

// treeSize describes how many processes and threads a dump or restore
// took: "3 threads", or "4 processes, 5 threads" for a tree.
func treeSize(processes, threads int) string {
	if processes <= 1 {
		return fmt.Sprintf("%d threads", threads)
	}
	return fmt.Sprintf("%d processes, %d threads", processes, threads)
}
