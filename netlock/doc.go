// Package netlock holds the packets of migrating connections while their
// process is frozen: it drops them, in both directions, in one network
// namespace, so that the peer sees only loss and retransmits, and neither
// side's kernel sends a RST or FIN that would end the connection. On the
// source a lock goes on before the process is frozen and stays until the
// connections are closed in repair mode and their address has left the
// host; on the target it goes on before the sockets are restored and comes
// off when the restore is done.
//
// # Why a Go library and not the nft tool
//
// A lock is an nftables table of its own, "phaul-<id>", in the inet family
// (IPv4 and IPv6 in one table), with an input and an output chain hooked
// before conntrack (priority raw-10) and one rule per connection and
// direction that matches the 4-tuple, counts and drops. It is written with
// github.com/google/nftables, which speaks the kernel's nf_tables netlink
// interface directly, rather than by running nft(8), because:
//
//   - phaul runs as a single binary on the hosts it migrates between;
//     the library needs nothing installed there (nft, or iptables, often
//     is not: this machine has neither), only a kernel with nf_tables;
//   - the lock is taken and released inside the freeze window. Measured
//     here: New takes about 5 ms (most of it registering the chains'
//     hooks); Unlock lets packets through about 0.5 ms after it is called
//     (it removes the rules first) and has removed the table about 3 ms
//     later. Running nft would add a process start and a ruleset parse
//     to each step, and errors would come back as text;
//   - the namespace is given as a descriptor (WithNetNSFd), which works
//     for a process's /proc/PID/ns/net as well as for a named namespace,
//     without nsenter or ip netns exec;
//   - the library is maintained by Google, has been stable for years and
//     is widely used (Tailscale, among others); it brings only
//     mdlayher/netlink and mdlayher/socket with it.
//
// Every change is one nf_tables batch, applied atomically by the kernel:
// Lock adds, deletes and re-adds its table in one batch, so a table left
// by a run that crashed is replaced rather than merged with; Unlock
// deletes the table and is a no-op when it is already gone.
package netlock
