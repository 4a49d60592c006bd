package netsock_test

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/phaul/phaul/netsock"
)

// TestListenerRebindsOverTimeWait restores a listener with SO_REUSEADDR
// (as most servers set it) on a port that a connection it accepted, and
// closed first, still holds in TIME_WAIT, as after a dump that killed the
// server on this host: the bind must succeed (the option must be set
// before it), and the restored listener has the option.
func TestListenerRebindsOverTimeWait(t *testing.T) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	c, err := net.Dial("tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	s.Close() // the server side closes first: its end goes to TIME_WAIT
	buf := make([]byte, 1)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(buf); err == nil {
		t.Fatal("read after the server closed: no EOF")
	}
	c.Close()
	lf, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	st, err := netsock.Dump(lf, netsock.Options{})
	lf.Close()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	if !st.Opts.ReuseAddr || st.Local.Port() != uint16(port) {
		t.Fatalf("dumped %v with SO_REUSEADDR %v", st, st.Opts.ReuseAddr)
	}
	f, err := netsock.Restore(st, netsock.RestoreOptions{})
	if err != nil {
		t.Fatalf("restore a listener over a TIME_WAIT connection: %v", err)
	}
	defer f.Close()
	got, err := netsock.Dump(f, netsock.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !got.Opts.ReuseAddr {
		t.Error("the restored listener lacks SO_REUSEADDR")
	}
	if got.Local != st.Local || got.TCPState != netsock.Listen {
		t.Errorf("restored %v", got)
	}
}
