package actionscript

import (
	"os/exec"
	"syscall"

	"github.com/phaul/phaul/internal/sys"
)

// procAttr puts a script in a process group of its own, so that a timeout
// kills what it started too.
func procAttr() *syscall.SysProcAttr { return &syscall.SysProcAttr{Setpgid: true} }

// killGroup kills the script's process group.
func killGroup(cmd *exec.Cmd) error {
	if cmd.Process == nil {
		return nil
	}
	return sys.Kill(-cmd.Process.Pid, sys.SIGKILL)
}
