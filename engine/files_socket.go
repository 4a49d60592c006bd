package engine

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/netlock"
	"github.com/phaul/phaul/netsock"
	"github.com/phaul/phaul/protocol/imagepb"
)

// Dump of IPv4 and IPv6 sockets (TCP, MPTCP listeners, UDP) through package
// netsock. phaul reads each socket from a copy of the process's descriptor
// taken with pidfd_getfd and keeps that copy while the process is frozen:
// an established connection is left in TCP repair mode by netsock.Dump, so
// a rollback (Frozen.Resume) must give it back with netsock.Resume, and a
// kill closes it silently (in repair mode closing sends neither FIN nor
// RST). Other socket families are refused by describe, as before.

// dumpedSocket is phaul's copy of a socket of the frozen process.
type dumpedSocket struct {
	fd int // descriptor in the process
	f  *os.File
	st *netsock.State
}

// dumpLockID names the network lock a dump with established connections
// takes in the process's network namespace. It is kept when the process is
// killed, so that the peers' retransmissions are not answered with RST
// while the process is down; Restore of the same PID removes it.
func dumpLockID(pid int) string { return "dump-" + strconv.Itoa(pid) }

// isSocketLink reports whether a descriptor's /proc link is a socket.
func isSocketLink(link string) bool { return strings.HasPrefix(link, "socket:[") }

// inetSocket describes the socket behind descriptor fd of pid into f when it
// is an IPv4 or IPv6 one, and reports whether it was; other sockets are left
// to the caller (handled false, no error).
func (ft *fileTable) inetSocket(pid, fd int, link string, f *imagepb.File) (handled bool, err error) {
	st, err := os.Stat(fmt.Sprintf("/proc/%d/fd/%d", pid, fd))
	if err != nil {
		return false, fmt.Errorf("descriptor %d of %d: %w", fd, pid, err)
	}
	ino := st.Sys().(*syscall.Stat_t).Ino
	f.Inode, f.Dev = ino, st.Sys().(*syscall.Stat_t).Dev
	// One socket has one open file description: a second descriptor of it
	// is a dup, matched by dumpFDs, and must not be dumped (put in repair
	// mode) twice.
	if s, ok := ft.socketByInode[ino]; ok {
		f.Kind, f.InetSocket = imagepb.FileKind_FILE_INET_SOCKET, s.st.ToProto()
		return true, nil
	}
	sk, err := socketCopy(pid, fd)
	if err != nil {
		return false, fmt.Errorf("descriptor %d of %d (%s): %w", fd, pid, link, err)
	}
	domain, err := socketDomain(sk)
	if err != nil {
		_ = sk.Close()
		return false, fmt.Errorf("descriptor %d of %d (%s): %w", fd, pid, link, err)
	}
	if domain != sys.AF_INET && domain != sys.AF_INET6 {
		_ = sk.Close()
		return false, nil // refused by the caller, by name
	}
	if err := ft.lockNet(pid); err != nil {
		_ = sk.Close()
		return false, err
	}
	state, err := netsock.Dump(sk, netsock.Options{TCPEstablished: ft.tcpEstablished})
	if err != nil {
		_ = sk.Close()
		if errors.Is(err, netsock.ErrUnsupported) {
			return false, fmt.Errorf("descriptor %d: %w: %w", fd, err, ErrUnsupported)
		}
		return false, fmt.Errorf("descriptor %d of %d (%s): %w", fd, pid, link, err)
	}
	s := &dumpedSocket{fd: fd, f: sk, st: state}
	ft.sockets = append(ft.sockets, s)
	ft.socketByInode[ino] = s
	f.Kind, f.InetSocket = imagepb.FileKind_FILE_INET_SOCKET, state.ToProto()
	return true, nil
}

// socketDomain returns the address family of socket f, without touching
// its file flags.
func socketDomain(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var domain int
	var derr error
	if err := rc.Control(func(fd uintptr) {
		domain, derr = sys.GetsockoptInt(int(fd), sys.SOL_SOCKET, sys.SO_DOMAIN)
	}); err != nil {
		return 0, err
	}
	return domain, derr
}

// socketCopy takes a copy of descriptor fd of pid with pidfd_getfd.
func socketCopy(pid, fd int) (*os.File, error) {
	sfd, err := sys.CopyFD(pid, fd)
	if err != nil {
		return nil, err
	}
	// os.NewFile keeps the file flags (it never clears O_NONBLOCK), and
	// netsock uses the descriptor through SyscallConn only.
	return os.NewFile(uintptr(sfd), fmt.Sprintf("socket of %d fd %d", pid, fd)), nil
}

// lockNet takes, once per dump and only when established connections are
// allowed and the process has some, the network lock on every IPv4 and
// IPv6 socket of the process, in its network namespace: from before any
// connection enters repair mode until the process is resumed, or, when it
// is killed, until it is restored.
func (ft *fileTable) lockNet(pid int) error {
	if !ft.tcpEstablished || ft.lockDone {
		return nil
	}
	ft.lockDone = true
	pids := ft.pids
	if pids == nil {
		pids = []int{pid}
	}
	var eps []netsock.Endpoint
	for _, p := range pids {
		more, err := Endpoints(p)
		if err != nil {
			return err
		}
		eps = append(eps, more...)
	}
	established := false
	for _, ep := range eps {
		established = established || ep.TCPState == netsock.Established
	}
	if !established {
		return nil
	}
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
	if err != nil {
		return fmt.Errorf("network namespace of %d: %w", pid, err)
	}
	defer ns.Close()
	l, err := netlock.New(ns, dumpLockID(ft.lockPid), netsock.LockSet(eps))
	if err != nil {
		return fmt.Errorf("lock the connections of %d: %w", pid, err)
	}
	ft.lock = l
	return nil
}

// Endpoints returns the endpoints of the IPv4 and IPv6 sockets of a
// running process, read from copies of its descriptors without changing
// anything; other sockets are left out (a dump refuses them by name).
func Endpoints(pid int) ([]netsock.Endpoint, error) {
	fds, err := proc.ListFDs(pid)
	if err != nil {
		return nil, err
	}
	var eps []netsock.Endpoint
	for _, fd := range fds {
		link, err := proc.ReadFDLink(pid, fd)
		if err != nil || !isSocketLink(link) {
			continue
		}
		sk, err := socketCopy(pid, fd)
		if err != nil {
			return nil, fmt.Errorf("descriptor %d of %d (%s): %w", fd, pid, link, err)
		}
		ep, err := netsock.Addrs(sk)
		_ = sk.Close()
		if err != nil {
			continue
		}
		eps = append(eps, ep)
	}
	return eps, nil
}

// resumeSockets gives the dumped sockets back to the resumed process
// (established connections leave repair mode), closes phaul's copies and
// removes the network lock.
func resumeSockets(socks []*dumpedSocket, l *netlock.Lock) error {
	var errs []error
	for _, s := range socks {
		if err := netsock.Resume(s.f, s.st); err != nil {
			errs = append(errs, fmt.Errorf("descriptor %d (%v): %w", s.fd, s.st, err))
		}
		_ = s.f.Close()
	}
	if l != nil {
		if err := l.Unlock(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// closeSockets closes phaul's copies of the sockets of a killed process:
// connections in repair mode go silently. The network lock stays for
// Restore to remove.
func closeSockets(socks []*dumpedSocket) {
	for _, s := range socks {
		_ = s.f.Close()
	}
}
