// Package topology builds host-like network namespaces on one machine for
// tests, the demo and the bench: each host is a network namespace with an
// address on a shared segment (a bridge in a hub namespace), so processes
// on different "hosts" talk over a real network stack, and an address can
// move from one host to another. Commands run on a host with `ip netns
// exec`, optionally in a fresh PID namespace so that a migrated process can
// keep its PID there while the original still runs.
//
// Everything is removed by Close, also after a partial setup.
package topology
