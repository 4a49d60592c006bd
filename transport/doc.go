// Package transport owns the connection between two phaul hosts: one TCP
// connection, mutually authenticated with TLS (or explicitly not), carrying
// one yamux session whose streams carry gRPC. The target listens (Listen,
// Listener.Serve), the source dials (Dial); both get a Session, which opens
// and accepts streams as net.Conn and serves or dials gRPC over them.
//
// Policy: TLS means mutual TLS 1.3 with a CA file, a certificate and a key
// on each side (each verifies the other's certificate against the CA).
// Without TLS, only loopback is allowed unless Insecure is set: a listener
// bound to another address, or a dial reaching one, is refused with
// ErrNeedTLS before anything is exchanged.
package transport
