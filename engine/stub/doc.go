// Package stub builds and starts the restore stub: a minimal static x86_64
// ELF program, generated in memory, that does nothing but call pause(2) in a
// loop. The restorer seizes it, makes it fork a process with the dumped PID,
// and rebuilds that process by injecting system calls into it. The stub has
// no libc, no TLS, no rseq and only three mappings besides the vDSO, so
// almost nothing of it has to be undone.
package stub
