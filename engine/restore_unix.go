package engine

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"syscall"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// Restore of unix domain sockets. Sockets are made inside the process
// (injected socket, socketpair, bind, listen, connect), so that names
// resolve in its network namespace, root and working directory; phaul
// keeps a copy of every socket it makes in the restore's pool (under
// sharedSocket and the socket's dump-time inode) and works on the copies:
// it sends the queued messages again, accepts connections, shuts down and
// sets options.
//
// The first socket of a group opened makes the group (planUnix): a
// socket pair and both its ends, an accepted connection (through its
// listener) and its client, a listener or a bound datagram socket that
// another one connects to. The sockets of the group not opened yet wait
// in the pool for their turn, in this process or another one.
//
// Each socket's queue is sent again exactly once, from its peer for the
// sockets made with their peer. A datagram socket that others send to is
// refilled once it and every sender of its queue exist (unixFills): the
// datagrams of unnamed senders from a temporary unnamed socket, the others
// from the socket of the image that sent them. Options that change how a
// socket sends (SO_PASSCRED autobinds an unnamed sender) are set after.
//
// SO_PEERCRED is not reproduced: it names the process that made the
// socket (the restored one) with the restorer's uid and gid.

// unixRestore is what one restore knows of its unix sockets.
type unixRestore struct {
	socks map[uint64]*imagepb.UnixSocket
	// filled are the sockets whose queue was sent again.
	filled map[uint64]bool
}

// unixState returns the restore's unix socket state, shared by every
// process of the restore through the pool.
func (r *restorer) unixState() *unixRestore {
	if r.shared.unix == nil {
		s := &unixRestore{socks: map[uint64]*imagepb.UnixSocket{}, filled: map[uint64]bool{}}
		for _, f := range r.files.GetFiles() {
			if u := f.GetUnixSocket(); f.GetKind() == imagepb.FileKind_FILE_UNIX_SOCKET && u != nil {
				s.socks[u.Inode] = u
			}
		}
		r.shared.unix = s
	}
	return r.shared.unix
}

func unixKey(ino uint64) sharedKey { return sharedKey{sharedSocket, ino} }

func unixDesc(u *imagepb.UnixSocket) string {
	return fmt.Sprintf("unix %s socket %s (socket:[%d] at dump)", unixTypeName(u.Type), unixNameString(u.Name), u.Inode)
}

// openUnixSocket returns a descriptor of the unix socket of f in the
// process, made now or taken from the pool, with f's file flags.
//
// Precondition: called on the Tracer thread.
func (r *restorer) openUnixSocket(f *imagepb.File) (uint64, error) {
	u := f.GetUnixSocket()
	if u == nil {
		return 0, fmt.Errorf("%w: unix socket file %d without its state", ErrBadImage, f.Id)
	}
	fd, ok, err := r.fromShared(unixKey(u.Inode))
	if err != nil {
		return 0, err
	}
	if !ok {
		if fd, err = r.makeUnix(u); err != nil {
			return 0, fmt.Errorf("%s: %w", unixDesc(u), err)
		}
	}
	if err := r.unixFills(); err != nil {
		return 0, err
	}
	return fd, r.setFlags(fd, f.Flags)
}

// ensureUnix returns phaul's copy of the socket ino of the image, making
// it (and its group) in this process when no process made it yet.
//
// Precondition: called on the Tracer thread.
func (r *restorer) ensureUnix(ino uint64) (int, error) {
	if fd, ok := r.shared.get(unixKey(ino)); ok {
		return fd, nil
	}
	u := r.unixState().socks[ino]
	if u == nil {
		return -1, fmt.Errorf("%w: socket:[%d] is not in the image", ErrBadImage, ino)
	}
	fd, err := r.makeUnix(u)
	if err != nil {
		return -1, fmt.Errorf("%s: %w", unixDesc(u), err)
	}
	if err := r.closeIn(fd); err != nil {
		return -1, err
	}
	ours, _ := r.shared.get(unixKey(ino))
	return ours, nil
}

// makeUnix makes u, and the sockets its plan makes with it, in the
// process; every one goes into the pool. It returns u's descriptor in the
// process.
//
// Precondition: called on the Tracer thread.
func (r *restorer) makeUnix(u *imagepb.UnixSocket) (uint64, error) {
	plan, partner := planUnix(u, r.unixState().socks)
	// A listener makes the connections that go through it when it is
	// made: the accepted ones first, then those not accepted yet, in
	// order, so that accept returns each where it belongs.
	l := u.PendingOn
	if plan == planAccepted {
		if l = u.ListenerInode; l == 0 {
			l = partner.ListenerInode
		}
	}
	if _, made := r.shared.get(unixKey(l)); l != 0 && !made {
		if _, err := r.ensureUnix(l); err != nil {
			return 0, err
		}
		fd, ok, err := r.fromShared(unixKey(u.Inode))
		if err == nil && !ok {
			err = fmt.Errorf("its listener socket:[%d] did not make it", l)
		}
		return fd, err
	}
	switch plan {
	case planPair:
		return r.makeUnixPair(u, partner)
	case planAccepted:
		return r.makeUnixAccepted(u, partner)
	case planGone:
		return r.makeUnixGone(u)
	}
	return r.makeUnixSingle(u)
}

// makeUnixSingle makes a socket of its own: bound, listening, or
// connected to the name of its peer.
//
// Precondition: called on the Tracer thread.
func (r *restorer) makeUnixSingle(u *imagepb.UnixSocket) (uint64, error) {
	fd, err := r.unixSocketIn(u.Type)
	if err != nil {
		return 0, err
	}
	if err := r.bindUnix(fd, u); err != nil {
		return 0, err
	}
	if u.State == unixListening {
		if _, err := r.main.Syscall(sys.SYS_LISTEN, fd, uint64(u.Backlog)); err != nil {
			return 0, fmt.Errorf("listen: %w", err)
		}
	}
	if err := r.share(unixKey(u.Inode), fd); err != nil {
		return 0, err
	}
	ours, _ := r.shared.get(unixKey(u.Inode))
	if u.State == unixListening {
		if err := r.listenerConnections(u); err != nil {
			return 0, err
		}
	}
	if u.Connected {
		// What is queued came before it connected (planSenders): send it
		// now, while any socket may send to it.
		if len(u.Queue) > 0 {
			if err := r.fillUnix(u, ours); err != nil {
				return 0, err
			}
		}
		name := u.PeerName
		switch {
		case u.External:
		case u.PendingOn != 0:
			l := r.unixState().socks[u.PendingOn]
			if l == nil {
				return 0, fmt.Errorf("%w: its listener socket:[%d] is not in the image", ErrBadImage, u.PendingOn)
			}
			name = l.Name
		default:
			peer := r.unixState().socks[u.PeerInode]
			if peer == nil {
				return 0, fmt.Errorf("%w: its peer socket:[%d] is not in the image", ErrBadImage, u.PeerInode)
			}
			if _, err := r.ensureUnix(peer.Inode); err != nil {
				return 0, err
			}
			name = peer.Name
		}
		if err := r.connectUnix(fd, name); err != nil {
			return 0, err
		}
	}
	if u.Connected || len(u.Queue) == 0 {
		r.unixState().filled[u.Inode] = true
	}
	return fd, setUnixOptions(ours, u)
}

// listenerConnections makes the connections that go through listener l:
// the accepted ones, then the clients of those not accepted yet, in the
// order accept returns them.
//
// Precondition: called on the Tracer thread.
func (r *restorer) listenerConnections(l *imagepb.UnixSocket) error {
	st := r.unixState()
	var accepted []uint64
	for ino, u := range st.socks {
		if u.ListenerInode == l.Inode {
			accepted = append(accepted, ino)
		}
	}
	slices.Sort(accepted)
	for _, ino := range append(accepted, l.Pending...) {
		if _, err := r.ensureUnix(ino); err != nil {
			return err
		}
	}
	return nil
}

// makeUnixPair makes u and its peer p with socketpair.
//
// Precondition: called on the Tracer thread.
func (r *restorer) makeUnixPair(u, p *imagepb.UnixSocket) (uint64, error) {
	a, b, err := r.socketpairIn(u.Type)
	if err != nil {
		return 0, err
	}
	if err := errors.Join(r.bindUnix(a, u), r.bindUnix(b, p)); err != nil {
		return 0, err
	}
	if err := errors.Join(r.share(unixKey(u.Inode), a), r.share(unixKey(p.Inode), b)); err != nil {
		return 0, err
	}
	ca, _ := r.shared.get(unixKey(u.Inode))
	cb, _ := r.shared.get(unixKey(p.Inode))
	if err := errors.Join(r.fillUnix(u, cb), r.fillUnix(p, ca)); err != nil {
		return 0, err
	}
	if err := errors.Join(shutdownUnix(ca, u.Shutdown), shutdownUnix(cb, p.Shutdown)); err != nil {
		return 0, err
	}
	if err := errors.Join(setUnixOptions(ca, u), setUnixOptions(cb, p)); err != nil {
		return 0, err
	}
	r.unixState().filled[u.Inode], r.unixState().filled[p.Inode] = true, true
	return a, r.closeIn(b)
}

// makeUnixGone makes u as one end of a socketpair whose other end, after
// sending u's queue, is closed.
//
// Precondition: called on the Tracer thread.
func (r *restorer) makeUnixGone(u *imagepb.UnixSocket) (uint64, error) {
	a, b, err := r.socketpairIn(u.Type)
	if err != nil {
		return 0, err
	}
	if err := r.bindUnix(a, u); err != nil {
		return 0, err
	}
	if err := r.share(unixKey(u.Inode), a); err != nil {
		return 0, err
	}
	ca, _ := r.shared.get(unixKey(u.Inode))
	cb, err := sys.CopyFD(r.pid, int(b))
	if err != nil {
		return 0, err
	}
	err = r.fillUnix(u, cb)
	_ = sys.Close(cb)
	if err != nil {
		return 0, err
	}
	if err := r.closeIn(b); err != nil {
		return 0, err
	}
	if u.Type == sys.SOCK_DGRAM {
		// A stream peer's close shut it down already.
		if err := shutdownUnix(ca, u.Shutdown); err != nil {
			return 0, err
		}
	}
	r.unixState().filled[u.Inode] = true
	return a, setUnixOptions(ca, u)
}

// makeUnixAccepted makes an accepted connection through the listener it
// came from: a client connects to the listener's name, phaul accepts on
// its copy of the listener. One of u and partner is the accepted end, the
// other its client; partner is nil when the client was closed.
//
// Precondition: called on the Tracer thread.
func (r *restorer) makeUnixAccepted(u, partner *imagepb.UnixSocket) (uint64, error) {
	acc, client := u, partner
	if u.ListenerInode == 0 {
		acc, client = partner, u
	}
	l := r.unixState().socks[acc.ListenerInode]
	if l == nil {
		return 0, fmt.Errorf("%w: its listener socket:[%d] is not in the image", ErrBadImage, acc.ListenerInode)
	}
	lcopy, err := r.ensureUnix(l.Inode)
	if err != nil {
		return 0, err
	}
	c, err := r.unixSocketIn(acc.Type)
	if err != nil {
		return 0, err
	}
	if client != nil {
		if err := r.bindUnix(c, client); err != nil {
			return 0, err
		}
	}
	if err := r.connectUnix(c, l.Name); err != nil {
		return 0, err
	}
	if ok, err := sys.WaitReadable(lcopy, 5000); err != nil || !ok {
		return 0, fmt.Errorf("no connection to accept on %s: %w", unixNameString(l.Name), errors.Join(err, sys.EAGAIN))
	}
	s, err := sys.Accept4(lcopy, sys.SOCK_CLOEXEC)
	if err != nil {
		return 0, fmt.Errorf("accept on %s: %w", unixNameString(l.Name), err)
	}
	r.shared.put(unixKey(acc.Inode), s)
	var cc int
	if client != nil {
		if err := r.share(unixKey(client.Inode), c); err != nil {
			return 0, err
		}
		cc, _ = r.shared.get(unixKey(client.Inode))
	} else if cc, err = sys.CopyFD(r.pid, int(c)); err != nil {
		return 0, err
	}
	err = r.fillUnix(acc, cc)
	if client != nil {
		err = errors.Join(err, r.fillUnix(client, s),
			shutdownUnix(s, acc.Shutdown), shutdownUnix(cc, client.Shutdown), setUnixOptions(cc, client))
		r.unixState().filled[client.Inode] = true
	} else {
		_ = sys.Close(cc)
		err = errors.Join(err, r.closeIn(c))
	}
	if err := errors.Join(err, setUnixOptions(s, acc)); err != nil {
		return 0, err
	}
	r.unixState().filled[acc.Inode] = true
	if u == client {
		return c, nil
	}
	fd, err := r.install(s)
	if err != nil {
		return 0, err
	}
	if client != nil {
		err = r.closeIn(c)
	}
	return fd, err
}

// unixFills sends the queues of the datagram sockets that others send to,
// once the socket and every sender of its queue exist.
//
// Precondition: called on the Tracer thread.
func (r *restorer) unixFills() error {
	st := r.unixState()
	inodes := make([]uint64, 0, len(st.socks))
	for ino := range st.socks {
		inodes = append(inodes, ino)
	}
	slices.Sort(inodes)
	for _, ino := range inodes {
		u := st.socks[ino]
		if st.filled[ino] {
			continue
		}
		dst, ok := r.shared.get(unixKey(ino))
		if !ok {
			continue
		}
		ready := true
		for _, m := range u.Queue {
			if m.SenderInode != 0 {
				_, made := r.shared.get(unixKey(m.SenderInode))
				ready = ready && made
			}
		}
		if !ready {
			continue
		}
		st.filled[ino] = true
		if err := r.fillUnix(u, dst); err != nil {
			return fmt.Errorf("%s: %w", unixDesc(u), err)
		}
	}
	return nil
}

// fillUnix sends the messages queued in u again. from is the socket that
// sends those planned to come from u's peer (SenderInode 0) when u is
// made with its peer; for a socket made alone it is u itself, and they
// come from a temporary unnamed socket connected to u's name.
//
// Precondition: called on the Tracer thread.
func (r *restorer) fillUnix(u *imagepb.UnixSocket, from int) error {
	if len(u.Queue) == 0 {
		return nil
	}
	plan, _ := planUnix(u, r.unixState().socks)
	alone := plan == planSingle
	temp := -1
	defer func() {
		if temp >= 0 {
			_ = sys.Close(temp)
		}
	}()
	for i := 0; i < len(u.Queue); {
		// A run of messages from one sender.
		j := i + 1
		for j < len(u.Queue) && u.Queue[j].SenderInode == u.Queue[i].SenderInode {
			j++
		}
		sender := from
		switch {
		case u.Queue[i].SenderInode != 0:
			var ok bool
			if sender, ok = r.shared.get(unixKey(u.Queue[i].SenderInode)); !ok {
				return fmt.Errorf("the sender socket:[%d] of its datagrams was not made", u.Queue[i].SenderInode)
			}
		case alone:
			if temp < 0 {
				var err error
				if temp, err = r.tempSender(u); err != nil {
					return err
				}
			}
			sender = temp
		}
		if err := sendUnixQueue(sender, u.Type, u.Queue[i:j]); err != nil {
			return fmt.Errorf("send its %d queued messages again: %w", len(u.Queue), err)
		}
		i = j
	}
	return nil
}

// tempSender returns phaul's copy of a new unnamed datagram socket
// connected to u, made in the process (its namespace resolves u's name).
//
// Precondition: called on the Tracer thread.
func (r *restorer) tempSender(u *imagepb.UnixSocket) (int, error) {
	t, err := r.unixSocketIn(sys.SOCK_DGRAM)
	if err != nil {
		return -1, err
	}
	err = r.connectUnix(t, u.Name)
	var cp int
	if err == nil {
		cp, err = sys.CopyFD(r.pid, int(t))
	}
	if cerr := r.closeIn(t); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return -1, fmt.Errorf("temporary sender: %w", err)
	}
	return cp, nil
}

// sendUnixQueue sends msgs on the connected socket from, each with the
// credentials it carried. The send buffer is widened meanwhile, so that
// the whole queue fits whatever the sender's own limit, and an unnamed
// sender does not take a name (SO_PASSCRED autobinds one on send).
func sendUnixQueue(from int, typ uint32, msgs []*imagepb.UnixMessage) error {
	total := 0
	for _, m := range msgs {
		total += len(m.Data)
	}
	sndbuf, err := sys.GetsockoptInt(from, sys.SOL_SOCKET, sys.SO_SNDBUF)
	if err != nil {
		return err
	}
	if want := 2*total + 4096*len(msgs) + 65536; want > sndbuf {
		if err := sys.SetsockoptInt(from, sys.SOL_SOCKET, sys.SO_SNDBUFFORCE, want/2); err != nil {
			return fmt.Errorf("widen the send buffer: %w", err)
		}
		defer sys.SetsockoptInt(from, sys.SOL_SOCKET, sys.SO_SNDBUFFORCE, sndbuf/2)
	}
	name, err := sys.GetsocknameUnix(from)
	if err != nil {
		return err
	}
	if len(name) == 0 {
		for _, opt := range []int{sys.SO_PASSCRED, sys.SO_PASSPIDFD} {
			if v, err := sys.GetsockoptInt(from, sys.SOL_SOCKET, opt); err == nil && v != 0 {
				if err := sys.SetsockoptInt(from, sys.SOL_SOCKET, opt, 0); err != nil {
					return err
				}
				defer sys.SetsockoptInt(from, sys.SOL_SOCKET, opt, v)
			}
		}
	}
	for _, m := range msgs {
		var creds *sys.Ucred
		if m.HasCreds {
			creds = &sys.Ucred{Pid: m.Pid, Uid: m.Uid, Gid: m.Gid}
		}
		data := m.Data
		for {
			n, err := sys.SendUnix(from, data, creds, sys.MSG_DONTWAIT|sys.MSG_NOSIGNAL)
			if err != nil {
				return err
			}
			if typ != sys.SOCK_STREAM {
				if n != len(data) {
					return fmt.Errorf("sent %d of a %d-byte message", n, len(data))
				}
				break
			}
			if data = data[n:]; len(data) == 0 {
				break
			}
		}
	}
	return nil
}

// shutdownUnix shuts down what sk_shutdown says of a socket.
func shutdownUnix(sk int, bits uint32) error {
	how := -1
	switch bits & (rcvShutdown | sendShutdown) {
	case rcvShutdown:
		how = sys.SHUT_RD
	case sendShutdown:
		how = sys.SHUT_WR
	case rcvShutdown | sendShutdown:
		how = sys.SHUT_RDWR
	}
	if how < 0 {
		return nil
	}
	return sys.Shutdown(sk, how)
}

// setUnixOptions gives socket sk u's options, the ones that change how it
// sends last.
func setUnixOptions(sk int, u *imagepb.UnixSocket) error {
	set := func(opt, v int) error { return sys.SetsockoptInt(sk, sys.SOL_SOCKET, opt, v) }
	for _, b := range []struct {
		get, force int
		want       uint32
	}{{sys.SO_SNDBUF, sys.SO_SNDBUFFORCE, u.Sndbuf}, {sys.SO_RCVBUF, sys.SO_RCVBUFFORCE, u.Rcvbuf}} {
		if b.want == 0 {
			continue
		}
		cur, err := sys.GetsockoptInt(sk, sys.SOL_SOCKET, b.get)
		if err != nil {
			return err
		}
		if uint32(cur) != b.want {
			// The kernel keeps twice the value it is given.
			if err := set(b.force, int(b.want/2)); err != nil {
				return fmt.Errorf("buffer size %d: %w", b.want, err)
			}
		}
	}
	if u.RcvtimeoUs != 0 {
		if err := sys.SetsockoptTimeval(sk, sys.SO_RCVTIMEO, u.RcvtimeoUs); err != nil {
			return err
		}
	}
	if u.SndtimeoUs != 0 {
		if err := sys.SetsockoptTimeval(sk, sys.SO_SNDTIMEO, u.SndtimeoUs); err != nil {
			return err
		}
	}
	if u.PeekOff >= 0 {
		if err := set(sys.SO_PEEK_OFF, int(u.PeekOff)); err != nil {
			return fmt.Errorf("peek offset: %w", err)
		}
	}
	if u.Passcred {
		if err := set(sys.SO_PASSCRED, 1); err != nil {
			return err
		}
	}
	if u.Passpidfd {
		if err := set(sys.SO_PASSPIDFD, 1); err != nil {
			return err
		}
	}
	return nil
}

// unixSocketIn makes a unix socket of type typ in the process.
//
// Precondition: called on the Tracer thread.
func (r *restorer) unixSocketIn(typ uint32) (uint64, error) {
	fd, err := r.main.Syscall(sys.SYS_SOCKET, sys.AF_UNIX, uint64(typ)|sys.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket(AF_UNIX, %s): %w", unixTypeName(typ), err)
	}
	return fd, nil
}

// socketpairIn makes a pair of connected unix sockets in the process.
//
// Precondition: called on the Tracer thread.
func (r *restorer) socketpairIn(typ uint32) (uint64, uint64, error) {
	at := r.scratch + 256
	if _, err := r.main.Syscall(sys.SYS_SOCKETPAIR, sys.AF_UNIX, uint64(typ)|sys.SOCK_CLOEXEC, 0, at); err != nil {
		return 0, 0, fmt.Errorf("socketpair(AF_UNIX, %s): %w", unixTypeName(typ), err)
	}
	b := make([]byte, 8)
	if err := r.main.ReadMemory(at, b); err != nil {
		return 0, 0, err
	}
	return uint64(binary.LittleEndian.Uint32(b)), uint64(binary.LittleEndian.Uint32(b[4:])), nil
}

// closeIn closes descriptor fd of the process.
//
// Precondition: called on the Tracer thread.
func (r *restorer) closeIn(fd uint64) error {
	if _, err := r.main.Syscall(sys.SYS_CLOSE, fd); err != nil {
		return fmt.Errorf("close %d: %w", fd, err)
	}
	return nil
}

// sockaddrIn writes a sockaddr_un of name into the process's scratch
// area and returns its length.
//
// Precondition: called on the Tracer thread.
func (r *restorer) sockaddrIn(name []byte) (uint64, error) {
	sa, n, err := sys.UnixSockaddr(name)
	if err != nil {
		return 0, fmt.Errorf("%w: socket name of %d bytes", ErrBadImage, len(name))
	}
	return n, r.main.WriteMemory(r.scratch, sa)
}

// connectUnix connects the process's socket fd to name.
//
// Precondition: called on the Tracer thread.
func (r *restorer) connectUnix(fd uint64, name []byte) error {
	n, err := r.sockaddrIn(name)
	if err != nil {
		return err
	}
	if _, err := r.main.Syscall(sys.SYS_CONNECT, fd, r.scratch, n); err != nil {
		return fmt.Errorf("connect to %s: %w", unixNameString(name), err)
	}
	return nil
}

// bindUnix binds the process's socket fd to u's name, if it has one. A
// stale socket file at a path name is removed first; the new one gets
// the old one's mode and owner.
//
// Precondition: called on the Tracer thread.
func (r *restorer) bindUnix(fd uint64, u *imagepb.UnixSocket) error {
	if len(u.Name) == 0 {
		return nil
	}
	path := u.Name[0] != 0
	if path {
		if err := r.removeStaleSocket(string(u.Name)); err != nil {
			return err
		}
	}
	n, err := r.sockaddrIn(u.Name)
	if err != nil {
		return err
	}
	if _, err := r.main.Syscall(sys.SYS_BIND, fd, r.scratch, n); err != nil {
		return fmt.Errorf("bind to %s: %w", unixNameString(u.Name), err)
	}
	if path {
		p := procPath(r.pid, string(u.Name))
		if err := os.Lchown(p, int(u.FileUid), int(u.FileGid)); err != nil {
			return fmt.Errorf("owner of the socket file: %w", err)
		}
		if err := os.Chmod(p, os.FileMode(u.FileMode&0o777)); err != nil {
			return fmt.Errorf("mode of the socket file: %w", err)
		}
	}
	return nil
}

// removeStaleSocket removes the socket file at name (as the process
// resolves it) when no socket of the process's network namespace is
// bound to it: what a killed process leaves behind. Anything else there
// is left for bind to report.
func (r *restorer) removeStaleSocket(name string) error {
	p := procPath(r.pid, name)
	fi, err := os.Lstat(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket (%s)", name, fi.Mode().Type())
	}
	st := fi.Sys().(*syscall.Stat_t)
	c, err := openDiag(r.pid)
	if err != nil {
		return err
	}
	defer c.close()
	all, err := c.all()
	if err != nil {
		return err
	}
	for _, s := range all {
		if s.hasVFS && uint64(s.vfsIno) == st.Ino && sys.KernelDev(s.vfsDev) == st.Dev {
			return fmt.Errorf("%s is bound by socket:[%d], which is in use", name, s.inode)
		}
	}
	if err := os.Remove(p); err != nil {
		return fmt.Errorf("remove the stale socket file: %w", err)
	}
	r.log.Debug("removed a stale socket file", "path", name, "inode", st.Ino)
	return nil
}
