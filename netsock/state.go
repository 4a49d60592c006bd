package netsock

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/phaul/phaul/internal/sys"
)

// Family is an address family.
type Family int

// Families netsock handles.
const (
	IPv4 Family = sys.AF_INET
	IPv6 Family = sys.AF_INET6
)

func (f Family) String() string {
	switch f {
	case IPv4:
		return "IPv4"
	case IPv6:
		return "IPv6"
	}
	return fmt.Sprintf("family %d", int(f))
}

// Proto is a transport protocol.
type Proto int

// Protocols netsock handles.
const (
	TCP Proto = sys.IPPROTO_TCP
	UDP Proto = sys.IPPROTO_UDP
	// MPTCP is a multipath TCP socket. Only listening and unconnected
	// ones are carried over: Go 1.24 and later listen with MPTCP by
	// default, and accept plain TCP connections from plain TCP peers on
	// such a listener. TCP_REPAIR does not work on an MPTCP connection.
	MPTCP Proto = sys.IPPROTO_MPTCP
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "TCP"
	case UDP:
		return "UDP"
	case MPTCP:
		return "MPTCP"
	}
	return fmt.Sprintf("protocol %d", int(p))
}

// TCPState is a TCP state as the kernel numbers it.
type TCPState uint8

// TCP states.
const (
	Established TCPState = sys.TCP_ESTABLISHED
	SynSent     TCPState = sys.TCP_SYN_SENT
	SynRecv     TCPState = sys.TCP_SYN_RECV
	FinWait1    TCPState = sys.TCP_FIN_WAIT1
	FinWait2    TCPState = sys.TCP_FIN_WAIT2
	TimeWait    TCPState = sys.TCP_TIME_WAIT
	Close       TCPState = sys.TCP_CLOSE
	CloseWait   TCPState = sys.TCP_CLOSE_WAIT
	LastAck     TCPState = sys.TCP_LAST_ACK
	Listen      TCPState = sys.TCP_LISTEN
	Closing     TCPState = sys.TCP_CLOSING
	NewSynRecv  TCPState = sys.TCP_NEW_SYN_RECV
)

var tcpStateNames = map[TCPState]string{
	Established: "ESTABLISHED",
	SynSent:     "SYN_SENT",
	SynRecv:     "SYN_RECV",
	FinWait1:    "FIN_WAIT1",
	FinWait2:    "FIN_WAIT2",
	TimeWait:    "TIME_WAIT",
	Close:       "CLOSE",
	CloseWait:   "CLOSE_WAIT",
	LastAck:     "LAST_ACK",
	Listen:      "LISTEN",
	Closing:     "CLOSING",
	NewSynRecv:  "NEW_SYN_RECV",
}

func (s TCPState) String() string {
	if n, ok := tcpStateNames[s]; ok {
		return n
	}
	return fmt.Sprintf("TCP state %d", uint8(s))
}

// State is everything Restore needs to rebuild a socket.
type State struct {
	Family Family
	Proto  Proto
	// TCPState is the TCP state (Listen, Close or Established); 0 for UDP.
	TCPState TCPState
	// Local is the bound address; the unspecified address and port 0 when
	// unbound. IPv6 addresses stay 16 bytes (IPv4-mapped ones included);
	// a link-local address carries its interface index as zone.
	Local netip.AddrPort
	// Peer is the connected peer; the zero AddrPort when not connected.
	Peer netip.AddrPort
	// Backlog is a listener's backlog as the kernel keeps it.
	Backlog int
	Opts    SockOpts
	// Repair is the state of an established TCP connection; nil otherwise.
	Repair *TCPRepair
	// RecvQueueDropped reports that a UDP socket had datagrams queued,
	// which are not carried over.
	RecvQueueDropped bool
	// UID owns the socket: the fsuid of the thread that created (or
	// accepted) it, which the kernel keeps as the socket's uid for
	// routing by uid, netfilter's skuid and /proc/net/tcp.
	UID uint32
}

// SockOpts are the socket options netsock carries over.
type SockOpts struct {
	ReuseAddr, ReusePort bool
	KeepAlive            bool
	// SndBuf and RcvBuf are as getsockopt reports them (twice what
	// setsockopt was given).
	SndBuf, RcvBuf int
	LingerOn       bool
	LingerSeconds  int
	// PeekOff is SO_PEEK_OFF; -1 when unset.
	PeekOff      int
	Mark         uint32
	Priority     int
	BindToDevice string
	Broadcast    bool
	OOBInline    bool
	RcvLowat     int

	// IP level.
	TOS, TTL          int
	Freebind          bool
	Transparent       bool
	BindAddressNoPort bool
	// IPv6 level.
	V6Only      bool
	TClass      int
	UnicastHops int

	// TCP level.
	NoDelay, Cork bool
	KeepIdle      int
	KeepIntvl     int
	KeepCnt       int
	UserTimeout   int
	Congestion    string
	NotSentLowat  int
	DeferAccept   int
	FastOpen      int
	// UserMSS is TCP_MAXSEG set on a listening or unconnected socket; 0
	// when not set.
	UserMSS int
}

// TCPRepair is the state of an established connection, read in repair
// mode.
type TCPRepair struct {
	// SendSeq is the sequence number after the last byte queued to send.
	SendSeq uint32
	// RecvSeq is the sequence number after the last byte received.
	RecvSeq uint32
	// SendQueue is the whole send queue, oldest byte first; its last
	// Unsent bytes were never sent.
	SendQueue []byte
	Unsent    int
	// RecvQueue holds the received bytes the process has not read.
	RecvQueue []byte

	// Options negotiated at the handshake.
	MSS          uint32
	WscaleOK     bool
	SndWscale    uint8
	RcvWscale    uint8
	SackOK       bool
	TimestampsOK bool
	// Timestamp is the connection's timestamp clock (TCP_TIMESTAMP).
	Timestamp uint32

	Window Window
}

// Window is TCP_REPAIR_WINDOW.
type Window struct {
	SndWl1    uint32
	SndWnd    uint32
	MaxWindow uint32
	RcvWnd    uint32
	RcvWup    uint32
}

// ErrUnsupported is matched by every refusal: a socket netsock cannot
// carry over (its kind, its state, or the caller's options).
var ErrUnsupported = errors.New("socket cannot be migrated")

// ErrEstablishedNotAllowed is matched (with ErrUnsupported) by the refusal
// of an established connection when Options.TCPEstablished is false.
var ErrEstablishedNotAllowed = errors.New("established TCP connections were not allowed (--tcp-established)")

// ErrPendingConnections is matched (with ErrUnsupported) by the refusal of
// a listener with connections waiting in its accept queue.
var ErrPendingConnections = errors.New("connections wait in the accept queue")

// RefusedError tells which socket was refused and why.
type RefusedError struct {
	// Socket describes the socket: "TCP 10.0.0.1:7000 -> 10.0.0.3:5000".
	Socket string
	// State is the TCP state, if the socket is a TCP one.
	State TCPState
	// Reason explains the refusal.
	Reason string
	// Err is ErrEstablishedNotAllowed, ErrPendingConnections or nil.
	Err error
}

func (e *RefusedError) Error() string {
	s := e.Socket
	if e.State != 0 {
		s += " in state " + e.State.String()
	}
	return s + ": " + e.Reason
}

// Unwrap makes errors.Is match ErrUnsupported and Err.
func (e *RefusedError) Unwrap() []error {
	if e.Err != nil {
		return []error{ErrUnsupported, e.Err}
	}
	return []error{ErrUnsupported}
}

// describe names a socket for messages.
func describe(p Proto, local, peer netip.AddrPort) string {
	s := p.String() + " " + local.String()
	if peer.IsValid() {
		s += " -> " + peer.String()
	}
	return s
}

// String describes the socket: "TCP 10.0.0.1:7000 -> 10.0.0.3:5000
// ESTABLISHED".
func (s *State) String() string {
	d := describe(s.Proto, s.Local, s.Peer)
	if s.Proto.stream() {
		d += " " + s.TCPState.String()
	}
	return d
}

// stream reports whether p is TCP or MPTCP.
func (p Proto) stream() bool { return p == TCP || p == MPTCP }
