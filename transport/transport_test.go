package transport

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/phaul/phaul/protocol/migrationpb"
)

// quiet is a logger for tests: warnings and errors only, on the test log.
func quiet(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// hello is a Control server answering Hello with the peer it sees.
type hello struct {
	migrationpb.UnimplementedControlServer
	peer string
}

func (h hello) Hello(context.Context, *migrationpb.HelloRequest) (*migrationpb.HelloResponse, error) {
	return &migrationpb.HelloResponse{Accepted: true, Reason: h.peer}, nil
}

// serveGRPC serves a hello Control service on the session until it ends.
func serveGRPC(ctx context.Context, s *Session) error {
	srv := grpc.NewServer(GRPCServerOptions()...)
	migrationpb.RegisterControlServer(srv, hello{peer: s.Peer().Identity})
	return s.ServeGRPC(ctx, srv)
}

// exercise checks a session pair: streams both ways with 4 MiB echoed,
// gRPC from client to server, ping.
func exercise(t *testing.T, client, server *Session) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	// Echo on every stream either side accepts (the server's gRPC takes
	// the client's streams, so the echo runs on the client side: streams
	// the server opens).
	wg.Go(func() {
		c, err := client.Accept()
		if err != nil {
			t.Error(err)
			return
		}
		defer c.Close()
		io.Copy(c, c)
	})
	gerr := make(chan error, 1)
	wg.Go(func() { gerr <- serveGRPC(ctx, server) })

	s, err := server.Open()
	if err != nil {
		t.Fatal(err)
	}
	payload := bytes.Repeat([]byte("phaul pages "), 4<<20/12)
	go func() {
		s.Write(payload)
		s.Close() // a yamux close is a half close: the echo still comes back
	}()
	got, err := io.ReadAll(s)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("echo: %d bytes, %v", len(got), err)
	}

	cc, err := client.DialGRPC()
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	resp, err := migrationpb.NewControlClient(cc).Hello(ctx, &migrationpb.HelloRequest{})
	if err != nil || !resp.Accepted {
		t.Fatalf("hello over the session: %v %v", resp, err)
	}
	if want := server.Peer().Identity; resp.Reason != want {
		t.Errorf("server saw peer %q, want %q", resp.Reason, want)
	}
	if _, err := client.Ping(); err != nil {
		t.Error(err)
	}
	cc.Close()
	client.Close()
	select {
	case err := <-gerr:
		if err != nil {
			t.Errorf("ServeGRPC after the client left: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ServeGRPC still running after the session closed")
	}
	<-server.Done()
}

// pair builds a session pair over conns with the server side of l.
func pair(t *testing.T, l *Listener, ccfg ClientConfig, sc, cc net.Conn) (client, server *Session) {
	t.Helper()
	if err := ccfg.Validate(); err != nil {
		t.Fatal(err)
	}
	var ctls *tls.Config
	if ccfg.TLS.Enabled() {
		var err error
		if ctls, err = ccfg.TLS.clientTLS(ccfg.ServerName); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	var serr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		server, serr = l.accept(ctx, sc)
	}()
	client, err := dialSession(ctx, cc, ctls, ccfg)
	<-done
	if err != nil || serr != nil {
		t.Fatalf("client %v, server %v", err, serr)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestSession runs the same exchange over pipes, TCP and mutual TLS.
func TestSession(t *testing.T) {
	ca := newCA(t, "phaul-test")
	srvTLS, cliTLS := ca.issue(t, "target"), ca.issue(t, "source")
	t.Run("pipe", func(t *testing.T) {
		scfg := ServerConfig{Config: Config{Insecure: true, Logger: quiet(t)}}
		if err := scfg.Validate(); err != nil {
			t.Fatal(err)
		}
		sc, cc := net.Pipe()
		client, server := pair(t, &Listener{cfg: scfg, log: scfg.Logger}, ClientConfig{Address: "pipe:0", Config: Config{Insecure: true, Logger: quiet(t)}}, sc, cc)
		exercise(t, client, server)
	})
	for _, tc := range []struct {
		name     string
		srv, cli TLSFiles
	}{{"tcp", TLSFiles{}, TLSFiles{}}, {"tls", srvTLS, cliTLS}} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := connect(t, tc.srv, tc.cli)
			if tc.name == "tls" {
				if p := server.Peer(); !p.TLS || p.Identity != "source" {
					t.Errorf("server sees %v", p)
				}
				if p := client.Peer(); !p.TLS || p.Identity != "target" {
					t.Errorf("client sees %v", p)
				}
			}
			exercise(t, client, server)
		})
	}
}

// connect listens on loopback with srv's TLS and dials with cli's; it
// returns both sessions. The listener is closed at cleanup.
func connect(t *testing.T, srv, cli TLSFiles) (client, server *Session) {
	t.Helper()
	l, err := Listen(ServerConfig{Listen: "127.0.0.1:0", Config: Config{TLS: srv, Logger: quiet(t)}})
	if err != nil {
		t.Fatal(err)
	}
	sessions := make(chan *Session, 1)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		l.Serve(ctx, func(ctx context.Context, s *Session) {
			sessions <- s
			<-s.Done()
		})
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
	client, err = Dial(context.Background(), ClientConfig{Address: l.Addr().String(), Config: Config{TLS: cli, Logger: quiet(t)}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	select {
	case server = <-sessions:
	case <-time.After(5 * time.Second):
		t.Fatal("no session on the server")
	}
	return client, server
}

// refusingServer listens with mutual TLS and counts the sessions its
// handler sees (it should see none).
func refusingServer(t *testing.T, srv TLSFiles) (addr string, sessions func() int) {
	t.Helper()
	l, err := Listen(ServerConfig{Listen: "127.0.0.1:0", Config: Config{TLS: srv, Logger: quiet(t)}})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	n := 0
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		l.Serve(ctx, func(context.Context, *Session) {
			mu.Lock()
			n++
			mu.Unlock()
		})
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
	return l.Addr().String(), func() int { mu.Lock(); defer mu.Unlock(); return n }
}

func TestTLSRefusals(t *testing.T) {
	ca, other := newCA(t, "phaul-test"), newCA(t, "intruder")
	srvTLS := ca.issue(t, "target")
	addr, sessions := refusingServer(t, srvTLS)
	dial := func(cli TLSFiles) error {
		s, err := Dial(context.Background(), ClientConfig{Address: addr, Config: Config{TLS: cli, Logger: quiet(t)}})
		if err == nil {
			s.Close()
		}
		return err
	}

	t.Run("client certificate of another CA", func(t *testing.T) {
		cli := other.issue(t, "intruder")
		cli.CAFile = ca.File // it trusts the target, the target does not trust it
		// Go's client offers no certificate the server's CAs did not
		// sign; the server then refuses for lack of one.
		err := dial(cli)
		if err == nil || !strings.Contains(err.Error(), "certificate required") {
			t.Fatalf("dial: %v", err)
		}
		// Forced to present it, the certificate itself is refused.
		cert, err := tls.LoadX509KeyPair(cli.CertFile, cli.KeyFile)
		if err != nil {
			t.Fatal(err)
		}
		pool := x509.NewCertPool()
		pool.AddCert(ca.Cert)
		c, err := tls.Dial("tcp", addr, &tls.Config{
			RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS13,
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
		})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write(preamble)
		if _, err = c.Read(make([]byte, 64)); err == nil || !strings.Contains(err.Error(), "unknown certificate authority") {
			t.Fatalf("read with a foreign certificate: %v", err)
		}
	})
	t.Run("client without certificate", func(t *testing.T) {
		pool := x509.NewCertPool()
		pool.AddCert(ca.Cert)
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS13})
		if err != nil {
			t.Fatal(err) // TLS 1.3: the server refuses after the client's handshake
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write(preamble)
		_, err = c.Read(make([]byte, 64))
		if err == nil || !strings.Contains(err.Error(), "certificate required") {
			t.Fatalf("read: %v", err)
		}
	})
	t.Run("client trusting another CA", func(t *testing.T) {
		cli := ca.issue(t, "source")
		cli.CAFile = other.File
		err := dial(cli)
		if err == nil || !strings.Contains(err.Error(), "certificate signed by unknown authority") {
			t.Fatalf("dial: %v", err)
		}
	})
	t.Run("client without TLS", func(t *testing.T) {
		err := dial(TLSFiles{})
		if err == nil || !strings.Contains(err.Error(), "preamble") {
			t.Fatalf("dial: %v", err)
		}
	})
	if n := sessions(); n != 0 {
		t.Errorf("the handler saw %d sessions", n)
	}
	// And the right client still gets in.
	if err := dial(ca.issue(t, "source")); err != nil {
		t.Fatal(err)
	}
}

func TestListenPolicy(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:7070", ":7070", "[::]:7070", "192.0.2.1:7070", "[2001:db8::1]:7070"} {
		cfg := ServerConfig{Listen: addr}
		err := cfg.Validate()
		if !errors.Is(err, ErrNeedTLS) || !strings.Contains(err.Error(), "--insecure") {
			t.Errorf("%s without TLS: %v", addr, err)
		}
		if _, err := Listen(ServerConfig{Listen: addr}); !errors.Is(err, ErrNeedTLS) {
			t.Errorf("listen on %s without TLS: %v", addr, err)
		}
		cfg = ServerConfig{Listen: addr, Config: Config{Insecure: true}}
		if err := cfg.Validate(); err != nil {
			t.Errorf("%s with --insecure: %v", addr, err)
		}
	}
	for _, addr := range []string{"127.0.0.1:0", "localhost:0", "[::1]:0"} {
		l, err := Listen(ServerConfig{Listen: addr})
		if err != nil {
			if addr == "[::1]:0" && strings.Contains(err.Error(), "assign requested address") {
				continue // no IPv6 here
			}
			t.Errorf("%s: %v", addr, err)
			continue
		}
		if !isLoopback(l.Addr()) {
			t.Errorf("%s bound %s", addr, l.Addr())
		}
		l.Close()
	}
	cfg := ServerConfig{}
	if err := cfg.Validate(); err != nil || cfg.Listen != DefaultListen {
		t.Errorf("default listen: %q %v", cfg.Listen, err)
	}
}

// addrConn is a connection claiming another remote address.
type addrConn struct {
	net.Conn
	remote net.Addr
}

func (c addrConn) RemoteAddr() net.Addr { return c.remote }

func TestDialPolicy(t *testing.T) {
	far := &net.TCPAddr{IP: net.ParseIP("192.0.2.7"), Port: 7070}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	cfg := ClientConfig{Address: "192.0.2.7:7070"}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	_, err := dialSession(context.Background(), addrConn{a, far}, nil, cfg)
	if !errors.Is(err, ErrNeedTLS) {
		t.Fatalf("plain dial off loopback: %v", err)
	}
	// With --insecure the policy lets it through (and the pipe's other
	// end, answering nothing, fails the preamble).
	cfg.Insecure = true
	b.Close()
	_, err = dialSession(context.Background(), addrConn{a, far}, nil, cfg)
	if err == nil || errors.Is(err, ErrNeedTLS) {
		t.Fatalf("insecure dial: %v", err)
	}
}

func TestConfigValidation(t *testing.T) {
	bad := []ServerConfig{
		{Listen: "127.0.0.1"},
		{Listen: "127.0.0.1:0", Config: Config{TLS: TLSFiles{CertFile: "a"}}},
		{Listen: "127.0.0.1:0", Config: Config{StreamWindow: 1000}},
		{Listen: "127.0.0.1:0", Config: Config{HandshakeTimeout: -1}},
		{Listen: "127.0.0.1:0", MaxSessions: -1},
	}
	for _, c := range bad {
		if err := c.Validate(); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
	dir := t.TempDir()
	missing := TLSFiles{CertFile: dir + "/c", KeyFile: dir + "/k", CAFile: dir + "/ca"}
	if _, err := Listen(ServerConfig{Listen: "127.0.0.1:0", Config: Config{TLS: missing}}); err == nil || !strings.Contains(err.Error(), "load TLS certificate") {
		t.Errorf("missing TLS files: %v", err)
	}
	ca := newCA(t, "x")
	f := ca.issue(t, "y")
	os.WriteFile(dir+"/notpem", []byte("hello"), 0o600)
	f.CAFile = dir + "/notpem"
	if _, err := Listen(ServerConfig{Listen: "127.0.0.1:0", Config: Config{TLS: f}}); err == nil || !strings.Contains(err.Error(), "no PEM certificate") {
		t.Errorf("bad CA file: %v", err)
	}
	if _, err := Dial(context.Background(), ClientConfig{Address: "nohost"}); err == nil {
		t.Error("address without port accepted")
	}
}

// TestMaxSessions: a connection beyond the limit is closed at once; one
// after a session ended is served.
func TestMaxSessions(t *testing.T) {
	l, err := Listen(ServerConfig{Listen: "127.0.0.1:0", MaxSessions: 1, Config: Config{Logger: quiet(t)}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		l.Serve(ctx, func(ctx context.Context, s *Session) { <-s.Done() })
	})
	defer wg.Wait()
	defer cancel()
	dial := func() (*Session, error) {
		return Dial(context.Background(), ClientConfig{Address: l.Addr().String(), Config: Config{Logger: quiet(t)}})
	}
	first, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	if s, err := dial(); err == nil {
		s.Close()
		t.Fatal("second session accepted beyond the limit")
	}
	first.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s, err := dial()
		if err == nil {
			s.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no session after the first ended: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestHandshakeTimeout: a client that never speaks is dropped.
func TestHandshakeTimeout(t *testing.T) {
	ca := newCA(t, "x")
	for _, tlsFiles := range []TLSFiles{{}, ca.issue(t, "target")} {
		l, err := Listen(ServerConfig{Listen: "127.0.0.1:0", Config: Config{TLS: tlsFiles, HandshakeTimeout: 200 * time.Millisecond, Logger: quiet(t)}})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Go(func() { l.Serve(ctx, func(context.Context, *Session) { t.Error("session from a silent client") }) })
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		start := time.Now()
		buf := make([]byte, 64)
		var rerr error
		for rerr == nil {
			_, rerr = c.Read(buf) // the preamble comes only after the client's
		}
		if !errors.Is(rerr, io.EOF) || time.Since(start) > 3*time.Second {
			t.Errorf("silent client: %v after %v", rerr, time.Since(start))
		}
		c.Close()
		cancel()
		wg.Wait()
	}
}

// TestServeShutdown: cancelling Serve's context ends live sessions and
// returns once every handler did, leaving no goroutine behind.
func TestServeShutdown(t *testing.T) {
	l, err := Listen(ServerConfig{Listen: "127.0.0.1:0", Config: Config{Logger: quiet(t)}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	started := make(chan struct{}, 4)
	go func() {
		served <- l.Serve(ctx, func(ctx context.Context, s *Session) {
			started <- struct{}{}
			serveGRPC(ctx, s)
		})
	}()
	var clients []*Session
	for range 3 {
		c, err := Dial(context.Background(), ClientConfig{Address: l.Addr().String(), Config: Config{Logger: quiet(t)}})
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
		<-started
	}
	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
	for _, c := range clients {
		select {
		case <-c.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("client session still open after the server shut down")
		}
	}
	if _, err := net.Dial("tcp", l.Addr().String()); err == nil {
		t.Error("listener still accepts")
	}
	checkNoLeak(t)
}

// checkNoLeak fails if a goroutine of this package or of yamux is left.
func checkNoLeak(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		leaked := false
		for _, g := range strings.Split(stacks, "\n\n") {
			if (strings.Contains(g, "phaul/transport.") || strings.Contains(g, "hashicorp/yamux.")) && !strings.Contains(g, "checkNoLeak") {
				leaked = true
			}
		}
		if !leaked {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("goroutines left:\n%s", stacks)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
