// Package fault is a test-only facility: named fault points at the steps of
// a live migration, armed from the environment, so that end-to-end tests
// can make a step fail in a chosen way and check that the migration commits
// or rolls back cleanly (exactly one copy of the process runs, with its
// memory intact).
//
// Nothing here is for production use. When PHAUL_FAULT is unset (always,
// outside tests) every point is one load of a nil map and a return: no
// behaviour changes, nothing is allocated, no interceptor is installed.
//
// # Arming
//
// PHAUL_FAULT holds one or more rules separated by commas:
//
//	PHAUL_FAULT='POINT[@N]=ACTION[:ARG][,...]'
//
// A rule fires at every hit of POINT, or with @N only at its Nth hit
// (counted from 1 in this process), so that a daemon armed for one
// migration serves the next one normally. Actions:
//
//	exit         the process dies at once (SIGKILL to itself): no cleanup,
//	             no goodbye to the peer, as if the host had crashed
//	error[:ERR]  the step fails; ERR is enomem, enospc or eio for an error
//	             wrapping that errno (default: a plain injected error)
//	cut          every connection of this process is reset (TCP RST), as
//	             if the network had failed; the step then goes on
//	sleep:DUR    the step waits DUR (a time.ParseDuration string) first
//	hang         the step waits until its request is cancelled (forever
//	             where there is no request): a peer that never answers,
//	             but notices the caller's deadline (gRPC sends it along)
//	stall        the step never ends, whatever its request's deadline: a
//	             peer stuck for good (in the kernel, say) that still
//	             keeps its connection
//	corrupt      (data points only) one byte of the data is flipped after
//	             it was checksummed
//
// A rule that fires writes "phaul: fault injected: POINT=ACTION" to
// standard error first, so that a test can tell the fault happened (and
// when). A malformed PHAUL_FAULT, or one naming an unknown point, stops
// the process at start with status 2.
//
// # Points
//
// The steps of the migration protocol are points of the gRPC interceptors
// that transport installs when PHAUL_FAULT is set, named after the Control
// method (Hello, StartMigration, BeginRound, RoundDone, Freeze, Restore,
// Commit, Confirm, Abort):
//
//	source.METHOD           phaul migrate, before the request is sent
//	source.METHOD.answered  phaul migrate, after the answer (or error) came
//	target.METHOD           phaul serve, the request arrived, before it is handled
//	target.METHOD.handled   phaul serve, handled, before the answer is sent
//
// So source.BeginRound@2 is the start of round 1, source.RoundDone@1 comes
// after round 0's pages were all sent and acknowledged, target.Restore is
// before the shadow takes its final state, target.Commit is before the
// shadow is resumed and target.Commit.handled after (an answer lost there
// leaves the outcome unknown to the source), source.Commit.answered is
// before the source kills the original. Besides those:
//
//	source.batch            a page batch, after its checksum (data point)
//	target.batch            a page batch received, before it is applied
//
// Points lists them all.
package fault
