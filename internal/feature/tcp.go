package feature

import (
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/phaul/phaul/internal/sys"
)

// tcpTimeout bounds every network step of the TCP_REPAIR probe.
const tcpTimeout = 5 * time.Second

// probeTCPRepair connects two sockets over loopback, puts the client into
// repair mode, reads its send sequence number (only possible in repair
// mode), leaves repair mode and checks the connection still carries data.
// TCP_REPAIR needs CAP_NET_ADMIN in the network namespace's owner.
func probeTCPRepair() (string, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("listen on loopback: %w", err)
	}
	defer ln.Close()
	type accepted struct {
		c   net.Conn
		err error
	}
	ch := make(chan accepted, 1)
	go func() {
		c, err := ln.Accept()
		ch <- accepted{c, err}
	}()
	conn, err := net.DialTimeout("tcp4", ln.Addr().String(), tcpTimeout)
	if err != nil {
		return "", fmt.Errorf("connect over loopback: %w", err)
	}
	defer conn.Close()
	a := <-ch
	if a.err != nil {
		return "", fmt.Errorf("accept over loopback: %w", a.err)
	}
	peer := a.c
	defer peer.Close()

	raw, err := conn.(*net.TCPConn).SyscallConn()
	if err != nil {
		return "", fmt.Errorf("raw loopback socket: %w", err)
	}
	var seq int
	var rerr error
	if err := raw.Control(func(fd uintptr) { seq, rerr = repairRoundTrip(int(fd)) }); err != nil {
		return "", fmt.Errorf("raw loopback socket: %w", err)
	}
	if rerr != nil {
		return "", rerr
	}

	deadline := time.Now().Add(tcpTimeout)
	if err := conn.SetDeadline(deadline); err != nil {
		return "", err
	}
	if err := peer.SetDeadline(deadline); err != nil {
		return "", err
	}
	if _, err := conn.Write([]byte("x")); err != nil {
		return "", absent("connection unusable after repair mode", err)
	}
	var b [1]byte
	if _, err := io.ReadFull(peer, b[:]); err != nil {
		return "", absent("connection unusable after repair mode", err)
	}
	return fmt.Sprintf("repair on, send queue seq %#x read, repair off, connection still works", uint32(seq)), nil
}

// repairRoundTrip turns repair mode on for fd, reads the send queue's
// sequence number and turns repair mode off again.
func repairRoundTrip(fd int) (int, error) {
	if err := sys.SetsockoptInt(fd, sys.SOL_TCP, sys.TCP_REPAIR, sys.TCP_REPAIR_ON); err != nil {
		if errors.Is(err, sys.EPERM) {
			return 0, absent("TCP_REPAIR refused: CAP_NET_ADMIN missing", err)
		}
		return 0, absent("TCP_REPAIR refused", err)
	}
	seq, err := func() (int, error) {
		if err := sys.SetsockoptInt(fd, sys.SOL_TCP, sys.TCP_REPAIR_QUEUE, sys.TCP_SEND_QUEUE); err != nil {
			return 0, absent("TCP_REPAIR_QUEUE refused in repair mode", err)
		}
		seq, err := sys.GetsockoptInt(fd, sys.SOL_TCP, sys.TCP_QUEUE_SEQ)
		if err != nil {
			return 0, absent("TCP_QUEUE_SEQ unreadable in repair mode", err)
		}
		if err := sys.SetsockoptInt(fd, sys.SOL_TCP, sys.TCP_REPAIR_QUEUE, sys.TCP_NO_QUEUE); err != nil {
			return 0, absent("TCP_REPAIR_QUEUE reset refused", err)
		}
		return seq, nil
	}()
	if offErr := sys.SetsockoptInt(fd, sys.SOL_TCP, sys.TCP_REPAIR, sys.TCP_REPAIR_OFF); offErr != nil && err == nil {
		err = absent("leaving TCP_REPAIR refused", offErr)
	}
	return seq, err
}
