package engine

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/engine/stub"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// A tree is restored in phases, all driven from one Tracer (a process
// forked by a traced one is traced by the same thread):
//
//  1. creation: the stub forks the root; every other process, zombies
//     included, is forked by its parent while the parent is still a copy
//     of the stub (clone3 with set_tid), parents before children. A
//     session leader calls setsid before it forks, so its children are
//     born in its session.
//  2. process groups: group leaders call setpgid(0, 0), then the others
//     join their group.
//  3. zombies exit with their status; their parents, still stubs, take
//     the SIGCHLD away again (the original parent had it long ago).
//  4. every live process gets its mappings, pages and the rest of its
//     state, in order; descriptions shared between processes pass through
//     the sharedFiles pool.
//  5. all of them run.

// treeRestore is the restore of every process of one image.
type treeRestore struct {
	tr      *ptrace.Tracer
	entries []*imagepb.ProcessEntry
	// procs are the live processes, in image order (parents first).
	procs []*restorer
	byPid map[int]*restorer
	// spawned are the PIDs created so far, zombies included.
	spawned []int
	shared  *sharedFiles
}

// newTreeRestore prepares the restore of every process of cp.
func newTreeRestore(cp *image.Checkpoint, opt RestoreOptions, start time.Time) (*treeRestore, error) {
	t := &treeRestore{tr: ptrace.NewTracer(), shared: newSharedFiles(), byPid: map[int]*restorer{}}
	// Files that descriptors of more than one process refer to go
	// through the pool.
	users := map[uint32]map[int32]bool{}
	for _, p := range cp.Processes {
		for _, fd := range p.State.GetFds() {
			if users[fd.FileId] == nil {
				users[fd.FileId] = map[int32]bool{}
			}
			users[fd.FileId][p.Entry.GetPid()] = true
		}
	}
	sharedIDs := map[uint32]bool{}
	for id, u := range users {
		sharedIDs[id] = len(u) > 1
	}
	log := opt.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	for i, p := range cp.Processes {
		t.entries = append(t.entries, p.Entry)
		if p.Entry.GetZombie() {
			if i == 0 {
				return nil, fmt.Errorf("%w: the root process %d is a zombie", ErrBadImage, p.Entry.GetPid())
			}
			continue
		}
		if p.State == nil {
			return nil, fmt.Errorf("%w: process %d has no state", ErrBadImage, p.Entry.GetPid())
		}
		pid := int(p.State.GetPid())
		r := &restorer{
			stdio: opt.Stdio, img: p.State, files: cp.Files, entry: p.Entry,
			shellJob: cp.Inventory.GetShellJob(), xsave: cp.Inventory.GetXsaveFeatures(),
			pid: pid, started: start, tr: t.tr, shared: t.shared, sharedIDs: sharedIDs,
			ownsNetLock: i == 0, idsSet: true,
			log: log.With("component", "restore", "pid", pid),
		}
		t.procs = append(t.procs, r)
		t.byPid[pid] = r
	}
	return t, nil
}

// precheck refuses early what would make the restore fail half-way.
func (t *treeRestore) precheck() error {
	for _, r := range t.procs {
		if err := r.precheck(); err != nil {
			return fmt.Errorf("process %d: %w", r.pid, err)
		}
	}
	for _, e := range t.entries {
		if e.GetZombie() {
			if err := pidFree(int(e.Pid)); err != nil {
				return fmt.Errorf("zombie %d: %w", e.Pid, err)
			}
			if t.byPid[int(e.Ppid)] == nil {
				return fmt.Errorf("%w: zombie %d: parent %d is not a live process of the image", ErrBadImage, e.Pid, e.Ppid)
			}
		}
	}
	return nil
}

// run restores the tree and lets it run.
func (t *treeRestore) run(ctx context.Context) error {
	root := t.procs[0]
	var err error
	if root.stub, err = stub.Start(root.stdio); err != nil {
		return err
	}
	if err := root.stub.WaitPaused(5 * time.Second); err != nil {
		return err
	}
	if err := t.tr.Do(func() error { return t.create(root) }); err != nil {
		return err
	}
	for _, r := range t.procs {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := t.tr.Do(func() error { return r.layout(r.img.Vmas) }); err != nil {
			return fmt.Errorf("process %d: %w", r.pid, err)
		}
		if err := r.writePages(ctx); err != nil {
			return fmt.Errorf("process %d: %w", r.pid, err)
		}
		r.log.Debug("pages written", "pages", r.pagesRestored, "since_start", time.Since(r.started))
		if err := t.tr.Do(r.prepare); err != nil {
			return fmt.Errorf("process %d: %w", r.pid, err)
		}
	}
	t.shared.close()
	return t.tr.Do(func() error {
		// Children first: a parent that runs first could wait for a
		// child that is not running yet, which is only a delay, but a
		// child never sees a parent still stopped by phaul.
		for i := len(t.procs) - 1; i >= 0; i-- {
			if err := t.procs[i].resume(); err != nil {
				return fmt.Errorf("process %d: %w", t.procs[i].pid, err)
			}
		}
		return nil
	})
}

// create forks every process of the tree (phases 1 to 3).
//
// Precondition: called on the Tracer thread.
func (t *treeRestore) create(root *restorer) error {
	if err := root.fork(); err != nil {
		return err
	}
	t.spawned = append(t.spawned, root.pid)
	for _, r := range t.procs[1:] {
		r.gadget = root.gadget
	}
	// Every process is driven through the stub's code while it is a copy
	// of the stub, with a page of scratch memory for clone_args.
	type stubProc struct {
		in      *ptrace.Injector
		scratch uint64
	}
	stubs := map[int]*stubProc{}
	defer func() {
		for _, s := range stubs {
			_ = s.in.Close()
		}
	}()
	gadget := uint64(stub.Base + stub.GadgetOffset)
	open := func(pid int) (*stubProc, error) {
		if s := stubs[pid]; s != nil {
			return s, nil
		}
		in, err := ptrace.NewInjector(pid, gadget)
		if err != nil {
			return nil, err
		}
		s := &stubProc{in: in}
		stubs[pid] = s
		if s.scratch, err = in.MapScratch(4096); err != nil {
			return nil, err
		}
		return s, nil
	}
	ids := func(e *imagepb.ProcessEntry) error {
		if e.Sid != e.Pid || e.Pid == t.entries[0].Pid && root.shellJob {
			return nil
		}
		s, err := open(int(e.Pid))
		if err != nil {
			return err
		}
		if _, err := s.in.Syscall(sys.SYS_SETSID); err != nil {
			return fmt.Errorf("process %d: setsid: %w", e.Pid, err)
		}
		return nil
	}
	if err := ids(t.entries[0]); err != nil {
		return err
	}
	for _, e := range t.entries[1:] {
		parent, err := open(int(e.Ppid))
		if err != nil {
			return fmt.Errorf("parent %d of %d: %w", e.Ppid, e.Pid, err)
		}
		if err := spawn(parent.in, parent.scratch, int(e.Pid), 0, uint64(sys.SIGCHLD)); err != nil {
			return fmt.Errorf("fork %d from %d: %w", e.Pid, e.Ppid, err)
		}
		t.spawned = append(t.spawned, int(e.Pid))
		if r := t.byPid[int(e.Pid)]; r != nil {
			r.created = append(r.created, r.pid)
		}
		if err := ids(e); err != nil {
			return err
		}
	}
	// Process groups: leaders, then members. The root's group, when the
	// root does not lead it here, is wherever the root is now.
	rootEntry := t.entries[0]
	rootLeads := rootEntry.Pgid == rootEntry.Pid && !root.shellJob
	st, err := proc.ReadStat(root.pid)
	if err != nil {
		return err
	}
	rootPgid := int32(st.Pgrp)
	groupOf := func(e *imagepb.ProcessEntry) int32 {
		if e.Pgid == rootEntry.Pgid && !rootLeads {
			return rootPgid
		}
		return e.Pgid
	}
	for _, leaders := range []bool{true, false} {
		for i, e := range t.entries {
			want := groupOf(e)
			if (want == e.Pid) != leaders || i == 0 && !rootLeads {
				continue
			}
			st, err := proc.ReadStat(int(e.Pid))
			if err != nil {
				return err
			}
			if int32(st.Pgrp) == want {
				continue // inherited, or made by setsid
			}
			s, err := open(int(e.Pid))
			if err != nil {
				return err
			}
			if _, err := s.in.Syscall(sys.SYS_SETPGID, 0, uint64(want)); err != nil {
				return fmt.Errorf("process %d: setpgid(%d): %w", e.Pid, want, err)
			}
		}
	}
	// Zombies exit; their parents drop the SIGCHLD.
	for _, e := range t.entries {
		if !e.GetZombie() {
			continue
		}
		parent, err := open(int(e.Ppid))
		if err != nil {
			return err
		}
		// The zombie is a copy of its parent, scratch page included.
		if err := zombify(int(e.Pid), e.ExitStatus, e.Comm, parent.scratch+1024); err != nil {
			return fmt.Errorf("zombie %d: %w", e.Pid, err)
		}
		delete(stubs, int(e.Pid)) // gone: nothing to give back
		if err := dropSignal(parent.in, parent.scratch, sys.SIGCHLD); err != nil {
			return fmt.Errorf("parent %d of zombie %d: %w", e.Ppid, e.Pid, err)
		}
	}
	var errs []error
	for pid, s := range stubs {
		errs = append(errs, s.in.UnmapScratch(), s.in.Close())
		delete(stubs, pid)
	}
	return errors.Join(errs...)
}

// spawn makes the process behind in fork a process with PID pid (clone3
// with set_tid, through clone_args at scratch) and waits until the child,
// traced from birth, stops.
//
// Precondition: called on the Tracer thread.
func spawn(in *ptrace.Injector, scratch uint64, pid int, flags, exitSignal uint64) error {
	tid := make([]byte, 4)
	binary.LittleEndian.PutUint32(tid, uint32(pid))
	if err := errors.Join(in.WriteMemory(scratch+256, tid),
		in.WriteMemory(scratch, cloneArgs(flags, exitSignal, scratch+256))); err != nil {
		return err
	}
	got, err := in.Syscall(sys.SYS_CLONE3, scratch, 88)
	if err != nil {
		if errors.Is(err, sys.EEXIST) {
			return pidFree(pid)
		}
		return fmt.Errorf("clone3 with PID %d: %w", pid, err)
	}
	if int(got) != pid {
		return fmt.Errorf("clone3 gave PID %d, asked for %d", got, pid)
	}
	// The child starts in a ptrace stop (auto-attached through the fork).
	for {
		st, err := ptrace.Wait(pid)
		if err != nil {
			return err
		}
		if st.Exited() {
			return fmt.Errorf("new process %d died: %s", pid, st)
		}
		if st.IsEventStop() {
			return nil
		}
		if err := sys.PtraceCont(pid, 0); err != nil {
			return err
		}
	}
}

// zombify makes the new process pid, a stopped copy of the stub, take the
// name comm (through a page of scratch memory at scratch) and end with the
// wait status status; its parent has not reaped it, so it stays a zombie.
// phaul's wait as its tracer passes it on to the parent.
//
// Precondition: called on the Tracer thread.
func zombify(pid int, status int32, comm string, scratch uint64) error {
	in, err := ptrace.NewInjector(pid, stub.Base+stub.GadgetOffset)
	if err != nil {
		return err
	}
	if len(comm) > 15 {
		comm = comm[:15]
	}
	if err := in.WriteMemory(scratch, ptrace.CString(comm)); err != nil {
		return err
	}
	if _, err := in.Syscall(sys.SYS_PRCTL, sys.PR_SET_NAME, scratch); err != nil {
		return fmt.Errorf("name %q: %w", comm, err)
	}
	if status&0x7f == 0 {
		_, err = in.Syscall(sys.SYS_EXIT_GROUP, uint64(status>>8&0xff))
		if !errors.Is(err, ptrace.ErrProcessGone) {
			return fmt.Errorf("exit_group(%d): %v", status>>8&0xff, err)
		}
		return nil
	}
	// A copy of a parent under injection: every signal blocked, and at
	// the int3 after the gadget. Let it pause with nothing blocked, for
	// the signal to end it.
	regs := in.Base()
	regs.Rip = stub.Base + stub.LoopOffset
	in.SetBase(regs)
	in.SetMask(0)
	if err := in.Close(); err != nil {
		return err
	}
	sig := sys.Signal(status & 0x7f)
	if err := sys.Tgkill(pid, pid, sig); err != nil {
		return err
	}
	deliver := sys.Signal(0)
	for {
		if err := sys.PtraceCont(pid, int(deliver)); err != nil {
			return err
		}
		st, err := ptrace.Wait(pid)
		if err != nil {
			return err
		}
		if st.Exited() {
			return nil
		}
		deliver = 0
		if st.IsSignalDelivery() {
			deliver = sys.Signal(st.Signal())
		}
	}
}

// dropSignal takes a pending sig off the process behind in (injected
// rt_sigtimedwait with a zero timeout, through scratch), if there is one.
//
// Precondition: called on the Tracer thread.
func dropSignal(in *ptrace.Injector, scratch uint64, sig sys.Signal) error {
	b := make([]byte, 8+16) // sigset, then a zero timespec
	binary.LittleEndian.PutUint64(b, 1<<(uint(sig)-1))
	if err := in.WriteMemory(scratch+512, b); err != nil {
		return err
	}
	_, err := in.Syscall(sys.SYS_RT_SIGTIMEDWAIT, scratch+512, 0, scratch+520, 8)
	if err != nil && !errors.Is(err, sys.EAGAIN) {
		return fmt.Errorf("rt_sigtimedwait(%d): %w", sig, err)
	}
	return nil
}

// abort kills every process created so far and waits for them. phaul is
// made a child subreaper meanwhile, so that the children of a killed
// process come to it to be reaped instead of to a slow init, which would
// keep their PIDs.
func (t *treeRestore) abort() {
	_ = t.tr.Do(func() error {
		if len(t.spawned) > 0 {
			restoreSub := sys.ChildSubreaper(true) == nil
			for _, pid := range t.spawned {
				_ = sys.Kill(pid, sys.SIGKILL)
			}
			for _, r := range t.procs {
				if len(r.created) > 0 {
					ptrace.ReapThreads(r.created)
				}
			}
			for _, pid := range t.spawned {
				ptrace.ReapThreads([]int{pid})
			}
			if restoreSub {
				_ = sys.ChildSubreaper(false)
			}
		}
		if s := t.procs[0].stub; s != nil {
			_ = sys.Kill(s.Pid, sys.SIGKILL)
			ptrace.ReapThreads([]int{s.Pid})
		}
		return nil
	})
}
