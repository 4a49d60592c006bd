package sys

import (
	"encoding/binary"
	"errors"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Unix domain sockets and sock_diag: what the engine needs to dump and
// restore AF_UNIX sockets. Socket names cross this package as the raw
// bytes of sun_path (an abstract name starts with a NUL byte; a path has
// no trailing NUL; nil is no name), never as x/sys's Sockaddr, which
// rewrites abstract names for display.

// Socket types, options, message flags and system calls of unix sockets.
const (
	AF_NETLINK     = unix.AF_NETLINK
	SOCK_SEQPACKET = unix.SOCK_SEQPACKET

	SO_PASSCRED  = unix.SO_PASSCRED
	SO_PASSPIDFD = 0x4c
	SO_RCVTIMEO  = unix.SO_RCVTIMEO
	SO_SNDTIMEO  = unix.SO_SNDTIMEO

	SCM_RIGHTS      = unix.SCM_RIGHTS
	SCM_CREDENTIALS = unix.SCM_CREDENTIALS
	SCM_PIDFD       = 0x4

	MSG_OOB          = unix.MSG_OOB
	MSG_TRUNC        = unix.MSG_TRUNC
	MSG_CTRUNC       = unix.MSG_CTRUNC
	MSG_CMSG_CLOEXEC = unix.MSG_CMSG_CLOEXEC

	SHUT_RD   = unix.SHUT_RD
	SHUT_WR   = unix.SHUT_WR
	SHUT_RDWR = unix.SHUT_RDWR

	SYS_SOCKET     = unix.SYS_SOCKET
	SYS_SOCKETPAIR = unix.SYS_SOCKETPAIR
	SYS_BIND       = unix.SYS_BIND
	SYS_LISTEN     = unix.SYS_LISTEN
	SYS_CONNECT    = unix.SYS_CONNECT

	ECONNREFUSED = unix.ECONNREFUSED

	S_IFMT   = unix.S_IFMT
	S_IFSOCK = unix.S_IFSOCK
	S_IFIFO  = unix.S_IFIFO
)

// sock_diag of AF_UNIX sockets (linux/sock_diag.h, linux/unix_diag.h).
const (
	SOCK_DIAG_BY_FAMILY = unix.SOCK_DIAG_BY_FAMILY

	UDIAG_SHOW_NAME    = 0x01
	UDIAG_SHOW_VFS     = 0x02
	UDIAG_SHOW_PEER    = 0x04
	UDIAG_SHOW_ICONS   = 0x08
	UDIAG_SHOW_RQLEN   = 0x10
	UDIAG_SHOW_MEMINFO = 0x20
	UDIAG_SHOW_UID     = 0x40
	UNIX_DIAG_NAME     = 0
	UNIX_DIAG_VFS      = 1
	UNIX_DIAG_PEER     = 2
	UNIX_DIAG_ICONS    = 3
	UNIX_DIAG_RQLEN    = 4
	UNIX_DIAG_MEMINFO  = 5
	UNIX_DIAG_SHUTDOWN = 6
	UNIX_DIAG_UID      = 7
	SizeofUnixDiagReq  = 24
	SizeofUnixDiagMsg  = 16
)

// Ucred is struct ucred: the credentials a unix socket message carries.
type Ucred struct {
	Pid      int32
	Uid, Gid uint32
}

// NetlinkSockDiag opens a NETLINK_SOCK_DIAG socket in the calling thread's
// network namespace; sock_diag answers about the sockets of that one.
func NetlinkSockDiag() (int, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	return fd, wrap("socket(AF_NETLINK)", err)
}

// SockDiag sends one SOCK_DIAG_BY_FAMILY request (req is the family's
// request structure) on the netlink socket fd, and returns the payloads
// of the answers: one for an exact request, every match for a dump. An
// error answer comes back as its errno.
func SockDiag(fd int, seq uint32, req []byte, dump bool) ([][]byte, error) {
	flags := uint16(unix.NLM_F_REQUEST)
	if dump {
		flags |= unix.NLM_F_DUMP
	}
	msg := make([]byte, unix.NLMSG_HDRLEN+len(req))
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint16(msg[4:], unix.SOCK_DIAG_BY_FAMILY)
	binary.NativeEndian.PutUint16(msg[6:], flags)
	binary.NativeEndian.PutUint32(msg[8:], seq)
	copy(msg[unix.NLMSG_HDRLEN:], req)
	for {
		err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, wrap("sendto(sock_diag)", err)
		}
		break
	}
	var out [][]byte
	buf := make([]byte, 1<<16)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, wrap("recvfrom(sock_diag)", err)
		}
		msgs, err := parseNetlink(buf[:n])
		if err != nil {
			return nil, wrap("sock_diag", err)
		}
		for _, m := range msgs {
			if m.seq != seq {
				continue
			}
			switch m.typ {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if len(m.data) < 4 {
					return nil, wrap("sock_diag", unix.EIO)
				}
				if e := int32(binary.NativeEndian.Uint32(m.data)); e != 0 {
					return nil, wrap("sock_diag", unix.Errno(-e))
				}
				return out, nil
			case unix.SOCK_DIAG_BY_FAMILY:
				out = append(out, append([]byte(nil), m.data...))
				if !dump {
					return out, nil
				}
			}
		}
	}
}

// netlinkMsg is one message of a netlink answer.
type netlinkMsg struct {
	typ  uint16
	seq  uint32
	data []byte
}

// parseNetlink splits a netlink answer into its messages.
func parseNetlink(b []byte) ([]netlinkMsg, error) {
	var out []netlinkMsg
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(b[0:]))
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			return nil, unix.EBADMSG
		}
		out = append(out, netlinkMsg{
			typ:  binary.NativeEndian.Uint16(b[4:]),
			seq:  binary.NativeEndian.Uint32(b[8:]),
			data: b[unix.NLMSG_HDRLEN:l],
		})
		b = b[min((l+unix.NLMSG_ALIGNTO-1)&^(unix.NLMSG_ALIGNTO-1), len(b)):]
	}
	return out, nil
}

// rawSockaddrUnix encodes name as a struct sockaddr_un and its length.
func rawSockaddrUnix(name []byte) (*unix.RawSockaddrUnix, uint32, error) {
	var sa unix.RawSockaddrUnix
	if len(name) > len(sa.Path) {
		return nil, 0, unix.EINVAL
	}
	sa.Family = unix.AF_UNIX
	for i, b := range name {
		sa.Path[i] = int8(b)
	}
	n := uint32(2 + len(name))
	if len(name) > 0 && name[0] != 0 && len(name) < len(sa.Path) {
		n++ // a path's terminating NUL
	}
	return &sa, n, nil
}

// unixName decodes the name of a sockaddr_un of length n.
func unixName(sa *unix.RawSockaddrUnix, n uint32) []byte {
	if n <= 2 {
		return nil
	}
	l := min(int(n)-2, len(sa.Path))
	name := make([]byte, l)
	for i := range name {
		name[i] = byte(sa.Path[i])
	}
	if name[0] != 0 {
		// A path: up to its first NUL.
		for i, b := range name {
			if b == 0 {
				name = name[:i]
				break
			}
		}
	}
	return name
}

// BindUnix binds the unix socket fd to name (a path, or an abstract name
// with its leading NUL) from the calling thread.
func BindUnix(fd int, name []byte) error {
	sa, n, err := rawSockaddrUnix(name)
	if err != nil {
		return wrap("bind", err)
	}
	_, _, e := unix.Syscall(unix.SYS_BIND, uintptr(fd), uintptr(unsafe.Pointer(sa)), uintptr(n))
	if e != 0 {
		return wrap("bind", e)
	}
	return nil
}

// ConnectUnix connects the unix socket fd to name, retrying EINTR.
func ConnectUnix(fd int, name []byte) error {
	sa, n, err := rawSockaddrUnix(name)
	if err != nil {
		return wrap("connect", err)
	}
	for {
		_, _, e := unix.Syscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(sa)), uintptr(n))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return wrap("connect", e)
		}
		return nil
	}
}

// UnixSockaddr returns the bytes of a struct sockaddr_un for name, to be
// written into another process for an injected bind or connect, with the
// length to pass.
func UnixSockaddr(name []byte) ([]byte, uint64, error) {
	sa, n, err := rawSockaddrUnix(name)
	if err != nil {
		return nil, 0, err
	}
	b := unsafe.Slice((*byte)(unsafe.Pointer(sa)), unsafe.Sizeof(*sa))
	return append([]byte(nil), b...), uint64(n), nil
}

// GetsocknameUnix returns the name of unix socket fd (nil: unnamed).
func GetsocknameUnix(fd int) ([]byte, error) {
	return unixSockName(unix.SYS_GETSOCKNAME, "getsockname", fd)
}

// GetpeernameUnix returns the name of the peer of unix socket fd.
func GetpeernameUnix(fd int) ([]byte, error) {
	return unixSockName(unix.SYS_GETPEERNAME, "getpeername", fd)
}

func unixSockName(nr uintptr, name string, fd int) ([]byte, error) {
	var sa unix.RawSockaddrUnix
	n := uint32(unsafe.Sizeof(sa))
	_, _, e := unix.Syscall(nr, uintptr(fd), uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&n)))
	if e != 0 {
		return nil, wrap(name, e)
	}
	return unixName(&sa, n), nil
}

// Socketpair creates a pair of connected unix sockets of type typ,
// close-on-exec.
func Socketpair(typ int) (int, int, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, -1, wrap("socketpair", err)
	}
	return fds[0], fds[1], nil
}

// Accept4 accepts a connection on the listening socket fd, retrying EINTR.
func Accept4(fd, flags int) (int, error) {
	for {
		nfd, _, err := unix.Accept4(fd, flags)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return nfd, wrap("accept4", err)
	}
}

// Shutdown shuts down part of a full-duplex connection.
func Shutdown(fd, how int) error { return wrap("shutdown", unix.Shutdown(fd, how)) }

// WaitReadable waits up to timeoutMs for fd to become readable (a
// connection to accept, data to read) and reports whether it did.
func WaitReadable(fd, timeoutMs int) (bool, error) {
	p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(p, timeoutMs)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return n > 0, wrap("poll", err)
	}
}

// GetsockoptTimeval reads a struct timeval socket option (SO_RCVTIMEO,
// SO_SNDTIMEO) in microseconds.
func GetsockoptTimeval(fd, opt int) (int64, error) {
	tv, err := unix.GetsockoptTimeval(fd, unix.SOL_SOCKET, opt)
	if err != nil {
		return 0, wrap("getsockopt", err)
	}
	return tv.Sec*1e6 + tv.Usec, nil
}

// SetsockoptTimeval sets a struct timeval socket option in microseconds.
func SetsockoptTimeval(fd, opt int, us int64) error {
	tv := unix.NsecToTimeval(us * 1000)
	return wrap("setsockopt", unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, opt, &tv))
}

// Recvmsg receives one message (with MSG_PEEK: looks at it) into p and
// oob, retrying EINTR. It returns the data length (the full length of a
// datagram with MSG_TRUNC), the control data length, the message flags
// and the sender's name.
func Recvmsg(fd int, p, oob []byte, flags int) (n, oobn, rflags int, from []byte, err error) {
	var sa unix.RawSockaddrUnix
	var msg unix.Msghdr
	msg.Name = (*byte)(unsafe.Pointer(&sa))
	msg.Namelen = uint32(unsafe.Sizeof(sa))
	var iov unix.Iovec
	if len(p) > 0 {
		iov.Base = &p[0]
		iov.SetLen(len(p))
	} else {
		var dummy byte
		iov.Base = &dummy
	}
	msg.Iov = &iov
	msg.Iovlen = 1
	if len(oob) > 0 {
		msg.Control = &oob[0]
		msg.SetControllen(len(oob))
	}
	for {
		r, _, e := unix.Syscall(unix.SYS_RECVMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), uintptr(flags))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 0, 0, 0, nil, wrap("recvmsg", e)
		}
		return int(r), int(msg.Controllen), int(msg.Flags), unixName(&sa, msg.Namelen), nil
	}
}

// ParseUnixControl reads the control messages of a unix socket message:
// the descriptors it passed (SCM_RIGHTS, and SCM_PIDFD), which the caller
// now owns, and the credentials (SCM_CREDENTIALS), nil when absent.
func ParseUnixControl(oob []byte) (fds []int, creds *Ucred, err error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, nil, wrap("control message", err)
	}
	for i := range msgs {
		m := &msgs[i]
		if m.Header.Level != unix.SOL_SOCKET {
			continue
		}
		switch m.Header.Type {
		case unix.SCM_RIGHTS, SCM_PIDFD:
			for j := 0; j+4 <= len(m.Data); j += 4 {
				fds = append(fds, int(int32(binary.NativeEndian.Uint32(m.Data[j:]))))
			}
		case unix.SCM_CREDENTIALS:
			uc, err := unix.ParseUnixCredentials(m)
			if err != nil {
				return fds, nil, wrap("control message", err)
			}
			creds = &Ucred{Pid: uc.Pid, Uid: uc.Uid, Gid: uc.Gid}
		}
	}
	return fds, creds, nil
}

// HasRights reports whether control data holds an SCM_RIGHTS message.
func HasRights(oob []byte) bool {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return false
	}
	for _, m := range msgs {
		if m.Header.Level == unix.SOL_SOCKET && m.Header.Type == unix.SCM_RIGHTS {
			return true
		}
	}
	return false
}

// SendUnix sends p (one datagram or record; empty ones too) on the
// connected socket fd with flags, carrying the credentials creds when not
// nil (SCM_CREDENTIALS: another process's pid and ids need CAP_SYS_ADMIN,
// CAP_SETUID and CAP_SETGID), retrying EINTR.
func SendUnix(fd int, p []byte, creds *Ucred, flags int) (int, error) {
	var msg unix.Msghdr
	var iov unix.Iovec
	var dummy byte
	iov.Base = &dummy
	if len(p) > 0 {
		iov.Base = &p[0]
		iov.SetLen(len(p))
	}
	msg.Iov = &iov
	msg.Iovlen = 1
	if creds != nil {
		oob := unix.UnixCredentials(&unix.Ucred{Pid: creds.Pid, Uid: creds.Uid, Gid: creds.Gid})
		msg.Control = &oob[0]
		msg.SetControllen(len(oob))
	}
	for {
		r, _, e := unix.Syscall(unix.SYS_SENDMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), uintptr(flags))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 0, wrap("sendmsg", e)
		}
		return int(r), nil
	}
}

// SendRights sends p on the connected socket fd with descriptors fds
// passed along (SCM_RIGHTS).
func SendRights(fd int, p []byte, fds ...int) error {
	for {
		err := unix.Sendmsg(fd, p, unix.UnixRights(fds...), nil, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return wrap("sendmsg", err)
	}
}

// KernelDev converts a device number as the kernel keeps it (major << 20
// | minor, as sock_diag reports it) to the userspace encoding of stat(2).
func KernelDev(kdev uint32) uint64 { return unix.Mkdev(kdev>>20, kdev&(1<<20-1)) }
