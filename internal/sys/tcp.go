package sys

import (
	"errors"
	"net/netip"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Address families, socket types, protocols and socket option levels of
// the inet sockets phaul dumps and restores.
const (
	AF_INET  = unix.AF_INET
	AF_INET6 = unix.AF_INET6
	AF_UNIX  = unix.AF_UNIX

	SOCK_STREAM     = unix.SOCK_STREAM
	SOCK_DGRAM      = unix.SOCK_DGRAM
	SOCK_NONBLOCK   = unix.SOCK_NONBLOCK
	SOCK_CLOEXEC    = unix.SOCK_CLOEXEC
	IPPROTO_TCP     = unix.IPPROTO_TCP
	IPPROTO_UDP     = unix.IPPROTO_UDP
	IPPROTO_MPTCP   = unix.IPPROTO_MPTCP
	IPPROTO_UDPLITE = unix.IPPROTO_UDPLITE
	SOL_SOCKET      = unix.SOL_SOCKET
	SOL_IP          = unix.SOL_IP
	SOL_IPV6        = unix.SOL_IPV6

	ENOTCONN        = unix.ENOTCONN
	EADDRINUSE      = unix.EADDRINUSE
	ENOPROTOOPT     = unix.ENOPROTOOPT
	EOPNOTSUPP      = unix.EOPNOTSUPP
	EPROTONOSUPPORT = unix.EPROTONOSUPPORT
	EINPROGRESS     = unix.EINPROGRESS
)

// Socket options (SOL_SOCKET, SOL_IP, SOL_IPV6, SOL_TCP).
const (
	SO_DOMAIN       = unix.SO_DOMAIN
	SO_TYPE         = unix.SO_TYPE
	SO_PROTOCOL     = unix.SO_PROTOCOL
	SO_ACCEPTCONN   = unix.SO_ACCEPTCONN
	SO_REUSEADDR    = unix.SO_REUSEADDR
	SO_REUSEPORT    = unix.SO_REUSEPORT
	SO_KEEPALIVE    = unix.SO_KEEPALIVE
	SO_SNDBUF       = unix.SO_SNDBUF
	SO_RCVBUF       = unix.SO_RCVBUF
	SO_SNDBUFFORCE  = unix.SO_SNDBUFFORCE
	SO_RCVBUFFORCE  = unix.SO_RCVBUFFORCE
	SO_LINGER       = unix.SO_LINGER
	SO_PEEK_OFF     = unix.SO_PEEK_OFF
	SO_MARK         = unix.SO_MARK
	SO_PRIORITY     = unix.SO_PRIORITY
	SO_BINDTODEVICE = unix.SO_BINDTODEVICE
	SO_BROADCAST    = unix.SO_BROADCAST
	SO_OOBINLINE    = unix.SO_OOBINLINE
	SO_RCVLOWAT     = unix.SO_RCVLOWAT

	IP_TOS                  = unix.IP_TOS
	IP_TTL                  = unix.IP_TTL
	IP_FREEBIND             = unix.IP_FREEBIND
	IP_TRANSPARENT          = unix.IP_TRANSPARENT
	IP_BIND_ADDRESS_NO_PORT = unix.IP_BIND_ADDRESS_NO_PORT
	IPV6_V6ONLY             = unix.IPV6_V6ONLY
	IPV6_TCLASS             = unix.IPV6_TCLASS
	IPV6_UNICAST_HOPS       = unix.IPV6_UNICAST_HOPS
	IPV6_FREEBIND           = unix.IPV6_FREEBIND
	IPV6_TRANSPARENT        = unix.IPV6_TRANSPARENT

	TCP_NODELAY        = unix.TCP_NODELAY
	TCP_CORK           = unix.TCP_CORK
	TCP_KEEPIDLE       = unix.TCP_KEEPIDLE
	TCP_KEEPINTVL      = unix.TCP_KEEPINTVL
	TCP_KEEPCNT        = unix.TCP_KEEPCNT
	TCP_USER_TIMEOUT   = unix.TCP_USER_TIMEOUT
	TCP_CONGESTION     = unix.TCP_CONGESTION
	TCP_NOTSENT_LOWAT  = unix.TCP_NOTSENT_LOWAT
	TCP_DEFER_ACCEPT   = unix.TCP_DEFER_ACCEPT
	TCP_FASTOPEN       = unix.TCP_FASTOPEN
	TCP_MAXSEG         = unix.TCP_MAXSEG
	TCP_INFO           = unix.TCP_INFO
	TCP_TIMESTAMP      = unix.TCP_TIMESTAMP
	TCP_REPAIR_OPTIONS = unix.TCP_REPAIR_OPTIONS
	TCP_REPAIR_WINDOW  = unix.TCP_REPAIR_WINDOW

	// TCP options for TCP_REPAIR_OPTIONS.
	TCPOPT_MAXSEG         = unix.TCPOPT_MAXSEG
	TCPOPT_WINDOW         = unix.TCPOPT_WINDOW
	TCPOPT_SACK_PERMITTED = unix.TCPOPT_SACK_PERMITTED
	TCPOPT_TIMESTAMP      = unix.TCPOPT_TIMESTAMP

	// Bits of tcp_info.tcpi_options.
	TCPI_OPT_TIMESTAMPS = 1
	TCPI_OPT_SACK       = 2
	TCPI_OPT_WSCALE     = 4
	TCPI_OPT_ECN        = 8

	// Queue ioctls.
	SIOCINQ     = unix.SIOCINQ
	SIOCOUTQ    = unix.SIOCOUTQ
	SIOCOUTQNSD = unix.SIOCOUTQNSD

	MSG_PEEK     = unix.MSG_PEEK
	MSG_DONTWAIT = unix.MSG_DONTWAIT
	MSG_NOSIGNAL = unix.MSG_NOSIGNAL
)

// TCP states (include/net/tcp_states.h), as tcp_info.tcpi_state reports them.
const (
	TCP_ESTABLISHED  = 1
	TCP_SYN_SENT     = 2
	TCP_SYN_RECV     = 3
	TCP_FIN_WAIT1    = 4
	TCP_FIN_WAIT2    = 5
	TCP_TIME_WAIT    = 6
	TCP_CLOSE        = 7
	TCP_CLOSE_WAIT   = 8
	TCP_LAST_ACK     = 9
	TCP_LISTEN       = 10
	TCP_CLOSING      = 11
	TCP_NEW_SYN_RECV = 12
)

// Socket creates a socket with SOCK_CLOEXEC in the calling thread's
// network namespace.
func Socket(domain, typ, proto int) (int, error) {
	fd, err := unix.Socket(domain, typ|unix.SOCK_CLOEXEC, proto)
	return fd, wrap("socket", err)
}

func inetSockaddr(family int, ap netip.AddrPort) (unix.Sockaddr, error) {
	a := ap.Addr()
	switch family {
	case unix.AF_INET:
		a = a.Unmap()
		if !a.Is4() {
			return nil, wrap("sockaddr", unix.EAFNOSUPPORT)
		}
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: a.As4()}, nil
	case unix.AF_INET6:
		var zone uint32
		if z := a.Zone(); z != "" {
			n, err := strconv.ParseUint(z, 10, 32)
			if err != nil {
				return nil, wrap("sockaddr", unix.EINVAL)
			}
			zone = uint32(n)
		}
		return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: a.As16(), ZoneId: zone}, nil
	}
	return nil, wrap("sockaddr", unix.EAFNOSUPPORT)
}

// inetAddrPort converts a kernel sockaddr to an AddrPort. IPv6 addresses
// stay 16 bytes long (an IPv4-mapped address keeps its ::ffff: form) and
// carry their scope id, a number, as zone.
func inetAddrPort(sa unix.Sockaddr) (netip.AddrPort, error) {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)), nil
	case *unix.SockaddrInet6:
		a := netip.AddrFrom16(sa.Addr)
		if sa.ZoneId != 0 {
			a = a.WithZone(strconv.FormatUint(uint64(sa.ZoneId), 10))
		}
		return netip.AddrPortFrom(a, uint16(sa.Port)), nil
	}
	return netip.AddrPort{}, unix.EAFNOSUPPORT
}

// BindInet binds fd (of family AF_INET or AF_INET6) to ap.
func BindInet(fd, family int, ap netip.AddrPort) error {
	sa, err := inetSockaddr(family, ap)
	if err != nil {
		return err
	}
	return wrap("bind", unix.Bind(fd, sa))
}

// ConnectInet connects fd (of family AF_INET or AF_INET6) to ap. EINTR
// is not retried: an interrupted connect goes on in the background.
func ConnectInet(fd, family int, ap netip.AddrPort) error {
	sa, err := inetSockaddr(family, ap)
	if err != nil {
		return err
	}
	return wrap("connect", unix.Connect(fd, sa))
}

// Listen marks fd as listening with the given backlog.
func Listen(fd, backlog int) error { return wrap("listen", unix.Listen(fd, backlog)) }

// GetsocknameInet returns the local address of an inet socket.
func GetsocknameInet(fd int) (netip.AddrPort, error) {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return netip.AddrPort{}, wrap("getsockname", err)
	}
	ap, err := inetAddrPort(sa)
	return ap, wrap("getsockname", err)
}

// GetpeernameInet returns the peer address of an inet socket; the error
// matches ENOTCONN for a socket that is not connected.
func GetpeernameInet(fd int) (netip.AddrPort, error) {
	sa, err := unix.Getpeername(fd)
	if err != nil {
		return netip.AddrPort{}, wrap("getpeername", err)
	}
	ap, err := inetAddrPort(sa)
	return ap, wrap("getpeername", err)
}

// GetsockoptString reads a string socket option (TCP_CONGESTION,
// SO_BINDTODEVICE).
func GetsockoptString(fd, level, opt int) (string, error) {
	s, err := unix.GetsockoptString(fd, level, opt)
	return s, wrap("getsockopt", err)
}

// SetsockoptString sets a string socket option.
func SetsockoptString(fd, level, opt int, s string) error {
	return wrap("setsockopt", unix.SetsockoptString(fd, level, opt, s))
}

// Linger is struct linger.
type Linger struct {
	On      bool
	Seconds int
}

// GetsockoptLinger reads SO_LINGER.
func GetsockoptLinger(fd int) (Linger, error) {
	l, err := unix.GetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER)
	if err != nil {
		return Linger{}, wrap("getsockopt(SO_LINGER)", err)
	}
	return Linger{On: l.Onoff != 0, Seconds: int(l.Linger)}, nil
}

// SetsockoptLinger sets SO_LINGER.
func SetsockoptLinger(fd int, l Linger) error {
	v := unix.Linger{Linger: int32(l.Seconds)}
	if l.On {
		v.Onoff = 1
	}
	return wrap("setsockopt(SO_LINGER)", unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &v))
}

// TCPInfo is the part of struct tcp_info that restoring a socket needs.
// For a listening socket the kernel reuses two fields: Unacked is the
// number of connections waiting in the accept queue, Sacked the backlog
// given to listen (capped by net.core.somaxconn).
type TCPInfo struct {
	State     uint8
	Options   uint8 // TCPI_OPT_* bits
	SndWscale uint8
	RcvWscale uint8
	SndMSS    uint32
	Unacked   uint32
	Sacked    uint32
}

// GetTCPInfo reads TCP_INFO.
func GetTCPInfo(fd int) (TCPInfo, error) {
	// struct tcp_info: u8 state, ca_state, retransmits, probes, backoff,
	// options, snd_wscale:4|rcv_wscale:4, flags; u32 rto, ato, snd_mss,
	// rcv_mss, unacked, sacked, ...
	var b [32]byte
	n, err := getsockopt(fd, unix.SOL_TCP, unix.TCP_INFO, b[:])
	if err != nil {
		return TCPInfo{}, wrap("getsockopt(TCP_INFO)", err)
	}
	if n < len(b) {
		return TCPInfo{}, wrap("getsockopt(TCP_INFO)", unix.EINVAL)
	}
	u32 := func(off int) uint32 { return *(*uint32)(unsafe.Pointer(&b[off])) }
	return TCPInfo{
		State:     b[0],
		Options:   b[5],
		SndWscale: b[6] & 0xf,
		RcvWscale: b[6] >> 4,
		SndMSS:    u32(16),
		Unacked:   u32(24),
		Sacked:    u32(28),
	}, nil
}

// TCPRepairWindow is struct tcp_repair_window (TCP_REPAIR_WINDOW).
type TCPRepairWindow struct {
	SndWl1    uint32
	SndWnd    uint32
	MaxWindow uint32
	RcvWnd    uint32
	RcvWup    uint32
}

// GetTCPRepairWindow reads TCP_REPAIR_WINDOW (repair mode only).
func GetTCPRepairWindow(fd int) (TCPRepairWindow, error) {
	var w TCPRepairWindow
	b := unsafe.Slice((*byte)(unsafe.Pointer(&w)), unsafe.Sizeof(w))
	n, err := getsockopt(fd, unix.SOL_TCP, unix.TCP_REPAIR_WINDOW, b)
	if err == nil && n != len(b) {
		err = unix.EINVAL
	}
	return w, wrap("getsockopt(TCP_REPAIR_WINDOW)", err)
}

// SetTCPRepairWindow sets TCP_REPAIR_WINDOW (repair mode only, after the
// queues are filled).
func SetTCPRepairWindow(fd int, w TCPRepairWindow) error {
	b := unsafe.Slice((*byte)(unsafe.Pointer(&w)), unsafe.Sizeof(w))
	return wrap("setsockopt(TCP_REPAIR_WINDOW)", setsockopt(fd, unix.SOL_TCP, unix.TCP_REPAIR_WINDOW, b))
}

// TCPRepairOpt is struct tcp_repair_opt: one TCP option negotiated at
// the handshake (TCPOPT_*) and its value.
type TCPRepairOpt struct {
	Code uint32
	Val  uint32
}

// SetTCPRepairOptions sets TCP_REPAIR_OPTIONS (repair mode, connected).
func SetTCPRepairOptions(fd int, opts []TCPRepairOpt) error {
	if len(opts) == 0 {
		return nil
	}
	o := make([]unix.TCPRepairOpt, len(opts))
	for i, x := range opts {
		o[i] = unix.TCPRepairOpt{Code: x.Code, Val: x.Val}
	}
	return wrap("setsockopt(TCP_REPAIR_OPTIONS)", unix.SetsockoptTCPRepairOpt(fd, unix.SOL_TCP, unix.TCP_REPAIR_OPTIONS, o))
}

// IoctlSocketInt runs an int-returning socket ioctl (SIOCINQ, SIOCOUTQ,
// SIOCOUTQNSD).
func IoctlSocketInt(fd int, req uint) (int, error) {
	v, err := unix.IoctlGetInt(fd, req)
	return v, wrap("ioctl", err)
}

// Recv receives into p with flags (MSG_PEEK, MSG_DONTWAIT, ...),
// retrying EINTR.
func Recv(fd int, p []byte, flags int) (int, error) {
	for {
		n, _, err := unix.Recvfrom(fd, p, flags)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return n, wrap("recv", err)
	}
}

// Send sends p with flags on a connected socket and returns how much the
// kernel took, retrying EINTR.
func Send(fd int, p []byte, flags int) (int, error) {
	for {
		n, err := unix.SendmsgN(fd, p, nil, nil, flags)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return n, wrap("send", err)
	}
}

func getsockopt(fd, level, opt int, b []byte) (int, error) {
	l := uint32(len(b))
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&b[0])), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return 0, e
	}
	return int(l), nil
}

func setsockopt(fd, level, opt int, b []byte) error {
	_, _, e := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), 0)
	if e != 0 {
		return e
	}
	return nil
}

// FdOwner returns the owner of the inode behind fd. For a socket that is
// the fsuid of the thread that created it, which the kernel also keeps
// as the socket's sk_uid (the uid of /proc/net/tcp, ip rule uidrange,
// nft meta skuid).
func FdOwner(fd int) (uint32, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, wrap("fstat", err)
	}
	return st.Uid, nil
}

// SetfsuidThread sets the calling thread's fsuid (only that thread's: run
// it on a locked thread that is discarded afterwards).
func SetfsuidThread(uid uint32) error {
	if _, err := unix.SetfsuidRetUid(int(uid)); err != nil {
		return wrap("setfsuid", err)
	}
	// setfsuid reports no failure: read the fsuid back (an invalid uid
	// changes nothing and returns the current one).
	if now, _ := unix.SetfsuidRetUid(-1); now != int(uid) {
		return wrap("setfsuid", unix.EPERM)
	}
	return nil
}
