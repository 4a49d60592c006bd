package engine

import (
	"errors"
	"fmt"

	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/netsock"
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
	// ErrPendingConnections is matched (with ErrUnsupported) by the
	// refusal of a listener, TCP or unix, with a connection it has not
	// accepted yet: a state that passes once the process accepts it, so
	// Dump tries again a few times before it gives up.
	ErrPendingConnections = netsock.ErrPendingConnections
	// ErrBusy is matched (with ErrUnsupported) by the refusal of another
	// state a serving process leaves by itself within moments: a unix
	// connection it accepted from a client outside the image. Dump tries
	// again, as for ErrPendingConnections.
	ErrBusy = errors.New("busy with a client outside the image")
)

// pending builds the refusal of a connection not yet accepted.
func pending(format string, args ...any) error {
	return fmt.Errorf("%w: %w", unsupported(format, args...), ErrPendingConnections)
}

// unsupported builds an ErrUnsupported error naming the resource.
func unsupported(format string, args ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), ErrUnsupported)
}
