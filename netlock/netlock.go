package netlock

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"

	"github.com/phaul/phaul/internal/sys"
)

// Proto is the transport protocol of a held connection or port.
type Proto uint8

// Protocols a lock can hold.
const (
	TCP Proto = sys.IPPROTO_TCP
	UDP Proto = sys.IPPROTO_UDP
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "TCP"
	case UDP:
		return "UDP"
	}
	return fmt.Sprintf("protocol %d", uint8(p))
}

// Conn is a connection whose packets a lock drops in both directions.
// Addresses are compared without their zone; an IPv4-mapped IPv6
// address matches the IPv4 packets it stands for.
type Conn struct {
	Proto  Proto
	Local  netip.AddrPort
	Remote netip.AddrPort
}

// Port is a local port (a listening socket) whose packets a lock drops:
// every packet to it and from it. An unspecified address matches every
// local address of both families.
type Port struct {
	Proto Proto
	Local netip.AddrPort
}

// Set is what a lock holds.
type Set struct {
	Conns []Conn
	Ports []Port
}

// Lock is a lock in place. Its methods are safe to call more than once.
type Lock struct {
	ns    *os.File // our own descriptor of the namespace; nil: the caller's
	table string
}

// chainPriority places the chains before conntrack (and before the raw
// table's usual rules), so dropped packets leave no trace there.
var chainPriority = nftables.ChainPriority(-310)

var idRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,64}$`)

// TableName is the nftables table (family inet) of the lock with this id.
func TableName(id string) string { return "phaul-" + id }

// New drops the packets of s in the network namespace netns (nil: the
// calling thread's) and returns the lock. id names the lock's table
// (letters, digits, '.', '_', '-'): a table of the same id left by an
// earlier run that did not unlock is replaced. netns is not kept: the
// caller may close it.
func New(netns *os.File, id string, s Set) (*Lock, error) {
	if !idRE.MatchString(id) {
		return nil, fmt.Errorf("netlock: bad id %q", id)
	}
	l := &Lock{table: TableName(id)}
	if netns != nil {
		// A descriptor of our own: the caller's may be closed, and a
		// /proc/PID/ns/net one must outlive the process.
		f, err := os.Open(fmt.Sprintf("/proc/self/fd/%d", netns.Fd()))
		if err != nil {
			return nil, fmt.Errorf("netlock: network namespace: %w", err)
		}
		l.ns = f
	}
	if err := l.lock(s); err != nil {
		l.closeNS()
		return nil, err
	}
	return l, nil
}

func (l *Lock) conn() (*nftables.Conn, error) {
	if l.ns == nil {
		return nftables.New()
	}
	return nftables.New(nftables.WithNetNSFd(int(l.ns.Fd())))
}

func (l *Lock) closeNS() {
	if l.ns != nil {
		l.ns.Close()
		l.ns = nil
	}
}

func (l *Lock) lock(s Set) error {
	c, err := l.conn()
	if err != nil {
		return fmt.Errorf("netlock: %w", err)
	}
	t := &nftables.Table{Name: l.table, Family: nftables.TableFamilyINet}
	// Add (a no-op if it exists), delete, add: one atomic batch that
	// replaces a leftover table.
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	in := c.AddChain(&nftables.Chain{
		Name: "input", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: &chainPriority,
	})
	out := c.AddChain(&nftables.Chain{
		Name: "output", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: &chainPriority,
	})
	for _, cn := range s.Conns {
		if !cn.Local.IsValid() || !cn.Remote.IsValid() {
			return fmt.Errorf("netlock: connection %v -> %v: incomplete address", cn.Local, cn.Remote)
		}
		la, ra := cn.Local.Addr().Unmap(), cn.Remote.Addr().Unmap()
		if la.Is4() != ra.Is4() {
			return fmt.Errorf("netlock: connection %v -> %v: mixed families", cn.Local, cn.Remote)
		}
		// Incoming: from the remote end to the local one.
		c.AddRule(&nftables.Rule{Table: t, Chain: in, Exprs: match(cn.Proto, ra, la, cn.Remote.Port(), cn.Local.Port())})
		c.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: match(cn.Proto, la, ra, cn.Local.Port(), cn.Remote.Port())})
	}
	for _, p := range s.Ports {
		if !p.Local.IsValid() || p.Local.Port() == 0 {
			return fmt.Errorf("netlock: port %v: no port", p.Local)
		}
		a := p.Local.Addr().Unmap()
		if a.IsUnspecified() {
			a = netip.Addr{}
		}
		c.AddRule(&nftables.Rule{Table: t, Chain: in, Exprs: match(p.Proto, netip.Addr{}, a, 0, p.Local.Port())})
		c.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: match(p.Proto, a, netip.Addr{}, p.Local.Port(), 0)})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("netlock: install table %s: %w", l.table, err)
	}
	return nil
}

// match builds "[family] [saddr] [daddr] l4proto [sport] [dport] counter
// drop"; invalid addresses and zero ports are left out.
func match(p Proto, saddr, daddr netip.Addr, sport, dport uint16) []expr.Any {
	var e []expr.Any
	fam := saddr
	if !fam.IsValid() {
		fam = daddr
	}
	if fam.IsValid() {
		nfproto, off, n := byte(nftables.TableFamilyIPv6), uint32(8), uint32(16)
		if fam.Is4() {
			nfproto, off, n = byte(nftables.TableFamilyIPv4), 12, 4
		}
		e = append(e,
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}})
		if saddr.IsValid() {
			e = append(e,
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: saddr.AsSlice()})
		}
		if daddr.IsValid() {
			e = append(e,
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off + n, Len: n},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: daddr.AsSlice()})
		}
	}
	e = append(e,
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(p)}})
	port := func(off uint32, v uint16) {
		e = append(e,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: off, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, v)})
	}
	if sport != 0 {
		port(0, sport)
	}
	if dport != 0 {
		port(2, dport)
	}
	return append(e, &expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop})
}

// Unlock removes the lock's table: every packet passes again. It is a
// no-op when the table is already gone.
func (l *Lock) Unlock() error {
	if l.table == "" {
		return nil
	}
	err := deleteTable(l, l.table)
	if err == nil {
		l.closeNS()
		l.table = ""
	}
	return err
}

// Unlock removes the table of the lock id in netns (nil: the calling
// thread's namespace), if there is one: the cleanup after a run that
// could not unlock.
func Unlock(netns *os.File, id string) error {
	l := &Lock{ns: netns, table: TableName(id)}
	return deleteTable(l, l.table)
}

func deleteTable(l *Lock, name string) error {
	c, err := l.conn()
	if err != nil {
		return fmt.Errorf("netlock: %w", err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("netlock: list tables: %w", err)
	}
	for _, t := range tables {
		if t.Name != name {
			continue
		}
		// The rules first: packets pass as soon as this batch is
		// committed (well under a millisecond); deleting the table
		// unregisters its hooks, which waits for an RCU grace period.
		c.FlushTable(t)
		if err := c.Flush(); err != nil && !errors.Is(err, sys.ENOENT) {
			return fmt.Errorf("netlock: flush table %s: %w", name, err)
		}
		c.DelTable(t)
		if err := c.Flush(); err != nil && !errors.Is(err, sys.ENOENT) {
			return fmt.Errorf("netlock: delete table %s: %w", name, err)
		}
		return nil
	}
	return nil
}

// Dropped returns how many packets the lock has dropped so far, in and
// out; an unlocked lock reports zeros.
func (l *Lock) Dropped() (in, out uint64, err error) {
	if l.table == "" {
		return 0, 0, nil
	}
	c, err := l.conn()
	if err != nil {
		return 0, 0, fmt.Errorf("netlock: %w", err)
	}
	t := &nftables.Table{Name: l.table, Family: nftables.TableFamilyINet}
	count := func(chain string) (uint64, error) {
		rules, err := c.GetRules(t, &nftables.Chain{Name: chain, Table: t})
		if err != nil {
			return 0, fmt.Errorf("netlock: rules of %s %s: %w", l.table, chain, err)
		}
		var n uint64
		for _, r := range rules {
			for _, e := range r.Exprs {
				if ctr, ok := e.(*expr.Counter); ok {
					n += ctr.Packets
				}
			}
		}
		return n, nil
	}
	if in, err = count("input"); err != nil {
		return 0, 0, err
	}
	out, err = count("output")
	return in, out, err
}

// Locks returns the ids of the locks in place in netns (nil: the calling
// thread's namespace), for an operator's cleanup after a run that could
// not unlock, and for tests.
func Locks(netns *os.File) ([]string, error) {
	l := &Lock{ns: netns}
	c, err := l.conn()
	if err != nil {
		return nil, fmt.Errorf("netlock: %w", err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("netlock: list tables: %w", err)
	}
	var ids []string
	for _, t := range tables {
		if id, ok := strings.CutPrefix(t.Name, TableName("")); ok {
			ids = append(ids, id)
		}
	}
	return ids, nil
}
