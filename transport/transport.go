package transport

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/phaul/phaul/internal/fault"
)

// preamble is what each end sends first on a new connection (after TLS):
// it makes sure the peer is phaul and, with TLS 1.3, lets a client whose
// certificate the server refused see the server's alert at once instead
// of on its first call.
var preamble = []byte("phaul-transport/1\n")

// Peer describes the other end of a session.
type Peer struct {
	Addr net.Addr
	// TLS is set for a mutually authenticated session; Identity is then
	// the peer certificate's common name (or first DNS name).
	TLS      bool
	Identity string
}

func (p Peer) String() string {
	if !p.TLS {
		return p.Addr.String() + " (no TLS)"
	}
	return fmt.Sprintf("%s (%s)", p.Addr, p.Identity)
}

// Session is one connection between two hosts: a yamux session on TCP
// (with TLS unless insecure or loopback). Either end may open streams; the
// other accepts them. Closing the session closes every stream and the
// connection.
type Session struct {
	mux  *yamux.Session
	peer Peer
	log  *slog.Logger
	// untrack forgets the connection for fault injection (tests only).
	untrack func()
}

// Open opens a stream to the peer.
func (s *Session) Open() (net.Conn, error) {
	c, err := s.mux.Open()
	if err != nil {
		return nil, fmt.Errorf("open stream to %s: %w", s.peer, err)
	}
	return c, nil
}

// Accept waits for a stream the peer opens.
func (s *Session) Accept() (net.Conn, error) {
	c, err := s.mux.Accept()
	if err != nil {
		return nil, fmt.Errorf("accept stream from %s: %w", s.peer, err)
	}
	return c, nil
}

// Ping measures the round trip to the peer.
func (s *Session) Ping() (time.Duration, error) {
	d, err := s.mux.Ping()
	if err != nil {
		return 0, fmt.Errorf("ping %s: %w", s.peer, err)
	}
	return d, nil
}

// Peer describes the other end.
func (s *Session) Peer() Peer { return s.peer }

// Done is closed when the session ends.
func (s *Session) Done() <-chan struct{} { return s.mux.CloseChan() }

// Close ends the session and its connection. It is idempotent.
func (s *Session) Close() error {
	if s.untrack != nil {
		s.untrack()
	}
	return s.mux.Close()
}

// Listener accepts sessions.
type Listener struct {
	cfg ServerConfig
	ln  net.Listener
	tls *tls.Config
	log *slog.Logger
}

// Listen validates cfg and listens on its address. Without TLS and
// Insecure, the address it binds must be loopback (ErrNeedTLS otherwise).
func Listen(cfg ServerConfig) (*Listener, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	l := &Listener{cfg: cfg, log: cfg.Logger.With("component", "transport")}
	if cfg.TLS.Enabled() {
		t, err := cfg.TLS.serverTLS()
		if err != nil {
			return nil, fmt.Errorf("transport: %w", err)
		}
		l.tls = t
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("transport: %w", err)
	}
	if l.tls == nil && !cfg.Insecure && !isLoopback(ln.Addr()) {
		ln.Close()
		return nil, fmt.Errorf("transport: listen on %s (bound %s): %w", cfg.Listen, ln.Addr(), errNeedTLS)
	}
	l.ln = ln
	return l, nil
}

// Addr is the address the listener is bound to.
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// Close stops accepting; Serve returns.
func (l *Listener) Close() error { return l.ln.Close() }

// Serve accepts connections until ctx is done or the listener is closed,
// sets each up (TLS, preamble, yamux) and calls handle with the session in
// a goroutine of its own, at most MaxSessions at once. A session is closed
// when handle returns, or when ctx is done (handle's ctx is then done
// too). Serve returns once every handler has returned; nil after ctx or
// Close, the accept error otherwise.
func (l *Listener) Serve(ctx context.Context, handle func(context.Context, *Session)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { l.ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	slots := make(chan struct{}, l.cfg.MaxSessions)
	l.log.Info("listening", "addr", l.ln.Addr().String(), "tls", l.tls != nil, "insecure", l.cfg.Insecure)
	var backoff time.Duration
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of descriptors and the like: wait a little and retry.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.log.Warn("accept failed", "err", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
				continue
			case <-ctx.Done():
				return nil
			}
		}
		backoff = 0
		select {
		case slots <- struct{}{}:
		default:
			l.log.Warn("connection refused: too many sessions", "peer", conn.RemoteAddr().String(), "max", l.cfg.MaxSessions)
			conn.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			l.serveConn(ctx, conn, handle)
		}()
	}
}

// serveConn sets up one connection and runs its handler.
func (l *Listener) serveConn(ctx context.Context, conn net.Conn, handle func(context.Context, *Session)) {
	log := l.log.With("peer", conn.RemoteAddr().String())
	sess, err := l.accept(ctx, conn)
	if err != nil {
		conn.Close()
		log.Warn("connection refused", "err", err)
		return
	}
	defer sess.Close()
	defer fault.Track(conn)()
	stop := context.AfterFunc(ctx, func() { sess.Close() })
	defer stop()
	log.Info("session open", "identity", sess.peer.Identity, "tls", sess.peer.TLS)
	start := time.Now()
	handle(ctx, sess)
	log.Info("session closed", "duration", time.Since(start).Round(time.Millisecond))
}

// accept runs the server side of the handshake.
func (l *Listener) accept(ctx context.Context, conn net.Conn) (*Session, error) {
	ctx, cancel := context.WithTimeout(ctx, l.cfg.HandshakeTimeout)
	defer cancel()
	peer := Peer{Addr: conn.RemoteAddr()}
	if l.tls != nil {
		tc := tls.Server(conn, l.tls)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("TLS handshake: %w", err)
		}
		peer.TLS = true
		peer.Identity = identity(tc.ConnectionState())
		conn = tc
	}
	if err := exchangePreamble(ctx, conn); err != nil {
		return nil, err
	}
	mux, err := yamux.Server(conn, l.cfg.yamux())
	if err != nil {
		return nil, fmt.Errorf("yamux: %w", err)
	}
	return &Session{mux: mux, peer: peer, log: l.log}, nil
}

// Dial connects to the target in cfg and returns the session. Without TLS
// and Insecure, the address reached must be loopback (ErrNeedTLS
// otherwise). A target that refuses our certificate fails Dial.
func Dial(ctx context.Context, cfg ClientConfig) (*Session, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	var tlsConf *tls.Config
	if cfg.TLS.Enabled() {
		t, err := cfg.TLS.clientTLS(cfg.ServerName)
		if err != nil {
			return nil, fmt.Errorf("dial %s: %w", cfg.Address, err)
		}
		tlsConf = t
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.HandshakeTimeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", cfg.Address)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", cfg.Address, err)
	}
	sess, err := dialSession(ctx, conn, tlsConf, cfg)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("dial %s: %w", cfg.Address, err)
	}
	sess.untrack = fault.Track(conn)
	return sess, nil
}

func dialSession(ctx context.Context, conn net.Conn, tlsConf *tls.Config, cfg ClientConfig) (*Session, error) {
	peer := Peer{Addr: conn.RemoteAddr()}
	if tlsConf == nil && !cfg.Insecure && !isLoopback(conn.RemoteAddr()) {
		return nil, fmt.Errorf("reached %s: %w", conn.RemoteAddr(), errNeedTLS)
	}
	if tlsConf != nil {
		tc := tls.Client(conn, tlsConf)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("TLS handshake: %w", err)
		}
		peer.TLS = true
		peer.Identity = identity(tc.ConnectionState())
		conn = tc
	}
	if err := exchangePreamble(ctx, conn); err != nil {
		if tlsConf == nil && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
			// A TLS server drops a plain client's hello without a word.
			return nil, fmt.Errorf("%w: the target closed the connection; does it require TLS? (give --tls-cert, --tls-key and --tls-ca)", err)
		}
		return nil, err
	}
	mux, err := yamux.Client(conn, cfg.yamux())
	if err != nil {
		return nil, fmt.Errorf("yamux: %w", err)
	}
	return &Session{mux: mux, peer: peer, log: cfg.Logger.With("component", "transport")}, nil
}

// exchangePreamble sends ours and checks the peer's, within ctx.
func exchangePreamble(ctx context.Context, conn net.Conn) error {
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
		defer conn.SetDeadline(time.Time{})
	}
	// Cancelling ctx cuts the exchange short through the deadline.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	errc := make(chan error, 1)
	go func() {
		_, err := conn.Write(preamble)
		errc <- err
	}()
	got := make([]byte, len(preamble))
	_, rerr := io.ReadFull(conn, got)
	werr := <-errc
	if !stop() {
		// ctx ended: the deadline may be cut whatever happened.
		return fmt.Errorf("preamble: %w", ctx.Err())
	}
	switch {
	case rerr != nil:
		return fmt.Errorf("read peer preamble: %w", rerr)
	case werr != nil:
		return fmt.Errorf("send preamble: %w", werr)
	case !bytes.Equal(got, preamble):
		return fmt.Errorf("peer is not a phaul transport (sent %q)", got)
	}
	return nil
}

// isLoopback reports whether a TCP address is a loopback address.
func isLoopback(a net.Addr) bool {
	t, ok := a.(*net.TCPAddr)
	return ok && t.IP.IsLoopback()
}
