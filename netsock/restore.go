package netsock

import (
	"errors"
	"fmt"
	"os"

	"github.com/phaul/phaul/internal/sys"
)

// RestoreOptions are the caller's choices for Restore.
type RestoreOptions struct {
	// NetNS is the network namespace to create the socket in; nil means
	// the calling thread's. Only socket(2) runs there: everything else
	// is done on the socket, which stays in the namespace it was created
	// in whatever thread or process uses it later.
	NetNS *os.File
}

// queueSlack is added to buffer sizes while queues are refilled, for the
// kernel's per-packet overhead.
const queueSlack = 1 << 16

// Restore creates a socket with the state st in the network namespace of
// opt.NetNS and returns it, blocking and close-on-exec (file flags are
// the caller's to set), and owned by st.UID like the dumped one (socket(2)
// runs with that fsuid). An established connection is rebuilt in TCP
// repair mode; when Restore returns it is live: the sent-but-unacked
// bytes will be retransmitted by the kernel, and the unsent tail has been
// queued normally. Hold the connection's packets (netlock) until then.
func Restore(st *State, opt RestoreOptions) (*os.File, error) {
	if err := st.validate(); err != nil {
		return nil, err
	}
	typ := sys.SOCK_STREAM
	if st.Proto == UDP {
		typ = sys.SOCK_DGRAM
	}
	fd, err := socketIn(opt.NetNS, st.UID, int(st.Family), typ, int(st.Proto))
	if st.Proto == MPTCP && (errors.Is(err, sys.EPROTONOSUPPORT) || errors.Is(err, sys.ENOPROTOOPT) || errors.Is(err, sys.EINVAL)) {
		// MPTCP is off on this host (net.mptcp.enabled=0, or not built
		// in): a plain TCP listener serves the same peers, as Go's own
		// fallback does.
		fd, err = socketIn(opt.NetNS, st.UID, int(st.Family), typ, int(TCP))
	}
	if err != nil {
		return nil, fmt.Errorf("restore %v: %w", st, err)
	}
	if err := restore(fd, st); err != nil {
		_ = sys.Close(fd)
		return nil, fmt.Errorf("restore %v: %w", st, err)
	}
	return os.NewFile(uintptr(fd), "socket:"+st.Proto.String()), nil
}

func (st *State) validate() error {
	if st.Family != IPv4 && st.Family != IPv6 {
		return fmt.Errorf("restore socket: %v not supported", st.Family)
	}
	switch st.Proto {
	case UDP:
		return nil
	case TCP:
	case MPTCP:
		if st.TCPState == Listen || st.TCPState == Close {
			return nil
		}
		return &RefusedError{Socket: describe(st.Proto, st.Local, st.Peer), State: st.TCPState, Reason: "only MPTCP listeners and unconnected MPTCP sockets can be restored"}
	default:
		return fmt.Errorf("restore socket: %v not supported", st.Proto)
	}
	switch st.TCPState {
	case Listen, Close:
		return nil
	case Established:
		if st.Repair == nil || !st.Peer.IsValid() || !st.Local.IsValid() {
			return fmt.Errorf("restore %v: no repair state or addresses", st)
		}
		if st.Repair.Unsent < 0 || st.Repair.Unsent > len(st.Repair.SendQueue) {
			return fmt.Errorf("restore %v: %d unsent bytes in a send queue of %d", st, st.Repair.Unsent, len(st.Repair.SendQueue))
		}
		return nil
	}
	return &RefusedError{Socket: describe(st.Proto, st.Local, st.Peer), State: st.TCPState, Reason: stateReason(st.TCPState)}
}

func restore(fd int, st *State) error {
	have, err := readOpts(fd, st.Family, st.Proto)
	if err != nil {
		return err
	}
	if st.TCPState == Established {
		return restoreEstablished(fd, st, have)
	}
	if err := setPreBind(fd, st, have); err != nil {
		return err
	}
	if err := setBuffersIf(fd, st.Opts, have); err != nil {
		return err
	}
	// SO_REUSEADDR goes before bind: the port may still be held here by
	// connections of the original in TIME_WAIT (it was killed on this
	// host), which inherited the option and let a socket with it bind.
	if st.Opts.ReuseAddr && !have.ReuseAddr {
		if err := optReuseAddr.set(fd, 1); err != nil {
			return err
		}
		have.ReuseAddr = true
	}
	if err := withTransparent(fd, st, func() error {
		if bound(st) {
			if err := sys.BindInet(fd, int(st.Family), st.Local); err != nil {
				return err
			}
		}
		if st.Proto == UDP && st.Peer.IsValid() {
			return sys.ConnectInet(fd, int(st.Family), st.Peer)
		}
		return nil
	}); err != nil {
		return err
	}
	if st.TCPState == Listen {
		if err := sys.Listen(fd, st.Backlog); err != nil {
			return err
		}
	}
	return setPost(fd, st, have)
}

func restoreEstablished(fd int, st *State, have SockOpts) error {
	r := st.Repair
	if err := sys.SetsockoptInt(fd, sys.SOL_TCP, sys.TCP_REPAIR, sys.TCP_REPAIR_ON); err != nil {
		return fmt.Errorf("enter TCP repair mode: %w", err)
	}
	if err := setPreBind(fd, st, have); err != nil {
		return err
	}
	// The queues must fit in the buffers while they are refilled.
	snd := max(st.Opts.SndBuf, 2*len(r.SendQueue)+queueSlack)
	rcv := max(st.Opts.RcvBuf, 2*len(r.RecvQueue)+queueSlack)
	if err := setBuffers(fd, snd, rcv); err != nil {
		return err
	}
	setq := func(q int) error {
		return sys.SetsockoptInt(fd, sys.SOL_TCP, sys.TCP_REPAIR_QUEUE, q)
	}
	// Sequence numbers of the queues' first bytes: the queues' contents
	// are added below, after connect.
	if err := setq(sys.TCP_SEND_QUEUE); err != nil {
		return err
	}
	if err := optQueueSeq.set(fd, int(int32(r.SendSeq-uint32(len(r.SendQueue))))); err != nil {
		return err
	}
	if err := setq(sys.TCP_RECV_QUEUE); err != nil {
		return err
	}
	if err := optQueueSeq.set(fd, int(int32(r.RecvSeq-uint32(len(r.RecvQueue))))); err != nil {
		return err
	}
	// In repair mode connect only sets the state: no SYN is sent.
	if err := withTransparent(fd, st, func() error {
		if err := sys.BindInet(fd, int(st.Family), st.Local); err != nil {
			return err
		}
		return sys.ConnectInet(fd, int(st.Family), st.Peer)
	}); err != nil {
		return err
	}
	opts := []sys.TCPRepairOpt{{Code: sys.TCPOPT_MAXSEG, Val: r.MSS}}
	if r.WscaleOK {
		opts = append(opts, sys.TCPRepairOpt{Code: sys.TCPOPT_WINDOW, Val: uint32(r.SndWscale) | uint32(r.RcvWscale)<<16})
	}
	if r.SackOK {
		opts = append(opts, sys.TCPRepairOpt{Code: sys.TCPOPT_SACK_PERMITTED})
	}
	if r.TimestampsOK {
		opts = append(opts, sys.TCPRepairOpt{Code: sys.TCPOPT_TIMESTAMP})
	}
	if err := sys.SetTCPRepairOptions(fd, opts); err != nil {
		return err
	}
	if r.TimestampsOK {
		if err := optTimestamp.set(fd, int(int32(r.Timestamp))); err != nil {
			return err
		}
	}
	if err := setq(sys.TCP_RECV_QUEUE); err != nil {
		return err
	}
	if err := sendAll(fd, r.RecvQueue); err != nil {
		return fmt.Errorf("refill receive queue: %w", err)
	}
	sent := len(r.SendQueue) - r.Unsent
	if err := setq(sys.TCP_SEND_QUEUE); err != nil {
		return err
	}
	if err := sendAll(fd, r.SendQueue[:sent]); err != nil {
		return fmt.Errorf("refill send queue: %w", err)
	}
	if err := setq(sys.TCP_NO_QUEUE); err != nil {
		return err
	}
	// The window goes last: the kernel checks it against rcv_nxt.
	if err := sys.SetTCPRepairWindow(fd, sys.TCPRepairWindow(r.Window)); err != nil {
		return err
	}
	if err := leaveRepair(fd, false, sys.TCP_REPAIR_OFF); err != nil {
		return err
	}
	// Repair mode's forced address reuse is gone: have.ReuseAddr (a fresh
	// socket's) is what the kernel reports now.
	if err := setPost(fd, st, have); err != nil {
		return err
	}
	if err := sendAll(fd, r.SendQueue[sent:]); err != nil {
		return fmt.Errorf("queue unsent bytes: %w", err)
	}
	if snd != st.Opts.SndBuf || rcv != st.Opts.RcvBuf {
		return setBuffers(fd, st.Opts.SndBuf, st.Opts.RcvBuf)
	}
	return nil
}

var (
	optQueueSeq  = opt{"TCP_QUEUE_SEQ", sys.SOL_TCP, sys.TCP_QUEUE_SEQ}
	optTimestamp = opt{"TCP_TIMESTAMP", sys.SOL_TCP, sys.TCP_TIMESTAMP}
)

// sendAll sends b without blocking: a queue that does not fit is an error,
// not a hang.
func sendAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := sys.Send(fd, b, sys.MSG_DONTWAIT|sys.MSG_NOSIGNAL)
		if err != nil {
			if errors.Is(err, sys.EAGAIN) {
				return fmt.Errorf("%d bytes do not fit in the socket buffer: %w", len(b), err)
			}
			return err
		}
		b = b[n:]
	}
	return nil
}

// bound reports whether the dumped socket had an address or port.
func bound(st *State) bool {
	return st.Local.IsValid() && (st.Local.Port() != 0 || !st.Local.Addr().IsUnspecified())
}

// withTransparent runs fn (bind, connect) with IP_TRANSPARENT set, so that
// the socket may use an address the host does not have yet (the address
// moves to the new host after the restore), then puts the option back.
func withTransparent(fd int, st *State, fn func() error) error {
	if st.Opts.Transparent {
		return fn()
	}
	if err := optTransparent.set(fd, 1); err != nil {
		return err
	}
	ferr := fn()
	if err := optTransparent.set(fd, 0); err != nil && ferr == nil {
		ferr = err
	}
	return ferr
}

// setBuffersIf sets the buffer sizes that differ from a fresh socket's.
func setBuffersIf(fd int, w, have SockOpts) error {
	snd, rcv := w.SndBuf, w.RcvBuf
	if snd == have.SndBuf {
		snd = 0
	}
	if rcv == have.RcvBuf {
		rcv = 0
	}
	return setBuffers(fd, snd, rcv)
}

// socketIn creates a socket owned by uid in network namespace ns (nil:
// the calling thread's). Unless both are the caller's already, it runs on
// a thread that enters ns, takes uid as its fsuid, and is then discarded.
func socketIn(ns *os.File, uid uint32, domain, typ, proto int) (int, error) {
	if ns == nil && uid == uint32(os.Geteuid()) {
		return sys.Socket(domain, typ, proto)
	}
	fd := -1
	err := sys.OnDiscardedThread(func() error {
		if ns != nil {
			if err := control(ns, func(nsfd int) error { return sys.SetnsNet(nsfd) }); err != nil {
				return err
			}
		}
		if err := sys.SetfsuidThread(uid); err != nil {
			return err
		}
		var err error
		fd, err = sys.Socket(domain, typ, proto)
		return err
	})
	return fd, err
}
