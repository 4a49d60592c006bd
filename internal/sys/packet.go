package sys

import "golang.org/x/sys/unix"

// SendEthernetFrame sends a raw Ethernet frame (header included) with
// protocol proto out of the interface with index ifindex.
func SendEthernetFrame(ifindex int, proto uint16, dst [6]byte, frame []byte) error {
	htons := proto<<8 | proto>>8
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons))
	if err != nil {
		return wrap("socket(AF_PACKET)", err)
	}
	defer unix.Close(fd)
	sa := &unix.SockaddrLinklayer{Protocol: htons, Ifindex: ifindex, Halen: 6}
	copy(sa.Addr[:], dst[:])
	return wrap("sendto", unix.Sendto(fd, frame, 0, sa))
}
