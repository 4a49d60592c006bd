package topology

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/phaul/phaul/internal/sys"
)

// Host is one host-like network namespace.
type Host struct {
	// Name is the host's name in the topology ("source", "target", ...).
	Name string
	// NS is the network namespace's name (under /run/netns).
	NS string
	// Addr is the host's IPv4 address on the shared segment.
	Addr string
	// Iface is the host's interface on the segment.
	Iface string
}

// Network is a set of hosts on one segment.
type Network struct {
	Hosts  []*Host
	hub    string
	prefix string // first three octets, e.g. "10.213.7"
	nsList []string
}

// Host returns the host called name, or nil.
func (n *Network) Host(name string) *Host {
	for _, h := range n.Hosts {
		if h.Name == name {
			return h
		}
	}
	return nil
}

// FreeAddr returns an address on the segment that no host has, for a
// service address that moves between hosts.
func (n *Network) FreeAddr() string { return n.prefix + ".200" }

// ErrNoIP reports that the ip tool (iproute2) is missing.
var ErrNoIP = errors.New("the ip tool (iproute2) is not installed")

// New creates hosts named names on a fresh segment 10.X.Y.0/24 (X, Y
// random). Host i gets address 10.X.Y.(i+1). Close removes everything.
func New(ctx context.Context, names ...string) (*Network, error) {
	if _, err := exec.LookPath("ip"); err != nil {
		return nil, ErrNoIP
	}
	if len(names) == 0 || len(names) > 100 {
		return nil, fmt.Errorf("topology: %d hosts", len(names))
	}
	var rnd [3]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, err
	}
	tag := hex.EncodeToString(rnd[:])
	n := &Network{
		hub:    "phaul-" + tag + "-hub",
		prefix: fmt.Sprintf("10.%d.%d", 100+int(rnd[0])%100, rnd[1]),
	}
	fail := func(err error) (*Network, error) {
		_ = n.Close()
		return nil, err
	}
	if err := n.addNS(ctx, n.hub); err != nil {
		return fail(err)
	}
	if err := ip(ctx, "-n", n.hub, "link", "add", "br0", "type", "bridge"); err != nil {
		return fail(err)
	}
	if err := ip(ctx, "-n", n.hub, "link", "set", "br0", "up"); err != nil {
		return fail(err)
	}
	for i, name := range names {
		h := &Host{
			Name:  name,
			NS:    fmt.Sprintf("phaul-%s-%d", tag, i),
			Addr:  fmt.Sprintf("%s.%d", n.prefix, i+1),
			Iface: "eth0",
		}
		port := fmt.Sprintf("p%s%d", tag, i) // at most 15 bytes
		steps := [][]string{
			{"link", "add", h.Iface, "netns", h.NS, "type", "veth", "peer", "name", port, "netns", n.hub},
			{"-n", n.hub, "link", "set", port, "master", "br0"},
			{"-n", n.hub, "link", "set", port, "up"},
			{"-n", h.NS, "addr", "add", h.Addr + "/24", "dev", h.Iface},
			{"-n", h.NS, "link", "set", h.Iface, "up"},
			{"-n", h.NS, "link", "set", "lo", "up"},
		}
		if err := n.addNS(ctx, h.NS); err != nil {
			return fail(err)
		}
		for _, s := range steps {
			if err := ip(ctx, s...); err != nil {
				return fail(err)
			}
		}
		n.Hosts = append(n.Hosts, h)
	}
	return n, nil
}

func (n *Network) addNS(ctx context.Context, name string) error {
	if err := ip(ctx, "netns", "add", name); err != nil {
		return err
	}
	n.nsList = append(n.nsList, name)
	return nil
}

// Namespaces returns the names of the namespaces the network created
// (under /run/netns), hub included.
func (n *Network) Namespaces() []string { return append([]string(nil), n.nsList...) }

// Close removes every namespace the network created (and with them the
// interfaces). Processes still running in them keep the namespaces alive
// until they exit: stop them first.
func (n *Network) Close() error {
	var errs []error
	for i := len(n.nsList) - 1; i >= 0; i-- {
		if err := ip(context.Background(), "netns", "del", n.nsList[i]); err != nil {
			errs = append(errs, err)
		}
	}
	n.nsList = nil
	return errors.Join(errs...)
}

// Command returns a command that runs name with args on host h.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
}

// CommandNewPIDNS returns a command that runs name with args on host h, in
// a new PID namespace (with its own /proc) of which it is the init: PIDs
// of the source host are free there. When it exits, the kernel kills
// everything left in that namespace.
func (h *Host) CommandNewPIDNS(ctx context.Context, name string, args ...string) *exec.Cmd {
	a := append([]string{"netns", "exec", h.NS, "unshare", "--pid", "--fork", "--mount-proc", "--kill-child", name}, args...)
	return exec.CommandContext(ctx, "ip", a...)
}

// AddAddr adds addr (with the segment's /24) to host h.
func (n *Network) AddAddr(ctx context.Context, h *Host, addr string) error {
	return ip(ctx, "-n", h.NS, "addr", "add", addr+"/24", "dev", h.Iface)
}

// DelAddr removes addr from host h.
func (n *Network) DelAddr(ctx context.Context, h *Host, addr string) error {
	return ip(ctx, "-n", h.NS, "addr", "del", addr+"/24", "dev", h.Iface)
}

// MoveAddr moves addr from host from to host to and announces it from its
// new host with a gratuitous ARP, as an operator's failover script would,
// so that neighbours stop sending to the old host at once.
func (n *Network) MoveAddr(ctx context.Context, from, to *Host, addr string) error {
	if err := n.DelAddr(ctx, from, addr); err != nil {
		return err
	}
	if err := n.AddAddr(ctx, to, addr); err != nil {
		return err
	}
	return to.AnnounceAddr(addr)
}

// AnnounceAddr broadcasts a gratuitous ARP request for addr from host h.
func (h *Host) AnnounceAddr(addr string) error {
	ip := net.ParseIP(addr).To4()
	if ip == nil {
		return fmt.Errorf("announce %q: not an IPv4 address", addr)
	}
	return h.Do(func() error {
		ifc, err := net.InterfaceByName(h.Iface)
		if err != nil {
			return err
		}
		bcast := [6]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
		f := make([]byte, 0, 42)
		f = append(f, bcast[:]...)
		f = append(f, ifc.HardwareAddr...)
		f = append(f, 0x08, 0x06)                   // ARP
		f = append(f, 0, 1, 0x08, 0x00, 6, 4, 0, 1) // Ethernet, IPv4, request
		f = append(f, ifc.HardwareAddr...)
		f = append(f, ip...)
		f = append(f, 0, 0, 0, 0, 0, 0)
		f = append(f, ip...) // target = sender: gratuitous
		if err := sys.SendEthernetFrame(ifc.Index, 0x0806, bcast, f); err != nil {
			return fmt.Errorf("announce %s on %s: %w", addr, h.Name, err)
		}
		return nil
	})
}

// Do runs fn on an OS thread that has entered host h's network namespace.
// Sockets fn creates belong to that namespace; they may be used from any
// goroutine afterwards. The thread is discarded after fn.
func (h *Host) Do(fn func() error) error {
	return sys.OnDiscardedThread(func() error {
		f, err := os.Open("/run/netns/" + h.NS)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := sys.SetnsNet(int(f.Fd())); err != nil {
			return fmt.Errorf("enter %s: %w", h.NS, err)
		}
		return fn()
	})
}

func ip(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// NestedPid returns the PID, in this namespace, of the process that is pid
// in a child PID namespace (a process migrated to a host started with
// CommandNewPIDNS), or 0 when there is none.
func NestedPid(pid int) int {
	want := strconv.Itoa(pid)
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		here, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := os.ReadFile("/proc/" + e.Name() + "/status")
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(st), "\n") {
			if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
				if f := strings.Fields(rest); len(f) == 2 && f[1] == want {
					return here
				}
			}
		}
	}
	return 0
}
