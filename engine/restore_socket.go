package engine

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"github.com/phaul/phaul/netlock"
	"github.com/phaul/phaul/netsock"
	"github.com/phaul/phaul/protocol/imagepb"
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
	ourFD, err := fileFD(sk)
	if err != nil {
		return 0, err
	}
	fd, err := r.install(ourFD)
	if err != nil {
		return 0, fmt.Errorf("%v: %w", st, err)
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

// restoreLockID names the network lock a restore takes in the new
// process's network namespace while it rebuilds established connections:
// from before the first socket exists until the process runs (Restore,
// Shadow.Resume). Until then a peer's packets are dropped there, never
// answered with RST, and a restored connection sends nothing.
func restoreLockID(pid int) string { return "restore-" + strconv.Itoa(pid) }

// ImageEndpoints returns the endpoints of the IPv4 and IPv6 sockets of a
// file table, and whether one of them is an established connection.
func ImageEndpoints(files *imagepb.FileTable) (eps []netsock.Endpoint, established bool, err error) {
	for _, f := range files.GetFiles() {
		if f.GetKind() != imagepb.FileKind_FILE_INET_SOCKET {
			continue
		}
		st, err := netsock.FromProto(f.GetInetSocket())
		if err != nil {
			return nil, false, fmt.Errorf("%w: file %d: %w", ErrBadImage, f.GetId(), err)
		}
		eps = append(eps, st.Endpoint())
		established = established || st.Repair != nil
	}
	return eps, established, nil
}

// lockNet takes the restore's network lock when the image holds
// established connections (with every socket's port or connection in it).
func (r *restorer) lockNet() error {
	if !r.ownsNetLock {
		return nil
	}
	eps, established, err := ImageEndpoints(r.files)
	if err != nil || !established {
		return err
	}
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", r.pid))
	if err != nil {
		return fmt.Errorf("network namespace of %d: %w", r.pid, err)
	}
	defer ns.Close()
	l, err := netlock.New(ns, restoreLockID(r.pid), netsock.LockSet(eps))
	if err != nil {
		return fmt.Errorf("lock the connections of %d: %w", r.pid, err)
	}
	r.netLock = l
	return nil
}

// unlockNet removes the restore's network lock, and with dumpLock also
// the lock a dump of the same process left in this network namespace
// (dumpLockID: a dump and restore on one host).
func (r *restorer) unlockNet(dumpLock bool) error {
	if r.netLock == nil {
		return nil
	}
	var errs []error
	if err := r.netLock.Unlock(); err != nil {
		errs = append(errs, err)
	}
	r.netLock = nil
	if dumpLock {
		ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", r.pid))
		if err != nil {
			return errors.Join(append(errs, fmt.Errorf("network namespace of %d: %w", r.pid, err))...)
		}
		defer ns.Close()
		if err := netlock.Unlock(ns, dumpLockID(r.pid)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove the network lock of the dump: %w", err))
		}
	}
	return errors.Join(errs...)
}
