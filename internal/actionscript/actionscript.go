package actionscript

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Action is a point of a migration at which scripts run.
type Action string

// The points, in the order a migration meets them. The source meets
// network-lock (its process is frozen and its connections held), post-dump
// (its state is collected, about to go to the target), post-resume (the process runs on the
// target), network-unlock (the source lock is gone), or rollback instead of
// the last two. The target meets network-lock (the restored connections
// are held), pre-resume, post-resume and network-unlock, or rollback.
const (
	NetworkLock   Action = "network-lock"
	PostDump      Action = "post-dump"
	PreResume     Action = "pre-resume"
	PostResume    Action = "post-resume"
	NetworkUnlock Action = "network-unlock"
	Rollback      Action = "rollback"
)

// DefaultTimeout is how long a script may run when Runner.Timeout is 0.
const DefaultTimeout = time.Minute

// maxOutput bounds the output of one run kept for the log.
const maxOutput = 64 << 10

// Runner runs a list of scripts. The zero Runner runs nothing.
type Runner struct {
	scripts []string
	// Timeout bounds each run (DefaultTimeout when 0); a script still
	// running then is killed, with its process group.
	Timeout time.Duration
	// Env is added to the environment of every run (KEY=VALUE).
	Env    []string
	Logger *slog.Logger
}

// New checks that every script exists and is an executable file, and
// returns a Runner for them (paths made absolute: the daemon's working
// directory is not the operator's).
func New(scripts []string) (*Runner, error) {
	r := &Runner{}
	for _, s := range scripts {
		abs, err := filepath.Abs(s)
		if err != nil {
			return nil, fmt.Errorf("action script %s: %w", s, err)
		}
		st, err := os.Stat(abs)
		if err != nil {
			return nil, fmt.Errorf("action script: %w", err)
		}
		if !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
			return nil, fmt.Errorf("action script %s: not an executable file", abs)
		}
		r.scripts = append(r.scripts, abs)
	}
	return r, nil
}

// Scripts returns the scripts, in the order they run.
func (r *Runner) Scripts() []string {
	if r == nil {
		return nil
	}
	return r.scripts
}

// With returns a copy of r whose runs also get env.
func (r *Runner) With(env ...string) *Runner {
	if r == nil {
		return nil
	}
	c := *r
	c.Env = append(append([]string(nil), r.Env...), env...)
	return &c
}

// Run runs every script for action a, in order, with env added to the
// environment; it stops at the first that fails and returns an error that
// names it, its exit status and the end of its output. A nil Runner runs
// nothing.
func (r *Runner) Run(ctx context.Context, a Action, env ...string) error {
	if r == nil {
		return nil
	}
	log := r.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	timeout := r.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	for _, s := range r.scripts {
		if err := r.runOne(ctx, log, s, a, timeout, env); err != nil {
			return err
		}
	}
	return nil
}

func (r *Runner) runOne(ctx context.Context, log *slog.Logger, script string, a Action, timeout time.Duration, env []string) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, script)
	cmd.Env = append(os.Environ(), "PHAUL_ACTION="+string(a), "CRTOOLS_SCRIPT_ACTION="+string(a))
	cmd.Env = append(append(cmd.Env, r.Env...), env...)
	var out limitedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = procAttr()
	cmd.Cancel = func() error { return killGroup(cmd) }
	cmd.WaitDelay = time.Second
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	for _, line := range strings.Split(strings.TrimRight(out.String(), "\n"), "\n") {
		if line != "" {
			log.Info("action script", "action", a, "script", script, "out", line)
		}
	}
	if err != nil {
		why := err.Error()
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			why = fmt.Sprintf("still running after %v, killed", timeout)
		}
		if tail := lastLine(out.String()); tail != "" {
			why += ": " + tail
		}
		return fmt.Errorf("action script %s (%s): %s", script, a, why)
	}
	log.Debug("action script done", "action", a, "script", script, "took", took)
	return nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return s
}

// limitedBuffer keeps the first maxOutput bytes written to it.
type limitedBuffer struct{ bytes.Buffer }

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := maxOutput - b.Len(); room > 0 {
		b.Buffer.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}
