package netlock_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/phaul/phaul/internal/topology"
	"github.com/phaul/phaul/netlock"
)

func newNet(t *testing.T, names ...string) *topology.Network {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network namespaces need root")
	}
	n, err := topology.New(context.Background(), names...)
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
	return n
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

// connect returns a server-side and a client-side connection between
// hosts srv and cli, and the server's listener.
func connect(t *testing.T, srv, cli *topology.Host, addr string) (s, c net.Conn, l net.Listener) {
	t.Helper()
	if err := srv.Do(func() (err error) {
		l, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	acc := make(chan net.Conn, 1)
	go func() {
		a, err := l.Accept()
		if err != nil {
			close(acc)
			return
		}
		acc <- a
	}()
	if err := cli.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", addr, 5*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	s, ok := <-acc
	if !ok {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { s.Close() })
	return s, c, l
}

func addrPort(a net.Addr) netip.AddrPort { return a.(*net.TCPAddr).AddrPort() }

// readWithin reads exactly len(want) bytes from c within d.
func readWithin(c net.Conn, n int, d time.Duration) ([]byte, error) {
	if err := c.SetReadDeadline(time.Now().Add(d)); err != nil {
		return nil, err
	}
	b := make([]byte, n)
	_, err := io.ReadFull(c, b)
	return b, err
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestLockHoldsConnection checks that a locked connection carries nothing
// either way, that the lock counts what it dropped, and that after Unlock
// the peers' retransmissions get through: nothing was reset.
func TestLockHoldsConnection(t *testing.T) {
	n := newNet(t, "server", "client")
	srv, cli := n.Host("server"), n.Host("client")
	s, c, _ := connect(t, srv, cli, srv.Addr+":7100")
	ns := openNS(t, srv)

	t0 := time.Now()
	lk, err := netlock.New(ns, newID(t), netlock.Set{Conns: []netlock.Conn{
		{Proto: netlock.TCP, Local: addrPort(s.LocalAddr()), Remote: addrPort(s.RemoteAddr())},
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("lock installed in %v", time.Since(t0))
	defer lk.Unlock()

	if _, err := c.Write([]byte("to-server")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write([]byte("to-client")); err != nil {
		t.Fatal(err)
	}
	if _, err := readWithin(s, 9, 400*time.Millisecond); !isTimeout(err) {
		t.Fatalf("server read through the lock: %v", err)
	}
	if _, err := readWithin(c, 9, 100*time.Millisecond); !isTimeout(err) {
		t.Fatalf("client read through the lock: %v", err)
	}
	in, out, err := lk.Dropped()
	if err != nil {
		t.Fatal(err)
	}
	if in == 0 || out == 0 {
		t.Errorf("dropped in=%d out=%d, want both > 0", in, out)
	}
	t0 = time.Now()
	if err := lk.Unlock(); err != nil {
		t.Fatal(err)
	}
	t.Logf("lock removed in %v (dropped in=%d out=%d)", time.Since(t0), in, out)
	if err := lk.Unlock(); err != nil {
		t.Fatalf("second Unlock: %v", err)
	}
	if b, err := readWithin(s, 9, 10*time.Second); err != nil || string(b) != "to-server" {
		t.Fatalf("server after unlock: %q, %v", b, err)
	}
	if b, err := readWithin(c, 9, 10*time.Second); err != nil || string(b) != "to-client" {
		t.Fatalf("client after unlock: %q, %v", b, err)
	}
	// Unrelated traffic of the same hosts was never held.
	s2, c2, _ := connect(t, srv, cli, srv.Addr+":7101")
	if _, err := c2.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := readWithin(s2, 1, 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestLockHoldsPort checks that a locked listening port takes no new
// connection until unlocked, and that the connection attempt made during
// the lock completes afterwards (its SYN is retransmitted, not refused).
func TestLockHoldsPort(t *testing.T) {
	n := newNet(t, "server", "client")
	srv, cli := n.Host("server"), n.Host("client")
	ns := openNS(t, srv)
	var l net.Listener
	if err := srv.Do(func() (err error) {
		l, err = net.Listen("tcp", "0.0.0.0:7200")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	id := newID(t)
	lk, err := netlock.New(ns, id, netlock.Set{Ports: []netlock.Port{
		{Proto: netlock.TCP, Local: netip.MustParseAddrPort("0.0.0.0:7200")},
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Unlock()
	dialed := make(chan error, 1)
	go func() {
		dialed <- cli.Do(func() error {
			c, err := net.DialTimeout("tcp", srv.Addr+":7200", 15*time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
	}()
	select {
	case err := <-dialed:
		t.Fatalf("dial through a locked port returned: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	if in, _, err := lk.Dropped(); err != nil || in == 0 {
		t.Errorf("dropped in=%d, %v; want > 0", in, err)
	}
	// The cleanup of a crashed run: unlock by id.
	if err := netlock.Unlock(ns, id); err != nil {
		t.Fatal(err)
	}
	if err := <-dialed; err != nil {
		t.Fatalf("dial after unlock: %v", err)
	}
	if err := lk.Unlock(); err != nil {
		t.Fatalf("Unlock after the table was removed: %v", err)
	}
}

// TestLockReplacesLeftover checks that locking with the id of a lock that
// was never unlocked (a crashed run) replaces its table, and that Unlock
// leaves no table behind.
func TestLockReplacesLeftover(t *testing.T) {
	n := newNet(t, "server")
	ns := openNS(t, n.Host("server"))
	id := newID(t)
	conns := []netlock.Conn{
		{Proto: netlock.TCP, Local: netip.MustParseAddrPort("10.0.0.1:1"), Remote: netip.MustParseAddrPort("10.0.0.2:2")},
		{Proto: netlock.TCP, Local: netip.MustParseAddrPort("[fd00::1]:1"), Remote: netip.MustParseAddrPort("[fd00::2]:2")},
		{Proto: netlock.UDP, Local: netip.MustParseAddrPort("[::ffff:10.0.0.1]:1"), Remote: netip.MustParseAddrPort("10.0.0.2:2")},
	}
	if _, err := netlock.New(ns, id, netlock.Set{Conns: conns}); err != nil {
		t.Fatal(err)
	}
	if got := countRules(t, ns, netlock.TableName(id)); got != 6 {
		t.Fatalf("first lock: %d rules, want 6", got)
	}
	lk, err := netlock.New(ns, id, netlock.Set{Ports: []netlock.Port{{Proto: netlock.TCP, Local: netip.MustParseAddrPort("[::]:80")}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := countRules(t, ns, netlock.TableName(id)); got != 2 {
		t.Fatalf("second lock with the same id: %d rules, want 2 (leftover not replaced)", got)
	}
	if ids, err := netlock.Locks(ns); err != nil || len(ids) != 1 || ids[0] != id {
		t.Fatalf("Locks = %q, %v; want [%s]", ids, err, id)
	}
	if err := lk.Unlock(); err != nil {
		t.Fatal(err)
	}
	if ids, err := netlock.Locks(ns); err != nil || len(ids) != 0 {
		t.Fatalf("after Unlock, Locks = %q, %v", ids, err)
	}
	if got := countRules(t, ns, netlock.TableName(id)); got != -1 {
		t.Fatalf("after Unlock the table still has %d rules", got)
	}
	if _, err := netlock.New(ns, "bad id!", netlock.Set{}); err == nil {
		t.Error("a bad id was accepted")
	}
}

// countRules counts the rules of table in ns; -1 when there is no table.
func countRules(t *testing.T, ns *os.File, table string) int {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(int(ns.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		if tb.Name != table {
			continue
		}
		n := 0
		for _, ch := range []string{"input", "output"} {
			rules, err := c.GetRules(tb, &nftables.Chain{Name: ch, Table: tb})
			if err != nil {
				t.Fatal(err)
			}
			n += len(rules)
		}
		return n
	}
	return -1
}
