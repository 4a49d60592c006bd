// Package engine checkpoints and restores Linux processes without CRIU.
//
// Dump freezes every thread of a process with ptrace (package ptrace),
// collects its state from /proc, from ptrace register sets and from system
// calls injected into its own threads, copies its memory with
// process_vm_readv, and writes an image directory (package image). Restore
// starts the restore stub (package stub), makes it fork a process with the
// dumped PID through clone3(set_tid), rebuilds the address space, threads,
// descriptors and the rest by injecting system calls into that process, and
// lets it run.
//
// Memory that mappings and descriptors share (shared anonymous memory,
// memfds, deleted tmpfs files, SysV segments) is saved once per object of
// the image, not per mapping or process, and made again once at restore
// for every process that shares it (shmem.go, restore_shmem.go).
//
// Anything the engine cannot reproduce faithfully is refused at dump time
// with an error that names it (ErrUnsupported); the process then keeps
// running untouched.
package engine
