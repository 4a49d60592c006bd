// Package testutil holds the helpers phaul's tests share: building test
// programs (C fixtures with gcc, Go fixtures and the phaul binary with the
// go command), running workloads that follow the fixture protocol, and the
// process bookkeeping that end-to-end tests need (reaping orphans adopted as
// a child subreaper, waiting for a PID to be free, pseudo-terminals).
//
// # Fixture protocol
//
// A workload writes its stdout and stderr to a log file chosen by the test
// (or to a pseudo-terminal). After setup it may announce
// "REGION <name> 0x<addr> <len>" (memory it verifies) and other lines, then
// prints "READY <pid>". On SIGUSR1 it runs a full self-check and prints one
// line, "CHECK <seq> OK <key=value...>" or "CHECK <seq> FAIL <reason>". A
// workload that cannot run on this host prints "SKIP <reason>"; one whose
// setup failed prints "SETUP FAIL <reason>". e2e/testdata/fixture.h is the
// C side of the protocol.
//
// # Kernel features
//
// SkipIfNotSupported turns a probe of package feature into a skip (feature
// missing on this kernel) or a failure (the probe itself failed).
//
// # Cleanup
//
// Every process a helper starts, and every temporary directory, is cleaned
// up through t.Cleanup, also when the test fails.
package testutil
