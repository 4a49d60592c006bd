// Package tracker finds the pages a running process wrote between two
// moments: what an iterative pre-dump copies again in each round.
//
// A Tracker is started on a process (Start) and asked, round after round,
// which pages were written since the previous round (Round). The answer
// (Delta) covers the mappings whose pages a dump saves, as they are at the
// round: private memory, anonymous or file-backed and whatever its
// protection (a mapping made writable later is tracked from the start),
// and shared anonymous memory. Mappings are diffed at every round: a
// mapping that appeared, grew, or moved since the previous round is
// tracked from then on and counts as written as a whole in the round that
// finds it; one that vanished or shrank is simply absent from the answer.
// Whatever cannot be tracked counts as written in every round (Area.Untracked).
// Pages written by the kernel on the process's behalf (read() into a
// buffer) count like any write. A page dropped with MADV_DONTNEED (or a
// reclaimed MADV_FREE page) is reported as written; if it is not present
// any more it is gone, and a dump must not record it, so that restore
// cannot bring back stale contents.
//
// # Backends
//
//   - softdirty: the kernel's soft-dirty bits (CONFIG_MEM_SOFT_DIRTY):
//     clear_refs=4 to clear, pagemap bit 55 to read. The process is stopped
//     for the read and the clear of each round (they are two steps). Absent
//     on kernels built without soft-dirty and on arm64: Start then fails
//     with ErrNotSupported.
//   - uffdwp: asynchronous userfaultfd write-protect (Linux 6.7+). A
//     userfaultfd is created inside the process by syscall injection
//     (UFFD_USER_MODE_ONLY when the process is not root), copied out with
//     pidfd_getfd, set up with UFFDIO_API(WP_ASYNC|WP_UNPOPULATED), and
//     every private mapping is registered (UFFDIO_REGISTER, mode WP) and
//     write-protected (UFFDIO_WRITEPROTECT). The kernel resolves the write
//     faults itself: the process sees nothing but their cost (about
//     1.2 µs for the first write to a page in a round, up to 15 µs in a
//     nested VM). Each round is one PAGEMAP_SCAN per mapping with
//     PM_SCAN_WP_MATCHING|PM_SCAN_CHECK_WPASYNC and category
//     PAGE_IS_WRITTEN, which reports the written pages and protects them
//     again, atomically page by page: the process runs throughout, only
//     the injection (at Start, and to close the descriptor at Stop) stops
//     it. Shared anonymous memory is not tracked by this backend (another
//     process can write it): it counts as written in every round.
//   - hash: a 64-bit digest per page, compared between rounds. It needs no
//     kernel support beyond process_vm_readv and never stops the process,
//     but reads all memory every round. The first round reports every
//     present page. A page written while it is being read is caught in the
//     next round because its digest then differs from that of the bytes
//     recorded; the final round runs with the process frozen, so the last
//     answer is exact (up to a digest collision, 2^-64 per changed page).
//
// Choose picks the backend ("auto": softdirty, then uffdwp, then hash);
// each can be named explicitly.
//
// The kernel tracks pages as it maps them: a write to a transparent huge
// page reports its 512 small pages. What the process can notice of uffdwp
// tracking besides the cost of write faults: the parked descriptor in its
// descriptor table (a process that closes every descriptor it does not
// know ends tracking, which the next round notices and answers with every
// page), and a child forked meanwhile inherits that descriptor (not the
// registrations).
//
// # Between separate runs
//
// Successive `phaul pre-dump` invocations are separate processes. Park
// writes what the next one needs (StateFile, in the pre-dump directory)
// and leaves tracking running: for uffdwp, the userfaultfd injected into
// the process stays open there (O_CLOEXEC, parked), keeping the
// registrations alive; its descriptor number and inode number are
// recorded. Resume takes over: it copies the parked descriptor again with
// pidfd_getfd and checks its inode number. The state is marked consumed as
// it is taken over, so that a directory cannot be continued twice (the
// second continuation would miss the writes the first one collected); a
// consumed state, or a parked descriptor that is gone (closed by the
// process, exec), makes the next round report every page. The hash
// backend stores its digests in the state.
//
// Stop removes every trace from the process: it unregisters the mappings
// (UFFDIO_UNREGISTER) and closes the parked descriptor inside the process
// by injection, so that a final dump finds neither a userfaultfd nor a
// registered mapping ("uw" in VmFlags). If the process exits, Round
// returns an error matching ErrProcessGone and Stop only releases what
// phaul holds. CloseProcessFD closes only the parked descriptor, for a
// process frozen at the end of a migration: its registrations stay until
// Stop, or until Close drops phaul's copy, the last reference (the kernel
// then unregisters them), so that the downtime pays one injected system
// call and no page-table walk.
//
// # Stopping the process
//
// Control abstracts how a backend gets the process stopped: FreezeControl
// seizes it with ptrace for the duration of one call (pre-dump rounds),
// StoppedControl serves a caller that has it frozen already (the final
// dump, which runs its last round and Stop inside its freeze).
package tracker
