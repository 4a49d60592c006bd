package netsock_test

import (
	"net/netip"
	"reflect"
	"testing"

	"github.com/phaul/phaul/netsock"
)

// TestImageRoundTrip checks that every field survives the image message.
func TestImageRoundTrip(t *testing.T) {
	st := &netsock.State{
		Family: netsock.IPv6, Proto: netsock.TCP, TCPState: netsock.Established,
		Local:   netip.MustParseAddrPort("[fe80::1%3]:7000"),
		Peer:    netip.MustParseAddrPort("[::ffff:10.0.0.3]:40000"),
		Backlog: 5,
		UID:     1000,
		Opts: netsock.SockOpts{
			ReuseAddr: true, ReusePort: true, KeepAlive: true, SndBuf: 1, RcvBuf: 2, LingerOn: true, LingerSeconds: 3,
			PeekOff: 4, Mark: 5, Priority: 6, BindToDevice: "eth0", Broadcast: true, OOBInline: true, RcvLowat: 7,
			TOS: 8, TTL: 9, Freebind: true, Transparent: true, BindAddressNoPort: true, V6Only: true, TClass: 10,
			UnicastHops: 11, NoDelay: true, Cork: true, KeepIdle: 12, KeepIntvl: 13, KeepCnt: 14, UserTimeout: 15,
			Congestion: "cubic", NotSentLowat: -1, DeferAccept: 16, FastOpen: 17, UserMSS: 18,
		},
		Repair: &netsock.TCPRepair{
			SendSeq: 1, RecvSeq: 2, SendQueue: []byte("abc"), Unsent: 2, RecvQueue: []byte("de"), MSS: 1460,
			WscaleOK: true, SndWscale: 7, RcvWscale: 9, SackOK: true, TimestampsOK: true, Timestamp: 123,
			Window: netsock.Window{SndWl1: 1, SndWnd: 2, MaxWindow: 3, RcvWnd: 4, RcvWup: 5},
		},
	}
	if got := viaImage(t, st); !reflect.DeepEqual(got, st) {
		t.Errorf("round trip:\n got %+v\nwant %+v", got, st)
	}
	udp := &netsock.State{Family: netsock.IPv4, Proto: netsock.UDP, Local: netip.MustParseAddrPort("0.0.0.0:53"), RecvQueueDropped: true, Opts: netsock.SockOpts{PeekOff: -1}}
	if got := viaImage(t, udp); !reflect.DeepEqual(got, udp) {
		t.Errorf("round trip:\n got %+v\nwant %+v", got, udp)
	}
}
