package netsock

import (
	"errors"
	"fmt"
	"net/netip"
	"os"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/netlock"
)

// Endpoint is what a network lock needs to know of a socket: its
// protocol, addresses and TCP state.
type Endpoint struct {
	Family   Family
	Proto    Proto
	TCPState TCPState
	Local    netip.AddrPort
	Peer     netip.AddrPort
}

// Addrs returns the endpoint of the socket f without changing anything
// (no repair mode): call it before the lock, and Dump after. A socket
// that is not IPv4 or IPv6 TCP, MPTCP or UDP is refused as Dump refuses
// it.
func Addrs(f *os.File) (Endpoint, error) {
	var ep Endpoint
	err := control(f, func(fd int) error {
		domain, err := sys.GetsockoptInt(fd, sys.SOL_SOCKET, sys.SO_DOMAIN)
		if err != nil {
			return fmt.Errorf("socket domain: %w", err)
		}
		if domain != sys.AF_INET && domain != sys.AF_INET6 {
			return &RefusedError{Socket: fmt.Sprintf("family %d socket", domain), Reason: "not an IPv4 or IPv6 socket"}
		}
		proto, err := sys.GetsockoptInt(fd, sys.SOL_SOCKET, sys.SO_PROTOCOL)
		if err != nil {
			return fmt.Errorf("socket protocol: %w", err)
		}
		ep.Family, ep.Proto = Family(domain), Proto(proto)
		if ep.Proto != TCP && ep.Proto != MPTCP && ep.Proto != UDP {
			return &RefusedError{Socket: fmt.Sprintf("%v socket of protocol %d", ep.Family, proto), Reason: "only TCP (and MPTCP listeners) and UDP sockets can be migrated"}
		}
		if ep.Local, err = sys.GetsocknameInet(fd); err != nil {
			return err
		}
		if ep.Peer, err = sys.GetpeernameInet(fd); err != nil && !errors.Is(err, sys.ENOTCONN) {
			return err
		}
		if ep.Proto.stream() {
			info, err := sys.GetTCPInfo(fd)
			if err != nil {
				return err
			}
			ep.TCPState = TCPState(info.State)
		}
		return nil
	})
	return ep, err
}

// Endpoint returns the endpoint of the dumped socket.
func (st *State) Endpoint() Endpoint {
	return Endpoint{Family: st.Family, Proto: st.Proto, TCPState: st.TCPState, Local: st.Local, Peer: st.Peer}
}

// LockSet returns what a network lock must hold for these sockets: the
// 4-tuple of every connected one and the port of every TCP listener and
// bound UDP socket (a datagram that met the closed port would bring the
// peer an ICMP port unreachable, which its connected UDP socket reports
// as ECONNREFUSED). Unbound sockets need nothing.
func LockSet(eps []Endpoint) netlock.Set {
	var s netlock.Set
	for _, ep := range eps {
		p := netlock.TCP
		if ep.Proto == UDP {
			p = netlock.UDP
		}
		switch {
		case ep.Proto.stream() && ep.TCPState == Listen:
			s.Ports = append(s.Ports, netlock.Port{Proto: p, Local: ep.Local})
		case ep.Peer.IsValid() && ep.Local.IsValid():
			s.Conns = append(s.Conns, netlock.Conn{Proto: p, Local: ep.Local, Remote: ep.Peer})
		case ep.Proto == UDP && ep.Local.IsValid() && ep.Local.Port() != 0:
			s.Ports = append(s.Ports, netlock.Port{Proto: p, Local: ep.Local})
		}
	}
	return s
}
