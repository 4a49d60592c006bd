package netsock

import (
	"errors"
	"fmt"
	"net/netip"
	"os"

	"github.com/phaul/phaul/internal/sys"
)

// Options are the caller's choices for Dump.
type Options struct {
	// TCPEstablished allows established TCP connections to be dumped (and
	// left in repair mode). Without it they are refused with
	// ErrEstablishedNotAllowed.
	TCPEstablished bool
}

// Dump reads the state of the socket f refers to. f may be a descriptor
// shared with a frozen process (pidfd_getfd): its file flags are not
// touched. An established connection is left in repair mode (see the
// package documentation): close it to drop it silently, or call Resume to
// give it back to the process. On error the socket is left as it was.
func Dump(f *os.File, opt Options) (*State, error) {
	var st *State
	err := control(f, func(fd int) (err error) {
		st, err = dump(fd, opt)
		return err
	})
	return st, err
}

// Resume gives a dumped socket back to its process after a failed
// migration: an established connection leaves repair mode (the kernel
// sends a window probe, which makes the peer retransmit what the network
// lock dropped) and gets SO_REUSEADDR back. Other sockets are untouched.
func Resume(f *os.File, st *State) error {
	if st.Repair == nil {
		return nil
	}
	return control(f, func(fd int) error {
		return leaveRepair(fd, st.Opts.ReuseAddr, sys.TCP_REPAIR_OFF)
	})
}

// control runs fn on f's descriptor without changing its blocking mode
// (os.File.Fd would).
func control(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

func leaveRepair(fd int, reuseAddr bool, how int) error {
	if err := sys.SetsockoptInt(fd, sys.SOL_TCP, sys.TCP_REPAIR, how); err != nil {
		return fmt.Errorf("leave TCP repair mode: %w", err)
	}
	// Leaving repair mode sets sk_reuse to "no reuse".
	if reuseAddr {
		if err := sys.SetsockoptInt(fd, sys.SOL_SOCKET, sys.SO_REUSEADDR, 1); err != nil {
			return fmt.Errorf("set SO_REUSEADDR again after repair mode: %w", err)
		}
	}
	return nil
}

func dump(fd int, opt Options) (*State, error) {
	domain, err := sys.GetsockoptInt(fd, sys.SOL_SOCKET, sys.SO_DOMAIN)
	if err != nil {
		return nil, fmt.Errorf("socket domain: %w", err)
	}
	if domain != sys.AF_INET && domain != sys.AF_INET6 {
		name := fmt.Sprintf("family %d", domain)
		if domain == sys.AF_UNIX {
			name = "unix"
		}
		return nil, &RefusedError{Socket: name + " socket", Reason: "not an IPv4 or IPv6 socket"}
	}
	typ, err := sys.GetsockoptInt(fd, sys.SOL_SOCKET, sys.SO_TYPE)
	if err != nil {
		return nil, fmt.Errorf("socket type: %w", err)
	}
	proto, err := sys.GetsockoptInt(fd, sys.SOL_SOCKET, sys.SO_PROTOCOL)
	if err != nil {
		return nil, fmt.Errorf("socket protocol: %w", err)
	}
	st := &State{Family: Family(domain), Proto: Proto(proto)}
	switch {
	case typ == sys.SOCK_STREAM && (proto == sys.IPPROTO_TCP || proto == sys.IPPROTO_MPTCP):
	case typ == sys.SOCK_DGRAM && proto == sys.IPPROTO_UDP:
	default:
		return nil, &RefusedError{
			Socket: fmt.Sprintf("%v socket of type %d, protocol %d", st.Family, typ, proto),
			Reason: "only TCP (and MPTCP listeners) and UDP sockets can be migrated",
		}
	}
	if st.Local, err = sys.GetsocknameInet(fd); err != nil {
		return nil, err
	}
	if st.Peer, err = sys.GetpeernameInet(fd); err != nil && !errors.Is(err, sys.ENOTCONN) {
		return nil, err
	}
	if st.UID, err = sys.FdOwner(fd); err != nil {
		return nil, err
	}
	name := describe(st.Proto, st.Local, st.Peer)
	// Options first: repair mode changes what SO_REUSEADDR reports.
	if st.Opts, err = readOpts(fd, st.Family, st.Proto); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if st.Proto == UDP {
		n, err := sys.IoctlSocketInt(fd, sys.SIOCINQ)
		if err != nil {
			return nil, fmt.Errorf("%s: receive queue: %w", name, err)
		}
		st.RecvQueueDropped = n > 0
		return st, nil
	}
	info, err := sys.GetTCPInfo(fd)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	st.TCPState = TCPState(info.State)
	refuse := func(reason string, e error) error {
		return &RefusedError{Socket: name, State: st.TCPState, Reason: reason, Err: e}
	}
	switch st.TCPState {
	case Listen:
		if info.Unacked > 0 {
			return nil, refuse(fmt.Sprintf("%d connection(s) wait in the accept queue and cannot be carried over; accept them first", info.Unacked), ErrPendingConnections)
		}
		st.Backlog = int(info.Sacked)
		return st, nil
	case Close:
		st.Peer = netip.AddrPort{}
		return st, nil
	case Established:
		if st.Proto == MPTCP {
			return nil, refuse("the kernel does not repair MPTCP connections (TCP_REPAIR); only MPTCP listeners can be migrated", nil)
		}
		if !opt.TCPEstablished {
			return nil, refuse("established connections migrate only when allowed (--tcp-established)", ErrEstablishedNotAllowed)
		}
		if err := dumpRepair(fd, st); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		return st, nil
	}
	return nil, refuse(stateReason(st.TCPState), nil)
}

// stateReason says why a TCP state cannot be migrated.
func stateReason(s TCPState) string {
	switch s {
	case SynSent:
		return "a connect is still in progress; only established connections can be migrated"
	case SynRecv, NewSynRecv:
		return "the handshake is not complete"
	case FinWait1, FinWait2, Closing:
		return "the process shut down its side of the connection (FIN sent); closing connections cannot be restored yet"
	case CloseWait, LastAck:
		return "the peer closed its side of the connection (FIN received); restoring that needs a FIN injected into the new socket, which phaul does not do yet"
	case TimeWait:
		return "the connection is closed"
	}
	return "unknown TCP state"
}

// dumpRepair reads an established connection in repair mode and leaves
// the socket in repair mode, unless it fails.
func dumpRepair(fd int, st *State) (err error) {
	if err := sys.SetsockoptInt(fd, sys.SOL_TCP, sys.TCP_REPAIR, sys.TCP_REPAIR_ON); err != nil {
		if errors.Is(err, sys.EPERM) {
			return fmt.Errorf("enter TCP repair mode (needs CAP_NET_ADMIN in the socket's network namespace): %w", err)
		}
		return fmt.Errorf("enter TCP repair mode: %w", err)
	}
	defer func() {
		if err != nil {
			_ = sys.SetsockoptInt(fd, sys.SOL_TCP, sys.TCP_REPAIR_QUEUE, sys.TCP_NO_QUEUE)
			_ = leaveRepair(fd, st.Opts.ReuseAddr, sys.TCP_REPAIR_OFF_NO_WP)
		}
	}()
	// The state again, now that nothing is sent: the caller holds the
	// network lock, so nothing arrives either.
	info, err := sys.GetTCPInfo(fd)
	if err != nil {
		return err
	}
	if TCPState(info.State) != Established {
		st.TCPState = TCPState(info.State)
		return &RefusedError{Socket: describe(st.Proto, st.Local, st.Peer), State: st.TCPState, Reason: stateReason(st.TCPState)}
	}
	r := &TCPRepair{
		WscaleOK:     info.Options&sys.TCPI_OPT_WSCALE != 0,
		SackOK:       info.Options&sys.TCPI_OPT_SACK != 0,
		TimestampsOK: info.Options&sys.TCPI_OPT_TIMESTAMPS != 0,
	}
	if r.WscaleOK {
		r.SndWscale, r.RcvWscale = info.SndWscale, info.RcvWscale
	}
	// In repair mode TCP_MAXSEG reports the MSS clamp negotiated at the
	// handshake.
	mss, err := sys.GetsockoptInt(fd, sys.SOL_TCP, sys.TCP_MAXSEG)
	if err != nil {
		return fmt.Errorf("MSS: %w", err)
	}
	r.MSS = uint32(mss)
	if r.TimestampsOK {
		ts, err := sys.GetsockoptInt(fd, sys.SOL_TCP, sys.TCP_TIMESTAMP)
		if err != nil {
			return fmt.Errorf("timestamp: %w", err)
		}
		r.Timestamp = uint32(ts)
	}
	w, err := sys.GetTCPRepairWindow(fd)
	if err != nil {
		return err
	}
	r.Window = Window(w)

	// Send queue: write_seq, then the bytes from snd_una on.
	if err := sys.SetsockoptInt(fd, sys.SOL_TCP, sys.TCP_REPAIR_QUEUE, sys.TCP_SEND_QUEUE); err != nil {
		return err
	}
	seq, err := sys.GetsockoptInt(fd, sys.SOL_TCP, sys.TCP_QUEUE_SEQ)
	if err != nil {
		return fmt.Errorf("send sequence: %w", err)
	}
	r.SendSeq = uint32(seq)
	outq, err := sys.IoctlSocketInt(fd, sys.SIOCOUTQ)
	if err != nil {
		return fmt.Errorf("send queue length: %w", err)
	}
	unsent, err := sys.IoctlSocketInt(fd, sys.SIOCOUTQNSD)
	if err != nil {
		return fmt.Errorf("unsent length: %w", err)
	}
	if r.SendQueue, err = peek(fd, outq); err != nil {
		return fmt.Errorf("send queue: %w", err)
	}
	r.Unsent = unsent

	// Receive queue: rcv_nxt, then the unread bytes.
	if err := sys.SetsockoptInt(fd, sys.SOL_TCP, sys.TCP_REPAIR_QUEUE, sys.TCP_RECV_QUEUE); err != nil {
		return err
	}
	seq, err = sys.GetsockoptInt(fd, sys.SOL_TCP, sys.TCP_QUEUE_SEQ)
	if err != nil {
		return fmt.Errorf("receive sequence: %w", err)
	}
	r.RecvSeq = uint32(seq)
	inq, err := sys.IoctlSocketInt(fd, sys.SIOCINQ)
	if err != nil {
		return fmt.Errorf("receive queue length: %w", err)
	}
	if r.RecvQueue, err = peekRecv(fd, inq, st.Opts.PeekOff); err != nil {
		return fmt.Errorf("receive queue: %w", err)
	}
	if err := sys.SetsockoptInt(fd, sys.SOL_TCP, sys.TCP_REPAIR_QUEUE, sys.TCP_NO_QUEUE); err != nil {
		return err
	}
	if r.Unsent > len(r.SendQueue) {
		return fmt.Errorf("send queue: %d unsent bytes in a queue of %d", r.Unsent, len(r.SendQueue))
	}
	st.Repair = r
	return nil
}

// peek reads n bytes of the selected repair queue without consuming them.
func peek(fd, n int) ([]byte, error) {
	if n == 0 {
		return nil, nil
	}
	b := make([]byte, n)
	got, err := sys.Recv(fd, b, sys.MSG_PEEK|sys.MSG_DONTWAIT)
	if err != nil {
		return nil, err
	}
	if got != n {
		// Urgent data stops a peek at the mark.
		return nil, fmt.Errorf("peeked %d of %d queued bytes (urgent data?)", got, n)
	}
	return b, nil
}

// peekRecv peeks at the receive queue from its start: a peek starts at
// SO_PEEK_OFF when the process enabled it, and moves it on, so it is set
// to 0 for the peek and put back afterwards.
func peekRecv(fd, n, peekOff int) ([]byte, error) {
	if n == 0 || peekOff < 0 {
		return peek(fd, n)
	}
	if err := optPeekOff.set(fd, 0); err != nil {
		return nil, err
	}
	b, err := peek(fd, n)
	if serr := optPeekOff.set(fd, peekOff); serr != nil && err == nil {
		err = serr
	}
	return b, err
}

// Silence puts a connected TCP socket into repair mode, so that closing
// it (every descriptor of it) sends neither FIN nor RST: for discarding a
// restored connection when a migration is rolled back on the target,
// where the peer must go on talking to the original. Other sockets are
// left alone (a listener has nothing to send but RSTs to connections
// still in its accept queue).
func Silence(f *os.File) error {
	return control(f, func(fd int) error {
		proto, err := sys.GetsockoptInt(fd, sys.SOL_SOCKET, sys.SO_PROTOCOL)
		if err != nil {
			return err
		}
		if proto != sys.IPPROTO_TCP {
			return nil
		}
		info, err := sys.GetTCPInfo(fd)
		if err != nil {
			return err
		}
		if s := TCPState(info.State); s == Listen || s == Close {
			return nil
		}
		if err := sys.SetsockoptInt(fd, sys.SOL_TCP, sys.TCP_REPAIR, sys.TCP_REPAIR_ON); err != nil {
			return fmt.Errorf("enter TCP repair mode: %w", err)
		}
		return nil
	})
}
