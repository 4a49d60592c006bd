package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/phaul/phaul/internal/topology"
)

// buildNetwork builds the hosts' network (tests record what it built).
var buildNetwork = topology.New

// Hosts is two host-like namespaces, "source" and "target", with the
// processes started on them, each logging to a file in Dir. Close stops
// every process and removes the namespaces, also after a failure.
//
// Built by NewClientHosts, it also has a third host, "client", from which
// clients reach the workload at the service address VIP: a /32 on the
// loopback of the host that has the workload, with a route on the client
// via that host (as through a load balancer). ActionScript moves it along
// with the process: phaul runs it on both sides of a migration.
type Hosts struct {
	Net            *topology.Network
	Source, Target *topology.Host
	// Client is the clients' host (nil with two hosts).
	Client *topology.Host
	// VIP is the service address, and ActionScript the script that moves
	// it (both "" with two hosts).
	VIP          string
	ActionScript string
	// Phaul is the phaul executable run on both hosts.
	Phaul string
	// Dir holds the logs of the processes (and the action script's log,
	// actions.log).
	Dir string

	mu    sync.Mutex
	procs []*Proc
}

// NewHosts builds the two hosts. phaul is the phaul executable; logs go to
// dir.
func NewHosts(ctx context.Context, phaul, dir string) (*Hosts, error) {
	n, err := buildNetwork(ctx, "source", "target")
	if err != nil {
		return nil, fmt.Errorf("build the two hosts: %w", err)
	}
	return &Hosts{Net: n, Source: n.Host("source"), Target: n.Host("target"), Phaul: phaul, Dir: dir}, nil
}

// NewClientHosts builds the two hosts and a client host, with the service
// address and the action script that moves it (see Hosts).
func NewClientHosts(ctx context.Context, phaul, dir string) (*Hosts, error) {
	n, err := buildNetwork(ctx, "source", "target", "client")
	if err != nil {
		return nil, fmt.Errorf("build the three hosts: %w", err)
	}
	h := &Hosts{Net: n, Source: n.Host("source"), Target: n.Host("target"), Client: n.Host("client"),
		VIP: n.FreeAddr(), Phaul: phaul, Dir: dir}
	h.ActionScript = filepath.Join(dir, "move-address.sh")
	if err := topology.WriteMoveScript(h.ActionScript, filepath.Join(dir, "actions.log"), h.VIP, h.Client, h.Source, h.Target); err != nil {
		_ = n.Close()
		return nil, err
	}
	return h, nil
}

// PlaceVIP puts the service address on the source, wherever an earlier
// run left it, and routes the client's traffic for it via the source.
func (h *Hosts) PlaceVIP(ctx context.Context) error {
	if h.Client == nil {
		return nil
	}
	return topology.PlaceService(ctx, h.VIP, h.Client, h.Source, h.Target)
}

// Dial connects to addr from the client host (from here with two hosts).
func (h *Hosts) Dial(network, addr string) (net.Conn, error) {
	dial := func() (net.Conn, error) { return net.DialTimeout(network, addr, 5*time.Second) }
	if h.Client == nil {
		return dial()
	}
	var c net.Conn
	err := h.Client.Do(func() error {
		var err error
		c, err = dial()
		return err
	})
	return c, err
}

// Close stops every process still running, newest first, then removes the
// namespaces.
func (h *Hosts) Close() error {
	h.mu.Lock()
	procs := h.procs
	h.procs = nil
	h.mu.Unlock()
	for i := len(procs) - 1; i >= 0; i-- {
		procs[i].Stop()
	}
	if h.Net == nil {
		return nil
	}
	return h.Net.Close()
}

// Proc is a process started by Hosts.Start, in a process group of its own.
type Proc struct {
	Cmd *exec.Cmd
	// Log is the file that receives its stdout and stderr.
	Log  string
	done chan struct{}
	once sync.Once
}

// Start starts cmd with its output to the file log (in Dir unless
// absolute), in a process group of its own, and keeps it for Close.
func (h *Hosts) Start(cmd *exec.Cmd, log string) (*Proc, error) {
	if !filepath.IsAbs(log) {
		log = filepath.Join(h.Dir, log)
	}
	f, err := os.Create(log)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cmd.Stdout, cmd.Stderr = f, f
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Proc{Cmd: cmd, Log: log, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	h.mu.Lock()
	h.procs = append(h.procs, p)
	h.mu.Unlock()
	return p, nil
}

// Stop ends the process group: SIGTERM, then SIGKILL after 5 s. It
// returns once the process has been reaped.
func (p *Proc) Stop() {
	p.once.Do(func() {
		pgid := p.Cmd.Process.Pid
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			<-p.done
		}
	})
}

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Serve is a phaul serve running on the target host, in a PID namespace of
// its own of which it is the init: when it stops, everything migrated to it
// goes too.
type Serve struct {
	*Proc
	// Addr is host:port it listens on.
	Addr string
	// Pid is the phaul serve process (as seen from here).
	Pid int
}

// StartServe starts phaul serve on the target host (with the action script,
// if any) and waits until it listens.
func (h *Hosts) StartServe(ctx context.Context, port int, log string) (*Serve, error) {
	addr := fmt.Sprintf("%s:%d", h.Target.Addr, port)
	args := []string{"serve", "--listen", addr, "--insecure", "-v"}
	if h.ActionScript != "" {
		args = append(args, "--action-script", h.ActionScript)
	}
	p, err := h.Start(h.Target.CommandNewPIDNS(ctx, h.Phaul, args...), log)
	if err != nil {
		return nil, fmt.Errorf("start phaul serve on the target: %w", err)
	}
	if _, err := WaitLine(ctx, p.Log, "time=", 10*time.Second); err != nil {
		p.Stop()
		return nil, fmt.Errorf("phaul serve: %w", err)
	}
	s := &Serve{Proc: p, Addr: addr}
	// ip netns exec and unshare exec each other; unshare forks serve.
	for _, c := range Descendants(p.Cmd.Process.Pid) {
		if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", c)); exe == h.Phaul || filepath.Base(exe) == filepath.Base(h.Phaul) {
			s.Pid = c
			break
		}
	}
	return s, nil
}

// Lookup returns the PID, as seen from here, of the process that is pid in
// serve's PID namespace (a process migrated to it), or 0. Only serve's
// descendants are considered, never another namespace's process that
// happens to have the same number there.
func (s *Serve) Lookup(pid int) int {
	for _, c := range Descendants(s.Cmd.Process.Pid) {
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", c))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(st), "\n") {
			if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
				if f := strings.Fields(rest); len(f) >= 2 && f[len(f)-1] == strconv.Itoa(pid) {
					return c
				}
			}
		}
	}
	return 0
}

// Descendants returns the PIDs of pid's children, grandchildren, ... in
// breadth-first order.
func Descendants(pid int) []int {
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		// Each thread lists the children it made itself.
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", p))
		for _, t := range tasks {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", p, t.Name()))
			for _, f := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(f); err == nil {
					out = append(out, c)
					queue = append(queue, c)
				}
			}
		}
	}
	return out
}

// ErrNoLine reports that an expected line did not come in time.
var ErrNoLine = errors.New("expected line did not come")

// WaitLine waits until the file at path has a line starting with prefix and
// returns the newest such line.
func WaitLine(ctx context.Context, path, prefix string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		if l, ok := LastLine(path, prefix); ok {
			return l, nil
		}
		if time.Now().After(deadline) {
			tail, _ := os.ReadFile(path)
			return "", fmt.Errorf("%w: no %q line in %s within %v; it holds:\n%s", ErrNoLine, prefix, filepath.Base(path), timeout, lastLines(string(tail), 20))
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// LastLine returns the newest line of the file at path that starts with
// prefix.
func LastLine(path, prefix string) (string, bool) {
	var last string
	found := false
	_ = eachLine(path, func(l string) {
		if strings.HasPrefix(l, prefix) {
			last, found = l, true
		}
	})
	return last, found
}

func eachLine(path string, fn func(string)) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fn(sc.Text())
	}
	return sc.Err()
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Alive reports whether pid runs (a zombie waiting to be reaped does not).
func Alive(pid int) bool {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(st), ')')
	return i > 0 && i+2 < len(st) && st[i+2] != 'Z'
}

// clockTick is the unit of utime and stime in /proc/PID/stat (USER_HZ,
// 100 on every Linux architecture phaul runs on).
const clockTick = 10 * time.Millisecond

// ProcessCPU returns the CPU time (user + system, all threads, not
// children) pid has used so far, from /proc/PID/stat.
func ProcessCPU(pid int) (time.Duration, error) {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	i := strings.LastIndexByte(string(st), ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(string(st[i+1:]))
	// After the comm: state is field 3, utime 14 and stime 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	s, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return time.Duration(u+s) * clockTick, nil
}
