package e2e

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/testutil"
)

// The unixsock fixture (testdata/unixsock.c) is built on first use.
var (
	unixsockOnce sync.Once
	unixsockBin  artifact
)

// startUnixsock starts the unixsock fixture with its socket file and FIFO
// in dir.
func startUnixsock(tb testing.TB, dir string, args ...string) *testutil.Workload {
	tb.Helper()
	needPhaul(tb)
	unixsockOnce.Do(func() {
		out := filepath.Join(buildDir, "unixsock")
		err := testutil.CompileC(filepath.Join(testdata, "unixsock.c"), out)
		unixsockBin = artifact{argv: []string{out}, err: err}
	})
	if err := unixsockBin.err; err != nil {
		if errors.Is(err, testutil.ErrNoTool) {
			tb.Skipf("fixture unixsock: %v", err)
		}
		tb.Fatalf("fixture unixsock did not build: %v", err)
	}
	argv := append(append([]string(nil), unixsockBin.argv...), append([]string{"--dir", dir}, args...)...)
	return testutil.StartWorkload(tb, argv, &testutil.Options{Name: "unixsock"})
}

// sockDir returns a short directory for socket files (sun_path holds 107
// bytes).
func sockDir(tb testing.TB) string {
	tb.Helper()
	d, err := os.MkdirTemp("", "phaul-ux-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// TestDumpRestoreUnixSockets dumps a process holding socket pairs of every
// type, a listener with a client and an accepted connection, a datagram
// socket bound to an abstract name with another connected to it, and a
// FIFO, all with data queued, restores it, and lets the process check that
// every queued byte and message arrives once, in order and with its
// boundaries, that new data flows every way, that a new client connects to
// the listener, and that blocking modes and options are as before. The
// listener's socket file, left behind by the killed process, is replaced.
func TestDumpRestoreUnixSockets(t *testing.T) {
	dir := sockDir(t)
	w := startUnixsock(t, dir)
	pre := w.MustCheck(t)
	if pre.Fields["phase"] != "pre" {
		t.Fatalf("unexpected first check: %s", pre.Line)
	}
	before := takeSnapshot(t, w.Pid)
	img := imageDir(t)
	dumpAndWaitGone(t, w, img)
	if fi, err := os.Lstat(filepath.Join(dir, "listen.sock")); err != nil || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("the killed process's socket file: %v %v", fi, err)
	}
	restoreDetached(t, w, img)
	compareSnapshots(t, w, before, takeSnapshot(t, w.Pid), snapOpts{})
	post := w.MustCheck(t)
	if post.Fields["phase"] != "post" || post.Seq != pre.Seq+1 {
		t.Fatalf("first check after restore: %s", post.Line)
	}
	requireProgress(t, w, "after restore")
}

// extPeers are the peers outside the image the fixture connects to: a
// stream listener and a bound datagram socket, in this test process.
type extPeers struct {
	stream, dgram string
	ln            *net.UnixListener
	pc            *net.UnixConn
	conns         chan *net.UnixConn
}

func newExtPeers(t *testing.T, dir string) *extPeers {
	t.Helper()
	e := &extPeers{stream: filepath.Join(dir, "ext.sock"), dgram: filepath.Join(dir, "ext.dgram"), conns: make(chan *net.UnixConn, 4)}
	var err error
	if e.ln, err = net.ListenUnix("unix", &net.UnixAddr{Name: e.stream, Net: "unix"}); err != nil {
		t.Fatal(err)
	}
	if e.pc, err = net.ListenUnixgram("unixgram", &net.UnixAddr{Name: e.dgram, Net: "unixgram"}); err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := e.ln.AcceptUnix()
			if err != nil {
				close(e.conns)
				return
			}
			e.conns <- c
		}
	}()
	t.Cleanup(func() {
		e.ln.Close()
		e.pc.Close()
		for c := range e.conns {
			c.Close()
		}
	})
	return e
}

// nextConn returns the next connection the listener accepted.
func (e *extPeers) nextConn(t *testing.T) *net.UnixConn {
	t.Helper()
	select {
	case c := <-e.conns:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("no connection to the external listener")
		return nil
	}
}

// expect reads want from c within a few seconds.
func expect(t *testing.T, what string, c net.Conn, want string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 256)
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != want {
		t.Fatalf("%s: read %q, %v; want %q", what, buf[:n], err, want)
	}
}

// TestDumpRefusesUnixSockets covers what dump must refuse, naming the
// descriptor, with the process left running and its sockets as they were
// (the next check reads every queue): a descriptor in flight, and peers
// outside the image without --ext-unix-sk.
func TestDumpRefusesUnixSockets(t *testing.T) {
	refuse := func(t *testing.T, w *testutil.Workload, patterns ...string) {
		t.Helper()
		before := takeSnapshot(t, w.Pid)
		r := runPhaul(t, w, "dump", "-t", strconv.Itoa(w.Pid), "-D", imageDir(t))
		r.mustFail(t, w, patterns...)
		if w.OriginalExited() {
			t.Fatalf("the failed dump killed the process: %v", w.ExitState())
		}
		assertResumed(t, w, 0)
		compareSnapshots(t, w, before, takeSnapshot(t, w.Pid), snapOpts{})
		if c := w.MustCheck(t); c.Fields["phase"] != "post" {
			t.Fatalf("check after the refused dump: %s", c.Line)
		}
	}
	t.Run("rights-in-flight", func(t *testing.T) {
		w := startUnixsock(t, sockDir(t), "--rights", "1")
		c := w.MustCheck(t)
		fd := field(t, c, "rights_fd")
		refuse(t, w, fmt.Sprintf(`descriptor %d of %d \(unix datagram socket`, fd, w.Pid), `SCM_RIGHTS`, `not supported`)
	})
	t.Run("external-peer", func(t *testing.T) {
		dir := sockDir(t)
		e := newExtPeers(t, dir)
		w := startUnixsock(t, dir, "--ext-stream", e.stream, "--ext-dgram", e.dgram)
		first := e.nextConn(t)
		c := w.MustCheck(t)
		fd := field(t, c, "ext_stream_fd")
		refuse(t, w, fmt.Sprintf(`descriptor %d of %d \(unix stream socket unnamed\) is connected to socket:\[\d+\] \(".*ext.sock"\), outside the image`, fd, w.Pid),
			`--ext-unix-sk`, `not supported`)
		// The check after the refusal wrote on the same connections.
		msg := fmt.Sprintf("ext %d", w.Pid)
		expect(t, "external stream", first, msg)
		expect(t, "external datagram", e.pc, msg)
	})
}

// TestDumpRestoreUnixExternal dumps with --ext-unix-sk a process whose
// stream socket is connected to a listener outside the image and whose
// datagram socket is connected to a bound socket outside: after restore
// the first connects to the listener again (a new connection), the second
// to the bound socket, and what the process sends arrives there.
func TestDumpRestoreUnixExternal(t *testing.T) {
	dir := sockDir(t)
	e := newExtPeers(t, dir)
	w := startUnixsock(t, dir, "--ext-stream", e.stream, "--ext-dgram", e.dgram)
	first := e.nextConn(t)
	pre := w.MustCheck(t)
	img := imageDir(t)
	dumpAndWaitGone(t, w, img, "--ext-unix-sk")
	// The original connection ended with the process.
	_ = first.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := first.Read(make([]byte, 16)); err == nil {
		t.Fatalf("the dumped process's connection still delivers data (%d bytes)", n)
	}
	restoreDetached(t, w, img)
	again := e.nextConn(t)
	post := w.MustCheck(t)
	if post.Seq != pre.Seq+1 || post.Fields["phase"] != "post" {
		t.Fatalf("first check after restore: %s", post.Line)
	}
	msg := fmt.Sprintf("ext %d", w.Pid)
	expect(t, "external stream", again, msg)
	expect(t, "external datagram", e.pc, msg)
	requireProgress(t, w, "after restore")
}
