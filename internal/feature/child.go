package feature

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"time"

	"github.com/phaul/phaul/internal/sys"
)

// childProgram is the harmless process probes act on: it echoes its stdin,
// so a line coming back proves it finished starting up (the dynamic loader
// and libc set-up, rseq registration included) and is blocked in read(0).
const childProgram = "/bin/cat"

// childTimeout bounds the start-up handshake.
const childTimeout = 5 * time.Second

// child is a process a probe started and must stop.
type child struct {
	cmd   *exec.Cmd
	stdin *os.File // our end of the child's stdin (its fd 0)
	pid   int
}

// startChild starts childProgram and waits until it has echoed a line.
func startChild() (*child, error) {
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("start probe child: %w", err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, fmt.Errorf("start probe child: %w", err)
	}
	cmd := exec.Command(childProgram)
	cmd.Stdin, cmd.Stdout = inR, outW
	// Dies with the thread that started it, should we die first.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: sys.SIGKILL}
	err = cmd.Start()
	inR.Close()
	outW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		return nil, fmt.Errorf("start probe child %s: %w", childProgram, err)
	}
	c := &child{cmd: cmd, stdin: inW, pid: cmd.Process.Pid}
	defer outR.Close()
	if _, err := inW.WriteString("ready\n"); err != nil {
		c.stop()
		return nil, fmt.Errorf("probe child handshake: %w", err)
	}
	if err := outR.SetReadDeadline(time.Now().Add(childTimeout)); err != nil {
		c.stop()
		return nil, fmt.Errorf("probe child handshake: %w", err)
	}
	line, err := bufio.NewReader(outR).ReadString('\n')
	if err != nil || line != "ready\n" {
		c.stop()
		return nil, fmt.Errorf("probe child handshake: got %q: %v", line, err)
	}
	return c, nil
}

// stop kills and reaps the child.
func (c *child) stop() {
	_ = c.cmd.Process.Kill()
	_ = c.cmd.Wait() // "signal: killed" is the expected outcome
	c.stdin.Close()
}

// onLockedThread runs fn on a goroutine locked to its OS thread, as every
// ptrace request for one tracee must come from the same thread.
func onLockedThread(fn func() (string, error)) (string, error) {
	type result struct {
		detail string
		err    error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		d, err := fn()
		ch <- result{d, err}
	}()
	r := <-ch
	return r.detail, r.err
}

// withStoppedChild starts a child, seizes and interrupts it, and runs fn
// while it is stopped — all on one locked OS thread. The child is detached,
// killed and reaped before withStoppedChild returns. A refused SEIZE or
// INTERRUPT is reported as absent ptrace.
func withStoppedChild(fn func(pid int) (string, error)) (string, error) {
	return onLockedThread(func() (string, error) {
		c, err := startChild()
		if err != nil {
			return "", err
		}
		defer c.stop()
		if err := seizeAndStop(c.pid); err != nil {
			return "", err
		}
		defer func() { _ = sys.PtraceDetach(c.pid, 0) }() // the child is killed next
		return fn(c.pid)
	})
}

// seizeAndStop attaches to pid with PTRACE_SEIZE, interrupts it and waits
// for the PTRACE_EVENT_STOP.
func seizeAndStop(pid int) error {
	if err := sys.PtraceSeize(pid, 0); err != nil {
		return absent(ptraceDenied(err), err)
	}
	if err := sys.PtraceInterrupt(pid); err != nil {
		return absent("PTRACE_INTERRUPT refused", err)
	}
	for {
		_, ws, err := sys.Wait4(pid, sys.WALL)
		if err != nil {
			return fmt.Errorf("wait for probe child %d: %w", pid, err)
		}
		switch {
		case ws.Exited() || ws.Signaled():
			return fmt.Errorf("probe child %d ended while being seized (status %#x)", pid, uint32(ws))
		case ws.Stopped() && int(ws)>>16 == sys.PTRACE_EVENT_STOP:
			return nil
		case ws.Stopped():
			// A signal got there first: deliver it and wait for the interrupt.
			if err := sys.PtraceCont(pid, int(ws.StopSignal())); err != nil {
				return fmt.Errorf("resume probe child %d: %w", pid, err)
			}
		}
	}
}

// ptraceDenied explains a refused PTRACE_SEIZE.
func ptraceDenied(err error) string {
	if !errors.Is(err, sys.EPERM) {
		return "PTRACE_SEIZE refused"
	}
	reason := "PTRACE_SEIZE of an own child refused (seccomp, LSM, or missing CAP_SYS_PTRACE"
	if b, rerr := os.ReadFile("/proc/sys/kernel/yama/ptrace_scope"); rerr == nil {
		reason += "; kernel.yama.ptrace_scope=" + string(trimNL(b))
	}
	return reason + ")"
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}
