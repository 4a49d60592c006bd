// Package ptrace owns every ptrace interaction phaul has with a tracee:
// the Tracer that runs all requests on one OS thread, seizing and freezing a
// thread group, waiting for stops, and running system calls inside a
// stopped thread (injection) through a `syscall` instruction found in the
// tracee's vDSO.
//
// The kernel ties a tracee to the thread that attached it, so every
// function in this package that issues a ptrace request or waits for a
// tracee must run on the Tracer's thread: call it from inside Tracer.Do.
// Functions say so in a "Precondition:" line.
package ptrace
