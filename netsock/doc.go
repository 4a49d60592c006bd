// Package netsock dumps and restores IPv4 and IPv6 sockets (TCP and UDP):
// the state a process's socket has, read from a descriptor phaul holds on
// the same socket (taken from the frozen process with pidfd_getfd), and a
// new socket built from that state in the network namespace of the
// restoring host.
//
// What is carried over:
//
//   - TCP listening sockets: address, backlog (read from TCP_INFO, where the
//     kernel reports a listener's max backlog as tcpi_sacked) and options.
//     A listener with connections waiting in its accept queue is refused:
//     those connections cannot be moved (CRIU refuses them too).
//   - MPTCP listeners (and unconnected MPTCP sockets) the same way: Go
//     1.24 and later listen with MPTCP by default, and a plain TCP peer's
//     connection accepted on such a listener is a plain TCP socket. Where
//     the restoring host has no MPTCP, a TCP listener takes its place, as
//     Go itself falls back. MPTCP connections are refused: the kernel
//     does not repair them.
//   - TCP sockets that are neither listening nor connected (state CLOSE):
//     options and the bound address, if any.
//   - Established TCP connections, only when the caller allows them
//     (Options.TCPEstablished, the --tcp-established of CRIU): sequence
//     numbers, the whole send queue (sent-but-unacked bytes and the unsent
//     tail), the unread receive queue, the options negotiated at the
//     handshake (MSS, window scale, SACK, timestamps and the timestamp
//     clock), the window (TCP_REPAIR_WINDOW) and the socket options, all
//     read in TCP_REPAIR mode.
//   - UDP sockets: bound and connected addresses and options. Datagrams
//     waiting in the receive queue are not carried over: they are lost as
//     if dropped on the wire, which UDP allows; State.RecvQueueDropped says
//     it happened.
//
// Every other TCP state is refused by name (SYN_SENT, FIN_WAIT1, FIN_WAIT2,
// CLOSE_WAIT, LAST_ACK, CLOSING, ...), and so is every other kind of
// socket, with an error that matches ErrUnsupported.
//
// # Dump leaves established connections in repair mode
//
// Dump turns TCP_REPAIR on for an established connection and leaves it on:
// in repair mode the kernel sends nothing on the connection, and closing
// it (the process's descriptor and phaul's) sends neither FIN nor RST, so
// the peer never learns that the connection left the host. To roll back,
// Resume leaves repair mode; the connection then goes on as before, with
// its queues intact. Leaving repair mode resets SO_REUSEADDR in the
// kernel; Resume sets it again.
//
// Reading the state does not disturb the socket: queues are read with
// MSG_PEEK (SO_PEEK_OFF, if the process uses it, is put back), the
// socket's file flags are never touched (netsock uses the descriptor
// through SyscallConn, never os.File.Fd, which would clear O_NONBLOCK on
// the process's open file description).
//
// The caller must hold the connection's packets (package netlock) from
// before Dump until the restored socket is ready: in repair mode the kernel
// still processes incoming packets, and once the socket is gone the host
// would answer the peer's retransmissions with RST. Keep the target's lock
// until the migration commits: a restored socket that acks the peer's
// bytes makes a rollback to the source impossible. To roll back on the
// target, Silence the restored connections before their last descriptor
// closes; on the source, Resume them.
//
// Addrs reads a socket's addresses without touching it, and LockSet turns
// them into what netlock must hold, so the lock can go on before Dump.
//
// # Restore
//
// Restore creates the socket in the network namespace given in
// RestoreOptions.NetNS (or the calling thread's) and rebuilds it: for an
// established connection in the order proven on this kernel
// (shared/probes/p6_tcprepair.c): repair mode, queue sequence numbers,
// bind, connect, repair options and timestamp, receive queue, the sent
// part of the send queue, window, repair off, options, then the unsent tail
// is sent normally. Repair mode allows binding a port another socket holds
// (a restored listener on the same port); restore listeners first.
//
// A restored connection's round-trip estimate starts from nothing, so the
// kernel retransmits its sent-but-unacked bytes after the initial
// retransmission timeout: about 1 s after the lock comes off, the peer
// gets them (measured here; CRIU behaves the same). Bytes the peer sent
// during the lock arrive as soon as its own retransmission does.
//
// Binding and connecting use IP_TRANSPARENT for the duration of the calls
// (unless the socket had it), so a socket can be restored before its
// address has moved to the new host. Integer options are set only where
// they differ from those of a fresh socket on the restoring host, so
// defaults of the new host stay defaults. The send and receive buffer sizes
// of an established connection are always set (the queues must fit), which
// fixes them at the dumped sizes, as CRIU does.
//
// State converts to and from the image message imagepb.InetSocket
// (protocol/socket.proto) with State.ToProto and FromProto.
package netsock
