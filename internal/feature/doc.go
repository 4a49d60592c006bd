// Package feature owns phaul's kernel-feature probes: one cached probe per
// mechanism the engine, the tracker and the network code rely on (ptrace
// SEIZE, process_vm_*, clone3 set_tid, PR_SET_MM_MAP, rseq, the vdso layout,
// pidfd_getfd, soft-dirty, userfaultfd write-protect, PAGEMAP_SCAN,
// TCP_REPAIR, memfd) plus a few host facts (pid_max, the userfaultfd sysctl).
//
// Every probe exercises the mechanism for real — on a child process it
// starts and reaps, or on memory and sockets of its own — and never infers
// support from the kernel version. A probe runs at most once per process;
// later calls return the cached answer. A missing feature is reported by an
// error matching both ErrNotSupported and, where a system call refused, the
// errno (errors.Is works for either), with a message saying what is missing
// and what follows for phaul.
//
// `phaul check` prints these results; tests gate on them with
// testutil.SkipIfNotSupported.
package feature
