// Package workload is phaul's built-in test workload: a process that holds
// a set amount of memory with a known pattern, rewrites pages at a set rate
// from a set number of goroutines, prints a heartbeat line at a fixed
// interval, and verifies its whole memory on request (SIGUSR1) or at every
// heartbeat. The phaul binary runs it as a hidden subcommand, so the demo
// and the bench need nothing but phaul.
//
// The heartbeat lines are the workload's own account of its downtime: each
// reports the largest gap it saw between two heartbeats.
package workload
