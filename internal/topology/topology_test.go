package topology

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

func newNet(t *testing.T, names ...string) *Network {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network namespaces need root")
	}
	n, err := New(context.Background(), names...)
	if errors.Is(err, ErrNoIP) {
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

// TestHostsTalkOverTheSegment checks that hosts reach each other by address
// and that a moved address follows its host.
func TestHostsTalkOverTheSegment(t *testing.T) {
	n := newNet(t, "source", "target", "client")
	src, tgt, cli := n.Host("source"), n.Host("target"), n.Host("client")
	for _, h := range []*Host{src, tgt, cli} {
		if _, err := os.Stat("/run/netns/" + h.NS); err != nil {
			t.Fatal(err)
		}
	}
	serve := func(h *Host, addr string) net.Listener {
		var l net.Listener
		if err := h.Do(func() (err error) {
			l, err = net.Listen("tcp4", addr+":7000")
			return err
		}); err != nil {
			t.Fatal(err)
		}
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				_, _ = io.WriteString(c, h.Name)
				c.Close()
			}
		}()
		return l
	}
	ask := func(addr string) string {
		var got []byte
		if err := cli.Do(func() error {
			c, err := net.DialTimeout("tcp4", addr+":7000", 5*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			got, err = io.ReadAll(c)
			return err
		}); err != nil {
			t.Fatalf("dial %s: %v", addr, err)
		}
		return string(got)
	}
	l1 := serve(src, src.Addr)
	defer l1.Close()
	l2 := serve(tgt, tgt.Addr)
	defer l2.Close()
	if got := ask(src.Addr); got != "source" {
		t.Errorf("source answered %q", got)
	}
	if got := ask(tgt.Addr); got != "target" {
		t.Errorf("target answered %q", got)
	}
	// The client's own loopback is not the source's.
	if err := cli.Do(func() error {
		_, err := net.DialTimeout("tcp4", "127.0.0.1:7000", time.Second)
		return err
	}); err == nil {
		t.Error("client's loopback reached a server of another host")
	}
	// A service address moves from source to target.
	svc := n.FreeAddr()
	ctx := context.Background()
	if err := n.AddAddr(ctx, src, svc); err != nil {
		t.Fatal(err)
	}
	l3 := serve(src, svc)
	if got := ask(svc); got != "source" {
		t.Errorf("service on source answered %q", got)
	}
	l3.Close()
	if err := n.MoveAddr(ctx, src, tgt, svc); err != nil {
		t.Fatal(err)
	}
	l4 := serve(tgt, svc)
	defer l4.Close()
	// The gratuitous ARP updates the client's neighbour entry; allow a few
	// tries for it to arrive.
	var got string
	for i := 0; i < 10 && got != "target"; i++ {
		var b []byte
		_ = cli.Do(func() error {
			c, err := net.DialTimeout("tcp4", svc+":7000", 200*time.Millisecond)
			if err != nil {
				return err
			}
			defer c.Close()
			b, _ = io.ReadAll(c)
			return nil
		})
		got = string(b)
		if got != "target" {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if got != "target" {
		t.Errorf("moved service answered %q", got)
	}
}

// TestPIDNamespaceCommand checks that a command started with
// CommandNewPIDNS sees itself as PID 1 with its own /proc.
func TestPIDNamespaceCommand(t *testing.T) {
	n := newNet(t, "target")
	out, err := n.Host("target").CommandNewPIDNS(context.Background(), "sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'").CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	lines := strings.Fields(string(out))
	if len(lines) != 2 || lines[0] != "1" {
		t.Fatalf("in the new PID namespace: %q", out)
	}
}

func TestCloseRemovesNamespaces(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	n, err := New(context.Background(), "a", "b")
	if err != nil {
		t.Skip(err)
	}
	names := append([]string(nil), n.nsList...)
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	for _, ns := range names {
		if _, err := os.Stat("/run/netns/" + ns); err == nil {
			t.Errorf("namespace %s left behind", ns)
		}
	}
}
