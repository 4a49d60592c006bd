package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/testutil"
)

// The sockserver fixture (testdata/sockserver.c) is built on first use.
var (
	sockserverOnce sync.Once
	sockserverBin  artifact
)

// startSockserver starts the TCP and UDP echo server on two free loopback
// ports and returns it with the ports.
func startSockserver(tb testing.TB) (w *testutil.Workload, tcpPort, udpPort int) {
	tb.Helper()
	needPhaul(tb)
	sockserverOnce.Do(func() {
		out := filepath.Join(buildDir, "sockserver")
		err := testutil.CompileC(filepath.Join(testdata, "sockserver.c"), out)
		sockserverBin = artifact{argv: []string{out}, err: err}
	})
	if err := sockserverBin.err; err != nil {
		if errors.Is(err, testutil.ErrNoTool) {
			tb.Skipf("fixture sockserver: %v", err)
		}
		tb.Fatalf("fixture sockserver did not build: %v", err)
	}
	tcpPort, udpPort = freePort(tb, "tcp"), freePort(tb, "udp")
	argv := append(append([]string(nil), sockserverBin.argv...), strconv.Itoa(tcpPort), strconv.Itoa(udpPort))
	return testutil.StartWorkload(tb, argv, &testutil.Options{Name: "sockserver"}), tcpPort, udpPort
}

// freePort returns a free port of network ("tcp" or "udp") on 127.0.0.1,
// below the kernel's ephemeral range. These tests run in this network
// namespace, and a dump with --tcp-established locks its server's port
// (every packet to and from it) until the restore: a port from the
// ephemeral range, free meanwhile, could be handed to another package's
// test binding port 0, whose connections the lock would then drop.
func freePort(tb testing.TB, network string) int {
	tb.Helper()
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if v, err := strconv.Atoi(f[0]); err == nil {
				low = v
			}
		}
	}
	const from = 10000
	if low <= from {
		tb.Skipf("the ephemeral port range starts at %d: no port below it to use", low)
	}
	for range 100 {
		port := from + rand.IntN(low-from)
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		if network == "udp" {
			if c, err := net.ListenPacket("udp4", addr); err == nil {
				c.Close()
				return port
			}
			continue
		}
		if l, err := net.Listen("tcp4", addr); err == nil {
			l.Close()
			return port
		}
	}
	tb.Fatalf("no free %s port in [%d, %d)", network, from, low)
	return 0
}

// echoConn is a client connection to the sockserver.
type echoConn struct {
	c net.Conn
	r *bufio.Reader
}

func dialEcho(tb testing.TB, port int) *echoConn {
	tb.Helper()
	c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
	if err != nil {
		tb.Fatalf("connect to the server: %v", err)
	}
	tb.Cleanup(func() { c.Close() })
	return &echoConn{c: c, r: bufio.NewReader(c)}
}

// roundTrip sends msg and requires "echo msg" back within timeout.
func (e *echoConn) roundTrip(msg string, timeout time.Duration) error {
	_ = e.c.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(e.c, "%s\n", msg); err != nil {
		return fmt.Errorf("send %q: %w", msg, err)
	}
	line, err := e.r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("reply to %q: %w", msg, err)
	}
	if want := "echo " + msg + "\n"; line != want {
		return fmt.Errorf("reply %q, want %q", line, want)
	}
	return nil
}

func udpEcho(tb testing.TB, port int) {
	tb.Helper()
	c, err := net.Dial("udp4", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		tb.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64)
	for try := 0; try < 5; try++ {
		if _, err := c.Write([]byte("ping")); err != nil {
			tb.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		n, err := c.Read(buf)
		if err == nil && string(buf[:n]) == "ping" {
			return
		}
	}
	tb.Fatalf("UDP socket on port %d does not answer", port)
}

// TestDumpRestoreListeners dumps a process with a TCP listener and a bound
// UDP socket on 127.0.0.1, restores it with its PID, and requires both to
// work.
func TestDumpRestoreListeners(t *testing.T) {
	w, tcpPort, udpPort := startSockserver(t)
	e := dialEcho(t, tcpPort)
	if err := e.roundTrip("before", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	udpEcho(t, udpPort)
	// The connection is closed before the dump (the server closes its end
	// on EOF): only the listener and the UDP socket remain.
	e.c.Close()
	time.Sleep(300 * time.Millisecond)
	dir := imageDir(t)
	dumpAndWaitGone(t, w, dir)
	restoreDetached(t, w, dir)
	if err := dialEcho(t, tcpPort).roundTrip("after", 5*time.Second); err != nil {
		t.Fatalf("restored listener: %v\n%s", err, logTail(w))
	}
	udpEcho(t, udpPort)
}

// TestDumpRefusesEstablished dumps, without --tcp-established, a process
// with an established connection: the dump is refused naming the
// connection, and the process and the connection go on.
func TestDumpRefusesEstablished(t *testing.T) {
	w, tcpPort, _ := startSockserver(t)
	e := dialEcho(t, tcpPort)
	if err := e.roundTrip("before", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	local := e.c.LocalAddr().String()
	r := runPhaul(t, w, "dump", "-t", strconv.Itoa(w.Pid), "-D", imageDir(t))
	r.mustFail(t, w, "ESTABLISHED", regexpQuote(local), "tcp-established")
	assertResumed(t, w, 0)
	if err := e.roundTrip("after", 5*time.Second); err != nil {
		t.Fatalf("connection after the refused dump: %v", err)
	}
}

// TestDumpRestoreEstablished dumps a server with an established loopback
// connection with --tcp-established, kills it, restores it in the same
// namespace, and requires the client (this test, not dumped), which sends
// numbered messages all along, to get every reply once and in order.
func TestDumpRestoreEstablished(t *testing.T) {
	w, tcpPort, _ := startSockserver(t)
	e := dialEcho(t, tcpPort)
	var (
		mu      sync.Mutex
		sent    int
		failure error
	)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 1; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			err := e.roundTrip("msg "+strconv.Itoa(i), 30*time.Second)
			mu.Lock()
			if err != nil {
				failure = err
			} else {
				sent = i
			}
			mu.Unlock()
			if err != nil {
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		_ = e.c.SetDeadline(time.Now())
		<-done
	}()
	time.Sleep(200 * time.Millisecond)
	dir := imageDir(t)
	dumpAndWaitGone(t, w, dir, "--tcp-established")
	mu.Lock()
	atDump := sent
	mu.Unlock()
	restoreDetached(t, w, dir)
	deadline := time.Now().Add(30 * time.Second)
	for {
		mu.Lock()
		n, err := sent, failure
		mu.Unlock()
		if err != nil {
			t.Fatalf("client after %d replies (%d before the dump): %v\n%s", n, atDump, err, logTail(w))
		}
		if n >= atDump+50 {
			t.Logf("%d replies in order, %d of them after the dump", n, n-atDump)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d replies (%d before the dump) after 30 s\n%s", n, atDump, logTail(w))
		}
		time.Sleep(50 * time.Millisecond)
	}
	close(stop)
	<-done
	mu.Lock()
	defer mu.Unlock()
	if failure != nil && !strings.Contains(failure.Error(), "deadline") {
		t.Fatal(failure)
	}
}

func regexpQuote(s string) string {
	return strings.NewReplacer(".", `\.`).Replace(s)
}
