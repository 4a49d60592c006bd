package netsock

import (
	"errors"
	"fmt"

	"github.com/phaul/phaul/internal/sys"
)

// tcpMSSDefault is what TCP_MAXSEG reports on an unconnected socket whose
// user did not set it (TCP_MSS_DEFAULT).
const tcpMSSDefault = 536

// opt is one integer socket option.
type opt struct {
	name  string
	level int
	opt   int
}

var (
	optReuseAddr   = opt{"SO_REUSEADDR", sys.SOL_SOCKET, sys.SO_REUSEADDR}
	optReusePort   = opt{"SO_REUSEPORT", sys.SOL_SOCKET, sys.SO_REUSEPORT}
	optKeepAlive   = opt{"SO_KEEPALIVE", sys.SOL_SOCKET, sys.SO_KEEPALIVE}
	optSndBuf      = opt{"SO_SNDBUFFORCE", sys.SOL_SOCKET, sys.SO_SNDBUFFORCE}
	optRcvBuf      = opt{"SO_RCVBUFFORCE", sys.SOL_SOCKET, sys.SO_RCVBUFFORCE}
	optPeekOff     = opt{"SO_PEEK_OFF", sys.SOL_SOCKET, sys.SO_PEEK_OFF}
	optMark        = opt{"SO_MARK", sys.SOL_SOCKET, sys.SO_MARK}
	optPriority    = opt{"SO_PRIORITY", sys.SOL_SOCKET, sys.SO_PRIORITY}
	optBroadcast   = opt{"SO_BROADCAST", sys.SOL_SOCKET, sys.SO_BROADCAST}
	optOOBInline   = opt{"SO_OOBINLINE", sys.SOL_SOCKET, sys.SO_OOBINLINE}
	optRcvLowat    = opt{"SO_RCVLOWAT", sys.SOL_SOCKET, sys.SO_RCVLOWAT}
	optTOS         = opt{"IP_TOS", sys.SOL_IP, sys.IP_TOS}
	optTTL         = opt{"IP_TTL", sys.SOL_IP, sys.IP_TTL}
	optFreebind    = opt{"IP_FREEBIND", sys.SOL_IP, sys.IP_FREEBIND}
	optTransparent = opt{"IP_TRANSPARENT", sys.SOL_IP, sys.IP_TRANSPARENT}
	optNoPort      = opt{"IP_BIND_ADDRESS_NO_PORT", sys.SOL_IP, sys.IP_BIND_ADDRESS_NO_PORT}
	optV6Only      = opt{"IPV6_V6ONLY", sys.SOL_IPV6, sys.IPV6_V6ONLY}
	optTClass      = opt{"IPV6_TCLASS", sys.SOL_IPV6, sys.IPV6_TCLASS}
	optHops        = opt{"IPV6_UNICAST_HOPS", sys.SOL_IPV6, sys.IPV6_UNICAST_HOPS}
	optNoDelay     = opt{"TCP_NODELAY", sys.SOL_TCP, sys.TCP_NODELAY}
	optCork        = opt{"TCP_CORK", sys.SOL_TCP, sys.TCP_CORK}
	optKeepIdle    = opt{"TCP_KEEPIDLE", sys.SOL_TCP, sys.TCP_KEEPIDLE}
	optKeepIntvl   = opt{"TCP_KEEPINTVL", sys.SOL_TCP, sys.TCP_KEEPINTVL}
	optKeepCnt     = opt{"TCP_KEEPCNT", sys.SOL_TCP, sys.TCP_KEEPCNT}
	optUserTimeout = opt{"TCP_USER_TIMEOUT", sys.SOL_TCP, sys.TCP_USER_TIMEOUT}
	optNotSent     = opt{"TCP_NOTSENT_LOWAT", sys.SOL_TCP, sys.TCP_NOTSENT_LOWAT}
	optDeferAccept = opt{"TCP_DEFER_ACCEPT", sys.SOL_TCP, sys.TCP_DEFER_ACCEPT}
	optFastOpen    = opt{"TCP_FASTOPEN", sys.SOL_TCP, sys.TCP_FASTOPEN}
	optMaxSeg      = opt{"TCP_MAXSEG", sys.SOL_TCP, sys.TCP_MAXSEG}
)

func (o opt) get(fd int) (int, error) {
	v, err := sys.GetsockoptInt(fd, o.level, o.opt)
	if err != nil {
		return 0, fmt.Errorf("get %s: %w", o.name, err)
	}
	return v, nil
}

func (o opt) set(fd, v int) error {
	if err := sys.SetsockoptInt(fd, o.level, o.opt, v); err != nil {
		return fmt.Errorf("set %s to %d: %w", o.name, v, err)
	}
	return nil
}

// setIf sets o to want when it differs from have.
func (o opt) setIf(fd, want, have int) error {
	if want == have {
		return nil
	}
	return o.set(fd, want)
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// optReader reads options, keeping the first error.
type optReader struct {
	fd  int
	err error
}

func (r *optReader) int(o opt) int {
	if r.err != nil {
		return 0
	}
	v, err := o.get(r.fd)
	if unsupported(err) {
		// Not every protocol has every option (MPTCP passes only some
		// to its subflows): a fresh socket lacks it too, so it is
		// never set on restore.
		return 0
	}
	r.err = err
	return v
}

// unsupported reports an option the socket's protocol does not have.
func unsupported(err error) bool {
	return errors.Is(err, sys.ENOPROTOOPT) || errors.Is(err, sys.EOPNOTSUPP)
}

func (r *optReader) bool(o opt) bool { return r.int(o) != 0 }

// readOpts reads the options netsock carries over. A socket in repair
// mode reports SO_REUSEADDR wrongly: read before entering it.
func readOpts(fd int, fam Family, p Proto) (SockOpts, error) {
	r := &optReader{fd: fd}
	var o SockOpts
	o.ReuseAddr = r.bool(optReuseAddr)
	o.ReusePort = r.bool(optReusePort)
	o.KeepAlive = r.bool(optKeepAlive)
	o.SndBuf = r.int(opt{"SO_SNDBUF", sys.SOL_SOCKET, sys.SO_SNDBUF})
	o.RcvBuf = r.int(opt{"SO_RCVBUF", sys.SOL_SOCKET, sys.SO_RCVBUF})
	o.Mark = uint32(r.int(optMark))
	o.Priority = r.int(optPriority)
	o.Broadcast = r.bool(optBroadcast)
	o.OOBInline = r.bool(optOOBInline)
	o.RcvLowat = r.int(optRcvLowat)
	o.TOS = r.int(optTOS)
	o.TTL = r.int(optTTL)
	o.Freebind = r.bool(optFreebind)
	o.Transparent = r.bool(optTransparent)
	o.BindAddressNoPort = r.bool(optNoPort)
	if fam == IPv6 {
		o.V6Only = r.bool(optV6Only)
		o.TClass = r.int(optTClass)
		o.UnicastHops = r.int(optHops)
	}
	if p.stream() {
		o.NoDelay = r.bool(optNoDelay)
		o.Cork = r.bool(optCork)
		o.KeepIdle = r.int(optKeepIdle)
		o.KeepIntvl = r.int(optKeepIntvl)
		o.KeepCnt = r.int(optKeepCnt)
		o.UserTimeout = r.int(optUserTimeout)
		o.NotSentLowat = r.int(optNotSent)
		o.DeferAccept = r.int(optDeferAccept)
		o.FastOpen = r.int(optFastOpen)
	}
	if r.err != nil {
		return o, r.err
	}
	var err error
	// SO_PEEK_OFF is refused by protocols that do not support it.
	if o.PeekOff, err = optPeekOff.get(fd); err != nil {
		if !unsupported(err) {
			return o, err
		}
		o.PeekOff = -1
	}
	l, err := sys.GetsockoptLinger(fd)
	if err != nil {
		return o, err
	}
	o.LingerOn, o.LingerSeconds = l.On, l.Seconds
	if o.BindToDevice, err = sys.GetsockoptString(fd, sys.SOL_SOCKET, sys.SO_BINDTODEVICE); err != nil {
		return o, fmt.Errorf("get SO_BINDTODEVICE: %w", err)
	}
	if p.stream() {
		if o.Congestion, err = sys.GetsockoptString(fd, sys.SOL_TCP, sys.TCP_CONGESTION); err != nil && !unsupported(err) {
			return o, fmt.Errorf("get TCP_CONGESTION: %w", err)
		}
		info, err := sys.GetTCPInfo(fd)
		if err != nil {
			return o, err
		}
		// TCP_MAXSEG reports the user's MSS only before a connection.
		if s := TCPState(info.State); s == Listen || s == Close {
			mss, err := optMaxSeg.get(fd)
			if err != nil && !unsupported(err) {
				return o, err
			}
			if err == nil && mss != tcpMSSDefault {
				o.UserMSS = mss
			}
		}
	}
	return o, nil
}

// setPreBind sets, on a new socket, the options that must be in place
// before bind and connect. have are the new socket's own options.
// Buffer sizes are left to the caller.
func setPreBind(fd int, st *State, have SockOpts) error {
	w := st.Opts
	steps := []struct {
		o          opt
		want, have int
	}{
		{optReusePort, b2i(w.ReusePort), b2i(have.ReusePort)},
		{optMark, int(w.Mark), int(have.Mark)},
		{optPriority, w.Priority, have.Priority},
		{optTOS, w.TOS, have.TOS},
		{optTTL, w.TTL, have.TTL},
		{optFreebind, b2i(w.Freebind), b2i(have.Freebind)},
		{optTransparent, b2i(w.Transparent), b2i(have.Transparent)},
		{optNoPort, b2i(w.BindAddressNoPort), b2i(have.BindAddressNoPort)},
	}
	if st.Family == IPv6 {
		steps = append(steps, []struct {
			o          opt
			want, have int
		}{
			{optV6Only, b2i(w.V6Only), b2i(have.V6Only)},
			{optTClass, w.TClass, have.TClass},
			{optHops, w.UnicastHops, have.UnicastHops},
		}...)
	}
	if st.Proto.stream() && w.UserMSS != 0 {
		steps = append(steps, struct {
			o          opt
			want, have int
		}{optMaxSeg, w.UserMSS, 0})
	}
	for _, s := range steps {
		if err := s.o.setIf(fd, s.want, s.have); err != nil {
			return err
		}
	}
	if w.BindToDevice != have.BindToDevice {
		if err := sys.SetsockoptString(fd, sys.SOL_SOCKET, sys.SO_BINDTODEVICE, w.BindToDevice); err != nil {
			return fmt.Errorf("set SO_BINDTODEVICE to %q: %w", w.BindToDevice, err)
		}
	}
	if st.Proto.stream() && w.Congestion != "" && w.Congestion != have.Congestion {
		if err := sys.SetsockoptString(fd, sys.SOL_TCP, sys.TCP_CONGESTION, w.Congestion); err != nil {
			return fmt.Errorf("set TCP_CONGESTION to %q (is it available on this host?): %w", w.Congestion, err)
		}
	}
	return nil
}

// setPost sets the remaining options once the socket is bound, connected
// or listening (and out of repair mode).
func setPost(fd int, st *State, have SockOpts) error {
	w := st.Opts
	steps := []struct {
		o          opt
		want, have int
	}{
		{optReuseAddr, b2i(w.ReuseAddr), b2i(have.ReuseAddr)},
		{optKeepAlive, b2i(w.KeepAlive), b2i(have.KeepAlive)},
		{optBroadcast, b2i(w.Broadcast), b2i(have.Broadcast)},
		{optOOBInline, b2i(w.OOBInline), b2i(have.OOBInline)},
		{optRcvLowat, w.RcvLowat, have.RcvLowat},
	}
	if st.Proto.stream() {
		steps = append(steps, []struct {
			o          opt
			want, have int
		}{
			{optNoDelay, b2i(w.NoDelay), b2i(have.NoDelay)},
			{optCork, b2i(w.Cork), b2i(have.Cork)},
			{optKeepIdle, w.KeepIdle, have.KeepIdle},
			{optKeepIntvl, w.KeepIntvl, have.KeepIntvl},
			{optKeepCnt, w.KeepCnt, have.KeepCnt},
			{optUserTimeout, w.UserTimeout, have.UserTimeout},
			{optNotSent, w.NotSentLowat, have.NotSentLowat},
			{optDeferAccept, w.DeferAccept, have.DeferAccept},
			{optFastOpen, w.FastOpen, have.FastOpen},
		}...)
	}
	if have.PeekOff != -1 || w.PeekOff != -1 {
		steps = append(steps, struct {
			o          opt
			want, have int
		}{optPeekOff, w.PeekOff, have.PeekOff})
	}
	for _, s := range steps {
		if err := s.o.setIf(fd, s.want, s.have); err != nil {
			return err
		}
	}
	if w.LingerOn != have.LingerOn || w.LingerSeconds != have.LingerSeconds {
		if err := sys.SetsockoptLinger(fd, sys.Linger{On: w.LingerOn, Seconds: w.LingerSeconds}); err != nil {
			return err
		}
	}
	return nil
}

// setBuffers sets SO_SNDBUF and SO_RCVBUF to sizes getsockopt will report
// as snd and rcv (the kernel doubles what it is given; the FORCE variants
// ignore the sysctl caps). Zero leaves a size alone.
func setBuffers(fd, snd, rcv int) error {
	if snd > 0 {
		if err := optSndBuf.set(fd, snd/2); err != nil {
			return err
		}
	}
	if rcv > 0 {
		if err := optRcvBuf.set(fd, rcv/2); err != nil {
			return err
		}
	}
	return nil
}
