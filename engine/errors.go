package engine

import (
	"errors"
	"fmt"

	"github.com/phaul/phaul/engine/ptrace"
)

var (
	// ErrUnsupported reports a resource of the process that phaul cannot
	// checkpoint yet; the message names it.
	ErrUnsupported = errors.New("not supported")
	// ErrNoProcess reports a PID with no process behind it.
	ErrNoProcess = errors.New("no such process")
	// ErrPidTaken reports that a PID needed by restore is in use.
	ErrPidTaken = errors.New("PID is in use")
	// ErrBadImage reports an image that cannot be restored as it is.
	ErrBadImage = errors.New("bad image")
	// ErrProcessGone is returned when the process exits during the dump.
	ErrProcessGone = ptrace.ErrProcessGone
)

// unsupported builds an ErrUnsupported error naming the resource.
func unsupported(format string, args ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), ErrUnsupported)
}
