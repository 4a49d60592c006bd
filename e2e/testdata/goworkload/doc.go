// Command goworkload is the Go test workload of phaul's end-to-end tests. It
// runs many sleeping goroutines (each checking a pattern on its own stack),
// GC-heavy allocators, a mutator that re-verifies and rewrites the chunks of
// a large checksummed []byte, and a time.Ticker; with -netpoll, two
// goroutines also ping-pong a counter through two os.Pipe pairs, which
// brings up the runtime's netpoller (epoll, an eventfd and the pipes).
//
// It speaks the fixture protocol of e2e/testdata/fixture.h: "REGION buf",
// "READY <pid>", one "CHECK <seq> OK|FAIL ..." line per SIGUSR1 (received
// with signal.Notify), and "EXIT <status>" then exit on SIGTERM.
//
// It uses the standard library only; the tests build it with `go build`.
package main
