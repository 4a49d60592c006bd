// Package pagereader copies pages out of another process that keeps
// running while they are read: in batches with process_vm_readv (many
// ranges per call), through /proc/PID/mem for memory the process cannot
// read itself (PROT_NONE, execute-only), and page by page when a batch
// meets a range that was unmapped or protected in the meantime. Pages that
// are gone are left out; the caller treats them as gone.
package pagereader
