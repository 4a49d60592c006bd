package netsock_test

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/netlock"
	"github.com/phaul/phaul/netsock"
)

// bulk is how many messages the server queues while its peer cannot ack:
// more than the initial congestion window lets out, so the send queue
// holds both sent-but-unacked and unsent bytes.
const bulk = 4096

// The IPv4 variant listens the Go way (MPTCP) and moves the address
// before the restore.
func TestMigrateEstablishedIPv4(t *testing.T) { testMigrate(t, false, false) }

// The IPv6 variant listens with plain TCP and restores the sockets before
// their address reaches the target, as a migration that moves the address
// last does.
func TestMigrateEstablishedIPv6(t *testing.T) { testMigrate(t, true, true) }

// testMigrate moves a listener and an established connection with data
// queued both ways from the source to the target, with the client
// connected throughout, and checks that both streams go on with every
// message received exactly once and in order.
func testMigrate(t *testing.T, v6, restoreBeforeMove bool) {
	e := newEnv(t, v6)
	addr := e.addr(7000)
	l := listenMPTCP(t, e.src, addr, !v6)
	s, c := dial(t, e.cli, l, addr)
	if err := s.SetWriteBuffer(1 << 20); err != nil {
		t.Fatal(err)
	}
	if err := s.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: 77 * time.Second, Interval: 11 * time.Second, Count: 5}); err != nil {
		t.Fatal(err)
	}

	// Live: 50 messages to the server stay unread in its receive queue.
	if err := writeMsgs(c, 0, 100); err != nil {
		t.Fatal(err)
	}
	if err := readMsgs(s, 0, 50, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := writeMsgs(s, 0, 100); err != nil {
		t.Fatal(err)
	}
	if err := readMsgs(c, 0, 100, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	waitInq(t, s, 50*msgLen)

	// The client loses everything for a while: the server's bytes leave
	// but are never acked (a send queue with sent-but-unacked bytes and,
	// past the congestion window, unsent ones); the client's own bytes
	// wait in its send queue.
	id := newID(t)
	lkCli, err := netlock.New(e.cliNS, id, netlock.Set{Conns: []netlock.Conn{
		{Proto: netlock.TCP, Local: c.LocalAddr().(*net.TCPAddr).AddrPort(), Remote: c.RemoteAddr().(*net.TCPAddr).AddrPort()},
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer lkCli.Unlock()
	if err := writeMsgs(s, 100, 100+bulk); err != nil {
		t.Fatal(err)
	}
	if err := writeMsgs(c, 100, 200); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)

	// The migration's lock on the source, from the freeze on, built
	// from descriptors that share the sockets' open file descriptions,
	// as pidfd_getfd gives them.
	sf, lf := fileOf(t, s), fileOf(t, l.(*net.TCPListener))
	var eps []netsock.Endpoint
	for _, f := range []*os.File{sf, lf} {
		ep, err := netsock.Addrs(f)
		if err != nil {
			t.Fatal(err)
		}
		eps = append(eps, ep)
	}
	set := netsock.LockSet(eps)
	if len(set.Conns) != 1 || len(set.Ports) != 1 {
		t.Fatalf("lock set %+v", set)
	}
	lkSrc, err := netlock.New(e.srcNS, id, set)
	if err != nil {
		t.Fatal(err)
	}
	defer lkSrc.Unlock()
	if err := lkCli.Unlock(); err != nil {
		t.Fatal(err)
	}

	// Freeze and dump.
	st, err := netsock.Dump(sf, netsock.Options{TCPEstablished: true})
	if err != nil {
		t.Fatal(err)
	}
	lst, err := netsock.Dump(lf, netsock.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r := st.Repair
	t.Logf("dumped %v: send queue %d bytes (%d unsent), receive queue %d, mss %d, wscale %d/%d, sack %v, ts %v, window %+v",
		st, len(r.SendQueue), r.Unsent, len(r.RecvQueue), r.MSS, r.SndWscale, r.RcvWscale, r.SackOK, r.TimestampsOK, r.Window)
	t.Logf("options %+v", st.Opts)
	if st.TCPState != netsock.Established || lst.TCPState != netsock.Listen {
		t.Fatalf("states %v, %v", st.TCPState, lst.TCPState)
	}
	if !bytes.Equal(r.RecvQueue, msgs(50, 100)) {
		t.Fatalf("receive queue: %d bytes, want messages 50..99", len(r.RecvQueue))
	}
	if !bytes.Equal(r.SendQueue, msgs(100, 100+bulk)) {
		t.Fatalf("send queue: %d bytes, want messages 100..%d", len(r.SendQueue), 100+bulk-1)
	}
	if r.Unsent == 0 || r.Unsent == len(r.SendQueue) {
		t.Errorf("unsent %d of %d: want both sent-but-unacked and unsent bytes", r.Unsent, len(r.SendQueue))
	}
	if wantProto := map[bool]netsock.Proto{false: netsock.MPTCP, true: netsock.TCP}[v6]; lst.Proto != wantProto && mptcpEnabled() {
		t.Errorf("listener protocol %v, want %v", lst.Proto, wantProto)
	}
	if lst.Backlog <= 0 {
		t.Errorf("listener backlog %d", lst.Backlog)
	}
	st, lst = viaImage(t, st), viaImage(t, lst)

	// The process's sockets go away in repair mode: the listener and the
	// connection (both descriptors of it).
	l.Close()
	s.Close()
	lf.Close()
	sf.Close()

	if !restoreBeforeMove {
		e.move(t)
	}
	lkTgt, err := netlock.New(e.tgtNS, id, netsock.LockSet([]netsock.Endpoint{st.Endpoint(), lst.Endpoint()}))
	if err != nil {
		t.Fatal(err)
	}
	defer lkTgt.Unlock()
	t0 := time.Now()
	rl, err := netsock.Restore(lst, netsock.RestoreOptions{NetNS: e.tgtNS})
	if err != nil {
		t.Fatal(err)
	}
	rs, err := netsock.Restore(st, netsock.RestoreOptions{NetNS: e.tgtNS})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("restored listener and connection in %v", time.Since(t0))
	// Options came along (checked here: net.FileConn resets keep-alive
	// to Go's defaults).
	if got := sockInt(t, rs, sys.SOL_TCP, sys.TCP_KEEPIDLE); got != 77 {
		t.Errorf("TCP_KEEPIDLE %d, want 77", got)
	}
	if got := sockInt(t, rs, sys.SOL_TCP, sys.TCP_KEEPCNT); got != 5 {
		t.Errorf("TCP_KEEPCNT %d, want 5", got)
	}
	if got := sockInt(t, rs, sys.SOL_SOCKET, sys.SO_REUSEADDR); got != 1 {
		t.Errorf("SO_REUSEADDR %d, want 1", got)
	}
	if got := sockInt(t, rs, sys.SOL_SOCKET, sys.SO_SNDBUF); got != st.Opts.SndBuf {
		t.Errorf("SO_SNDBUF %d, want %d", got, st.Opts.SndBuf)
	}
	if restoreBeforeMove {
		e.move(t)
	}
	if err := lkTgt.Unlock(); err != nil {
		t.Fatal(err)
	}
	if err := lkSrc.Unlock(); err != nil {
		t.Fatal(err)
	}

	ns, err := net.FileConn(rs)
	if err != nil {
		t.Fatal(err)
	}
	rs.Close()
	defer ns.Close()
	nl, err := net.FileListener(rl)
	if err != nil {
		t.Fatal(err)
	}
	rl.Close()
	defer nl.Close()

	// Both streams go on.
	errc := make(chan error, 2)
	go func() { errc <- writeMsgs(c, 200, 300) }()
	go func() { errc <- writeMsgs(ns, 100+bulk, 200+bulk) }()
	t0 = time.Now()
	if err := readMsgs(ns, 50, 300, 30*time.Second); err != nil {
		t.Fatalf("server after migration: %v", err)
	}
	if err := readMsgs(c, 100, 200+bulk, 30*time.Second); err != nil {
		t.Fatalf("client after migration: %v", err)
	}
	t.Logf("streams complete %v after the restore", time.Since(t0))
	for range 2 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	if err := noMore(ns); err != nil {
		t.Errorf("server: %v", err)
	}
	if err := noMore(c); err != nil {
		t.Errorf("client: %v", err)
	}
	// The restored listener takes new connections on the same port.
	s2, c2 := dial(t, e.cli, nl, addr)
	if err := writeMsgs(c2, 0, 10); err != nil {
		t.Fatal(err)
	}
	if err := readMsgs(s2, 0, 10, 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestDumpResumeKeepsConnection checks that a dump rolled back with Resume
// leaves the connection as it was: queues intact, SO_REUSEADDR, SO_PEEK_OFF
// and O_NONBLOCK kept, and both streams go on.
func TestDumpResumeKeepsConnection(t *testing.T) {
	e := newEnv(t, false)
	addr := e.addr(7010)
	l := listen(t, e.src, addr)
	s, c := dial(t, e.cli, l, addr)
	setSockInt(t, s, sys.SOL_SOCKET, sys.SO_PEEK_OFF, 3)
	flags := fileFlags(t, s)
	if flags&sys.O_NONBLOCK == 0 {
		t.Fatal("Go's socket is not non-blocking")
	}
	if err := writeMsgs(c, 0, 20); err != nil {
		t.Fatal(err)
	}
	waitInq(t, s, 20*msgLen)
	lk, err := netlock.New(e.srcNS, newID(t), netlock.Set{Conns: []netlock.Conn{
		{Proto: netlock.TCP, Local: s.LocalAddr().(*net.TCPAddr).AddrPort(), Remote: s.RemoteAddr().(*net.TCPAddr).AddrPort()},
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Unlock()
	if err := writeMsgs(s, 0, bulk); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)

	f := fileOf(t, s)
	st, err := netsock.Dump(f, netsock.Options{TCPEstablished: true})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(st.Repair.RecvQueue, msgs(0, 20)) {
		t.Errorf("receive queue: %d bytes, want messages 0..19 (SO_PEEK_OFF must not shift it)", len(st.Repair.RecvQueue))
	}
	if !bytes.Equal(st.Repair.SendQueue, msgs(0, bulk)) {
		t.Errorf("send queue: %d bytes, want messages 0..%d", len(st.Repair.SendQueue), bulk-1)
	}
	if st.Opts.PeekOff != 3 || !st.Opts.ReuseAddr {
		t.Errorf("options: peek_off %d reuseaddr %v", st.Opts.PeekOff, st.Opts.ReuseAddr)
	}
	if err := netsock.Resume(f, st); err != nil {
		t.Fatal(err)
	}
	if err := lk.Unlock(); err != nil {
		t.Fatal(err)
	}
	if got := fileFlags(t, s); got != flags {
		t.Errorf("file flags %#x after dump, were %#x", got, flags)
	}
	if got := sockInt(t, s, sys.SOL_SOCKET, sys.SO_REUSEADDR); got != 1 {
		t.Errorf("SO_REUSEADDR %d after Resume, want 1", got)
	}
	if got := sockInt(t, s, sys.SOL_SOCKET, sys.SO_PEEK_OFF); got != 3 {
		t.Errorf("SO_PEEK_OFF %d after Resume, want 3", got)
	}
	setSockInt(t, s, sys.SOL_SOCKET, sys.SO_PEEK_OFF, -1)
	if err := readMsgs(s, 0, 20, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := readMsgs(c, 0, bulk, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := writeMsgs(s, bulk, bulk+10); err != nil {
		t.Fatal(err)
	}
	if err := readMsgs(c, bulk, bulk+10, 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestRefusals checks that sockets netsock cannot carry are refused by
// name and left working.
func TestRefusals(t *testing.T) {
	e := newEnv(t, false)
	l := listen(t, e.src, e.addr(7020))
	check := func(name string, f interface {
		File() (*os.File, error)
	}, opt netsock.Options, want string, is ...error) {
		t.Helper()
		_, err := netsock.Dump(fileOf(t, f), opt)
		if err == nil {
			t.Errorf("%s: dumped", name)
			return
		}
		t.Logf("%s: %v", name, err)
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %q does not name %s", name, err, want)
		}
		for _, target := range append(is, netsock.ErrUnsupported) {
			if !errors.Is(err, target) {
				t.Errorf("%s: error does not match %v", name, target)
			}
		}
	}

	s, _ := dial(t, e.cli, l, e.addr(7020))
	check("established, not allowed", s, netsock.Options{}, "ESTABLISHED", netsock.ErrEstablishedNotAllowed)

	s, c := dial(t, e.cli, l, e.addr(7020))
	c.Close()
	waitState(t, s, netsock.CloseWait)
	check("peer closed", s, netsock.Options{TCPEstablished: true}, "CLOSE_WAIT")

	s, _ = dial(t, e.cli, l, e.addr(7020))
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	waitState(t, s, netsock.FinWait2)
	check("shut down for writing", s, netsock.Options{TCPEstablished: true}, "FIN_WAIT2")

	// A listener with a connection nobody accepted.
	pl := listen(t, e.src, e.addr(7021))
	if err := e.cli.Do(func() error {
		c, err := net.DialTimeout("tcp", e.addr(7021), 5*time.Second)
		if err == nil {
			t.Cleanup(func() { c.Close() })
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	check("listener with a pending connection", pl.(*net.TCPListener), netsock.Options{}, "accept queue", netsock.ErrPendingConnections)

	// A connect in progress: SYNs to an address nobody answers.
	var fd int
	if err := e.cli.Do(func() (err error) {
		fd, err = sys.Socket(sys.AF_INET, sys.SOCK_STREAM|sys.SOCK_NONBLOCK, 0)
		if err != nil {
			return err
		}
		err = sys.ConnectInet(fd, sys.AF_INET, netip.MustParseAddrPort(strings.TrimSuffix(e.n.FreeAddr(), ".200")+".250:9"))
		if errors.Is(err, syscall.EINPROGRESS) {
			err = nil
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	sf := os.NewFile(uintptr(fd), "syn-sent")
	t.Cleanup(func() { sf.Close() })
	check("connect in progress", fileConn{sf}, netsock.Options{TCPEstablished: true}, "SYN_SENT")

	// Not an inet socket.
	ul, err := net.Listen("unix", t.TempDir()+"/sock")
	if err != nil {
		t.Fatal(err)
	}
	defer ul.Close()
	check("unix socket", ul.(*net.UnixListener), netsock.Options{}, "unix")

	// Restore refuses states it cannot build.
	_, err = netsock.Restore(&netsock.State{Family: netsock.IPv4, Proto: netsock.TCP, TCPState: netsock.CloseWait}, netsock.RestoreOptions{NetNS: e.tgtNS})
	if !errors.Is(err, netsock.ErrUnsupported) || !strings.Contains(err.Error(), "CLOSE_WAIT") {
		t.Errorf("restore of CLOSE_WAIT: %v", err)
	}

	// The refused established connection still works.
	s, c = dial(t, e.cli, l, e.addr(7020))
	check("established, not allowed", s, netsock.Options{}, "ESTABLISHED")
	if err := writeMsgs(c, 0, 5); err != nil {
		t.Fatal(err)
	}
	if err := readMsgs(s, 0, 5, 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

// fileConn gives an *os.File the File method of net's types.
type fileConn struct{ f *os.File }

func (c fileConn) File() (*os.File, error) { return c.f, nil }

// waitState waits until the TCP connection c is in state want.
func waitState(t *testing.T, c *net.TCPConn, want netsock.TCPState) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		rc, err := c.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var info sys.TCPInfo
		if err := rc.Control(func(fd uintptr) { info, err = sys.GetTCPInfo(int(fd)) }); err != nil {
			t.Fatal(err)
		}
		if err != nil {
			t.Fatal(err)
		}
		if netsock.TCPState(info.State) == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("state %v, want %v", netsock.TCPState(info.State), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestCloseInRepairIsSilent checks that closing a dumped connection (every
// descriptor of it) sends neither FIN nor RST: without any lock, the
// client's end stays established and reads nothing, not even an EOF.
func TestCloseInRepairIsSilent(t *testing.T) {
	e := newEnv(t, false)
	l := listen(t, e.src, e.addr(7030))
	s, c := dial(t, e.cli, l, e.addr(7030))
	f := fileOf(t, s)
	if _, err := netsock.Dump(f, netsock.Options{TCPEstablished: true}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	f.Close()
	// The same with Silence, as a target rolling back does.
	s2, c2 := dial(t, e.cli, l, e.addr(7030))
	if err := writeMsgs(c2, 0, 10); err != nil {
		t.Fatal(err)
	}
	waitInq(t, s2, 10*msgLen) // unread data: a plain close would send RST
	f2 := fileOf(t, s2)
	if err := netsock.Silence(f2); err != nil {
		t.Fatal(err)
	}
	s2.Close()
	f2.Close()
	time.Sleep(300 * time.Millisecond)
	for _, c := range []*net.TCPConn{c, c2} {
		waitState(t, c, netsock.Established)
		if err := noMore(c); err != nil {
			t.Fatalf("client after the silent close: %v", err)
		}
	}
}

// TestMigrateUDP moves a bound and a connected UDP socket to the target.
func TestMigrateUDP(t *testing.T) {
	e := newEnv(t, false)
	var bound, conn *net.UDPConn
	peer := netip.MustParseAddrPort(e.cli.Addr + ":7301")
	if err := e.src.Do(func() (err error) {
		if bound, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(e.addr(7300)))); err != nil {
			return err
		}
		conn, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(e.addr(7302))), net.UDPAddrFromAddrPort(peer))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer bound.Close()
	defer conn.Close()
	var cu *net.UDPConn
	if err := e.cli.Do(func() (err error) {
		cu, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(peer))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer cu.Close()
	send := func(msg string) {
		t.Helper()
		if _, err := cu.WriteToUDPAddrPort([]byte(msg), netip.MustParseAddrPort(e.addr(7300))); err != nil {
			t.Fatal(err)
		}
	}
	send("queued")
	waitInq(t, bound, 1)

	bf, cf := fileOf(t, bound), fileOf(t, conn)
	var eps []netsock.Endpoint
	for _, f := range []*os.File{bf, cf} {
		ep, err := netsock.Addrs(f)
		if err != nil {
			t.Fatal(err)
		}
		eps = append(eps, ep)
	}
	set := netsock.LockSet(eps)
	if len(set.Conns) != 1 || len(set.Ports) != 1 {
		t.Fatalf("lock set %+v", set)
	}
	id := newID(t)
	lkSrc, err := netlock.New(e.srcNS, id, set)
	if err != nil {
		t.Fatal(err)
	}
	defer lkSrc.Unlock()
	bst, err := netsock.Dump(bf, netsock.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cst, err := netsock.Dump(cf, netsock.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("dumped %v (queue dropped: %v) and %v", bst, bst.RecvQueueDropped, cst)
	if bst.Proto != netsock.UDP || !bst.RecvQueueDropped || bst.Peer.IsValid() || bst.Local.String() != e.addr(7300) {
		t.Errorf("bound socket: %+v", bst)
	}
	if cst.Peer != peer || cst.Local.String() != e.addr(7302) || cst.RecvQueueDropped {
		t.Errorf("connected socket: %+v", cst)
	}
	bst, cst = viaImage(t, bst), viaImage(t, cst)
	bound.Close()
	conn.Close()
	bf.Close()
	cf.Close()

	e.move(t)
	lkTgt, err := netlock.New(e.tgtNS, id, set)
	if err != nil {
		t.Fatal(err)
	}
	defer lkTgt.Unlock()
	rb, err := netsock.Restore(bst, netsock.RestoreOptions{NetNS: e.tgtNS})
	if err != nil {
		t.Fatal(err)
	}
	rc, err := netsock.Restore(cst, netsock.RestoreOptions{NetNS: e.tgtNS})
	if err != nil {
		t.Fatal(err)
	}
	if err := lkTgt.Unlock(); err != nil {
		t.Fatal(err)
	}
	if err := lkSrc.Unlock(); err != nil {
		t.Fatal(err)
	}
	pb, err := net.FilePacketConn(rb)
	if err != nil {
		t.Fatal(err)
	}
	rb.Close()
	defer pb.Close()
	pc, err := net.FileConn(rc)
	if err != nil {
		t.Fatal(err)
	}
	rc.Close()
	defer pc.Close()

	// The bound socket receives on the target (the gratuitous ARP may
	// take a moment to arrive: send until something does).
	buf := make([]byte, 64)
	var got string
	for i := 0; i < 20 && got == ""; i++ {
		send("after")
		if err := pb.SetReadDeadline(time.Now().Add(200 * time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		if n, _, err := pb.ReadFrom(buf); err == nil {
			got = string(buf[:n])
		}
	}
	if got != "after" {
		t.Fatalf("restored bound socket received %q", got)
	}
	// The connected socket sends from its address to its peer.
	if _, err := pc.Write([]byte("from-target")); err != nil {
		t.Fatal(err)
	}
	if err := cu.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	for {
		n, from, err := cu.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatal(err)
		}
		if string(buf[:n]) == "from-target" {
			if from.String() != e.addr(7302) {
				t.Errorf("datagram from %v, want %s", from, e.addr(7302))
			}
			break
		}
	}
}

// TestListenerOptionsRoundTrip restores listeners from a chosen state and
// dumps them again: backlog and options survive, plain TCP and MPTCP.
func TestListenerOptionsRoundTrip(t *testing.T) {
	e := newEnv(t, false)
	for _, p := range []netsock.Proto{netsock.TCP, netsock.MPTCP} {
		want := &netsock.State{
			Family: netsock.IPv6, Proto: p, TCPState: netsock.Listen,
			Local:   netip.MustParseAddrPort("[::]:7400"),
			Backlog: 17,
			UID:     65534,
			Opts: netsock.SockOpts{
				ReuseAddr: true, V6Only: true, NoDelay: true, KeepAlive: true,
				KeepIdle: 99, KeepIntvl: 7, KeepCnt: 3, TTL: 33, UnicastHops: 12, TClass: 0x10,
				Mark: 7, RcvLowat: 10, PeekOff: -1, Congestion: "reno", DeferAccept: 3, FastOpen: 5, UserMSS: 1200,
				SndBuf: 65536, RcvBuf: 262144, LingerOn: true, LingerSeconds: 4,
			},
		}
		if p == netsock.MPTCP {
			// Options MPTCP does not pass to its subflows cannot be
			// set, nor are they reported by a dump of an MPTCP socket.
			w := &want.Opts
			w.TTL, w.UnicastHops, w.TClass, w.RcvLowat, w.UserMSS = 0, 0, 0, 0, 0
		}
		f, err := netsock.Restore(want, netsock.RestoreOptions{NetNS: e.tgtNS})
		if err != nil {
			t.Fatalf("%v: %v", p, err)
		}
		got, err := netsock.Dump(f, netsock.Options{})
		f.Close()
		if err != nil {
			t.Fatalf("%v: %v", p, err)
		}
		t.Logf("%v: %+v", got, got.Opts)
		if got.Backlog != want.Backlog || got.Local != want.Local || got.Proto != p || got.UID != want.UID {
			t.Errorf("%v: got %v backlog %d uid %d", p, got, got.Backlog, got.UID)
		}
		g, w := got.Opts, want.Opts
		if p == netsock.MPTCP {
			// MPTCP does not pass every option to its subflow, nor
			// report it: compare what both report.
			g.UserMSS, w.UserMSS = 0, 0
			g.FastOpen, w.FastOpen = 0, 0
			g.DeferAccept, w.DeferAccept = 0, 0
			g.RcvLowat, w.RcvLowat = 0, 0
			g.PeekOff, w.PeekOff = -1, -1
		}
		if g != w {
			t.Errorf("%v: options\n got %+v\nwant %+v", p, g, w)
		}
	}
}

// mptcpEnabled reports whether this kernel does MPTCP.
func mptcpEnabled() bool {
	b, err := os.ReadFile("/proc/sys/net/mptcp/enabled")
	return err == nil && strings.TrimSpace(string(b)) == "1"
}
