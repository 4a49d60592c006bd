package engine

import (
	"errors"
	"fmt"
	"os"

	"github.com/phaul/phaul/netlock"
	"github.com/phaul/phaul/netsock"
	"github.com/phaul/phaul/protocol/imagepb"

	"github.com/phaul/phaul/internal/sys"
)

// Restore of IPv4 and IPv6 sockets: netsock.Restore builds the socket in
// phaul's own process, in the network namespace of the new process, and
// the new process takes it with injected pidfd_open(phaul) and
// pidfd_getfd. phaul keeps its copy until the restore is over: if the
// restore fails, a restored connection is silenced (repair mode) before the
// copy closes, so the peer gets neither FIN nor RST.

// openInetSocket restores the socket of f and returns a new close-on-exec
// descriptor of it in the process, with f's file flags.
//
// Precondition: called on the Tracer thread.
func (r *restorer) openInetSocket(f *imagepb.File) (uint64, error) {
	in := r.main
	st, err := netsock.FromProto(f.GetInetSocket())
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrBadImage, err)
	}
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", r.pid))
	if err != nil {
		return 0, fmt.Errorf("network namespace of %d: %w", r.pid, err)
	}
	defer ns.Close()
	sk, err := netsock.Restore(st, netsock.RestoreOptions{NetNS: ns})
	if err != nil {
		return 0, err
	}
	r.sockets = append(r.sockets, sk)
	if st.Repair != nil {
		r.netLocked = true
	}
	ourFD, err := fileFD(sk)
	if err != nil {
		return 0, err
	}
	pidfd, err := in.Syscall(sys.SYS_PIDFD_OPEN, uint64(os.Getpid()), 0)
	if err != nil {
		return 0, fmt.Errorf("pidfd_open(phaul): %w", err)
	}
	fd, err := in.Syscall(sys.SYS_PIDFD_GETFD, pidfd, uint64(ourFD), 0)
	if _, cerr := in.Syscall(sys.SYS_CLOSE, pidfd); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return 0, fmt.Errorf("pidfd_getfd(%v): %w", st, err)
	}
	// pidfd_getfd gives a close-on-exec descriptor; the file flags are the
	// open file description's, shared with phaul's copy, and set here in
	// the process (never through os.File.Fd, which clears O_NONBLOCK).
	return fd, r.setFlags(fd, f.Flags)
}

// fileFD returns f's descriptor number without changing its file flags.
func fileFD(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	n := -1
	if err := rc.Control(func(fd uintptr) { n = int(fd) }); err != nil {
		return 0, err
	}
	return n, nil
}

// closeSockets closes phaul's copies of the restored sockets. When the
// restore failed, connections are silenced first: the process's copies are
// gone (it was killed) or going, and the peer must not see them close.
func (r *restorer) closeSockets(failed bool) {
	for _, sk := range r.sockets {
		if failed {
			if err := netsock.Silence(sk); err != nil {
				r.log.Warn("silence a restored connection", "err", err)
			}
		}
		_ = sk.Close()
	}
	r.sockets = nil
}

// unlockNet removes the network lock a dump with established connections
// left in the process's network namespace (dumpLockID), once the process
// runs with its connections restored.
func (r *restorer) unlockNet() error {
	if !r.netLocked {
		return nil
	}
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", r.pid))
	if err != nil {
		return fmt.Errorf("network namespace of %d: %w", r.pid, err)
	}
	defer ns.Close()
	if err := netlock.Unlock(ns, dumpLockID(r.pid)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove the network lock of the dump: %w", err)
	}
	return nil
}
