package netsock

import (
	"fmt"
	"net/netip"
	"strconv"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// ToProto returns st as an image message.
func (st *State) ToProto() *imagepb.InetSocket {
	typ := uint32(sys.SOCK_STREAM)
	if st.Proto == UDP {
		typ = sys.SOCK_DGRAM
	}
	p := &imagepb.InetSocket{
		Family:           uint32(st.Family),
		Type:             typ,
		Protocol:         uint32(st.Proto),
		TcpState:         uint32(st.TCPState),
		Backlog:          uint32(st.Backlog),
		RecvQueueDropped: st.RecvQueueDropped,
		Uid:              st.UID,
	}
	p.LocalAddr, p.LocalPort, p.LocalScopeId = addrToProto(st.Local)
	p.PeerAddr, p.PeerPort, p.PeerScopeId = addrToProto(st.Peer)
	o := &st.Opts
	p.Options = &imagepb.InetSocketOptions{
		ReuseAddr:         o.ReuseAddr,
		ReusePort:         o.ReusePort,
		Keepalive:         o.KeepAlive,
		Sndbuf:            int32(o.SndBuf),
		Rcvbuf:            int32(o.RcvBuf),
		LingerOn:          o.LingerOn,
		LingerSeconds:     int32(o.LingerSeconds),
		PeekOff:           int32(o.PeekOff),
		Mark:              o.Mark,
		Priority:          int32(o.Priority),
		BindToDevice:      o.BindToDevice,
		Broadcast:         o.Broadcast,
		OobInline:         o.OOBInline,
		Rcvlowat:          int32(o.RcvLowat),
		IpTos:             int32(o.TOS),
		IpTtl:             int32(o.TTL),
		Freebind:          o.Freebind,
		Transparent:       o.Transparent,
		BindAddressNoPort: o.BindAddressNoPort,
		V6Only:            o.V6Only,
		Ipv6Tclass:        int32(o.TClass),
		Ipv6UnicastHops:   int32(o.UnicastHops),
		Nodelay:           o.NoDelay,
		Cork:              o.Cork,
		Keepidle:          int32(o.KeepIdle),
		Keepintvl:         int32(o.KeepIntvl),
		Keepcnt:           int32(o.KeepCnt),
		UserTimeout:       int32(o.UserTimeout),
		Congestion:        o.Congestion,
		NotsentLowat:      int32(o.NotSentLowat),
		DeferAccept:       int32(o.DeferAccept),
		Fastopen:          int32(o.FastOpen),
		UserMss:           int32(o.UserMSS),
	}
	if r := st.Repair; r != nil {
		p.TcpRepair = &imagepb.TcpRepair{
			SendSeq:      r.SendSeq,
			RecvSeq:      r.RecvSeq,
			SendQueue:    r.SendQueue,
			Unsent:       uint32(r.Unsent),
			RecvQueue:    r.RecvQueue,
			Mss:          r.MSS,
			WscaleOk:     r.WscaleOK,
			SndWscale:    uint32(r.SndWscale),
			RcvWscale:    uint32(r.RcvWscale),
			SackOk:       r.SackOK,
			TimestampsOk: r.TimestampsOK,
			Timestamp:    r.Timestamp,
			SndWl1:       r.Window.SndWl1,
			SndWnd:       r.Window.SndWnd,
			MaxWindow:    r.Window.MaxWindow,
			RcvWnd:       r.Window.RcvWnd,
			RcvWup:       r.Window.RcvWup,
		}
	}
	return p
}

// FromProto returns the state an image message holds.
func FromProto(p *imagepb.InetSocket) (*State, error) {
	st := &State{
		Family:           Family(p.GetFamily()),
		Proto:            Proto(p.GetProtocol()),
		TCPState:         TCPState(p.GetTcpState()),
		Backlog:          int(p.GetBacklog()),
		RecvQueueDropped: p.GetRecvQueueDropped(),
		UID:              p.GetUid(),
	}
	wantType := uint32(sys.SOCK_STREAM)
	if st.Proto == UDP {
		wantType = sys.SOCK_DGRAM
	}
	if p.GetType() != wantType {
		return nil, fmt.Errorf("inet socket image: type %d for %v", p.GetType(), st.Proto)
	}
	var err error
	if st.Local, err = addrFromProto(p.GetLocalAddr(), p.GetLocalPort(), p.GetLocalScopeId()); err != nil {
		return nil, fmt.Errorf("inet socket image: local address: %w", err)
	}
	if st.Peer, err = addrFromProto(p.GetPeerAddr(), p.GetPeerPort(), p.GetPeerScopeId()); err != nil {
		return nil, fmt.Errorf("inet socket image: peer address: %w", err)
	}
	if o := p.GetOptions(); o != nil {
		st.Opts = SockOpts{
			ReuseAddr:         o.GetReuseAddr(),
			ReusePort:         o.GetReusePort(),
			KeepAlive:         o.GetKeepalive(),
			SndBuf:            int(o.GetSndbuf()),
			RcvBuf:            int(o.GetRcvbuf()),
			LingerOn:          o.GetLingerOn(),
			LingerSeconds:     int(o.GetLingerSeconds()),
			PeekOff:           int(o.GetPeekOff()),
			Mark:              o.GetMark(),
			Priority:          int(o.GetPriority()),
			BindToDevice:      o.GetBindToDevice(),
			Broadcast:         o.GetBroadcast(),
			OOBInline:         o.GetOobInline(),
			RcvLowat:          int(o.GetRcvlowat()),
			TOS:               int(o.GetIpTos()),
			TTL:               int(o.GetIpTtl()),
			Freebind:          o.GetFreebind(),
			Transparent:       o.GetTransparent(),
			BindAddressNoPort: o.GetBindAddressNoPort(),
			V6Only:            o.GetV6Only(),
			TClass:            int(o.GetIpv6Tclass()),
			UnicastHops:       int(o.GetIpv6UnicastHops()),
			NoDelay:           o.GetNodelay(),
			Cork:              o.GetCork(),
			KeepIdle:          int(o.GetKeepidle()),
			KeepIntvl:         int(o.GetKeepintvl()),
			KeepCnt:           int(o.GetKeepcnt()),
			UserTimeout:       int(o.GetUserTimeout()),
			Congestion:        o.GetCongestion(),
			NotSentLowat:      int(o.GetNotsentLowat()),
			DeferAccept:       int(o.GetDeferAccept()),
			FastOpen:          int(o.GetFastopen()),
			UserMSS:           int(o.GetUserMss()),
		}
	} else {
		st.Opts.PeekOff = -1
	}
	if r := p.GetTcpRepair(); r != nil {
		if r.GetUnsent() > uint32(len(r.GetSendQueue())) {
			return nil, fmt.Errorf("inet socket image: %d unsent bytes in a send queue of %d", r.GetUnsent(), len(r.GetSendQueue()))
		}
		st.Repair = &TCPRepair{
			SendSeq:      r.GetSendSeq(),
			RecvSeq:      r.GetRecvSeq(),
			SendQueue:    r.GetSendQueue(),
			Unsent:       int(r.GetUnsent()),
			RecvQueue:    r.GetRecvQueue(),
			MSS:          r.GetMss(),
			WscaleOK:     r.GetWscaleOk(),
			SndWscale:    uint8(r.GetSndWscale()),
			RcvWscale:    uint8(r.GetRcvWscale()),
			SackOK:       r.GetSackOk(),
			TimestampsOK: r.GetTimestampsOk(),
			Timestamp:    r.GetTimestamp(),
			Window: Window{
				SndWl1:    r.GetSndWl1(),
				SndWnd:    r.GetSndWnd(),
				MaxWindow: r.GetMaxWindow(),
				RcvWnd:    r.GetRcvWnd(),
				RcvWup:    r.GetRcvWup(),
			},
		}
	}
	return st, nil
}

func addrToProto(ap netip.AddrPort) (addr []byte, port, scope uint32) {
	if !ap.IsValid() {
		return nil, 0, 0
	}
	a := ap.Addr()
	if z := a.Zone(); z != "" {
		n, _ := strconv.ParseUint(z, 10, 32)
		scope = uint32(n)
	}
	return a.AsSlice(), uint32(ap.Port()), scope
}

func addrFromProto(b []byte, port, scope uint32) (netip.AddrPort, error) {
	if len(b) == 0 {
		return netip.AddrPort{}, nil
	}
	a, ok := netip.AddrFromSlice(b)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("%d-byte address", len(b))
	}
	if port > 0xffff {
		return netip.AddrPort{}, fmt.Errorf("port %d", port)
	}
	if scope != 0 {
		a = a.WithZone(strconv.FormatUint(uint64(scope), 10))
	}
	return netip.AddrPortFrom(a, uint16(port)), nil
}
