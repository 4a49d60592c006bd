package netsock_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/topology"
	"github.com/phaul/phaul/netsock"
	"github.com/phaul/phaul/protocol/imagepb"
)

// env is three hosts (source, target, client) and a service address on
// the source that can move to the target, IPv4 or IPv6.
type env struct {
	n             *topology.Network
	src, tgt, cli *topology.Host
	srcNS, tgtNS  *os.File
	cliNS         *os.File
	v6            bool
	prefix        string // IPv6 only: "fdXX:XXXX::"
	svc           string
}

func newEnv(t *testing.T, v6 bool) *env {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network namespaces and TCP_REPAIR need root")
	}
	ctx := context.Background()
	n, err := topology.New(ctx, "source", "target", "client")
	if errors.Is(err, topology.ErrNoIP) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Error(err)
		}
	})
	e := &env{n: n, src: n.Host("source"), tgt: n.Host("target"), cli: n.Host("client"), v6: v6}
	e.srcNS, e.tgtNS, e.cliNS = openNS(t, e.src), openNS(t, e.tgt), openNS(t, e.cli)
	if !v6 {
		e.svc = n.FreeAddr()
		if err := n.AddAddr(ctx, e.src, e.svc); err != nil {
			t.Fatal(err)
		}
		return e
	}
	var r [3]byte
	if _, err := rand.Read(r[:]); err != nil {
		t.Fatal(err)
	}
	e.prefix = fmt.Sprintf("fd%02x:%s::", r[0], hex.EncodeToString(r[1:]))
	for i, h := range []*topology.Host{e.src, e.tgt, e.cli} {
		ipRun(t, "-n", h.NS, "-6", "addr", "add", fmt.Sprintf("%s%d/64", e.prefix, i+1), "dev", h.Iface, "nodad")
	}
	e.svc = e.prefix + "200"
	ipRun(t, "-n", e.src.NS, "-6", "addr", "add", e.svc+"/64", "dev", e.src.Iface, "nodad")
	return e
}

// addr returns the service address with port.
func (e *env) addr(port int) string { return net.JoinHostPort(e.svc, fmt.Sprint(port)) }

// move moves the service address from the source to the target.
func (e *env) move(t *testing.T) {
	t.Helper()
	if !e.v6 {
		if err := e.n.MoveAddr(context.Background(), e.src, e.tgt, e.svc); err != nil {
			t.Fatal(err)
		}
		return
	}
	ipRun(t, "-n", e.src.NS, "-6", "addr", "del", e.svc+"/64", "dev", e.src.Iface)
	ipRun(t, "-n", e.tgt.NS, "-6", "addr", "add", e.svc+"/64", "dev", e.tgt.Iface, "nodad")
	// Stands in for the unsolicited neighbour advertisement a failover
	// script would send.
	ipRun(t, "-n", e.cli.NS, "-6", "neigh", "flush", "dev", e.cli.Iface)
}

func ipRun(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func openNS(t *testing.T, h *topology.Host) *os.File {
	t.Helper()
	f, err := os.Open("/run/netns/" + h.NS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func newID(t *testing.T) string {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return "test-" + hex.EncodeToString(b[:])
}

// listen listens on addr on host h, the Go way (MPTCP when the kernel
// has it, since Go 1.24).
func listen(t *testing.T, h *topology.Host, addr string) net.Listener {
	t.Helper()
	return listenMPTCP(t, h, addr, true)
}

// listenMPTCP listens on addr on host h, with or without MPTCP.
func listenMPTCP(t *testing.T, h *topology.Host, addr string, mptcp bool) net.Listener {
	t.Helper()
	var lc net.ListenConfig
	lc.SetMultipathTCP(mptcp)
	var l net.Listener
	if err := h.Do(func() (err error) {
		l, err = lc.Listen(context.Background(), "tcp", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// dial connects from host h to addr through listener l (which must be
// on the other end) and returns the accepted and the dialed connection.
func dial(t *testing.T, h *topology.Host, l net.Listener, addr string) (srv, cli *net.TCPConn) {
	t.Helper()
	acc := make(chan net.Conn, 1)
	go func() {
		a, err := l.Accept()
		if err != nil {
			close(acc)
			return
		}
		acc <- a
	}()
	var c net.Conn
	if err := h.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", addr, 5*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	a, ok := <-acc
	if !ok {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close() })
	return a.(*net.TCPConn), c.(*net.TCPConn)
}

// Numbered messages: an 8-byte sequence number and an 8-byte check.
const msgLen = 16

func msgs(from, to uint64) []byte {
	b := make([]byte, 0, (to-from)*msgLen)
	for i := from; i < to; i++ {
		b = binary.BigEndian.AppendUint64(b, i)
		b = binary.BigEndian.AppendUint64(b, i*0x9E3779B97F4A7C15^0x5a5a5a5a)
	}
	return b
}

func writeMsgs(c net.Conn, from, to uint64) error {
	if err := c.SetWriteDeadline(time.Now().Add(10 * time.Second)); err != nil {
		return err
	}
	_, err := c.Write(msgs(from, to))
	return err
}

// readMsgs reads messages from..to-1 and checks that each arrives once,
// in order.
func readMsgs(c net.Conn, from, to uint64, d time.Duration) error {
	if err := c.SetReadDeadline(time.Now().Add(d)); err != nil {
		return err
	}
	b := make([]byte, (to-from)*msgLen)
	n, err := io.ReadFull(c, b)
	if got := firstBad(b[:n], from); got >= 0 {
		return fmt.Errorf("message %d: got %x", from+uint64(got), b[got*msgLen:min(n, (got+1)*msgLen)])
	}
	if err != nil {
		return fmt.Errorf("after %d of %d messages: %w", n/msgLen, to-from, err)
	}
	return nil
}

// firstBad returns the index of the first complete message in b that is
// not the expected one, or -1.
func firstBad(b []byte, from uint64) int {
	want := msgs(from, from+uint64(len(b)/msgLen))
	for i := 0; i+msgLen <= len(b); i += msgLen {
		if !bytes.Equal(b[i:i+msgLen], want[i:i+msgLen]) {
			return i / msgLen
		}
	}
	return -1
}

// noMore checks that nothing more arrives on c: no extra byte, no EOF,
// no reset.
func noMore(c net.Conn) error {
	if err := c.SetReadDeadline(time.Now().Add(200 * time.Millisecond)); err != nil {
		return err
	}
	var b [1]byte
	n, err := c.Read(b[:])
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return nil
	}
	return fmt.Errorf("read %d more bytes, %v", n, err)
}

// sockInt reads an int socket option of c.
func sockInt(t *testing.T, c syscall.Conn, level, opt int) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) { v, gerr = sys.GetsockoptInt(int(fd), level, opt) }); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatal(gerr)
	}
	return v
}

func setSockInt(t *testing.T, c syscall.Conn, level, opt, v int) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = sys.SetsockoptInt(int(fd), level, opt, v) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
}

// fileFlags returns the file status flags of c's open file description.
func fileFlags(t *testing.T, c syscall.Conn) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var ferr error
	if err := rc.Control(func(fd uintptr) { v, ferr = sys.FcntlInt(int(fd), sys.F_GETFL, 0) }); err != nil {
		t.Fatal(err)
	}
	if ferr != nil {
		t.Fatal(ferr)
	}
	return v
}

// waitInq waits until c has at least n unread bytes.
func waitInq(t *testing.T, c syscall.Conn, n int) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var q int
		if err := rc.Control(func(fd uintptr) { q, _ = sys.IoctlSocketInt(int(fd), sys.SIOCINQ) }); err != nil {
			t.Fatal(err)
		}
		if q >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("receive queue holds %d bytes, want %d", q, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// fileOf returns a descriptor sharing c's open file description, as
// pidfd_getfd gives the engine.
func fileOf(t *testing.T, c interface{ File() (*os.File, error) }) *os.File {
	t.Helper()
	f, err := c.File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// viaImage sends st through its image message and back, as a migration
// does.
func viaImage(t *testing.T, st *netsock.State) *netsock.State {
	t.Helper()
	b, err := proto.Marshal(st.ToProto())
	if err != nil {
		t.Fatal(err)
	}
	var p imagepb.InetSocket
	if err := proto.Unmarshal(b, &p); err != nil {
		t.Fatal(err)
	}
	out, err := netsock.FromProto(&p)
	if err != nil {
		t.Fatal(err)
	}
	return out
}
