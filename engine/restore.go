package engine

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/engine/stub"
	"github.com/phaul/phaul/internal/hostinfo"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/netlock"
	"github.com/phaul/phaul/protocol/imagepb"
)

// RestoreOptions configures Restore.
type RestoreOptions struct {
	// Dir is the image directory.
	Dir string
	// ShellJob re-binds the terminal descriptors of a --shell-job image to
	// Stdio; an image dumped with --shell-job needs it.
	ShellJob bool
	// Stdio are the descriptors a --shell-job image re-binds its terminal
	// descriptors to (nil entries mean /dev/null).
	Stdio [3]*os.File
	// Logger receives progress; nil discards it.
	Logger *slog.Logger
}

// RestoreResult reports what a restore did.
type RestoreResult struct {
	Pid           int           `json:"pid"`
	Processes     int           `json:"processes"`
	Threads       int           `json:"threads"`
	PagesRestored uint64        `json:"pages_restored"`
	Duration      time.Duration `json:"-"`
	DurationMS    float64       `json:"duration_ms"`
}

// Restore recreates the processes of an image directory, with their PIDs
// and TIDs, parent links, sessions and process groups (restore_tree.go),
// and lets them run. The root process is a child of the calling process,
// which must reap it. On error nothing of them is left running.
func Restore(ctx context.Context, opt RestoreOptions) (*RestoreResult, error) {
	start := time.Now()
	cp, err := image.Load(opt.Dir)
	if err != nil {
		return nil, fmt.Errorf("restore %s: %w", opt.Dir, err)
	}
	if cp.Inventory.GetPredump() {
		return nil, fmt.Errorf("restore %s: %w: a pre-dump holds memory only; restore its final dump", opt.Dir, ErrBadImage)
	}
	if cp.Inventory.GetShellJob() && !opt.ShellJob {
		return nil, fmt.Errorf("restore %s: %w: the image was dumped with --shell-job; restore it with --shell-job", opt.Dir, ErrBadImage)
	}
	t, err := newTreeRestore(cp, opt, start)
	if err != nil {
		return nil, fmt.Errorf("restore %s: %w", opt.Dir, err)
	}
	defer t.tr.Close()
	root := t.procs[0]
	if err := t.precheck(); err != nil {
		return nil, fmt.Errorf("restore %d: %w", root.pid, err)
	}
	for _, r := range t.procs {
		if r.chain, err = image.OpenChain(opt.Dir, r.pid); err != nil {
			return nil, fmt.Errorf("restore %d: %w", root.pid, err)
		}
		defer r.chain.Close()
	}
	defer t.tr.Do(func() error { t.shared.close(); return nil })
	if err := t.run(ctx); err != nil {
		t.abort()
		for _, r := range t.procs {
			r.closeSockets(true)
		}
		// The connections are gone: nothing left to hold for. A dump's
		// lock on this host stays, for another try.
		if uerr := root.unlockNet(false); uerr != nil {
			root.log.Warn("remove the restore's network lock", "err", uerr)
		}
		return nil, fmt.Errorf("restore %d: %w", root.pid, err)
	}
	res := &RestoreResult{Pid: root.pid, Processes: len(t.entries), Duration: time.Since(start)}
	for _, r := range t.procs {
		r.closeSockets(false)
		res.Threads += len(r.img.Threads)
		res.PagesRestored += r.pagesRestored
	}
	if err := root.unlockNet(true); err != nil {
		root.log.Warn("restored, but the network lock stays", "err", err)
	}
	res.DurationMS = float64(res.Duration.Microseconds()) / 1000
	root.log.Info("restored", "processes", res.Processes, "took", res.Duration)
	return res, nil
}

// restorer holds the state of one restore (or of one shadow process being
// built while a migration runs).
type restorer struct {
	stdio [3]*os.File
	// The process's final state: known from the start for a restore from
	// an image, only at Finish for a shadow.
	img      *imagepb.Process
	files    *imagepb.FileTable
	entry    *imagepb.ProcessEntry
	shellJob bool
	xsave    uint64

	pid     int
	started time.Time
	// stubStatus is the status of a thread as the stub made it, read once:
	// every thread starts with the stub's credentials (created by the
	// main thread before it takes its own), so setCreds needs one read.
	stubStatus *proc.Status
	chain      *image.Chain
	log        *slog.Logger
	tr         *ptrace.Tracer
	// vmas is the layout the process has now.
	vmas []*imagepb.VMA

	stub          *stub.Process // the stub that forks the process
	created       []int         // TIDs of the restored process, main thread first
	main          *ptrace.Injector
	gadget        uint64
	scratch       uint64
	shared        *sharedFiles    // objects the descriptors share (restore_shared.go)
	sharedIDs     map[uint32]bool // files other processes of the image use too
	sockets       []*os.File      // phaul's copies of the restored sockets (restore_socket.go)
	netLock       *netlock.Lock   // held while connections are rebuilt (restore_socket.go)
	pagesRestored uint64
	// ownsNetLock: this process takes the restore's network lock (the
	// root of a tree does, for all); idsSet: its session and process
	// group were set when it was created (restore_tree.go).
	ownsNetLock bool
	idsSet      bool
}

// precheck refuses early what would make the restore fail half-way.
func (r *restorer) precheck() error {
	for _, th := range r.img.Threads {
		if err := pidFree(int(th.Tid)); err != nil {
			return err
		}
	}
	for _, v := range r.img.Vmas {
		if v.Kind != imagepb.VMAKind_VMA_FILE_PRIVATE && v.Kind != imagepb.VMAKind_VMA_FILE_SHARED {
			continue
		}
		fi, err := os.Stat(v.Path)
		if err != nil {
			return fmt.Errorf("mapped file: %w", err)
		}
		if fi.Size() != v.FileSize {
			return fmt.Errorf("%w: mapped file %s is %d bytes, it was %d at dump time", ErrBadImage, v.Path, fi.Size(), v.FileSize)
		}
	}
	if _, err := os.Stat(r.img.Exe); err != nil {
		return fmt.Errorf("executable: %w", err)
	}
	return nil
}

// pidFree reports ErrPidTaken, naming the holder, when pid is in use.
func pidFree(pid int) error {
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	holder := strings.TrimSpace(string(comm))
	if holder == "" {
		holder = "unknown"
	}
	if st, err := proc.ReadStat(pid); err == nil && st.State == 'Z' {
		return fmt.Errorf("%w: PID %d is held by a zombie (%s) that its parent, PID %d, has not reaped yet", ErrPidTaken, pid, holder, st.Ppid)
	}
	return fmt.Errorf("%w: PID %d belongs to a running process (%s); the restore needs it free: end that process, or restore in a PID namespace where the PID is free (phaul serve in its own, for a migration)", ErrPidTaken, pid, holder)
}

// abort kills whatever was created.
func (r *restorer) abort() {
	_ = r.tr.Do(func() error {
		if len(r.created) > 0 {
			_ = sys.Kill(r.pid, sys.SIGKILL)
			ptrace.ReapThreads(r.created)
		}
		if r.stub != nil {
			_ = sys.Kill(r.stub.Pid, sys.SIGKILL)
			ptrace.ReapThreads([]int{r.stub.Pid})
		}
		return nil
	})
}

// start creates the process with the restorer's PID and gives it the
// layout vmas.
func (r *restorer) start(vmas []*imagepb.VMA) error {
	var err error
	if r.stub, err = stub.Start(r.stdio); err != nil {
		return err
	}
	if err := r.stub.WaitPaused(5 * time.Second); err != nil {
		return err
	}
	if err := r.tr.Do(r.fork); err != nil {
		return err
	}
	return r.tr.Do(func() error { return r.layout(vmas) })
}

// cloneArgs encodes struct clone_args (the 88-byte version).
func cloneArgs(flags, exitSignal, setTid uint64) []byte {
	b := make([]byte, 88)
	binary.LittleEndian.PutUint64(b[0:], flags)
	binary.LittleEndian.PutUint64(b[32:], exitSignal)
	binary.LittleEndian.PutUint64(b[64:], setTid)
	binary.LittleEndian.PutUint64(b[72:], 1) // set_tid_size
	return b
}

// fork makes the stub fork a process with the dumped PID, a child of this
// process (CLONE_PARENT: it inherits the stub's exit signal, SIGCHLD), and
// gets rid of the stub.
//
// Precondition: called on the Tracer thread.
func (r *restorer) fork() error {
	s := r.stub
	f, err := ptrace.Freeze(s.Pid)
	if err != nil {
		return fmt.Errorf("seize restore stub: %w", err)
	}
	_ = f
	// The CPU must offer every state component the process may use: the
	// dumping CPU's XCR0 (a process picks its code paths by CPUID once).
	if have, want := hostinfo.XCR0(), r.xsave; want&^have != 0 {
		return fmt.Errorf("%w: the process may use CPU state components %#x this CPU lacks (XCR0 here %#x, there %#x)",
			ErrBadImage, want&^have, have, want)
	}
	// EXITKILL (inherited by the process and its threads): should phaul die
	// before Resume detaches them, they die too instead of running on.
	if err := sys.PtraceSetOptions(s.Pid, sys.PTRACE_O_TRACESYSGOOD|sys.PTRACE_O_TRACEFORK|sys.PTRACE_O_TRACECLONE|sys.PTRACE_O_EXITKILL); err != nil {
		return fmt.Errorf("restore stub options: %w", err)
	}
	r.gadget = stub.Base + stub.GadgetOffset
	in, err := ptrace.NewInjector(s.Pid, r.gadget)
	if err != nil {
		return err
	}
	scratch, err := in.MapScratch(4096)
	if err != nil {
		return err
	}
	if err := spawn(in, scratch, r.pid, sys.CLONE_PARENT, 0); err != nil {
		return err
	}
	r.created = append(r.created, r.pid)
	// The stub's work is done.
	_ = sys.Kill(s.Pid, sys.SIGKILL)
	ptrace.ReapThreads([]int{s.Pid})
	r.stub = nil
	return nil
}
