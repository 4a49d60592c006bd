package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/bench/workload"
	"github.com/phaul/phaul/internal/topology"
	"github.com/phaul/phaul/netlock"
)

// The network tests of live migration run on three host-like namespaces on
// one segment: a client, the source host and the target host. The server's
// service address (VIP) is a /32 on the loopback of the host that has the
// process, and the client reaches it through a route via that host, as
// through a load balancer. Action scripts move it: the source's post-dump
// script takes it off the source, the target's network-lock script puts it
// on the target and points the client's route there; rollback scripts
// undo both.

// netSetup is the three-host topology with the server's address on the
// source.
type netSetup struct {
	n                *topology.Network
	client, src, tgt *topology.Host
	vip              string
	srcScript        string
	tgtScripts       []string
	scriptLog        string
}

// refuseScript makes the target's pre-resume point fail while its marker
// file exists.
const refuseScript = `#!/bin/sh
if [ "$PHAUL_ACTION" = pre-resume ] && [ -e %[1]s ]; then echo "refusing: %[1]s exists" >&2; exit 7; fi
`

func newNetSetup(t *testing.T) *netSetup {
	t.Helper()
	n, err := topology.New(context.Background(), "client", "source", "target")
	if err != nil {
		if strings.Contains(err.Error(), "not installed") {
			t.Skip(err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Error(err)
		}
	})
	s := &netSetup{n: n, client: n.Host("client"), src: n.Host("source"), tgt: n.Host("target"), vip: n.FreeAddr()}
	if err := topology.PlaceService(context.Background(), s.vip, s.client, s.src, s.tgt); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	s.scriptLog = filepath.Join(dir, "scripts.log")
	move, refuse := filepath.Join(dir, "move.sh"), filepath.Join(dir, "refuse.sh")
	if err := topology.WriteMoveScript(move, s.scriptLog, s.vip, s.client, s.src, s.tgt); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(refuse, []byte(fmt.Sprintf(refuseScript, s.refuseMarker())), 0o755); err != nil {
		t.Fatal(err)
	}
	s.srcScript, s.tgtScripts = move, []string{move, refuse}
	return s
}

// refuseMarker is the file that makes the target's pre-resume script fail.
func (s *netSetup) refuseMarker() string { return "/tmp/phaul-refuse-" + s.vip }

// dialTCP connects from the client host to the server.
func (s *netSetup) dialTCP(t *testing.T, port int) net.Conn {
	t.Helper()
	var c net.Conn
	err := s.client.Do(func() error {
		var err error
		c, err = net.DialTimeout("tcp", net.JoinHostPort(s.vip, strconv.Itoa(port)), 5*time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("connect to the server: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func (s *netSetup) dialUDP(t *testing.T, port int) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	err := s.client.Do(func() error {
		var err error
		c, err = net.DialUDP("udp", nil, &net.UDPAddr{IP: net.ParseIP(s.vip), Port: port})
		return err
	})
	if err != nil {
		t.Fatalf("UDP socket to the server: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// clients is a server's set of clients, one or more of each mode.
type clients struct {
	tcp   []*workload.TCPClient
	modes []string
	udp   *workload.UDPClient
}

func (s *netSetup) startClients(t *testing.T, port int, modes ...string) *clients {
	t.Helper()
	cs := &clients{modes: modes}
	for i, m := range modes {
		mode, err := workload.ParseMode(m)
		if err != nil {
			t.Fatal(err)
		}
		c, err := workload.NewTCPClient(s.dialTCP(t, port), workload.TCPClientConfig{ID: uint64(i + 1), Mode: mode})
		if err != nil {
			t.Fatal(err)
		}
		cs.tcp = append(cs.tcp, c)
	}
	u, err := workload.NewUDPClient(s.dialUDP(t, port+1), 10*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	cs.udp = u
	return cs
}

// waitTraffic waits until every client has received more than it had at
// the call, from the server wherever it now runs; it fails on any error a
// client saw.
func (cs *clients) waitTraffic(t *testing.T, what string) {
	t.Helper()
	base := make([]int64, len(cs.tcp))
	for i, c := range cs.tcp {
		base[i] = c.Stats().Received
	}
	ubase := cs.udp.Stats().Answered
	deadline := time.Now().Add(20 * time.Second)
	for {
		pending := ""
		for i, c := range cs.tcp {
			st := c.Stats()
			if st.Err != nil {
				t.Fatalf("%s: client %d (%s): %v", what, i+1, cs.modes[i], st.Err)
			}
			if st.Received <= base[i] {
				pending += fmt.Sprintf(" tcp client %d (%s)", i+1, cs.modes[i])
			}
		}
		if cs.udp.Stats().Answered <= ubase {
			pending += " udp client"
		}
		if pending == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no traffic for%s", what, pending)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// close ends every client orderly: each checks that both directions
// carried every message exactly once, in order. It returns the largest
// stall a TCP client saw.
func (cs *clients) close(t *testing.T) time.Duration {
	t.Helper()
	var stall time.Duration
	for i, c := range cs.tcp {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		st, err := c.Close(ctx)
		cancel()
		if err != nil {
			t.Errorf("client %d (%s): %v", i+1, cs.modes[i], err)
			continue
		}
		t.Logf("client %d (%s): sent %d, received %d, largest stall %v", i+1, cs.modes[i], st.Sent, st.Received, st.MaxGap)
		stall = max(stall, st.MaxGap)
	}
	ust := cs.udp.Stats()
	if ust.Err != nil {
		t.Errorf("udp client: %v", ust.Err)
	}
	t.Logf("udp client: sent %d, answered %d, largest gap %v", ust.Sent, ust.Answered, ust.MaxGap)
	_, _ = cs.udp.Close(context.Background())
	return stall
}

var netModes = []string{"normal", "normal", "lazy-server", "lazy-server", "bulk", "bulk"}

// startServer starts the built-in workload as a server on the source,
// listening on the service address (TCP on port, UDP on port+1).
func (s *netSetup) startServer(t *testing.T, phaul string, port int, mem string) (*exec.Cmd, string) {
	t.Helper()
	wl := exec.Command("ip", "netns", "exec", s.src.NS, phaul, "__workload", "--mem", mem, "--dirty", "1000",
		"--listen", net.JoinHostPort(s.vip, strconv.Itoa(port)), "--udp", net.JoinHostPort(s.vip, strconv.Itoa(port+1)))
	log := background(t, wl, "server")
	waitLog(t, log, "READY", 0)
	return wl, log
}

func (s *netSetup) startServe(t *testing.T, phaul string) string {
	t.Helper()
	args := []string{"serve", "--listen", s.tgt.Addr + ":7070", "--insecure", "-v"}
	for _, sc := range s.tgtScripts {
		args = append(args, "--action-script", sc)
	}
	log := background(t, s.tgt.CommandNewPIDNS(context.Background(), phaul, args...), "serve")
	waitLog(t, log, "time=", 0)
	return log
}

// TestMigrateTCPServer moves a server with six connected clients (two
// reading and read promptly, two whose data the server leaves unread for a
// while, two that read slowly while the server floods them) and a UDP
// client, while an action script moves the service address. Every client
// keeps its connection, and both directions of each carry every message
// exactly once, in order (checked by sequence numbers and content on both
// ends and by the counts exchanged at the orderly close); the server takes
// new connections on its restored listener; the UDP echo answers.
func TestMigrateTCPServer(t *testing.T) {
	phaul := needPhaul(t)
	s := newNetSetup(t)
	serveLog := s.startServe(t, phaul)
	const port = 7000
	wl, wlLog := s.startServer(t, phaul, port, "64M")
	pid := wl.Process.Pid
	cs := s.startClients(t, port, netModes...)
	cs.waitTraffic(t, "before the migration")
	time.Sleep(300 * time.Millisecond) // queues fill: unread, unsent, unacknowledged data

	// Without --tcp-established the process is refused, by its connections.
	out, err := s.src.Command(context.Background(), phaul, "migrate", "--to", s.tgt.Addr+":7070", "--insecure",
		strconv.Itoa(pid)).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--tcp-established") || !strings.Contains(string(out), s.vip+":7000") {
		t.Fatalf("migrate without --tcp-established: %v\n%s", err, out)
	}

	mc := s.src.Command(context.Background(), phaul, "migrate", "--to", s.tgt.Addr+":7070", "--insecure", "--json", "-v",
		"--tcp-established", "--action-script", s.srcScript, strconv.Itoa(pid))
	var stderr strings.Builder
	mc.Stderr = &stderr
	outb, err := mc.Output()
	if err != nil {
		t.Fatalf("migrate: %v\n%s\nserve log:\n%s", err, stderr.String(), readTail(serveLog))
	}
	var res migrateResult
	if err := json.Unmarshal(outb, &res); err != nil {
		t.Fatalf("migrate --json: %v\n%s", err, outb)
	}
	moved := topology.NestedPid(pid)
	if moved == 0 {
		t.Fatalf("PID %d does not run on the target\nserve log:\n%s", pid, readTail(serveLog))
	}
	cs.waitTraffic(t, "after the migration")

	// New connections reach the restored listener, now on the target.
	fresh := s.startClients(t, port, "normal")
	fresh.waitTraffic(t, "a new client after the migration")
	fresh.close(t)

	stall := cs.close(t)
	if err := syscall.Kill(moved, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	line, _ := waitLog(t, wlLog, "CHECK seq=1", 0)
	if !strings.Contains(line, " OK ") || !strings.Contains(line, fmt.Sprintf("pid=%d", pid)) {
		t.Fatalf("on the target the server says: %s", line)
	}
	if b, _ := os.ReadFile(wlLog); strings.Contains(string(b), "TCPERR") {
		t.Fatalf("the server saw errors:\n%s", lastLines(string(b), 40))
	}
	scripts, _ := os.ReadFile(s.scriptLog)
	want := []string{"source network-lock", "source post-dump", "target network-lock", "target pre-resume",
		"target network-unlock", "target post-resume", "source post-resume", "source network-unlock"}
	checkScripts(t, string(scripts), want, s.vip)
	s.checkNoLocks(t)
	t.Logf("downtime %.1f ms (%v), largest client stall %v", res.DowntimeMS, res.Phases, stall)
}

// checkScripts checks that the scripts ran at want's points, in this
// order per side, with the service address in their environment.
func checkScripts(t *testing.T, log string, want []string, vip string) {
	t.Helper()
	var got []string
	for _, line := range strings.Split(strings.TrimSpace(log), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		got = append(got, f[0]+" "+f[1])
		if !strings.Contains(line, "addrs="+vip) {
			t.Errorf("script without the service address: %s", line)
		}
	}
	for _, side := range []string{"source", "target"} {
		var g, w []string
		for _, x := range got {
			if strings.HasPrefix(x, side) {
				g = append(g, x)
			}
		}
		for _, x := range want {
			if strings.HasPrefix(x, side) {
				w = append(w, x)
			}
		}
		if strings.Join(g, ",") != strings.Join(w, ",") {
			t.Errorf("%s scripts ran at %v, want %v\n%s", side, g, w, log)
		}
	}
}

// TestMigrateTCPRollback makes the target refuse the commit after the
// connections were locked and the service address moved (its pre-resume
// script fails): the rollback scripts move the address back, the source
// gives the connections back to the original, which runs on, and no
// client loses a message or sees a reset.
func TestMigrateTCPRollback(t *testing.T) {
	phaul := needPhaul(t)
	s := newNetSetup(t)
	if err := os.WriteFile(s.refuseMarker(), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(s.refuseMarker()) })
	serveLog := s.startServe(t, phaul)
	const port = 7100
	wl, wlLog := s.startServer(t, phaul, port, "16M")
	pid := wl.Process.Pid
	cs := s.startClients(t, port, netModes...)
	cs.waitTraffic(t, "before the migration")
	time.Sleep(300 * time.Millisecond)

	out, err := s.src.Command(context.Background(), phaul, "migrate", "--to", s.tgt.Addr+":7070", "--insecure",
		"--tcp-established", "--action-script", s.srcScript, strconv.Itoa(pid)).CombinedOutput()
	if err == nil {
		t.Fatalf("migrate succeeded though the target's pre-resume script refuses:\n%s", out)
	}
	if !strings.Contains(string(out), "refused the commit") || !strings.Contains(string(out), "exit status 7") {
		t.Errorf("migrate does not name the cause:\n%s\nserve log:\n%s", out, readTail(serveLog))
	}
	if topology.NestedPid(pid) != 0 {
		t.Fatal("a copy runs on the target after the refusal")
	}
	cs.waitTraffic(t, "after the rollback")
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatalf("the original is gone: %v", err)
	}
	line, _ := waitLog(t, wlLog, "CHECK seq=1", 0)
	if !strings.Contains(line, " OK ") {
		t.Fatalf("after the rollback the server says: %s", line)
	}
	fresh := s.startClients(t, port, "normal")
	fresh.waitTraffic(t, "a new client after the rollback")
	fresh.close(t)
	cs.close(t)
	if b, _ := os.ReadFile(wlLog); strings.Contains(string(b), "TCPERR") {
		t.Fatalf("the server saw errors:\n%s", lastLines(string(b), 40))
	}
	scripts, _ := os.ReadFile(s.scriptLog)
	checkScripts(t, string(scripts), []string{"source network-lock", "source post-dump", "target network-lock",
		"target pre-resume", "target rollback", "source rollback"}, s.vip)
	// No lock is left on either host.
	s.checkNoLocks(t)
}

// checkNoLocks fails if a network lock is left on the source or target.
func (s *netSetup) checkNoLocks(t *testing.T) {
	t.Helper()
	for _, h := range []*topology.Host{s.src, s.tgt} {
		ns, err := os.Open("/run/netns/" + h.NS)
		if err != nil {
			t.Fatal(err)
		}
		ids, err := netlock.Locks(ns)
		ns.Close()
		if err != nil {
			t.Fatal(err)
		}
		if len(ids) != 0 {
			t.Errorf("network locks left on %s: %q", h.Name, ids)
		}
	}
}
