// Package workload is phaul's built-in test workload: a process that holds
// a set amount of memory with a known pattern, rewrites pages at a set rate
// from a set number of goroutines, prints a heartbeat line at a fixed
// interval, and verifies its whole memory on request (SIGUSR1) or at every
// heartbeat. The phaul binary runs it as a hidden subcommand, so the demo
// and the bench need nothing but phaul.
//
// The heartbeat lines are the workload's own account of its downtime: each
// reports the largest gap it saw between two heartbeats.
//
// # Network side
//
// With Config.Listen (--listen ADDR) the workload also serves a TCP
// protocol, and with Config.UDP (--udp ADDR) a UDP echo, so that tests
// can check that connections and sockets survive a migration and measure
// the stall a client sees. Server is that side on its own (for tests
// without Run); TCPClient and UDPClient are the clients, on a connection
// the caller made (from any network namespace).
//
// Every message carries a sequence number and a payload derived from
// (connection id, direction, sequence number), length included (an
// xorshift stream seeded by a splitmix64 hash of the three; see
// fillPayload and payloadLen), so both
// ends check every message byte for byte, and that the numbers go
// 0, 1, 2, ... with no gap, duplicate or reordering.
//
// # TCP frames
//
// A connection is a stream of frames, each a 16-byte header (big-endian)
// and a payload:
//
//	0   'p' 'w'  magic
//	2   u8       type: 1 hello, 2 data, 3 bye, 4 bye answer
//	3   u8       0 (reserved)
//	4   u32      payload length (at most 1 MiB)
//	8   u64      sequence number; in a bye, the messages sent
//	16  payload
//
// The client opens with a hello, whose 16-byte payload is
//
//	0   u64  connection id
//	8   u32  interval in microseconds (0: DefaultInterval)
//	12  u8   mode: 0 normal, 1 lazy-server, 2 bulk
//	13  3×0  reserved
//
// Then each side sends data frames numbered from 0. The client sends one
// every interval. The server sends its own (not answers) every interval,
// or in bulk mode back to back as fast as the socket takes them. Data
// payloads are 16 to 1024 bytes, and 16 to 64 KiB from a bulk server.
//
//   - normal: both ends read promptly.
//   - lazy-server: the server reads in bursts, sleeping 300 ms whenever it
//     has read everything, so the client's data waits in the server's
//     receive queue.
//   - bulk: the client reads 8 KiB then sleeps 1 ms, slower than the server
//     writes, so the server's send queue stays full (megabytes on
//     loopback) of data unsent or unacknowledged.
//
// To end, the client stops sending and sends a bye whose sequence number
// is how many data frames it sent. The server stops sending and answers
// with a bye answer, whose 16-byte payload is the number of data frames
// it received (u64) and sent (u64), then closes the connection. Each side
// checks the other's counts against its own.
//
// # UDP datagrams
//
// A datagram is a header of type 5 (datagram) with the sequence number,
// then the client's id (u64) and a payload of 16 to 256 bytes derived
// from (id, sequence number). The server checks it and sends it back
// unchanged. The client accepts answers in any order, but each exactly
// once and only for datagrams it sent; unanswered datagrams count as
// lost, not as errors.
//
// # Server lines
//
// The server writes, besides Run's lines:
//
//	TCPERR conn=ID reason             a violation (the count is in BEAT)
//	TCPDONE conn=ID received=N sent=M ok=true|false
//	UDPERR peer=ADDR reason
//
// A TCPERR is written for every sequence or payload violation, for a
// count in a bye that differs from what the server received, and for a
// connection that ends other than by a bye (reset, end of file, bad
// frame). TCPDONE ends an orderly close; ok is false if the connection
// had any TCPERR. A connection whose hello is bad is named conn=-.
package workload
