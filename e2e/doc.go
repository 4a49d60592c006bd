// Package e2e holds phaul's end-to-end tests (in the spirit of CRIU's ZDTM):
// real programs are started, checked, dumped with `phaul dump`, restored
// with `phaul restore` under their original PID, and checked again. Every
// workload verifies itself: on SIGUSR1 it compares all of its state with
// what it recorded and prints "CHECK <seq> OK" or "CHECK <seq> FAIL
// <reason>" (see testdata/fixture.h and package internal/testutil).
//
// TestMain builds the phaul binary and the fixtures (C programs with gcc, a
// Go program with the go command; the Python workload needs python3) into a
// temporary directory, and makes the test process a child subreaper so that
// restored processes, orphaned when `phaul restore -d` exits, are
// re-parented to it and reaped by the tests.
//
// The live-migration tests run two host-like network namespaces (package
// internal/topology), the target's phaul serve in a PID namespace of its
// own. TestMigrateFault is the fault-injection matrix of migration, one
// subtest per STEP/FAULT (round1/kill-target, commit/lost-answer, ...):
// fault points armed through PHAUL_FAULT (package internal/fault) break
// the migration at that step, then exactly one copy of the process must
// run, with its memory intact, and the target must take the next
// migration. TestMigrateTLS covers mutual TLS and the refusals.
//
// The tests need root (ptrace of any process, chosen PIDs with clone3).
//
//	go test ./e2e                              # everything
//	go test ./e2e -run TestHarness             # the fixtures and harness only (no phaul needed)
//	go test ./e2e -run TestDumpRestoreMemory -v
//	go test ./e2e -run 'TestMigrateFault/commit/' -v   # one step of the fault matrix
//	go test ./e2e -run '^$' -bench Dump -benchtime 3x
//
// The package holds test files only, besides this one.
package e2e
