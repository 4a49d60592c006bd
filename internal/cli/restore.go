package cli

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/spf13/pflag"

	"github.com/phaul/phaul/engine"
	"github.com/phaul/phaul/internal/sys"
)

func init() {
	register(&command{
		name:    "restore",
		summary: "recreate a process from an image directory, with its PID and TIDs",
		usage:   "-D DIR [-d] [--pidfile FILE] [--shell-job] [--json]",
		flags: func(fs *pflag.FlagSet) func(context.Context, *Env, []string) error {
			dir := fs.StringP("images-dir", "D", "", "directory holding the images (required)")
			detach := fs.BoolP("restore-detached", "d", false, "return once the process runs instead of waiting for it to exit")
			pidfile := fs.String("pidfile", "", "write the restored process's PID to FILE")
			shell := fs.Bool("shell-job", false, "re-bind the process's terminal descriptors to this command's stdio (the image must be dumped with --shell-job)")
			asJSON := fs.Bool("json", false, "print the result as JSON")
			verbose := fs.CountP("verbose", "v", "log progress to stderr (-vv for debug)")
			return func(ctx context.Context, env *Env, args []string) error {
				if len(args) > 0 {
					return usageError("unexpected argument %q", args[0])
				}
				if *dir == "" {
					return usageError("-D DIR is required")
				}
				var stdio [3]*os.File
				if *shell {
					stdio = [3]*os.File{os.Stdin, os.Stdout, os.Stderr}
				}
				// Signals meant for the restored process should not kill
				// phaul while it waits for it: forward them instead.
				sigs := make(chan os.Signal, 4)
				if !*detach {
					signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT)
					defer signal.Stop(sigs)
				}
				res, err := engine.Restore(ctx, engine.RestoreOptions{
					Dir: *dir, Stdio: stdio, ShellJob: *shell, Logger: newLogger(env, *verbose),
				})
				if err != nil {
					return err
				}
				if *pidfile != "" {
					if err := os.WriteFile(*pidfile, []byte(strconv.Itoa(res.Pid)+"\n"), 0o644); err != nil {
						return fmt.Errorf("process %d restored, but: %w", res.Pid, err)
					}
				}
				if *asJSON {
					if err := printJSON(env.Stdout, res); err != nil {
						return err
					}
				} else if *detach || *verbose > 0 {
					fmt.Fprintf(env.Stderr, "restored %d (%s, %d pages) in %.1f ms\n",
						res.Pid, treeSize(res.Processes, res.Threads), res.PagesRestored, res.DurationMS)
				}
				if *detach {
					return nil
				}
				go func() {
					for s := range sigs {
						_ = sys.Kill(res.Pid, s.(syscall.Signal))
					}
				}()
				_, ws, err := sys.Wait4(res.Pid, 0)
				if err != nil {
					return fmt.Errorf("wait for restored process %d: %w", res.Pid, err)
				}
				switch {
				case ws.Exited():
					if ws.ExitStatus() != 0 {
						return exitError(ws.ExitStatus())
					}
					return nil
				case ws.Signaled():
					fmt.Fprintf(env.Stderr, "phaul restore: process %d killed by signal %d\n", res.Pid, ws.Signal())
					return exitError(128 + int(ws.Signal()))
				}
				return nil
			}
		},
	})
}
