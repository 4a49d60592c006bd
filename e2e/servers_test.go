package e2e

// Two real servers from Debian packages (.ci/run installs them) that fork
// workers: nginx (a master and two workers that share the listening
// socket, talk over unix socketpairs and share an anonymous MAP_SHARED
// page; the workers run as nobody) and lighttpd (server.max-worker = 2: a
// master and two workers sharing the listening socket). Each is dumped
// with its workers while clients keep keep-alive connections busy, and
// must answer on those same connections after restore, with the same
// worker PIDs.

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
)

// findServer returns the path of a server binary, or skips the test when
// its package is not installed.
func findServer(tb testing.TB, name string) string {
	tb.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	p := filepath.Join("/usr/sbin", name)
	if _, err := os.Stat(p); err != nil {
		tb.Skipf("%s is not installed (Debian package %s; .ci/run installs it)", name, name)
	}
	return p
}

// server is a forking server started by the test.
type server struct {
	name    string
	bin     string
	dir     string // its prefix: configuration, document root, logs
	port    int
	content string // the body of /index.html
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	master  int
	workers []int
}

// serverDir makes a directory the server's unprivileged workers can read.
func serverDir(tb testing.TB, name string) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", "phaul-e2e-"+name+"-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	for _, d := range []string{"www", "logs", "tmp"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			tb.Fatal(err)
		}
	}
	return dir
}

// newServer prepares the directory, the port and the page of a server.
func newServer(tb testing.TB, name string) *server {
	tb.Helper()
	needPhaul(tb)
	s := &server{name: name, bin: findServer(tb, name), dir: serverDir(tb, name), port: freePort(tb, "tcp")}
	var b strings.Builder
	for i := 0; b.Len() < 6000; i++ {
		fmt.Fprintf(&b, "%s line %d of the page served by the test %d\n", name, i, selfPid)
	}
	s.content = b.String()
	if err := os.WriteFile(filepath.Join(s.dir, "www", "index.html"), []byte(s.content), 0o644); err != nil {
		tb.Fatal(err)
	}
	return s
}

// start runs the server in its own process group, waits until it serves
// the page and has its two workers, and registers the cleanup: the whole
// tree (the original or the restored one) is killed and reaped.
func (s *server) start(tb testing.TB, args ...string) {
	tb.Helper()
	s.logPath = filepath.Join(s.dir, "logs", "stderr.log")
	out, err := os.Create(s.logPath)
	if err != nil {
		tb.Fatal(err)
	}
	null, err := os.Open(os.DevNull)
	if err != nil {
		tb.Fatal(err)
	}
	s.cmd = exec.Command(s.bin, args...)
	s.cmd.Dir = s.dir
	s.cmd.Stdin, s.cmd.Stdout, s.cmd.Stderr = null, out, out
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	s.done = make(chan struct{})
	err = testutil.StartChild(s.cmd)
	out.Close()
	null.Close()
	if err != nil {
		tb.Fatalf("start %s: %v", s.name, err)
	}
	s.master = s.cmd.Process.Pid
	go func() {
		_ = s.cmd.Wait()
		testutil.UnregisterChild(s.master)
		close(s.done)
	}()
	tb.Cleanup(s.kill)
	deadline := time.Now().Add(15 * time.Second)
	for {
		s.workers = treeChildPids(s.master)
		if len(s.workers) == 2 && s.get(2*time.Second) == nil {
			break
		}
		select {
		case <-s.done:
			tb.Fatalf("%s exited: %v\n%s", s.name, s.cmd.ProcessState, s.logs())
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s does not serve with two workers after 15 s (workers %v, %v)\n%s", s.name, s.workers,
				s.get(time.Second), s.logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
	sort.Ints(s.workers)
}

// get fetches the page once on a new connection.
func (s *server) get(timeout time.Duration) error {
	c := &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(s.url())
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != 200 || string(body) != s.content {
		return fmt.Errorf("%s: status %d, %d bytes (want 200 and the %d bytes of the page)", s.url(), resp.StatusCode, len(body), len(s.content))
	}
	return nil
}

func (s *server) url() string { return fmt.Sprintf("http://127.0.0.1:%d/index.html", s.port) }

// logs returns the server's log files, for failure messages.
func (s *server) logs() string {
	var b strings.Builder
	ents, _ := os.ReadDir(filepath.Join(s.dir, "logs"))
	for _, e := range ents {
		if strings.Contains(e.Name(), "access") {
			continue
		}
		data, _ := os.ReadFile(filepath.Join(s.dir, "logs", e.Name()))
		lines := strings.Split(strings.TrimSpace(string(data)), "\n")
		if len(lines) > 20 {
			lines = lines[len(lines)-20:]
		}
		fmt.Fprintf(&b, "--- %s:\n%s\n", e.Name(), strings.Join(lines, "\n"))
	}
	return b.String()
}

// ours reports whether pid runs the server binary.
func (s *server) ours(pid int) bool {
	exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	return exe == s.bin
}

// kill kills the server's tree and reaps it.
func (s *server) kill() {
	pids := append([]int{s.master}, s.workers...)
	pids = append(pids, treeChildPids(s.master)...)
	_ = sys.Kill(-s.master, sys.SIGKILL)
	for _, p := range pids {
		if s.ours(p) {
			_ = sys.Kill(p, sys.SIGKILL)
		}
	}
	<-s.done
	for _, p := range pids {
		if st, err := testutil.ReadProcStat(p); err == nil && (st.PPid == selfPid || s.ours(p)) {
			_ = testutil.WaitPidGone(p, 10*time.Second)
		}
	}
	testutil.ReapOrphans()
}

// ---- the client ----------------------------------------------------------

// keepAliveClient fetches the page again and again over one keep-alive
// connection and checks every answer.
type keepAliveClient struct {
	s      *server
	header string // a response header naming the worker's PID ("" if none)

	mu      sync.Mutex
	ok      int
	dials   int
	failure error
	pids    map[int]int // worker PID (from header) -> answers
	stop    chan struct{}
	done    chan struct{}
	ctx     context.Context
	cancel  context.CancelFunc // aborts the request in flight (cleanup)
}

func startKeepAliveClient(tb testing.TB, s *server, header string) *keepAliveClient {
	c := &keepAliveClient{s: s, header: header, pids: map[int]int{}, stop: make(chan struct{}), done: make(chan struct{})}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	tr := &http.Transport{
		MaxConnsPerHost:     1,
		MaxIdleConnsPerHost: 1,
		DisableCompression:  true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c.mu.Lock()
			c.dials++
			c.mu.Unlock()
			return dialer.DialContext(ctx, network, addr)
		},
	}
	hc := &http.Client{Timeout: 30 * time.Second, Transport: tr}
	go func() {
		defer close(c.done)
		defer tr.CloseIdleConnections()
		for {
			select {
			case <-c.stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			pid, err := c.fetch(hc)
			c.mu.Lock()
			if err != nil {
				c.failure = err
			} else {
				c.ok++
				c.pids[pid]++
			}
			c.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	tb.Cleanup(func() {
		c.cancel()
		c.halt()
	})
	return c
}

func (c *keepAliveClient) fetch(hc *http.Client) (int, error) {
	req, err := http.NewRequestWithContext(c.ctx, http.MethodGet, c.s.url(), nil)
	if err != nil {
		return 0, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, fmt.Errorf("read the body: %w", err)
	}
	if resp.StatusCode != 200 || string(body) != c.s.content {
		return 0, fmt.Errorf("status %d, %d bytes, want 200 and the page (%d bytes)", resp.StatusCode, len(body), len(c.s.content))
	}
	if c.header == "" {
		return 0, nil
	}
	pid, err := strconv.Atoi(resp.Header.Get(c.header))
	if err != nil {
		return 0, fmt.Errorf("header %s: %q", c.header, resp.Header.Get(c.header))
	}
	return pid, nil
}

// halt stops the client after the request in flight.
func (c *keepAliveClient) halt() {
	select {
	case <-c.stop:
	default:
		close(c.stop)
	}
	<-c.done
}

func (c *keepAliveClient) status() (ok, dials int, failure error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ok, c.dials, c.failure
}

// ---- the scenario -----------------------------------------------------------

// dumpRestoreServer runs the scenario on a started server: three
// keep-alive clients busy, dump of the master's tree with
// --tcp-established, restore, the same master and worker PIDs with the
// same credentials, the clients answered on their original connections,
// new connections answered too, and a clean stop.
func dumpRestoreServer(t *testing.T, s *server, header string) {
	clients := make([]*keepAliveClient, 3)
	for i := range clients {
		clients[i] = startKeepAliveClient(t, s, header)
	}
	treeWaitFor(t, 10*time.Second, "every client has answers", func() bool {
		for _, c := range clients {
			if ok, _, err := c.status(); err != nil || ok < 20 {
				return err != nil
			}
		}
		return true
	})
	for i, c := range clients {
		if _, _, err := c.status(); err != nil {
			t.Fatalf("client %d before the dump: %v\n%s", i, err, s.logs())
		}
	}
	tree := append([]int{s.master}, s.workers...)
	before := map[int]snapshot{}
	for _, p := range tree {
		before[p] = takeSnapshot(t, p)
	}

	dir := imageDir(t)
	r := runPhaul(t, nil, "dump", "-t", strconv.Itoa(s.master), "-D", dir, "--tcp-established")
	r.mustSucceed(t, nil)
	atDump := make([]int, len(clients))
	for i, c := range clients {
		atDump[i], _, _ = c.status()
	}
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s master %d still runs 10 s after the dump", s.name, s.master)
	}
	for _, p := range tree {
		if err := testutil.WaitPidGone(p, 10*time.Second); err != nil {
			t.Fatalf("after the dump: %v", err)
		}
	}

	pidfile := filepath.Join(t.TempDir(), "restored.pid")
	r = runPhaul(t, nil, "restore", "-D", dir, "-d", "--pidfile", pidfile)
	if r.code != 0 {
		t.Fatalf("%v\n%s", r, s.logs())
	}
	if data, err := os.ReadFile(pidfile); err != nil || strings.TrimSpace(string(data)) != strconv.Itoa(s.master) {
		t.Fatalf("pidfile holds %q (%v), want the master's PID %d", data, err, s.master)
	}
	treeWaitFor(t, 2*time.Second, "the restored master is re-parented to the test", func() bool {
		st, err := testutil.ReadProcStat(s.master)
		return err == nil && st.PPid == selfPid
	})
	restored := time.Now()
	if got := treeChildPids(s.master); !slices.Equal(slices.Sorted(slices.Values(got)), s.workers) {
		t.Errorf("the restored master has the children %v, want its workers %v", got, s.workers)
	}
	for _, p := range tree {
		after, err := readSnapshot(p)
		if err != nil {
			t.Errorf("process %d was not restored: %v", p, err)
			continue
		}
		if d := diffSnapshots(before[p], after, snapOpts{skipFds: true}); len(d) > 0 {
			t.Errorf("%s process %d differs after restore:\n  %s", s.name, p, strings.Join(d, "\n  "))
		}
	}

	// The clients go on over the same connections.
	treeWaitFor(t, 20*time.Second, "every client has 50 answers after the restore", func() bool {
		for i, c := range clients {
			if ok, _, err := c.status(); err != nil || ok < atDump[i]+50 {
				return err != nil
			}
		}
		return true
	})
	for i, c := range clients {
		c.halt()
		ok, dials, err := c.status()
		if err != nil {
			t.Errorf("client %d (%d answers, %d of them before the dump): %v", i, ok, atDump[i], err)
		}
		if dials != 1 {
			t.Errorf("client %d opened %d connections, want 1: its keep-alive connection did not survive", i, dials)
		}
		if header != "" {
			for pid := range c.pids {
				if !slices.Contains(s.workers, pid) {
					t.Errorf("client %d was answered by PID %d, not one of the workers %v", i, pid, s.workers)
				}
			}
		}
	}
	t.Logf("%d ms from restore to 50 answers per client", time.Since(restored).Milliseconds())
	for i := 0; i < 10; i++ {
		if err := s.get(5 * time.Second); err != nil {
			t.Errorf("a new connection after restore: %v", err)
			break
		}
	}
	if t.Failed() {
		t.Logf("%s", s.logs())
	}

	// A clean stop: the master tells its workers and waits for them.
	if err := sys.Kill(s.master, sys.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for _, p := range tree {
		if err := testutil.WaitPidGone(p, 15*time.Second); err != nil {
			t.Errorf("SIGTERM to the restored master: %v\n%s", err, s.logs())
		}
	}
}

// ---- nginx and lighttpd ---------------------------------------------------------

// TestTreeServerNginx: nginx with a master and two workers (running as
// nobody), each response naming its worker in X-Worker.
func TestTreeServerNginx(t *testing.T) {
	s := newServer(t, "nginx")
	conf := fmt.Sprintf(`daemon off;
master_process on;
worker_processes 2;
pid %[1]s/nginx.pid;
error_log %[1]s/logs/error.log info;
events { worker_connections 64; }
http {
	access_log %[1]s/logs/access.log;
	client_body_temp_path %[1]s/tmp/body;
	proxy_temp_path %[1]s/tmp/proxy;
	fastcgi_temp_path %[1]s/tmp/fastcgi;
	uwsgi_temp_path %[1]s/tmp/uwsgi;
	scgi_temp_path %[1]s/tmp/scgi;
	keepalive_timeout 300s;
	keepalive_requests 1000000;
	server {
		listen 127.0.0.1:%[2]d;
		root %[1]s/www;
		add_header X-Worker $pid;
	}
}
`, s.dir, s.port)
	path := filepath.Join(s.dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	s.start(t, "-p", s.dir+"/", "-c", path, "-e", filepath.Join(s.dir, "logs", "error.log"))
	dumpRestoreServer(t, s, "X-Worker")
	data, _ := os.ReadFile(filepath.Join(s.dir, "logs", "error.log"))
	for _, l := range strings.Split(string(data), "\n") {
		if strings.Contains(l, "[alert]") || strings.Contains(l, "[crit]") || strings.Contains(l, "[emerg]") ||
			strings.Contains(l, "exited on signal") {
			t.Errorf("nginx error log: %s", l)
		}
	}
}

// TestTreeServerLighttpd: lighttpd with server.max-worker = 2.
func TestTreeServerLighttpd(t *testing.T) {
	s := newServer(t, "lighttpd")
	conf := fmt.Sprintf(`server.document-root = "%[1]s/www"
server.bind = "127.0.0.1"
server.port = %[2]d
server.max-worker = 2
server.errorlog = "%[1]s/logs/error.log"
server.pid-file = "%[1]s/lighttpd.pid"
server.upload-dirs = ( "%[1]s/tmp" )
server.modules = ( "mod_accesslog" )
accesslog.filename = "%[1]s/logs/access.log"
server.max-keep-alive-requests = 1000000
server.max-keep-alive-idle = 300
index-file.names = ( "index.html" )
`, s.dir, s.port)
	path := filepath.Join(s.dir, "lighttpd.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	s.start(t, "-D", "-f", path)
	dumpRestoreServer(t, s, "")
}
