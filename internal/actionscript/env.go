package actionscript

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/phaul/phaul/netsock"
)

// SocketEnv describes a process's IPv4 and IPv6 sockets to a script:
// PHAUL_ADDRESSES holds the specific local addresses they are bound to
// (what a script moves to the new host), each once; PHAUL_CONNECTIONS the
// connections, "PROTO LOCAL PEER" separated by ";", and PHAUL_LISTENERS the
// listening TCP endpoints.
func SocketEnv(eps []netsock.Endpoint) []string {
	var addrs, conns, listeners []string
	for _, ep := range eps {
		if a := ep.Local.Addr().Unmap(); ep.Local.IsValid() && !a.IsUnspecified() {
			if s := a.WithZone("").String(); !slices.Contains(addrs, s) {
				addrs = append(addrs, s)
			}
		}
		switch {
		case ep.Peer.IsValid():
			conns = append(conns, strings.ToLower(ep.Proto.String())+" "+hostPort(ep.Local)+" "+hostPort(ep.Peer))
		case ep.TCPState == netsock.Listen:
			listeners = append(listeners, hostPort(ep.Local))
		}
	}
	return []string{
		"PHAUL_ADDRESSES=" + strings.Join(addrs, " "),
		"PHAUL_CONNECTIONS=" + strings.Join(conns, ";"),
		"PHAUL_LISTENERS=" + strings.Join(listeners, " "),
	}
}

func hostPort(ap netip.AddrPort) string {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
}
