package cli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/phaul/phaul/bench/workload"
	"github.com/phaul/phaul/engine"
	"github.com/phaul/phaul/internal/sys"
)

func init() {
	register(&command{
		name:    "demo",
		summary: "checkpoint and restore a built-in workload, and show that it carried on",
		usage:   "[--mem SIZE] [--dirty PAGES/S] [--keep DIR]",
		flags: func(fs *pflag.FlagSet) func(context.Context, *Env, []string) error {
			mem := fs.String("mem", "256M", "memory the workload fills")
			dirty := fs.Int("dirty", 1000, "pages the workload rewrites per second")
			keep := fs.String("keep", "", "keep the images in DIR instead of a temporary directory")
			return func(ctx context.Context, env *Env, args []string) error {
				if len(args) > 0 {
					return usageError("unexpected argument %q", args[0])
				}
				if _, err := workload.ParseSize(*mem); err != nil {
					return usageError("%v", err)
				}
				return runDemo(ctx, env, *mem, *dirty, *keep)
			}
		},
	})
}

func runDemo(ctx context.Context, env *Env, mem string, dirty int, keep string) error {
	if os.Geteuid() != 0 {
		return errors.New("the demo needs root (ptrace, clone3 with a chosen PID)")
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "phaul-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	dir := filepath.Join(work, "images")
	if keep != "" {
		dir = keep
	}
	logPath := filepath.Join(work, "workload.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logf.Close()
	say := func(format string, args ...any) { fmt.Fprintf(env.Stdout, "demo: "+format+"\n", args...) }

	// 1. The workload: phaul itself, running the built-in workload. It gets
	// no descriptor phaul inherited, only its stdio.
	if err := sys.CloseOnExecFrom(3); err != nil {
		return err
	}
	cmd := exec.Command(self, workloadCommand, "--mem", mem, "--dirty", fmt.Sprint(dirty), "--heartbeat", "10ms")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start workload: %w", err)
	}
	pid := cmd.Process.Pid
	restored := 0
	defer func() {
		// Whatever happened, leave nothing running.
		if restored != 0 {
			_ = sys.Kill(restored, sys.SIGKILL)
			_, _, _ = sys.Wait4(restored, 0)
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}()
	say("started the workload (PID %d, %s of memory, %d pages/s rewritten)", pid, mem, dirty)
	if _, err := waitLine(ctx, logPath, "READY", 30*time.Second); err != nil {
		return err
	}
	time.Sleep(500 * time.Millisecond)
	_ = sys.Kill(pid, sys.SIGUSR1)
	line, err := waitLine(ctx, logPath, "CHECK seq=1 ", 30*time.Second)
	if err != nil {
		return err
	}
	say("workload self-check before the dump: %s", line)

	// 2. Dump: freeze, write images, kill.
	res, err := engine.Dump(ctx, engine.DumpOptions{Pid: pid, Dir: dir})
	if err != nil {
		return err
	}
	_ = cmd.Wait() // reap the original so its PID is free again
	say("dumped %d threads, %s of pages (%d zero pages elided) to %s; frozen %.1f ms",
		res.Threads, humanBytes(res.BytesWritten), res.PagesZero, dir, res.FrozenMS)
	say("the original process is gone: %v", !alive(pid))

	// 3. Restore with the same PID.
	rr, err := engine.Restore(ctx, engine.RestoreOptions{Dir: dir})
	if err != nil {
		return err
	}
	restored = rr.Pid
	say("restored PID %d (%d threads, %d pages) in %.1f ms", rr.Pid, rr.Threads, rr.PagesRestored, rr.DurationMS)

	// 4. The workload proves it carried on: a full memory check, and its
	// heartbeats continue.
	time.Sleep(300 * time.Millisecond)
	_ = sys.Kill(restored, sys.SIGUSR1)
	line, err = waitLine(ctx, logPath, "CHECK seq=2 ", 30*time.Second)
	if err != nil {
		return err
	}
	if !strings.Contains(line, " OK ") {
		return fmt.Errorf("workload self-check after restore failed: %s", line)
	}
	say("workload self-check after the restore: %s", line)
	beat, _ := lastLine(logPath, "BEAT ")
	say("last heartbeat: %s (maxgap is the pause the workload itself saw)", beat)
	_ = sys.Kill(restored, sys.SIGTERM)
	_, ws, err := sys.Wait4(restored, 0)
	if err == nil && ws.Exited() && ws.ExitStatus() == 0 {
		say("the restored workload exited cleanly")
		restored = 0
	}
	say("done")
	return nil
}

func alive(pid int) bool { return sys.Kill(pid, 0) == nil }

// waitLine waits until the file at path has a line starting with prefix and
// returns the newest such line.
func waitLine(ctx context.Context, path, prefix string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		if l, ok := lastLine(path, prefix); ok {
			return l, nil
		}
		if time.Now().After(deadline) {
			tail, _ := os.ReadFile(path)
			return "", fmt.Errorf("no %q line from the workload within %v; its output:\n%s", prefix, timeout, tail)
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func lastLine(path, prefix string) (string, bool) {
	f, err := os.Open(path)
	if err != nil {
		return "", false
	}
	defer f.Close()
	var last string
	found := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), prefix) {
			last, found = sc.Text(), true
		}
	}
	return last, found
}
