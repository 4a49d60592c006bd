package engine

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"syscall"
	"testing"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// diagAttr encodes one netlink attribute, padded to 4 bytes.
func diagAttr(typ uint16, v []byte) []byte {
	b := make([]byte, 4+len(v), (4+len(v)+3)&^3)
	binary.NativeEndian.PutUint16(b, uint16(4+len(v)))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[4:], v)
	return b[:cap(b)]
}

func u32s(vs ...uint32) []byte {
	b := make([]byte, 4*len(vs))
	for i, v := range vs {
		binary.NativeEndian.PutUint32(b[4*i:], v)
	}
	return b
}

func TestParseUnixDiag(t *testing.T) {
	head := []byte{sys.AF_UNIX, sys.SOCK_STREAM, unixListening, 0}
	head = append(head, u32s(4242, 1, 2)...)
	msg := append([]byte(nil), head...)
	msg = append(msg, diagAttr(sys.UNIX_DIAG_NAME, []byte("/run/x.sock\x00"))...)
	msg = append(msg, diagAttr(sys.UNIX_DIAG_VFS, u32s(77, 8<<20|3))...)
	msg = append(msg, diagAttr(sys.UNIX_DIAG_ICONS, u32s(10, 11, 12))...)
	msg = append(msg, diagAttr(sys.UNIX_DIAG_RQLEN, u32s(3, 128))...)
	msg = append(msg, diagAttr(sys.UNIX_DIAG_SHUTDOWN, []byte{2})...)
	msg = append(msg, diagAttr(99, []byte{1, 2, 3, 4, 5})...) // unknown: skipped
	d, err := parseUnixDiag(msg)
	if err != nil {
		t.Fatal(err)
	}
	if d.typ != sys.SOCK_STREAM || d.state != unixListening || d.inode != 4242 {
		t.Errorf("header: %+v", d)
	}
	if string(d.name) != "/run/x.sock" {
		t.Errorf("path name %q: the trailing NUL must go", d.name)
	}
	if !d.hasVFS || d.vfsIno != 77 || sys.KernelDev(d.vfsDev) != sys.KernelDev(8<<20|3) {
		t.Errorf("vfs: %+v", d)
	}
	if len(d.icons) != 3 || d.icons[2] != 12 || !d.hasRQLen || d.rqueue != 3 || d.wqueue != 128 || d.shutdown != 2 {
		t.Errorf("icons/rqlen/shutdown: %+v", d)
	}
	if d.hasPeer {
		t.Errorf("no peer attribute, yet hasPeer")
	}

	// An abstract name keeps its bytes, NULs included; a peer of 0 (a
	// closed peer) is still a peer.
	msg = append([]byte(nil), head...)
	msg[1], msg[2] = sys.SOCK_DGRAM, unixConnected
	msg = append(msg, diagAttr(sys.UNIX_DIAG_NAME, []byte("\x00ab\x00c"))...)
	msg = append(msg, diagAttr(sys.UNIX_DIAG_PEER, u32s(0))...)
	if d, err = parseUnixDiag(msg); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(d.name, []byte("\x00ab\x00c")) || !d.hasPeer || d.peer != 0 {
		t.Errorf("abstract name %q, peer %v %d", d.name, d.hasPeer, d.peer)
	}

	for name, bad := range map[string][]byte{
		"short header":    head[:10],
		"other family":    append([]byte{sys.AF_INET}, head[1:]...),
		"attribute past":  append(append([]byte(nil), head...), 40, 0, 0, 0, 1, 2),
		"short vfs":       append(append([]byte(nil), head...), diagAttr(sys.UNIX_DIAG_VFS, u32s(1))...),
		"short rqlen":     append(append([]byte(nil), head...), diagAttr(sys.UNIX_DIAG_RQLEN, []byte{1})...),
		"attribute < hdr": append(append([]byte(nil), head...), 2, 0, 0, 0),
	} {
		if _, err := parseUnixDiag(bad); err == nil {
			t.Errorf("%s: parsed", name)
		}
	}
}

func TestUnixDiagRequest(t *testing.T) {
	b := unixDiagRequest(99, sys.UDIAG_SHOW_NAME)
	if len(b) != sys.SizeofUnixDiagReq || b[0] != sys.AF_UNIX ||
		binary.NativeEndian.Uint32(b[8:]) != 99 || binary.NativeEndian.Uint32(b[12:]) != sys.UDIAG_SHOW_NAME ||
		binary.NativeEndian.Uint32(b[16:]) != ^uint32(0) {
		t.Errorf("request % x", b)
	}
}

func TestParseExtUnixSk(t *testing.T) {
	for in, want := range map[string]ExtUnixSk{
		"":        {All: true},
		"all":     {All: true},
		"12,34":   {Inodes: []uint64{12, 34}},
		" 5 , 6 ": {Inodes: []uint64{5, 6}},
	} {
		got, err := ParseExtUnixSk(in)
		if err != nil || got.All != want.All || fmt.Sprint(got.Inodes) != fmt.Sprint(want.Inodes) {
			t.Errorf("ParseExtUnixSk(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, bad := range []string{"x", "1,,2", "0", "-3"} {
		if _, err := ParseExtUnixSk(bad); err == nil {
			t.Errorf("ParseExtUnixSk(%q) accepted", bad)
		}
	}
	e := ExtUnixSk{Inodes: []uint64{7}}
	if !e.allows(7, 1) || !e.allows(1, 7) || e.allows(1, 2) || e.allows(1, 0) || (ExtUnixSk{}).allows(1, 2) {
		t.Error("allows")
	}
}

func TestPlanUnix(t *testing.T) {
	listener := &imagepb.UnixSocket{Inode: 1, Type: sys.SOCK_STREAM, State: unixListening, Name: []byte("/s")}
	accepted := &imagepb.UnixSocket{Inode: 2, Type: sys.SOCK_STREAM, State: unixConnected, Name: []byte("/s"),
		Connected: true, PeerInode: 3, ListenerInode: 1}
	client := &imagepb.UnixSocket{Inode: 3, Type: sys.SOCK_STREAM, State: unixConnected, Connected: true, PeerInode: 2}
	pairA := &imagepb.UnixSocket{Inode: 4, Type: sys.SOCK_DGRAM, Connected: true, PeerInode: 5}
	pairB := &imagepb.UnixSocket{Inode: 5, Type: sys.SOCK_DGRAM, Connected: true, PeerInode: 4}
	bound := &imagepb.UnixSocket{Inode: 6, Type: sys.SOCK_DGRAM, State: unixUnconnected, Name: []byte("\x00srv")}
	oneway := &imagepb.UnixSocket{Inode: 7, Type: sys.SOCK_DGRAM, Connected: true, PeerInode: 6}
	gone := &imagepb.UnixSocket{Inode: 8, Type: sys.SOCK_STREAM, Connected: true, PeerGone: true}
	orphan := &imagepb.UnixSocket{Inode: 9, Type: sys.SOCK_STREAM, Name: []byte("/s"), Connected: true, PeerGone: true, ListenerInode: 1}
	ext := &imagepb.UnixSocket{Inode: 10, Type: sys.SOCK_STREAM, Connected: true, PeerInode: 99, External: true, PeerName: []byte("/x")}
	socks := map[uint64]*imagepb.UnixSocket{}
	for _, u := range []*imagepb.UnixSocket{listener, accepted, client, pairA, pairB, bound, oneway, gone, orphan, ext} {
		socks[u.Inode] = u
	}
	for _, tc := range []struct {
		u       *imagepb.UnixSocket
		plan    unixPlan
		partner *imagepb.UnixSocket
	}{
		{listener, planSingle, nil},
		{accepted, planAccepted, client},
		{client, planAccepted, accepted},
		{pairA, planPair, pairB},
		{pairB, planPair, pairA},
		{bound, planSingle, nil},
		{oneway, planSingle, nil},
		{gone, planGone, nil},
		{orphan, planAccepted, nil},
		{ext, planSingle, nil},
	} {
		p, partner := planUnix(tc.u, socks)
		if p != tc.plan || partner != tc.partner {
			t.Errorf("socket %d: plan %d with %v, want %d with %v", tc.u.Inode, p, partner.GetInode(), tc.plan, tc.partner.GetInode())
		}
	}
}

func TestPlanSenders(t *testing.T) {
	d := &imagepb.UnixSocket{Inode: 1, Type: sys.SOCK_DGRAM, Name: []byte("\x00d"), Queue: []*imagepb.UnixMessage{
		{Data: []byte("a")}, {Data: []byte("b"), Sender: []byte("/c")}, {Data: []byte("c")},
	}}
	c := &imagepb.UnixSocket{Inode: 2, Type: sys.SOCK_DGRAM, Name: []byte("/c"), Connected: true, PeerInode: 1}
	socks := map[uint64]*imagepb.UnixSocket{1: d, 2: c}
	if err := planSenders(&dumpedUnix{u: d}, socks); err != nil {
		t.Fatal(err)
	}
	if got := []uint64{d.Queue[0].SenderInode, d.Queue[1].SenderInode, d.Queue[2].SenderInode}; fmt.Sprint(got) != "[0 2 0]" {
		t.Errorf("senders %v, want [0 2 0]", got)
	}
	// A named sender that is not connected to it cannot send again.
	c.Connected = false
	if err := planSenders(&dumpedUnix{u: d}, socks); !errors.Is(err, ErrUnsupported) {
		t.Errorf("sender not connected: %v", err)
	}
	// Nor can anyone send to an unnamed socket.
	d.Name = nil
	if err := planSenders(&dumpedUnix{u: d}, socks); !errors.Is(err, ErrUnsupported) {
		t.Errorf("unnamed receiver: %v", err)
	}
}

// diagOf asks sock_diag about socket fd of this process.
func diagOf(t *testing.T, fd int) *unixDiag {
	t.Helper()
	ino, err := sys.FdInode(fd)
	if err != nil {
		t.Fatal(err)
	}
	c, err := openDiag(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	d, err := c.socket(ino)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func socketpair(t *testing.T, typ int) (int, int) {
	t.Helper()
	a, b, err := sys.Socketpair(typ)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sys.Close(a); sys.Close(b) })
	return a, b
}

func send(t *testing.T, fd int, data []byte) {
	t.Helper()
	if n, err := sys.SendUnix(fd, data, nil, sys.MSG_DONTWAIT); err != nil || n != len(data) {
		t.Fatalf("send %d bytes: %d, %v", len(data), n, err)
	}
}

func TestSockDiagUnix(t *testing.T) {
	a, b := socketpair(t, sys.SOCK_STREAM)
	send(t, b, []byte("hello"))
	da, db := diagOf(t, a), diagOf(t, b)
	if !da.hasPeer || da.peer != db.inode || db.peer != da.inode {
		t.Errorf("socketpair peers: %d->%d, %d->%d", da.inode, da.peer, db.inode, db.peer)
	}
	if da.state != unixConnected || da.typ != sys.SOCK_STREAM || !da.hasRQLen || da.rqueue != 5 {
		t.Errorf("socket a: %+v", da)
	}

	// A listener bound to a path, with one connection not accepted yet.
	path := filepath.Join(t.TempDir(), "l.sock")
	l, err := sys.Socket(sys.AF_UNIX, sys.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close(l)
	if err := sys.BindUnix(l, []byte(path)); err != nil {
		t.Fatal(err)
	}
	if err := sys.SetsockoptInt(l, sys.SOL_SOCKET, sys.SO_PASSCRED, 0); err != nil {
		t.Fatal(err)
	}
	if err := sysListen(l, 7); err != nil {
		t.Fatal(err)
	}
	c, err := sys.Socket(sys.AF_UNIX, sys.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close(c)
	if err := sys.ConnectUnix(c, []byte(path)); err != nil {
		t.Fatal(err)
	}
	dl, dc := diagOf(t, l), diagOf(t, c)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(dl.name) != path || dl.state != unixListening || !dl.hasVFS || uint64(dl.vfsIno) != fileIno(fi) {
		t.Errorf("listener: %+v", dl)
	}
	if dl.wqueue != 7 || len(dl.icons) != 1 || dl.icons[0] != dc.inode {
		t.Errorf("listener backlog %d, pending %v; want 7 and [%d]", dl.wqueue, dl.icons, dc.inode)
	}
	if !dc.hasPeer || dc.peer != 0 {
		t.Errorf("a client not accepted yet has peer %v %d, want 0", dc.hasPeer, dc.peer)
	}
	if peer, err := sys.GetpeernameUnix(c); err != nil || string(peer) != path {
		t.Errorf("getpeername %q, %v", peer, err)
	}
}

func sysListen(fd, backlog int) error { return sys.Listen(fd, backlog) }

func fileIno(fi os.FileInfo) uint64 { return fi.Sys().(*syscall.Stat_t).Ino }

// peek peeks socket a's queue as a dump does.
func peek(t *testing.T, a int, typ uint32, passcred bool) ([]*imagepb.UnixMessage, error) {
	t.Helper()
	d := diagOf(t, a)
	u := &imagepb.UnixSocket{Type: typ, Shutdown: uint32(d.shutdown), Passcred: passcred}
	return peekUnixQueue(a, u, d.rqueue)
}

// drainUnix reads everything queued in a, one recv per message.
func drainUnix(t *testing.T, a int) [][]byte {
	t.Helper()
	var out [][]byte
	buf := make([]byte, 1<<20)
	for {
		n, _, _, _, err := sys.Recvmsg(a, buf, nil, sys.MSG_DONTWAIT)
		if errors.Is(err, sys.EAGAIN) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, append([]byte(nil), buf[:n]...))
	}
}

func TestPeekUnixQueue(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789abcdef"), 6000) // 96000 bytes: more than one peek buffer
	for _, tc := range []struct {
		name string
		typ  int
		msgs [][]byte
		want [][]byte // what a dump records
	}{
		{"stream", sys.SOCK_STREAM, [][]byte{[]byte("abc"), []byte("defg"), big}, [][]byte{append([]byte("abcdefg"), big...)}},
		{"dgram", sys.SOCK_DGRAM, [][]byte{[]byte("one"), {}, big[:70000], []byte("x")}, [][]byte{[]byte("one"), {}, big[:70000], []byte("x")}},
		{"seqpacket", sys.SOCK_SEQPACKET, [][]byte{[]byte("r1"), []byte("record two"), {}}, [][]byte{[]byte("r1"), []byte("record two"), {}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := socketpair(t, tc.typ)
			if err := sys.SetsockoptInt(b, sys.SOL_SOCKET, sys.SO_SNDBUFFORCE, 1<<20); err != nil {
				t.Fatal(err)
			}
			for _, m := range tc.msgs {
				send(t, b, m)
			}
			want := tc.want
			for round := 0; round < 2; round++ { // peeking again sees the same...
				got, err := peek(t, a, uint32(tc.typ), false)
				if err != nil {
					t.Fatal(err)
				}
				if len(got) != len(want) {
					t.Fatalf("round %d: %d messages, want %d", round, len(got), len(want))
				}
				for i := range got {
					if !bytes.Equal(got[i].Data, want[i]) || got[i].HasCreds {
						t.Errorf("round %d: message %d is %d bytes (creds %v), want %d", round, i, len(got[i].Data), got[i].HasCreds, len(want[i]))
					}
				}
				// ...but for empty datagrams: the kernel marks them peeked,
				// and a peek at an offset skips them from then on.
				var nonEmpty [][]byte
				for _, m := range want {
					if len(m) > 0 {
						nonEmpty = append(nonEmpty, m)
					}
				}
				want = nonEmpty
			}
			if off, err := sys.GetsockoptInt(a, sys.SOL_SOCKET, sys.SO_PEEK_OFF); err != nil || off != -1 {
				t.Errorf("peek offset %d, %v after the dump; want -1 as before", off, err)
			}
			// Nothing was consumed.
			var all []byte
			for _, m := range drainUnix(t, a) {
				all = append(all, m...)
			}
			var sent []byte
			for _, m := range tc.msgs {
				sent = append(sent, m...)
			}
			if !bytes.Equal(all, sent) {
				t.Errorf("the socket holds %d bytes after the peek, want %d", len(all), len(sent))
			}
		})
	}

	t.Run("seqpacket-eof", func(t *testing.T) {
		a, b := socketpair(t, sys.SOCK_SEQPACKET)
		send(t, b, []byte("last"))
		if err := sys.Shutdown(b, sys.SHUT_WR); err != nil {
			t.Fatal(err)
		}
		got, err := peek(t, a, sys.SOCK_SEQPACKET, false)
		if err != nil || len(got) != 1 || string(got[0].Data) != "last" {
			t.Fatalf("got %v, %v", got, err)
		}
	})

	t.Run("credentials", func(t *testing.T) {
		a, b := socketpair(t, sys.SOCK_STREAM)
		if err := sys.SetsockoptInt(a, sys.SOL_SOCKET, sys.SO_PASSCRED, 1); err != nil {
			t.Fatal(err)
		}
		send(t, b, []byte("mine"))
		other := &sys.Ucred{Pid: 1, Uid: 1234, Gid: 5678}
		if _, err := sys.SendUnix(b, []byte("theirs"), other, 0); err != nil {
			t.Skipf("sending another process's credentials: %v", err)
		}
		send(t, b, []byte("mine again"))
		got, err := peek(t, a, sys.SOCK_STREAM, true)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 3 || string(got[1].Data) != "theirs" || got[1].Pid != 1 || got[1].Uid != 1234 || got[1].Gid != 5678 ||
			!got[0].HasCreds || got[0].Pid != int32(os.Getpid()) {
			t.Errorf("runs by credentials: %v", got)
		}
	})

	t.Run("rights-refused", func(t *testing.T) {
		a, b := socketpair(t, sys.SOCK_DGRAM)
		send(t, b, []byte("plain"))
		if err := sendFD(b, a); err != nil {
			t.Fatal(err)
		}
		_, err := peek(t, a, sys.SOCK_DGRAM, false)
		if !errors.Is(err, ErrUnsupported) {
			t.Fatalf("SCM_RIGHTS in flight: %v, want ErrUnsupported", err)
		}
		if got := drainUnix(t, a); len(got) != 2 {
			t.Errorf("%d messages left after the refused peek, want 2", len(got))
		}
	})

	t.Run("oob-refused", func(t *testing.T) {
		a, b := socketpair(t, sys.SOCK_STREAM)
		send(t, b, []byte("data"))
		if _, err := sys.SendUnix(b, []byte("!"), nil, sys.MSG_OOB); err != nil {
			t.Skipf("MSG_OOB on unix sockets: %v", err)
		}
		if _, err := peek(t, a, sys.SOCK_STREAM, false); !errors.Is(err, ErrUnsupported) {
			t.Fatalf("out-of-band byte: %v, want ErrUnsupported", err)
		}
	})
}

// sendFD sends descriptor fd over socket s.
func sendFD(s, fd int) error { return sys.SendRights(s, []byte("fd"), fd) }

func TestSendUnixQueue(t *testing.T) {
	a, b := socketpair(t, sys.SOCK_DGRAM)
	// A small send buffer must not stop a queue from being sent again.
	if err := sys.SetsockoptInt(b, sys.SOL_SOCKET, sys.SO_SNDBUF, 4096); err != nil {
		t.Fatal(err)
	}
	before, _ := sys.GetsockoptInt(b, sys.SOL_SOCKET, sys.SO_SNDBUF)
	msgs := []*imagepb.UnixMessage{{Data: bytes.Repeat([]byte{1}, 30000)}, {Data: nil}, {Data: []byte("z")}}
	if err := sendUnixQueue(b, sys.SOCK_DGRAM, msgs); err != nil {
		t.Fatal(err)
	}
	if after, _ := sys.GetsockoptInt(b, sys.SOL_SOCKET, sys.SO_SNDBUF); after != before {
		t.Errorf("send buffer %d after, %d before", after, before)
	}
	got := drainUnix(t, a)
	if len(got) != 3 || len(got[0]) != 30000 || len(got[1]) != 0 || string(got[2]) != "z" {
		t.Errorf("received %d messages", len(got))
	}
	if name, _ := sys.GetsocknameUnix(b); len(name) != 0 {
		t.Errorf("the sender took the name %q", name)
	}
}

func TestUnixPending(t *testing.T) {
	mk := func(pending ...uint64) (*fileTable, *dumpedUnix, *dumpedUnix) {
		l := &dumpedUnix{pid: 1, fd: 3, u: &imagepb.UnixSocket{Inode: 10, Type: sys.SOCK_STREAM, State: unixListening, Name: []byte("/l"), Pending: pending}}
		c := &dumpedUnix{pid: 2, fd: 4, u: &imagepb.UnixSocket{Inode: 11, Type: sys.SOCK_STREAM, State: unixConnected, Connected: true}}
		ft := &fileTable{unixSockets: []*dumpedUnix{l, c}}
		return ft, l, c
	}
	byInode := func(ft *fileTable) map[uint64]*dumpedUnix {
		m := map[uint64]*dumpedUnix{}
		for _, d := range ft.unixSockets {
			m[d.u.Inode] = d
		}
		return m
	}
	ft, _, c0 := mk(11)
	if err := ft.unixPending(byInode(ft)); err != nil || c0.u.PendingOn != 10 {
		t.Fatalf("client in the table, nothing sent: %v, pending on %d", err, c0.u.PendingOn)
	}
	// A client outside the image is left out, and counted.
	ft, l, c := mk(98, 11, 99)
	if err := ft.unixPending(byInode(ft)); err != nil || c.u.PendingOn != 10 || fmt.Sprint(l.u.Pending) != "[11]" || l.u.PendingOutside != 2 {
		t.Fatalf("clients outside: %v; pending %v, %d outside", err, l.u.Pending, l.u.PendingOutside)
	}
	socks := map[uint64]*imagepb.UnixSocket{10: ft.unixSockets[0].u, 11: c.u}
	if p, partner := planUnix(c.u, socks); p != planSingle || partner != nil {
		t.Errorf("a pending client is made alone, got plan %d", p)
	}
	for name, tc := range map[string]struct {
		pending []uint64
		outq    uint32
		want    string
	}{
		"sent data": {[]uint64{11}, 768, "descriptor 4 of 2 .* whose data \\(768 bytes of buffer\\)"},
		"closed":    {[]uint64{0}, 0, "whose client closed it"},
	} {
		ft, _, c := mk(tc.pending...)
		c.outq = tc.outq
		err := ft.unixPending(byInode(ft))
		if !errors.Is(err, ErrUnsupported) || !regexp.MustCompile(tc.want).MatchString(err.Error()) {
			t.Errorf("%s: %v, want ErrUnsupported matching %q", name, err, tc.want)
		}
	}
}
