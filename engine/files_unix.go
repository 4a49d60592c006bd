package engine

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// Dump of unix domain sockets.
//
// phaul learns a socket's type, state, name, peer, shutdown state and
// pending connections from sock_diag (NETLINK_SOCK_DIAG, asked in the
// process's network namespace), and reads the messages queued in it from
// a copy of the descriptor taken with pidfd_getfd, with MSG_PEEK and
// SO_PEEK_OFF: the process's socket keeps them, and its peek offset is
// given back. Each socket saves the messages queued for it to read (a
// unix socket has no send queue of its own), so every byte is saved once.
//
// Whether a socket's peer is in the image can only be told once every
// descriptor of every process was described: checkUnixPeers does it, and
// plans how restore sends each queued message again (restore_unix.go).
//
// Connections a listener has not accepted yet are restored when their
// client is in the image and has sent nothing yet: the client connects to
// the listener again, in accept order, after the accepted connections.
// Data a client sent before being accepted waits in a socket no
// descriptor reaches; reading it would mean accepting the connection, which
// cannot be undone if the process resumes, so such a listener is refused
// (ErrPendingConnections: it passes once the process accepts, and Dump
// tries again). A pending connection from a client outside the image is
// left out, counted in the image and reported by Dump: its client end
// cannot be made again, a busy server always has one, and its client sees
// it fail as when a server restarts.
//
// Refused as well, naming the descriptor: descriptors in flight
// (SCM_RIGHTS) and out-of-band data queued in a socket; credentials a
// receiver asked for (SO_PASSCRED) that name a process outside the image;
// a peer outside the image unless --ext-unix-sk allows it (and even then
// when it has no name to connect to again, or when data it sent is still
// queued); datagrams queued from a sender phaul cannot send from again; a
// socket bound to a path whose socket file is gone or replaced; two
// sockets with one name that is not a listener's.
//
// Known limits: an empty datagram or record, once peeked, is skipped by
// later peeks at an offset (the kernel marks it), so a second dump of a
// process that was resumed after a first one misses it; the kernel's
// SO_PEERCRED and ECONNRESET-after-close state are not reproduced.
//
// External peers (--ext-unix-sk): the socket is restored connected to
// the peer's name again. A datagram socket connected to a bound socket
// connects to that name; a stream or seqpacket socket connects to the
// name its peer has, which is the name of the listener that accepted it:
// the server sees a new connection. A peer without a name (a socketpair
// with a process outside the image) is refused even with the flag.

// ExtUnixSk selects the unix sockets whose peer may be outside the image
// (the --ext-unix-sk of CRIU). The zero value allows none.
type ExtUnixSk struct {
	// All allows every one.
	All bool
	// Inodes allows the sockets with these inode numbers, or whose peer
	// has one of them.
	Inodes []uint64
}

// allows reports whether the socket ino, with peer peer, may have its
// peer outside the image.
func (e ExtUnixSk) allows(ino, peer uint64) bool {
	if e.All {
		return true
	}
	for _, i := range e.Inodes {
		if i == ino || (peer != 0 && i == peer) {
			return true
		}
	}
	return false
}

// ParseExtUnixSk reads the value of --ext-unix-sk: "all" (or empty), or
// inode numbers separated by commas.
func ParseExtUnixSk(s string) (ExtUnixSk, error) {
	if s == "" || s == "all" {
		return ExtUnixSk{All: true}, nil
	}
	var e ExtUnixSk
	for _, f := range strings.Split(s, ",") {
		ino, err := strconv.ParseUint(strings.TrimSpace(f), 10, 64)
		if err != nil || ino == 0 {
			return ExtUnixSk{}, fmt.Errorf("--ext-unix-sk: %q is not a socket inode number", f)
		}
		e.Inodes = append(e.Inodes, ino)
	}
	return e, nil
}

// Kernel socket states of unix sockets (include/net/tcp_states.h).
const (
	unixConnected   = sys.TCP_ESTABLISHED
	unixUnconnected = sys.TCP_CLOSE
	unixListening   = sys.TCP_LISTEN
)

// sk_shutdown bits.
const (
	rcvShutdown  = 1
	sendShutdown = 2
)

// dumpedUnix is a unix socket of the table, with what the image does not
// keep.
type dumpedUnix struct {
	pid, fd int
	f       *imagepb.File
	u       *imagepb.UnixSocket
	// vfsIno is the inode of a path name's socket file (0 otherwise).
	vfsIno uint64
	// outq counts the bytes it sent that are queued in its peer (what
	// sock_diag reports for a socket that is not listening).
	outq uint32
}

// unixDiag is what sock_diag tells about one unix socket.
type unixDiag struct {
	typ, state uint8
	inode      uint32
	name       []byte
	hasVFS     bool
	vfsIno     uint32
	vfsDev     uint32
	hasPeer    bool
	peer       uint32
	icons      []uint32
	hasRQLen   bool
	rqueue     uint32
	wqueue     uint32
	shutdown   uint8
}

// unixDiagShow is what every query asks for.
const unixDiagShow = sys.UDIAG_SHOW_NAME | sys.UDIAG_SHOW_VFS | sys.UDIAG_SHOW_PEER |
	sys.UDIAG_SHOW_ICONS | sys.UDIAG_SHOW_RQLEN

// unixDiagRequest builds a struct unix_diag_req: every state, the socket
// ino (0 with a dump of all), no cookie.
func unixDiagRequest(ino uint32, show uint32) []byte {
	b := make([]byte, sys.SizeofUnixDiagReq)
	b[0] = sys.AF_UNIX
	binary.NativeEndian.PutUint32(b[4:], ^uint32(0)) // udiag_states: all
	binary.NativeEndian.PutUint32(b[8:], ino)
	binary.NativeEndian.PutUint32(b[12:], show)
	binary.NativeEndian.PutUint32(b[16:], ^uint32(0)) // no cookie
	binary.NativeEndian.PutUint32(b[20:], ^uint32(0))
	return b
}

// parseUnixDiag decodes a struct unix_diag_msg and its attributes.
func parseUnixDiag(b []byte) (*unixDiag, error) {
	if len(b) < sys.SizeofUnixDiagMsg {
		return nil, fmt.Errorf("sock_diag: answer of %d bytes", len(b))
	}
	if b[0] != sys.AF_UNIX {
		return nil, fmt.Errorf("sock_diag: answer for family %d", b[0])
	}
	d := &unixDiag{typ: b[1], state: b[2], inode: binary.NativeEndian.Uint32(b[4:])}
	for rest := b[sys.SizeofUnixDiagMsg:]; len(rest) >= 4; {
		l := int(binary.NativeEndian.Uint16(rest[0:]))
		typ := binary.NativeEndian.Uint16(rest[2:])
		if l < 4 || l > len(rest) {
			return nil, fmt.Errorf("sock_diag: attribute %d of length %d in %d bytes", typ, l, len(rest))
		}
		v := rest[4:l]
		short := func(n int) error {
			if len(v) < n {
				return fmt.Errorf("sock_diag: attribute %d of %d bytes, want %d", typ, len(v), n)
			}
			return nil
		}
		switch typ {
		case sys.UNIX_DIAG_NAME:
			d.name = append([]byte(nil), v...)
			if len(d.name) > 0 && d.name[0] != 0 {
				// A path: the kernel keeps its terminating NUL.
				if i := strings.IndexByte(string(d.name), 0); i >= 0 {
					d.name = d.name[:i]
				}
			}
		case sys.UNIX_DIAG_VFS:
			if err := short(8); err != nil {
				return nil, err
			}
			d.hasVFS, d.vfsIno, d.vfsDev = true, binary.NativeEndian.Uint32(v), binary.NativeEndian.Uint32(v[4:])
		case sys.UNIX_DIAG_PEER:
			if err := short(4); err != nil {
				return nil, err
			}
			d.hasPeer, d.peer = true, binary.NativeEndian.Uint32(v)
		case sys.UNIX_DIAG_ICONS:
			for i := 0; i+4 <= len(v); i += 4 {
				d.icons = append(d.icons, binary.NativeEndian.Uint32(v[i:]))
			}
		case sys.UNIX_DIAG_RQLEN:
			if err := short(8); err != nil {
				return nil, err
			}
			d.hasRQLen, d.rqueue, d.wqueue = true, binary.NativeEndian.Uint32(v), binary.NativeEndian.Uint32(v[4:])
		case sys.UNIX_DIAG_SHUTDOWN:
			if err := short(1); err != nil {
				return nil, err
			}
			d.shutdown = v[0]
		}
		rest = rest[min((l+3)&^3, len(rest)):]
	}
	return d, nil
}

// diagConn is a sock_diag socket in the network namespace of a process.
type diagConn struct {
	fd  int
	seq uint32
}

// openDiag opens a sock_diag socket in the network namespace of pid: on
// a thread that enters it and is then discarded, unless it is phaul's.
func openDiag(pid int) (*diagConn, error) {
	ours, err1 := os.Stat("/proc/self/ns/net")
	theirs, err2 := os.Stat(fmt.Sprintf("/proc/%d/ns/net", pid))
	if err := errors.Join(err1, err2); err != nil {
		return nil, fmt.Errorf("network namespace of %d: %w", pid, err)
	}
	if os.SameFile(ours, theirs) {
		fd, err := sys.NetlinkSockDiag()
		if err != nil {
			return nil, err
		}
		return &diagConn{fd: fd}, nil
	}
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
	if err != nil {
		return nil, fmt.Errorf("network namespace of %d: %w", pid, err)
	}
	defer ns.Close()
	fd := -1
	err = sys.OnDiscardedThread(func() error {
		if err := sys.SetnsNet(int(ns.Fd())); err != nil {
			return err
		}
		var err error
		fd, err = sys.NetlinkSockDiag()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("sock_diag in the network namespace of %d: %w", pid, err)
	}
	return &diagConn{fd: fd}, nil
}

func (c *diagConn) close() { _ = sys.Close(c.fd) }

// socket asks about the unix socket with inode ino.
func (c *diagConn) socket(ino uint64) (*unixDiag, error) {
	c.seq++
	ans, err := sys.SockDiag(c.fd, c.seq, unixDiagRequest(uint32(ino), unixDiagShow), false)
	if err != nil {
		return nil, fmt.Errorf("sock_diag of socket:[%d]: %w", ino, err)
	}
	if len(ans) != 1 {
		return nil, fmt.Errorf("sock_diag of socket:[%d]: %d answers", ino, len(ans))
	}
	d, err := parseUnixDiag(ans[0])
	if err == nil && uint64(d.inode) != ino {
		err = fmt.Errorf("sock_diag answered for socket:[%d], asked for socket:[%d]", d.inode, ino)
	}
	return d, err
}

// all lists every unix socket of the namespace, with names and files.
func (c *diagConn) all() ([]*unixDiag, error) {
	c.seq++
	ans, err := sys.SockDiag(c.fd, c.seq, unixDiagRequest(0, sys.UDIAG_SHOW_NAME|sys.UDIAG_SHOW_VFS), true)
	if err != nil {
		return nil, fmt.Errorf("sock_diag of every unix socket: %w", err)
	}
	out := make([]*unixDiag, 0, len(ans))
	for _, a := range ans {
		d, err := parseUnixDiag(a)
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, nil
}

// unixTypeName names a socket type for messages.
func unixTypeName(t uint32) string {
	switch t {
	case sys.SOCK_STREAM:
		return "stream"
	case sys.SOCK_DGRAM:
		return "datagram"
	case sys.SOCK_SEQPACKET:
		return "seqpacket"
	}
	return "type " + strconv.Itoa(int(t))
}

// unixNameString shows a socket name: a path, @name for an abstract one,
// "unnamed" for none.
func unixNameString(name []byte) string {
	switch {
	case len(name) == 0:
		return "unnamed"
	case name[0] == 0:
		return strconv.Quote("@" + string(name[1:]))
	}
	return strconv.Quote(string(name))
}

// unixSocket describes the socket behind descriptor fd of pid into f when
// it is a unix socket, and reports whether it was.
func (ft *fileTable) unixSocket(pid, fd int, f *imagepb.File) (handled bool, err error) {
	sk, err := sys.CopyFD(pid, fd)
	if err != nil {
		return false, fmt.Errorf("descriptor %d of %d: %w", fd, pid, err)
	}
	defer sys.Close(sk)
	domain, err := sys.GetsockoptInt(sk, sys.SOL_SOCKET, sys.SO_DOMAIN)
	if err != nil {
		return false, fmt.Errorf("descriptor %d of %d: %w", fd, pid, err)
	}
	if domain != sys.AF_UNIX {
		return false, nil
	}
	st, err := os.Stat(fmt.Sprintf("/proc/%d/fd/%d", pid, fd))
	if err != nil {
		return false, fmt.Errorf("descriptor %d of %d: %w", fd, pid, err)
	}
	ino := st.Sys().(*syscall.Stat_t).Ino
	f.Inode, f.Dev = ino, st.Sys().(*syscall.Stat_t).Dev
	// A socket has one open file description: another descriptor of it
	// (a dup, or inherited) is one file of the table, which dumpFDs finds.
	for _, d := range ft.unixSockets {
		if d.u.Inode == ino {
			f.Kind, f.UnixSocket = imagepb.FileKind_FILE_UNIX_SOCKET, d.u
			return true, nil
		}
	}
	c, err := openDiag(pid)
	if err != nil {
		return false, err
	}
	d, err := c.socket(ino)
	c.close()
	if err != nil {
		return false, fmt.Errorf("descriptor %d of %d: %w", fd, pid, err)
	}
	u := &imagepb.UnixSocket{Type: uint32(d.typ), State: uint32(d.state), Inode: ino, Name: d.name, Shutdown: uint32(d.shutdown)}
	what := fmt.Sprintf("descriptor %d of %d (unix %s socket %s)", fd, pid, unixTypeName(u.Type), unixNameString(u.Name))
	switch u.Type {
	case sys.SOCK_STREAM, sys.SOCK_DGRAM, sys.SOCK_SEQPACKET:
	default:
		return false, unsupported("%s", what)
	}
	if d.hasPeer {
		u.Connected, u.PeerInode = true, uint64(d.peer)
		if u.PeerName, err = sys.GetpeernameUnix(sk); err != nil && !errors.Is(err, sys.ENOTCONN) {
			return false, fmt.Errorf("%s: %w", what, err)
		}
	}
	if err := unixOptions(sk, u); err != nil {
		return false, fmt.Errorf("%s: %w", what, err)
	}
	ref := &dumpedUnix{pid: pid, fd: fd, f: f, u: u}
	if len(u.Name) > 0 && u.Name[0] != 0 {
		if err := unixPathFile(pid, d, ref); err != nil {
			return false, fmt.Errorf("%s: %w", what, err)
		}
	}
	if !d.hasRQLen {
		return false, fmt.Errorf("%s: sock_diag did not tell its queues", what)
	}
	if u.State == unixListening {
		// Connections not yet accepted: checkUnixPeers decides.
		u.Backlog = d.wqueue
		for _, ino := range d.icons {
			u.Pending = append(u.Pending, uint64(ino))
		}
		if len(u.Pending) != int(d.rqueue) {
			return false, fmt.Errorf("%s: %d connections not yet accepted, and %d clients of them", what, d.rqueue, len(u.Pending))
		}
	} else {
		ref.outq = d.wqueue
		if u.Queue, err = peekUnixQueue(sk, u, d.rqueue); err != nil {
			if errors.Is(err, ErrUnsupported) {
				return false, fmt.Errorf("%s: %w", what, err)
			}
			return false, fmt.Errorf("data queued in %s: %w", what, err)
		}
	}
	f.Kind, f.UnixSocket = imagepb.FileKind_FILE_UNIX_SOCKET, u
	ft.unixSockets = append(ft.unixSockets, ref)
	return true, nil
}

// unixOptions reads the socket options restore gives back.
func unixOptions(sk int, u *imagepb.UnixSocket) error {
	geti := func(opt int) (int, error) { return sys.GetsockoptInt(sk, sys.SOL_SOCKET, opt) }
	passcred, err1 := geti(sys.SO_PASSCRED)
	passpidfd, err2 := geti(sys.SO_PASSPIDFD)
	if errors.Is(err2, sys.ENOPROTOOPT) {
		passpidfd, err2 = 0, nil // older kernels
	}
	sndbuf, err3 := geti(sys.SO_SNDBUF)
	rcvbuf, err4 := geti(sys.SO_RCVBUF)
	peek, err5 := geti(sys.SO_PEEK_OFF)
	rcvtimeo, err6 := sys.GetsockoptTimeval(sk, sys.SO_RCVTIMEO)
	sndtimeo, err7 := sys.GetsockoptTimeval(sk, sys.SO_SNDTIMEO)
	if err := errors.Join(err1, err2, err3, err4, err5, err6, err7); err != nil {
		return fmt.Errorf("socket options: %w", err)
	}
	u.Passcred, u.Passpidfd = passcred != 0, passpidfd != 0
	u.Sndbuf, u.Rcvbuf, u.PeekOff = uint32(sndbuf), uint32(rcvbuf), int32(peek)
	u.RcvtimeoUs, u.SndtimeoUs = rcvtimeo, sndtimeo
	return nil
}

// procPath is name as process pid resolves it, seen from phaul: relative
// to its working directory, or to its root.
func procPath(pid int, name string) string {
	if filepath.IsAbs(name) {
		return fmt.Sprintf("/proc/%d/root%s", pid, name)
	}
	return fmt.Sprintf("/proc/%d/cwd/%s", pid, name)
}

// unixPathFile checks that a socket bound to a path still has its socket
// file there, and keeps its mode and owner.
func unixPathFile(pid int, d *unixDiag, ref *dumpedUnix) error {
	name := string(ref.u.Name)
	if !d.hasVFS {
		return fmt.Errorf("sock_diag did not tell the socket file of %s", name)
	}
	fi, err := os.Lstat(procPath(pid, name))
	if err != nil || fi.Mode().Type() != os.ModeSocket {
		return unsupported("its socket file %s was removed or replaced", name)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if st.Ino != uint64(d.vfsIno) || st.Dev != sys.KernelDev(d.vfsDev) {
		return unsupported("its socket file %s was removed or replaced (now inode %d, it was %d)", name, st.Ino, d.vfsIno)
	}
	ref.vfsIno = st.Ino
	ref.u.FileMode, ref.u.FileUid, ref.u.FileGid = st.Mode&0o7777, st.Uid, st.Gid
	return nil
}

// Bounds of one queue, so that a peer outside the image that keeps
// sending cannot make a dump read forever.
const (
	maxUnixQueueBytes = 256 << 20
	maxUnixQueueMsgs  = 1 << 20
)

// peekUnixQueue returns the messages queued for reading in socket sk (a
// copy of the process's), without consuming them: MSG_PEEK from peek
// offset 0, each read moving the offset on. rqueue is sock_diag's count
// of queued bytes (stream and seqpacket sockets). The socket's own peek
// offset is given back.
func peekUnixQueue(sk int, u *imagepb.UnixSocket, rqueue uint32) ([]*imagepb.UnixMessage, error) {
	stream := u.Type == sys.SOCK_STREAM
	if stream {
		// An out-of-band byte (MSG_OOB) would come back as ordinary data.
		var b [1]byte
		if _, _, _, _, err := sys.Recvmsg(sk, b[:], nil, sys.MSG_OOB|sys.MSG_PEEK|sys.MSG_DONTWAIT); err == nil {
			return nil, unsupported("an out-of-band byte (MSG_OOB) is queued in it")
		}
	}
	orig, err := sys.GetsockoptInt(sk, sys.SOL_SOCKET, sys.SO_PEEK_OFF)
	if err != nil {
		return nil, err
	}
	if err := sys.SetsockoptInt(sk, sys.SOL_SOCKET, sys.SO_PEEK_OFF, 0); err != nil {
		return nil, err
	}
	msgs, err := peekFromZero(sk, u, rqueue)
	if rerr := sys.SetsockoptInt(sk, sys.SOL_SOCKET, sys.SO_PEEK_OFF, orig); rerr != nil && err == nil {
		err = fmt.Errorf("give the peek offset back: %w", rerr)
	}
	return msgs, err
}

func peekFromZero(sk int, u *imagepb.UnixSocket, rqueue uint32) ([]*imagepb.UnixMessage, error) {
	stream := u.Type == sys.SOCK_STREAM
	wantCreds := u.Passcred || u.Passpidfd
	buf := make([]byte, 64<<10)
	oob := make([]byte, 4096)
	flags := sys.MSG_PEEK | sys.MSG_DONTWAIT | sys.MSG_CMSG_CLOEXEC
	if !stream {
		flags |= sys.MSG_TRUNC // the length of the whole datagram
	}
	var msgs []*imagepb.UnixMessage
	total := 0
	for {
		n, oobn, rflags, from, err := sys.Recvmsg(sk, buf, oob, flags)
		if errors.Is(err, sys.EAGAIN) {
			break
		}
		if err != nil {
			return nil, err
		}
		fds, creds, cerr := sys.ParseUnixControl(oob[:oobn])
		for _, fd := range fds {
			_ = sys.Close(fd)
		}
		if sys.HasRights(oob[:oobn]) {
			return nil, unsupported("descriptors are in flight in it (SCM_RIGHTS): %d queued bytes carry %d of them", total+n, len(fds))
		}
		if cerr != nil {
			return nil, cerr
		}
		if rflags&sys.MSG_CTRUNC != 0 {
			return nil, unsupported("a message queued in it carries more control data than phaul reads")
		}
		if n == 0 && (stream || (u.Type == sys.SOCK_SEQPACKET && u.Shutdown&rcvShutdown != 0 && total >= int(rqueue))) {
			break // end of file
		}
		if !stream && n > len(buf) {
			// Truncated: the offset moved by what was read. Peek again
			// from the datagram's start with room for all of it.
			buf = make([]byte, n)
			if err := sys.SetsockoptInt(sk, sys.SOL_SOCKET, sys.SO_PEEK_OFF, total); err != nil {
				return nil, err
			}
			continue
		}
		m := &imagepb.UnixMessage{Data: append([]byte(nil), buf[:n]...)}
		if !stream {
			m.Sender = from
		}
		if wantCreds && creds != nil {
			m.HasCreds, m.Pid, m.Uid, m.Gid = true, creds.Pid, creds.Uid, creds.Gid
		}
		if last := len(msgs) - 1; stream && last >= 0 && sameSender(msgs[last], m) {
			msgs[last].Data = append(msgs[last].Data, m.Data...)
		} else {
			msgs = append(msgs, m)
		}
		total += n
		if total > maxUnixQueueBytes || len(msgs) > maxUnixQueueMsgs {
			return nil, unsupported("more than %d bytes or %d messages are queued in it", maxUnixQueueBytes, maxUnixQueueMsgs)
		}
	}
	if u.Type != sys.SOCK_DGRAM && total < int(rqueue) {
		return nil, fmt.Errorf("read %d of the %d queued bytes", total, rqueue)
	}
	return msgs, nil
}

// sameSender reports whether two runs of stream data carry the same
// credentials (and so are one run).
func sameSender(a, b *imagepb.UnixMessage) bool {
	return a.HasCreds == b.HasCreds && a.Pid == b.Pid && a.Uid == b.Uid && a.Gid == b.Gid
}

// nameKey identifies the name of a socket of the table: the socket file
// for a path, the bytes for an abstract name; "" for none.
func (d *dumpedUnix) nameKey() string {
	switch {
	case len(d.u.Name) == 0:
		return ""
	case d.u.Name[0] == 0:
		return "abstract:" + string(d.u.Name)
	}
	return "file:" + strconv.FormatUint(d.vfsIno, 10)
}

func (d *dumpedUnix) String() string {
	return fmt.Sprintf("descriptor %d of %d (unix %s socket %s)", d.fd, d.pid, unixTypeName(d.u.Type), unixNameString(d.u.Name))
}

// checkUnixPeers runs once every descriptor of every process was
// described: it finds, for each unix socket, whether its peer and the
// listener that accepted it are in the table, refuses what restore could
// not rebuild, and says which socket sends each queued datagram again.
func (ft *fileTable) checkUnixPeers() error {
	if len(ft.unixSockets) == 0 {
		return nil
	}
	byInode := map[uint64]*dumpedUnix{}
	socks := map[uint64]*imagepb.UnixSocket{}
	for _, d := range ft.unixSockets {
		byInode[d.u.Inode] = d
		socks[d.u.Inode] = d.u
	}
	pids := map[int32]bool{}
	for _, d := range ft.described {
		pids[int32(d.pid)] = true
	}
	for _, d := range ft.unixSockets {
		pids[int32(d.pid)] = true
	}
	if err := ft.unixNames(); err != nil {
		return err
	}
	if err := ft.unixPending(byInode); err != nil {
		return err
	}
	for _, d := range ft.unixSockets {
		u := d.u
		if !u.Connected || u.PendingOn != 0 {
			continue
		}
		peer := byInode[u.PeerInode]
		switch {
		case u.PeerInode == 0 && (u.Type == sys.SOCK_DGRAM || u.Shutdown == rcvShutdown|sendShutdown):
			u.PeerGone = true
		case u.PeerInode == 0:
			// A stream connection the listener has not accepted yet.
			if !ft.extUnixSk.allows(u.Inode, 0) {
				return unsupported("%s is connected to %s, which has not accepted the connection yet (a listener outside the image? see --ext-unix-sk)", d, unixNameString(u.PeerName))
			}
			if len(u.PeerName) == 0 {
				return unsupported("%s is connected to a listener outside the image that has no name to connect to again", d)
			}
			u.External = true
		case peer != nil:
			mutual := peer.u.Connected && peer.u.PeerInode == u.Inode
			if !mutual && u.Type != sys.SOCK_DGRAM {
				return fmt.Errorf("%s: its peer socket:[%d] is connected elsewhere", d, u.PeerInode)
			}
			if !mutual && len(peer.u.Name) == 0 {
				return unsupported("%s is connected to the unnamed %s, which is not connected back", d, peer)
			}
		default:
			if !ft.extUnixSk.allows(u.Inode, u.PeerInode) && u.ListenerInode != 0 {
				// A server's connection with a client outside: gone once
				// it is served, so Dump tries again.
				return fmt.Errorf("%w: %w", unsupported("%s, accepted by a listener of the image, is connected to socket:[%d], a client outside the image; dump with --ext-unix-sk to have it connect to the listener again at restore",
					d, u.PeerInode), ErrBusy)
			}
			if !ft.extUnixSk.allows(u.Inode, u.PeerInode) {
				return unsupported("%s is connected to socket:[%d] (%s), outside the image; dump with --ext-unix-sk to connect it to that name again at restore",
					d, u.PeerInode, unixNameString(u.PeerName))
			}
			if len(u.PeerName) == 0 || (u.Type != sys.SOCK_DGRAM && u.ListenerInode != 0) {
				return unsupported("%s is connected to socket:[%d] outside the image, which has no name to connect to again (even with --ext-unix-sk)", d, u.PeerInode)
			}
			if n := queuedBytes(u); n > 0 || len(u.Queue) > 0 {
				return unsupported("%s holds %d bytes (%d messages) from socket:[%d] outside the image, which phaul cannot queue again", d, n, len(u.Queue), u.PeerInode)
			}
			u.External = true
		}
	}
	for _, d := range ft.unixSockets {
		if err := planSenders(d, socks); err != nil {
			return err
		}
		if !d.u.Passcred && !d.u.Passpidfd {
			continue
		}
		for _, m := range d.u.Queue {
			if m.HasCreds && !pids[m.Pid] {
				return unsupported("%s asked for credentials (SO_PASSCRED), and a message queued in it carries those of PID %d, which is not in the image", d, m.Pid)
			}
		}
	}
	return nil
}

// unixPending checks the connections the listeners of the table have not
// accepted yet: restore connects their clients to the listener again, in
// order, so each client must be in the table and must not have sent
// anything yet (what it sent waits in a socket without a descriptor,
// which phaul cannot read).
func (ft *fileTable) unixPending(byInode map[uint64]*dumpedUnix) error {
	for _, l := range ft.unixSockets {
		inside := l.u.Pending[:0]
		for _, ino := range l.u.Pending {
			c := byInode[ino]
			switch {
			case ino == 0:
				return pending("%s is listening with a connection not yet accepted whose client closed it", l)
			case c == nil:
				l.u.PendingOutside++ // left out: see above
				continue
			case c.outq > 0:
				return pending("%s is listening with a connection not yet accepted from %s, whose data (%d bytes of buffer) waits in a peer socket phaul cannot read before the connection is accepted",
					l, c, c.outq)
			case !c.u.Connected || c.u.PeerInode != 0:
				return fmt.Errorf("%s: its connection from %s is not pending", l, c)
			}
			c.u.PendingOn = l.u.Inode
			inside = append(inside, ino)
		}
		l.u.Pending = inside
	}
	return nil
}

// queuedBytes counts the bytes queued in u.
func queuedBytes(u *imagepb.UnixSocket) int {
	n := 0
	for _, m := range u.Queue {
		n += len(m.Data)
	}
	return n
}

// unixNames finds the accepted connections: a connected stream or
// seqpacket socket that shares its name with a listener of the table was
// accepted from it. Other names must be the socket's own: one socket per
// name, and no listener outside the table with it.
func (ft *fileTable) unixNames() error {
	owners := map[string][]*dumpedUnix{}
	var order []string
	for _, d := range ft.unixSockets {
		k := d.nameKey()
		if k == "" {
			continue
		}
		if owners[k] == nil {
			order = append(order, k)
		}
		owners[k] = append(owners[k], d)
	}
	var outside map[string]bool // names of listeners outside the table
	for _, k := range order {
		ds := owners[k]
		var l *dumpedUnix
		for _, d := range ds {
			if d.u.State == unixListening {
				l = d
			}
		}
		for _, d := range ds {
			switch {
			case d == l:
			case l != nil && d.u.Type == l.u.Type && d.u.Connected:
				d.u.ListenerInode = l.u.Inode
			case len(ds) > 1:
				return unsupported("%s and %s have one name (connections accepted from a listener that is no longer open)", ds[0], d)
			case d.u.Type != sys.SOCK_DGRAM && d.u.Connected:
				// Bound itself before connecting, or accepted from a
				// listener outside the table: only the first can be
				// restored.
				if outside == nil {
					var err error
					if outside, err = ft.outsideListeners(d.pid); err != nil {
						return err
					}
				}
				if outside[k] {
					return unsupported("%s was accepted from the listener on %s, which is not in the image", d, unixNameString(d.u.Name))
				}
			}
		}
	}
	return nil
}

// outsideListeners returns the name keys of the listening unix sockets of
// pid's network namespace that are not in the table.
func (ft *fileTable) outsideListeners(pid int) (map[string]bool, error) {
	c, err := openDiag(pid)
	if err != nil {
		return nil, err
	}
	defer c.close()
	all, err := c.all()
	if err != nil {
		return nil, err
	}
	in := map[uint64]bool{}
	for _, d := range ft.unixSockets {
		in[d.u.Inode] = true
	}
	out := map[string]bool{}
	for _, s := range all {
		if s.state != unixListening || in[uint64(s.inode)] || len(s.name) == 0 {
			continue
		}
		d := &dumpedUnix{u: &imagepb.UnixSocket{Name: s.name}, vfsIno: uint64(s.vfsIno)}
		out[d.nameKey()] = true
	}
	return out, nil
}

// planSenders says which socket sends each message queued in d again at
// restore, or refuses when none can. A socket made with its peer (pair,
// accepted connection, closed peer) gets its messages from that peer; the
// others are datagram sockets, whose datagrams come from a temporary
// unnamed socket (those an unnamed sender sent) or from the socket of the
// image that sent them and is connected to it.
func planSenders(d *dumpedUnix, socks map[uint64]*imagepb.UnixSocket) error {
	u := d.u
	if len(u.Queue) == 0 {
		return nil
	}
	if p, _ := planUnix(u, socks); p != planSingle {
		return nil
	}
	if u.Type != sys.SOCK_DGRAM {
		return fmt.Errorf("%s: %d messages queued in a socket without a peer", d, len(u.Queue))
	}
	if len(u.Name) == 0 {
		return unsupported("%s holds %d datagrams but has no name to send them to again", d, len(u.Queue))
	}
	byName := map[string]*imagepb.UnixSocket{}
	for _, s := range socks {
		if len(s.Name) > 0 && s.Type == sys.SOCK_DGRAM {
			byName[string(s.Name)] = s
		}
	}
	for _, m := range u.Queue {
		if len(m.Sender) == 0 {
			continue // a temporary unnamed socket
		}
		s := byName[string(m.Sender)]
		if s == nil || u.Connected || !s.Connected || s.PeerInode != u.Inode {
			return unsupported("%s holds a datagram from %s, which phaul cannot send from again (not in the image, or not connected to it)", d, unixNameString(m.Sender))
		}
		m.SenderInode = s.Inode
	}
	return nil
}

// unixPlan is how restore makes a unix socket.
type unixPlan int

const (
	// planSingle: socket, bind to its name, listen, or connect to the
	// name of its peer (in the image or outside).
	planSingle unixPlan = iota
	// planPair: socketpair with its peer, each bound to its name.
	planPair
	// planAccepted: connected through the listener it was accepted
	// from, with its peer as the client (or a client closed at once).
	planAccepted
	// planGone: socketpair whose other end is closed at once.
	planGone
)

// planUnix returns how restore makes u, and the socket of socks made with
// it (nil for none).
func planUnix(u *imagepb.UnixSocket, socks map[uint64]*imagepb.UnixSocket) (unixPlan, *imagepb.UnixSocket) {
	var peer *imagepb.UnixSocket
	if u.Connected && u.PeerInode != 0 && !u.External {
		peer = socks[u.PeerInode]
	}
	mutual := peer != nil && peer.Connected && peer.PeerInode == u.Inode
	switch {
	case u.ListenerInode != 0:
		if !mutual {
			return planAccepted, nil
		}
		return planAccepted, peer
	case mutual && peer.ListenerInode != 0:
		return planAccepted, peer
	case u.PeerGone:
		return planGone, nil
	case mutual:
		return planPair, peer
	}
	return planSingle, nil
}

// leftOut returns how many connections not accepted yet from clients
// outside the image the table leaves out, and the listeners they wait on.
func (ft *fileTable) leftOut() (n int, listeners []string) {
	for _, d := range ft.unixSockets {
		if k := d.u.PendingOutside; k > 0 {
			n += int(k)
			listeners = append(listeners, d.String())
		}
	}
	return n, listeners
}
