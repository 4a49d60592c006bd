package workload

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// lineLog is an io.Writer collecting the lines a LineWriter writes.
type lineLog struct {
	mu    sync.Mutex
	lines []string
}

func (l *lineLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, strings.Split(strings.TrimSuffix(string(p), "\n"), "\n")...)
	return len(p), nil
}

// grep returns the lines starting with prefix.
func (l *lineLog) grep(prefix string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, s := range l.lines {
		if strings.HasPrefix(s, prefix) {
			out = append(out, s)
		}
	}
	return out
}

// wait returns the first line starting with prefix, waiting up to 5 s.
func (l *lineLog) wait(t *testing.T, prefix string) string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if m := l.grep(prefix); len(m) > 0 {
			return m[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("no line %q in 5 s; lines:\n%s", prefix, l.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (l *lineLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// loopbacks are the addresses the network tests run on.
var loopbacks = []string{"127.0.0.1", "::1"}

// listen listens on host's loopback, skipping the test if the address
// family is missing.
func listen(t *testing.T, host string) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Skipf("no %s: %v", host, err)
	}
	return ln
}

// acceptLog is a listener that also hands every accepted connection to
// a channel, so that a test can look at the server's sockets.
type acceptLog struct {
	net.Listener
	conns chan net.Conn
}

func (l acceptLog) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		select {
		case l.conns <- c:
		default:
		}
	}
	return c, err
}

// testServer is a Server serving TCP on a loopback address.
type testServer struct {
	*Server
	log   *lineLog
	addr  string
	conns chan net.Conn // the server's side of each connection
}

// startServer starts a Server on host's loopback; the test's cleanup
// stops it and checks that ServeTCP returned.
func startServer(t *testing.T, host string) *testServer {
	t.Helper()
	ln := acceptLog{Listener: listen(t, host), conns: make(chan net.Conn, 64)}
	ts := &testServer{log: &lineLog{}, addr: ln.Addr().String(), conns: ln.conns}
	ts.Server = NewServer(NewLineWriter(ts.log))
	served := make(chan error, 1)
	go func() { served <- ts.ServeTCP(ln) }()
	t.Cleanup(func() {
		ln.Close()
		select {
		case err := <-served:
			if err != nil {
				t.Errorf("ServeTCP: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("ServeTCP did not return after its listener closed")
		}
		if st := ts.Stats(); st.TCPConns != 0 {
			t.Errorf("%d connections still served", st.TCPConns)
		}
	})
	return ts
}

// dial connects to the test server; the test's cleanup closes the
// connection.
func (ts *testServer) dial(t *testing.T) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// client starts a TCPClient on a new connection to the test server.
func (ts *testServer) client(t *testing.T, cfg TCPClientConfig) *TCPClient {
	t.Helper()
	c, err := NewTCPClient(ts.dial(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func closeCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}
