package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/phaul/phaul/bench/workload"
	"github.com/phaul/phaul/internal/sys"
)

// Config is a bench session: the matrix of workloads and variants, and how
// often to repeat it.
type Config struct {
	// Phaul is the phaul executable (it runs serve, migrate and the
	// built-in workload).
	Phaul string
	// Mems and DirtyRates span the built-in workload's matrix.
	Mems       []int64
	DirtyRates []int
	// Threads is the number of writer threads of the built-in workload.
	Threads int
	// Random fills the workload's pages with incompressible data.
	Random bool
	// Repeat is how many times each point of the matrix runs.
	Repeat int
	// Compare holds --compare specs (see CompareHelp).
	Compare []string
	// Workloads names the workloads: "mem" (built-in) and "tcp" (the
	// built-in one with TCPClients clients, DefaultTCPClients if 0).
	Workloads []string
	// TCPClients, when above 0, makes the built-in workload a server with
	// that many TCP clients and one UDP client connected from a third
	// host through every migration (see RunBench).
	TCPClients int
	// Cmd, when set, is a shell command run as the workload instead of the
	// built-in one (it must be a single process phaul can migrate).
	Cmd string
	// Heartbeat is the built-in workload's heartbeat interval.
	Heartbeat time.Duration
	// Warmup is how long the workload runs before it is migrated.
	Warmup time.Duration
	// Dir receives the logs of every process ("": a temporary directory,
	// removed at the end).
	Dir string
	// CommandLine is recorded in the results.
	CommandLine string
	// Progress, when set, is called before the first run and after each.
	Progress func(Progress)
}

// Progress is the state of a session for a progress display.
type Progress struct {
	Done, Total int
	// Last is the run that just ended (nil before the first).
	Last *Run
	// Bandwidth is the measured bandwidth, given before the first run
	// (nil when not measured).
	Bandwidth *Bandwidth
}

// The default matrix.
var (
	DefaultMems       = []int64{64 << 20, 256 << 20}
	DefaultDirtyRates = []int{0, 1000}
)

// DefaultTCPClients is the number of TCP clients of the "tcp" workload
// when Config.TCPClients is 0.
const DefaultTCPClients = 3

// ErrNothingToRun reports a session in which no run could be made.
var ErrNothingToRun = errors.New("nothing to run")

// runCase is one planned run.
type runCase struct {
	index   int
	v       Variant
	mem     int64
	dirty   int
	repeat  int
	userCmd string
}

// migration is what moving the workload gave.
type migration struct {
	start, end time.Time
	// pid is the workload's PID, as seen from here, after the move.
	pid    int
	result migrateResult
	// CPU used by the source (migrate) and the target (serve).
	sourceCPU, targetCPU time.Duration
}

// migrateResult is the part of `phaul migrate --json` the bench reads.
type migrateResult struct {
	DowntimeMS float64            `json:"downtime_ms"`
	TotalMS    float64            `json:"total_ms"`
	CleanupMS  float64            `json:"cleanup_ms"`
	Rounds     int                `json:"rounds"`
	BytesSent  uint64             `json:"bytes_sent"`
	PagesSent  uint64             `json:"pages_sent"`
	PagesZero  uint64             `json:"pages_zero"`
	Tracker    string             `json:"tracker"`
	RestoreMS  float64            `json:"target_restore_ms"`
	Phases     map[string]float64 `json:"downtime_phases"`
	PerRound   []struct {
		Pages      uint64  `json:"pages_sent"`
		Bytes      uint64  `json:"bytes_sent"`
		DurationMS float64 `json:"duration_ms"`
		Final      bool    `json:"final"`
	} `json:"per_round"`
}

// runner runs one session. The hooks are phaul's real target and
// migration; tests replace them.
type runner struct {
	cfg   Config
	hosts *Hosts
	// startTarget readies the target for run i (phaul serve).
	startTarget func(ctx context.Context, i int) (*Serve, error)
	// migrate moves the workload pid.
	migrate func(ctx context.Context, c runCase, pid int, serve *Serve) (*migration, error)
	// workloadArgs are extra flags for the built-in workload (tests).
	workloadArgs []string
}

// RunBench runs a bench session and returns every run, failed ones
// included. On cancellation it returns what was measured so far with the
// context's error. Every process it started is gone when it returns.
//
// Before the runs it measures the machine's read, link (source host to
// target host) and compression rates once (Results.Bandwidth, about a
// second), and gives each successful run its bandwidth bound (Run.BoundMS
// and BoundRatio).
//
// With TCPClients, the session runs on three hosts (NewClientHosts) and
// in every run the workload serves TCP and UDP at the service address;
// the clients connect from the client host and must all have received
// traffic before the migration (made with --tcp-established and the
// action script) and again after it, from the target; then they end in
// order, each checking that every message went through exactly once. A
// client's error fails the run. The run records the largest stall a TCP
// client saw during the migration (ClientStallMS) and the UDP echo's
// largest gap (UDPGapMS).
func RunBench(ctx context.Context, cfg Config) (*Results, error) {
	cfg = withDefaults(cfg)
	res := newResults(cfg)
	if cfg.TCPClients > 0 && cfg.Cmd != "" {
		return res, errors.New("TCP clients need the built-in workload, not a command")
	}
	cases, err := plan(ctx, cfg, res)
	if err != nil {
		return res, err
	}
	if len(cases) == 0 {
		return res, fmt.Errorf("%w: %s", ErrNothingToRun, strings.Join(res.Notes, "; "))
	}
	// The workload gets only its stdio, never a descriptor this process
	// inherited (phaul would refuse to migrate a pipe to another process).
	if err := sys.CloseOnExecFrom(3); err != nil {
		return res, err
	}
	dir := cfg.Dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "phaul-bench-"); err != nil {
			return res, err
		}
		defer os.RemoveAll(dir)
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return res, err
	}
	newHosts := NewHosts
	if cfg.TCPClients > 0 {
		newHosts = NewClientHosts
	}
	hosts, err := newHosts(ctx, cfg.Phaul, dir)
	if err != nil {
		return res, err
	}
	defer hosts.Close()
	r := &runner{cfg: cfg, hosts: hosts}
	r.startTarget = func(ctx context.Context, i int) (*Serve, error) {
		return hosts.StartServe(ctx, 7000+i%1000, fmt.Sprintf("run%03d-serve.log", i))
	}
	r.migrate = r.phaulMigrate
	if res.Bandwidth, err = measureBandwidth(ctx, hosts.Source, hosts.Target, cases, res); err != nil {
		res.Notes = append(res.Notes, fmt.Sprintf("Interrupted while measuring the bandwidth, before the first of %d runs.", len(cases)))
		return res, err
	}
	return res, r.runAll(ctx, cases, res)
}

func withDefaults(cfg Config) Config {
	if len(cfg.Mems) == 0 {
		cfg.Mems = DefaultMems
	}
	if len(cfg.DirtyRates) == 0 {
		cfg.DirtyRates = DefaultDirtyRates
	}
	if len(cfg.Workloads) == 0 {
		cfg.Workloads = []string{"mem"}
	}
	if contains(cfg.Workloads, "tcp") && cfg.TCPClients == 0 {
		cfg.TCPClients = DefaultTCPClients
	}
	cfg.Threads = max(cfg.Threads, 1)
	cfg.Repeat = max(cfg.Repeat, 1)
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = 10 * time.Millisecond
	}
	if cfg.Warmup <= 0 {
		cfg.Warmup = 500 * time.Millisecond
	}
	return cfg
}

func newResults(cfg Config) *Results {
	host, _ := os.Hostname()
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return &Results{Started: time.Now(), Host: host, Kernel: strings.TrimSpace(string(kernel)), Command: cfg.CommandLine}
}

// plan lists the runs, interleaved: each repeat goes over the whole
// matrix, and the variants of a point run one after the other (in an order
// rotated by the repeat), so that drift of the machine spreads over all of
// them. Variants and workloads that cannot run are left out with a note.
func plan(ctx context.Context, cfg Config, res *Results) ([]runCase, error) {
	variants, err := ParseCompare(cfg.Compare, Variant{Random: cfg.Random})
	if err != nil {
		return nil, err
	}
	var runnable []Variant
	var criuAsked []string
	for _, v := range variants {
		if v.Engine == "phaul" {
			runnable = append(runnable, v)
		} else {
			criuAsked = append(criuAsked, v.Name)
		}
	}
	if len(criuAsked) > 0 {
		version, reason := ProbeCRIU(ctx)
		res.Notes = append(res.Notes, criuNote(version, reason)+" Not run: "+strings.Join(criuAsked, "; ")+".")
	}
	mem := false
	for _, w := range cfg.Workloads {
		switch w {
		case "mem":
			mem = true
		case "tcp":
			mem = true
		default:
			return nil, fmt.Errorf("unknown workload %q (mem or tcp)", w)
		}
	}
	if cfg.Cmd != "" {
		res.Notes = append(res.Notes, "Workload: the command `"+cfg.Cmd+"`; the application's own downtime is not available for it (it sends no heartbeats).")
		mem = true
	}
	if !mem {
		return nil, nil
	}
	if cfg.TCPClients > 0 {
		var modes []string
		for i := 0; i < min(cfg.TCPClients, len(clientModes)); i++ {
			modes = append(modes, clientModes[i].String())
		}
		res.Notes = append(res.Notes, fmt.Sprintf("Clients: %d TCP clients (modes %s, in turn) and a UDP client on a third host "+
			"stay connected to the workload through each migration (phaul migrate --tcp-established, with an action script "+
			"that moves the service address). Client stall is the largest gap between two messages a TCP client received "+
			"that overlaps the migration; a client error fails the run.", cfg.TCPClients, strings.Join(modes, ", ")))
	}
	mems, dirties := cfg.Mems, cfg.DirtyRates
	if cfg.Cmd != "" {
		mems, dirties = []int64{0}, []int{0}
	}
	var cases []runCase
	for rep := 0; rep < cfg.Repeat; rep++ {
		for _, m := range mems {
			for _, d := range dirties {
				for k := range runnable {
					v := runnable[(k+rep)%len(runnable)]
					cases = append(cases, runCase{index: len(cases), v: v, mem: m, dirty: d, repeat: rep, userCmd: cfg.Cmd})
				}
			}
		}
	}
	return cases, nil
}

func (r *runner) runAll(ctx context.Context, cases []runCase, res *Results) error {
	progress := r.cfg.Progress
	if progress == nil {
		progress = func(Progress) {}
	}
	progress(Progress{Total: len(cases), Bandwidth: res.Bandwidth})
	for i, c := range cases {
		if err := ctx.Err(); err != nil {
			res.Notes = append(res.Notes, fmt.Sprintf("Interrupted after %d of %d runs.", i, len(cases)))
			return err
		}
		run := r.runOne(ctx, c)
		if ctx.Err() != nil {
			// A run cut short is not a measurement.
			res.Notes = append(res.Notes, fmt.Sprintf("Interrupted after %d of %d runs.", i, len(cases)))
			return ctx.Err()
		}
		boundRun(res.Bandwidth, &run)
		res.Runs = append(res.Runs, run)
		progress(Progress{Done: i + 1, Total: len(cases), Last: &res.Runs[len(res.Runs)-1]})
	}
	return nil
}

func (r *runner) runOne(ctx context.Context, c runCase) Run {
	run := Run{Config: c.v.Name, MemBytes: c.mem, DirtyRate: c.dirty, Threads: r.cfg.Threads, Repeat: c.repeat,
		Workload: "heap", Variant: c.v}
	switch {
	case c.userCmd != "":
		run.Workload, run.Threads = "cmd", 0
	case c.v.Random:
		run.Workload = "random"
	}
	if err := r.measure(ctx, c, &run); err != nil {
		run.Err = err.Error()
	}
	return run
}

// measure does one run: target ready, workload started (and its clients
// connected) and warmed up, migration, the workload's (and the clients')
// account of it, and its self-check on the target.
func (r *runner) measure(ctx context.Context, c runCase, run *Run) error {
	clients := 0
	if c.userCmd == "" {
		clients = r.cfg.TCPClients
	}
	run.TCPClients = clients
	if clients > 0 {
		if err := r.hosts.PlaceVIP(ctx); err != nil {
			return fmt.Errorf("place the service address on the source: %w", err)
		}
	}
	serve, err := r.startTarget(ctx, c.index)
	if err != nil {
		return err
	}
	if serve != nil {
		defer serve.Stop()
	}
	var argv []string
	if c.userCmd != "" {
		argv = []string{"/bin/sh", "-c", "exec " + c.userCmd}
	} else {
		argv = append([]string{r.cfg.Phaul, "__workload", "--mem", strconv.FormatInt(c.mem, 10),
			"--dirty", strconv.Itoa(c.dirty), "--writers", strconv.Itoa(r.cfg.Threads),
			"--heartbeat", r.cfg.Heartbeat.String()}, r.workloadArgs...)
		if c.v.Random {
			argv = append(argv, "--random")
		}
		if clients > 0 {
			argv = append(argv, "--listen", r.serviceAddr(c.index, 0), "--udp", r.serviceAddr(c.index, 1))
		}
	}
	wl, err := r.hosts.Start(r.sourceCommand(ctx, argv[0], argv[1:]...), fmt.Sprintf("run%03d-workload.log", c.index))
	if err != nil {
		return fmt.Errorf("start the workload: %w", err)
	}
	defer wl.Stop()
	var cs *clientSet
	if c.userCmd == "" {
		ready, err := WaitLine(ctx, wl.Log, "READY", 2*time.Minute)
		if err != nil {
			return err
		}
		if clients > 0 {
			tcpAddr, udpAddr := readyAddrs(ready)
			if tcpAddr == "" || udpAddr == "" {
				return fmt.Errorf("the workload does not serve TCP and UDP: %s", ready)
			}
			if cs, err = startClients(r.hosts.Dial, clients, tcpAddr, udpAddr); err != nil {
				return err
			}
			defer cs.abort()
			if err := cs.waitTraffic(ctx, "before the migration", clientWait); err != nil {
				return err
			}
		}
	}
	if err := sleep(ctx, r.cfg.Warmup); err != nil {
		return err
	}
	if wl.Exited() {
		tail, _ := os.ReadFile(wl.Log)
		return fmt.Errorf("the workload exited before the migration: %s", lastLines(string(tail), 5))
	}
	m, err := r.migrate(ctx, c, wl.Cmd.Process.Pid, serve)
	if err != nil {
		return err
	}
	// The moved process is not our child: stop it by PID when done (its
	// target's PID namespace ends with serve anyway).
	defer func() {
		if m.pid != wl.Cmd.Process.Pid && Alive(m.pid) {
			_ = syscall.Kill(m.pid, syscall.SIGKILL)
		}
	}()
	res := m.result
	run.FrozenMS, run.TotalMS, run.CleanupMS, run.Bytes, run.Rounds = res.DowntimeMS, res.TotalMS, res.CleanupMS, res.BytesSent, res.Rounds
	run.Pages, run.PagesZero, run.Tracker, run.RestoreMS, run.Phases = res.PagesSent, res.PagesZero, res.Tracker, res.RestoreMS, res.Phases
	for _, pr := range res.PerRound {
		run.RoundBytes = append(run.RoundBytes, pr.Bytes)
		run.RoundPages = append(run.RoundPages, pr.Pages)
		run.RoundMS = append(run.RoundMS, pr.DurationMS)
	}
	run.SourceCPU, run.TargetCPU = m.sourceCPU.Seconds(), m.targetCPU.Seconds()
	if c.userCmd != "" {
		if !Alive(m.pid) {
			return fmt.Errorf("the command is not running after the migration")
		}
		return nil
	}
	if cs != nil {
		if err := cs.waitTraffic(ctx, "after the migration", clientWait); err != nil {
			return err
		}
	}
	gap, at, err := appGap(ctx, wl.Log, m.start, m.end, 5*time.Second)
	if err != nil {
		return err
	}
	run.AppDowntimeMS = &gap
	run.AppGapEndMS = float64(at.Sub(m.start).Microseconds()) / 1000
	if cs != nil {
		if err := closeClients(ctx, cs, m, wl.Log, run); err != nil {
			return err
		}
	}
	// The workload checks all of its memory where it now runs.
	if err := syscall.Kill(m.pid, syscall.SIGUSR1); err != nil {
		return fmt.Errorf("ask the workload for its self-check: %w", err)
	}
	line, err := WaitLine(ctx, wl.Log, "CHECK seq=1 ", 2*time.Minute)
	if err != nil {
		return err
	}
	if !strings.Contains(line, " OK ") {
		return fmt.Errorf("self-check after the migration: %s", line)
	}
	run.Checked = true
	return nil
}

// serviceAddr is where the workload of run i serves TCP (k = 0) or UDP
// (k = 1): the service address with three hosts, else any port on the
// loopback (tests).
func (r *runner) serviceAddr(i, k int) string {
	if r.hosts.Client == nil {
		return "127.0.0.1:0"
	}
	return net.JoinHostPort(r.hosts.VIP, strconv.Itoa(8000+2*(i%500)+k))
}

// closeClients ends the clients of a run in order and records what they
// saw of the migration m. Any client error, and any violation the
// workload's server reported in its log, fails the run.
func closeClients(ctx context.Context, cs *clientSet, m *migration, log string, run *Run) error {
	tcp, udp, err := cs.close(ctx)
	run.Clients = clientResults(tcp, cs.modes, udp, m.start, m.end)
	if err != nil {
		return fmt.Errorf("clients: %w", err)
	}
	for _, prefix := range []string{"TCPERR", "UDPERR"} {
		if l, ok := LastLine(log, prefix); ok {
			return fmt.Errorf("the workload's server reported: %s", l)
		}
	}
	stall, err := windowStall(tcp, m.start, m.end)
	if err != nil {
		return err
	}
	v := millis(stall)
	run.ClientStallMS = &v
	if overlaps(udp.GapStart, udp.GapEnd, m.start, m.end) {
		u := millis(udp.MaxGap)
		run.UDPGapMS = &u
	}
	return nil
}

// sourceCommand returns a command run on the source host (or here, when
// the runner has no hosts: tests).
func (r *runner) sourceCommand(ctx context.Context, name string, args ...string) *exec.Cmd {
	if r.hosts.Source == nil {
		return exec.CommandContext(ctx, name, args...)
	}
	return r.hosts.Source.Command(ctx, name, args...)
}

// AppDowntime returns the largest gap between the heartbeats in the
// workload log at path around a migration that ran from start to end: the
// gaps of the beats after start, up to and including the first beat after
// end (the beat that ends a pause spanning the end). It waits up to
// timeout for that beat.
func AppDowntime(ctx context.Context, path string, start, end time.Time, timeout time.Duration) (float64, error) {
	gap, _, err := appGap(ctx, path, start, end, timeout)
	return gap, err
}

// appGap is AppDowntime, also returning when the largest gap ended.
func appGap(ctx context.Context, path string, start, end time.Time, timeout time.Duration) (float64, time.Time, error) {
	deadline := time.Now().Add(timeout)
	for {
		largest, at, after := 0.0, time.Time{}, false
		err := eachLine(path, func(l string) {
			b, ok := workload.ParseBeat(l)
			if !ok || after || !b.Time.After(start) {
				return
			}
			if b.GapMS > largest {
				largest, at = b.GapMS, b.Time
			}
			after = b.Time.After(end)
		})
		if err != nil {
			return 0, at, err
		}
		if after {
			return largest, at, nil
		}
		if time.Now().After(deadline) {
			tail, _ := os.ReadFile(path)
			return 0, at, fmt.Errorf("no heartbeat from the workload within %v after the migration; its log ends:\n%s", timeout, lastLines(string(tail), 5))
		}
		if err := sleep(ctx, 10*time.Millisecond); err != nil {
			return 0, at, err
		}
	}
}

// phaulMigrate runs `phaul migrate` on the source host.
func (r *runner) phaulMigrate(ctx context.Context, c runCase, pid int, serve *Serve) (*migration, error) {
	args := []string{"migrate", "--to", serve.Addr, "--insecure", "--json", "-vv"}
	if c.v.Track != "" {
		args = append(args, "--track", c.v.Track)
	}
	if c.v.Compress != "" {
		args = append(args, "--compress", c.v.Compress)
	}
	if c.v.Downtime > 0 {
		args = append(args, "--downtime", c.v.Downtime.String())
	}
	if r.cfg.TCPClients > 0 && c.userCmd == "" {
		args = append(args, "--tcp-established", "--action-script", r.hosts.ActionScript)
	}
	args = append(args, strconv.Itoa(pid))
	cmd := r.hosts.Source.Command(ctx, r.cfg.Phaul, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cpu0, err0 := ProcessCPU(serve.Pid)
	m := &migration{start: time.Now()}
	err := cmd.Run()
	m.end = time.Now()
	cpu1, err1 := ProcessCPU(serve.Pid)
	_ = os.WriteFile(r.hosts.Dir+fmt.Sprintf("/run%03d-migrate.log", c.index), stderr.Bytes(), 0o644)
	if err != nil {
		return nil, fmt.Errorf("phaul migrate: %w: %s", err, lastLines(strings.TrimSpace(stderr.String()), 3))
	}
	if err := json.Unmarshal(stdout.Bytes(), &m.result); err != nil {
		return nil, fmt.Errorf("phaul migrate --json said %q: %w", stdout.String(), err)
	}
	m.sourceCPU = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	if err0 == nil && err1 == nil {
		m.targetCPU = cpu1 - cpu0
	}
	deadline := time.Now().Add(5 * time.Second)
	for m.pid = serve.Lookup(pid); m.pid == 0; m.pid = serve.Lookup(pid) {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("migrated, but no process %d runs on the target", pid)
		}
		if err := sleep(ctx, 10*time.Millisecond); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
