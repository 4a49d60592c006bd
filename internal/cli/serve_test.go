package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/engine"
	"github.com/phaul/phaul/pagestream"
	"github.com/phaul/phaul/protocol"
	"github.com/phaul/phaul/protocol/imagepb"
	"github.com/phaul/phaul/protocol/migrationpb"
	"github.com/phaul/phaul/transport"
)

// syncBuffer is a bytes.Buffer safe for the logger and the test at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// testHost is the host both ends of the serve tests claim to be.
func testHost() *migrationpb.HostInfo {
	return &migrationpb.HostInfo{
		PageSize:       4096,
		KernelRelease:  "6.18.0-test",
		KernelFeatures: requiredFeatures(),
		XsaveFeatures:  0x207,
		Arch:           runtime.GOARCH,
		Hostname:       "test",
	}
}

// startServe runs `phaul serve` on loopback until the test ends and
// returns its address and log.
func startServe(t *testing.T, o serveOptions) (string, *syncBuffer) {
	t.Helper()
	if o.listen == "" {
		o.listen = "127.0.0.1:0"
	}
	o.host = testHost
	logs := &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	addr := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- runServe(ctx, &Env{Stdout: logs, Stderr: logs}, o, func(a net.Addr) { addr <- a.String() })
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("serve did not stop")
		}
	})
	select {
	case a := <-addr:
		return a, logs
	case err := <-done:
		t.Fatalf("serve: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not start")
	}
	return "", nil
}

// client is a source connected to a serve.
type client struct {
	sess    *transport.Session
	cc      *grpc.ClientConn
	control migrationpb.ControlClient
	pages   migrationpb.PagesClient
}

func dialServe(t *testing.T, addr string) *client {
	t.Helper()
	sess, err := transport.Dial(context.Background(), transport.ClientConfig{Address: addr})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := sess.DialGRPC()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close(); sess.Close() })
	return &client{sess: sess, cc: cc, control: migrationpb.NewControlClient(cc), pages: migrationpb.NewPagesClient(cc)}
}

func (c *client) hello(t *testing.T, host *migrationpb.HostInfo) (*migrationpb.HelloResponse, error) {
	t.Helper()
	return c.control.Hello(context.Background(), protocol.NewHelloRequest(protocol.Local{
		PhaulVersion: "test", Host: host, Codecs: pagestream.Codecs(),
	}))
}

// migrate runs one migration's page rounds through the serve and returns
// its id.
func (c *client) migrate(t *testing.T, pid int32) string {
	t.Helper()
	ctx := context.Background()
	resp, err := c.hello(t, testHost())
	if err != nil || protocol.CheckHelloResponse(resp) != nil {
		t.Fatalf("hello: %v %v", resp, err)
	}
	start, err := c.control.StartMigration(ctx, &migrationpb.StartMigrationRequest{Pid: pid, Options: &migrationpb.MigrationOptions{Codec: resp.Codec}})
	if err != nil {
		t.Fatal(err)
	}
	id := start.MigrationId
	// The round's layout: the kernel's vDSO mappings (as this process has
	// them) and one anonymous mapping for the pages.
	self, err := engine.Layout(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	layout := &imagepb.Process{Pid: pid}
	for _, v := range self {
		switch v.Kind {
		case imagepb.VMAKind_VMA_VVAR, imagepb.VMAKind_VMA_VVAR_VCLOCK, imagepb.VMAKind_VMA_VDSO:
			layout.Vmas = append(layout.Vmas, v)
		}
	}
	layout.Vmas = append([]*imagepb.VMA{{Start: 0x7f0000000000, End: 0x7f0000400000, Prot: 3, Flags: 2,
		Kind: imagepb.VMAKind_VMA_ANON_PRIVATE}}, layout.Vmas...)
	blob, err := proto.Marshal(layout)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.control.BeginRound(ctx, &migrationpb.BeginRoundRequest{MigrationId: id,
		Layouts: []*migrationpb.ProcessBlob{{Pid: pid, Image: blob}}}); err != nil {
		t.Fatalf("begin round: %v", err)
	}
	s, err := pagestream.Open(ctx, c.pages, id, pagestream.SenderConfig{Codec: resp.Codec})
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("some heap data.."), 300*4096/16)
	for round := range uint32(2) {
		k := s.Sink(pid, round)
		if err := k.WritePages(0x7f0000000000, data[:(300-100*int(round))*4096]); err != nil {
			t.Fatal(err)
		}
		if err := k.ZeroPages(0x7f0000200000, 10); err != nil {
			t.Fatal(err)
		}
		if err := k.Done(); err != nil {
			t.Fatal(err)
		}
		st := s.Stats()
		rd, err := c.control.RoundDone(ctx, &migrationpb.RoundDoneRequest{MigrationId: id, Stats: &migrationpb.RoundStats{
			Round: round, PagesData: st.PagesData, BytesWire: st.WireBytes,
		}})
		if err != nil {
			t.Fatal(err)
		}
		if want := uint64(300 - 100*round); rd.PagesStored != want {
			t.Errorf("round %d: target holds %d pages, want %d", round, rd.PagesStored, want)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return id
}

func TestServeMigrations(t *testing.T) {
	addr, logs := startServe(t, serveOptions{maxSessions: 4})
	ctx := context.Background()

	// Before an accepted Hello nothing starts.
	c := dialServe(t, addr)
	if _, err := c.control.StartMigration(ctx, &migrationpb.StartMigrationRequest{Pid: 1}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("start without hello: %v", err)
	}
	other := testHost()
	other.PageSize = 65536
	resp, err := c.hello(t, other)
	if err != nil || resp.Accepted || !strings.Contains(resp.Reason, "page size differs") {
		t.Fatalf("hello with another page size: %v %v", resp, err)
	}
	if _, err := c.control.StartMigration(ctx, &migrationpb.StartMigrationRequest{Pid: 1}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("start after a refused hello: %v", err)
	}

	// Two connections migrating at once.
	var wg sync.WaitGroup
	ids := make([]string, 2)
	clients := []*client{c, dialServe(t, addr)}
	for i, c := range clients {
		pid := freePid(t)
		wg.Go(func() { ids[i] = c.migrate(t, pid) })
	}
	wg.Wait()
	if t.Failed() {
		return
	}

	// A connection sees only its own migrations.
	if _, err := pagestream.Open(ctx, clients[1].pages, ids[0], pagestream.SenderConfig{}); status.Code(unwrapStatus(err)) != codes.NotFound {
		t.Errorf("page stream for another connection's migration: %v", err)
	}
	// Steps out of order are refused clearly.
	if _, err := c.control.Restore(ctx, &migrationpb.RestoreRequest{MigrationId: ids[0]}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("restore before freeze: %v", err)
	}
	if _, err := c.control.Commit(ctx, &migrationpb.CommitRequest{MigrationId: ids[0]}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("commit before restore: %v", err)
	}
	if _, err := c.control.Abort(ctx, &migrationpb.AbortRequest{MigrationId: ids[0], Reason: "test"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.control.Abort(ctx, &migrationpb.AbortRequest{MigrationId: ids[0]}); err != nil {
		t.Errorf("second abort: %v", err)
	}
	if _, err := pagestream.Open(ctx, c.pages, ids[0], pagestream.SenderConfig{}); status.Code(unwrapStatus(err)) != codes.NotFound {
		t.Errorf("page stream after abort: %v", err)
	}
	// The other migration goes when its connection does.
	clients[1].cc.Close()
	clients[1].sess.Close()
	waitFor(t, func() bool { return strings.Contains(logs.String(), ids[1]+" why=\"connection ended\"") })
	for _, want := range []string{"listening", "hello refused", "migration started", "round", "why=\"aborted: test\""} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs)
		}
	}
}

// unwrapStatus digs the gRPC status out of a wrapped error.
func unwrapStatus(err error) error {
	for e := err; e != nil; {
		if _, ok := status.FromError(e); ok {
			return e
		}
		u, ok := e.(interface{ Unwrap() error })
		if !ok {
			break
		}
		e = u.Unwrap()
	}
	return err
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestServeOneAfterAnother: sequential connections leave nothing behind.
func TestServeOneAfterAnother(t *testing.T) {
	addr, _ := startServe(t, serveOptions{pageMemoryBytes: 64 << 20})
	for range 5 {
		c := dialServe(t, addr)
		c.migrate(t, freePid(t))
		c.cc.Close()
		c.sess.Close()
	}
	checkServeLeaks(t, 2)
}

// checkServeLeaks fails when more than want goroutines of phaul's network
// packages run (want: those of the live listener).
func checkServeLeaks(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		buf := make([]byte, 4<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		n := 0
		for _, g := range strings.Split(stacks, "\n\n") {
			if strings.Contains(g, "phaul/transport.") || strings.Contains(g, "phaul/pagestream.") ||
				strings.Contains(g, "phaul/pageserver.") || strings.Contains(g, "hashicorp/yamux.") {
				n++
			}
		}
		if n <= want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines of the network packages, want at most %d:\n%s", n, want, stacks)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestServeJSONLog(t *testing.T) {
	addr, logs := startServe(t, serveOptions{jsonLog: true})
	waitFor(t, func() bool { return strings.Contains(logs.String(), "listening") })
	var msgs []string
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		msgs = append(msgs, m["msg"].(string))
		if m["msg"] == "listening" && m["addr"] != addr {
			t.Errorf("listening on %v, serve said %s", m["addr"], addr)
		}
	}
	if !slices.Contains(msgs, "listening") || !slices.Contains(msgs, "host") {
		t.Errorf("messages %q", msgs)
	}
}

func TestServeFlags(t *testing.T) {
	code, _, stderr := runCheckCmd(t, "serve", "--listen", "0.0.0.0:0")
	if code != 1 || !strings.Contains(stderr, "--insecure") || !strings.Contains(stderr, "TLS is required") {
		t.Errorf("non-loopback without TLS: status %d, %q", code, stderr)
	}
	code, _, stderr = runCheckCmd(t, "serve", "--tls-cert", "x.pem")
	if code != 2 || !strings.Contains(stderr, "go together") {
		t.Errorf("partial TLS flags: status %d, %q", code, stderr)
	}
	code, _, stderr = runCheckCmd(t, "serve", "--page-memory", "lots")
	if code != 2 {
		t.Errorf("bad --page-memory: status %d, %q", code, stderr)
	}
	code, out, _ := runCheckCmd(t, "help", "serve")
	if code != 0 || !strings.Contains(out, "--tls-ca") || !strings.Contains(out, "--json-log") {
		t.Errorf("help: %d %q", code, out)
	}
}

// freePid returns a PID no process has (shadows take it on the target).
var lastFree int32 = 25000

func freePid(t *testing.T) int32 {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("building shadow processes needs root")
	}
	for p := lastFree + 1; p < 32000; p++ {
		if _, err := os.Stat("/proc/" + strconv.Itoa(int(p))); err != nil {
			lastFree = p
			return p
		}
	}
	t.Fatal("no free PID")
	return 0
}
