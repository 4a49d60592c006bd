package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// A process tree is dumped as a whole: the root and every descendant are
// stopped, top down (a stopped parent forks no more children), before any
// state is collected, so that what they share is seen at one instant. One
// file table describes the descriptors of all of them. Zombies are kept as
// entries with their exit status.

// frozenTree is a process tree stopped by freezeTree.
type frozenTree struct {
	// procs are the live processes, parents before children, root first.
	procs []*Frozen
	// entries lists every process, zombies too, parents before children.
	entries []*imagepb.ProcessEntry
	files   *fileTable
	done    bool
}

// treeNamespaces are the namespaces every process of a tree must share
// with its root: restore creates the tree in one set of them.
var treeNamespaces = []string{"pid", "net", "mnt", "ipc", "uts", "user", "cgroup", "time"}

// freezeTree stops the tree under opt.Pid and collects the state of every
// process of it but memory contents. On error every process runs again.
func freezeTree(ctx context.Context, opt FreezeOptions) (*frozenTree, error) {
	status, err := checkProcess(opt.Pid, true)
	if err != nil {
		return nil, err
	}
	t := &frozenTree{files: newFileTable(opt)}
	fail := func(err error) (*frozenTree, error) {
		if rerr := t.resume(); rerr != nil {
			return nil, fmt.Errorf("%w (and resuming the tree failed: %v)", err, rerr)
		}
		return nil, err
	}
	// Stop top down; a slot per process keeps the entries in order.
	type slot struct {
		fz    *Frozen
		entry *imagepb.ProcessEntry
		ppid  int
	}
	slots := []slot{{fz: newFrozen(opt.Pid, status)}}
	for i := 0; i < len(slots); i++ {
		fz := slots[i].fz
		if fz == nil {
			continue
		}
		if i > 0 {
			if err := sameNamespaces(opt.Pid, fz.Pid); err != nil {
				return fail(err)
			}
			if err := notSharing(fz.Pid, slots[i].ppid); err != nil {
				return fail(err)
			}
		}
		if err := fz.stop(); err != nil {
			return fail(fmt.Errorf("process %d: %w", fz.Pid, err))
		}
		t.procs = append(t.procs, fz)
		kids, err := children(fz.Pid)
		if err != nil {
			return fail(err)
		}
		slices.Sort(kids)
		for _, kid := range kids {
			st, err := proc.ReadStat(kid)
			if err != nil {
				return fail(fmt.Errorf("child %d of %d: %w", kid, fz.Pid, err))
			}
			if st.State == 'Z' && st.ExitCode&0x80 != 0 {
				return fail(unsupported("zombie %d dumped core (wait status %#x): restore cannot end a process the same way", kid, st.ExitCode))
			}
			if st.State == 'Z' {
				slots = append(slots, slot{entry: &imagepb.ProcessEntry{Pid: int32(kid), Ppid: int32(fz.Pid),
					Pgid: int32(st.Pgrp), Sid: int32(st.Session), Zombie: true, ExitStatus: int32(st.ExitCode), Comm: st.Comm}})
				continue
			}
			if st.ExitSignal != int(sys.SIGCHLD) {
				return fail(unsupported("process %d was created with exit signal %d, not SIGCHLD (clone without SIGCHLD)", kid, st.ExitSignal))
			}
			kst, err := checkProcess(kid, true)
			if err != nil {
				return fail(err)
			}
			slots = append(slots, slot{fz: newFrozen(kid, kst), ppid: fz.Pid})
		}
	}
	for _, fz := range t.procs {
		t.files.pids = append(t.files.pids, fz.Pid)
	}
	if opt.TrackerDir != "" && len(slots) > 1 {
		return fail(unsupported("process %d has child processes: pre-dump chains of process trees", opt.Pid))
	}
	for _, fz := range t.procs {
		o := opt
		o.Pid = fz.Pid
		if _, err := fz.collect(ctx, o, nil); err != nil {
			return fail(fmt.Errorf("process %d: %w", fz.Pid, err))
		}
	}
	for _, fz := range t.procs {
		if err := fz.collectFDs(t.files); err != nil {
			return fail(fmt.Errorf("process %d: %w", fz.Pid, err))
		}
	}
	if err := t.files.finish(); err != nil {
		return fail(err)
	}
	for _, s := range slots {
		if s.fz != nil {
			t.entries = append(t.entries, s.fz.State.Entry)
		} else {
			t.entries = append(t.entries, s.entry)
		}
	}
	if err := checkTreeIDs(t.entries); err != nil {
		return fail(err)
	}
	return t, nil
}

// sameNamespaces refuses a process of the tree that is not in the root's
// namespaces.
func sameNamespaces(root, pid int) error {
	for _, ns := range treeNamespaces {
		a, errA := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", root, ns))
		b, errB := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, ns))
		if errors.Is(errA, os.ErrNotExist) && errors.Is(errB, os.ErrNotExist) {
			continue // namespace kind absent from this kernel
		}
		if errA != nil || errB != nil {
			return fmt.Errorf("%s namespace of %d or %d: %w", ns, root, pid, errors.Join(errA, errB))
		}
		if a != b {
			return unsupported("process %d is in another %s namespace (%s) than the root %d (%s)", pid, ns, b, root, a)
		}
	}
	return nil
}

// notSharing refuses a process that shares its address space, descriptor
// table or filesystem information with its parent (vfork, or clone with
// CLONE_VM, CLONE_FILES or CLONE_FS): restore gives every process its own.
func notSharing(pid, parent int) error {
	for _, k := range []struct {
		typ  int
		what string
	}{
		{sys.KCMP_VM, "address space (vfork or CLONE_VM)"},
		{sys.KCMP_FILES, "descriptor table (CLONE_FILES)"},
		{sys.KCMP_FS, "working directory, root and umask (CLONE_FS)"},
	} {
		same, err := sys.Kcmp(pid, parent, k.typ, 0, 0)
		if err != nil {
			return fmt.Errorf("compare %d with its parent %d: %w", pid, parent, err)
		}
		if same == 0 {
			return unsupported("process %d shares its %s with its parent %d", pid, k.what, parent)
		}
	}
	return nil
}

// checkTreeIDs refuses sessions and process groups restore cannot
// rebuild. entries lists the tree, root first, parents before children.
// Restore forks every process from its parent, where it inherits the
// parent's session and group; a process that leads its session calls
// setsid, any other joins its group with setpgid. So a process must be in
// its parent's session or lead its own, and its group must be led by a
// process of the tree or be the root's group (which stays outside).
func checkTreeIDs(entries []*imagepb.ProcessEntry) error {
	if len(entries) == 0 {
		return nil
	}
	root := entries[0]
	byPid := map[int32]*imagepb.ProcessEntry{}
	for _, e := range entries {
		byPid[e.Pid] = e
	}
	for _, e := range entries[1:] {
		parent := byPid[e.Ppid]
		if parent == nil {
			return fmt.Errorf("process %d: parent %d is not in the tree", e.Pid, e.Ppid)
		}
		if e.Sid != parent.Sid && e.Sid != e.Pid {
			return unsupported("process %d is in session %d, which neither it nor its parent %d (session %d) leads", e.Pid, e.Sid, e.Ppid, parent.Sid)
		}
		if e.Pgid == e.Pid || e.Pgid == root.Pgid && e.Sid == root.Sid {
			continue
		}
		leader := byPid[e.Pgid]
		switch {
		case leader == nil:
			return unsupported("process %d is in process group %d, whose leader is not in the tree", e.Pid, e.Pgid)
		case leader.Zombie:
			return unsupported("process %d is in process group %d, whose leader is a zombie", e.Pid, e.Pgid)
		case leader.Sid != e.Sid:
			return fmt.Errorf("process %d: process group %d is in session %d, not %d", e.Pid, e.Pgid, leader.Sid, e.Sid)
		}
	}
	return nil
}

// resume lets every process of the tree run again as it was.
func (t *frozenTree) resume() error {
	if t.done {
		return nil
	}
	t.done = true
	var errs []error
	for _, fz := range t.procs {
		if err := fz.Resume(); err != nil {
			errs = append(errs, fmt.Errorf("resume %d: %w", fz.Pid, err))
		}
	}
	if err := resumeSockets(t.files.sockets, t.files.lock); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// kill kills the tree, children before parents; each parent (still
// stopped) reaps its children by an injected wait4, so that no zombie of
// theirs is left for init to reap: a restore on this host needs the PIDs.
// The root is for its own parent to reap.
func (t *frozenTree) kill() error {
	if t.done {
		return errors.New("tree already resumed or killed")
	}
	t.done = true
	defer closeSockets(t.files.sockets)
	byPid := map[int]*Frozen{}
	for _, fz := range t.procs {
		byPid[fz.Pid] = fz
	}
	var errs []error
	reap := func(parent *Frozen, pid int) {
		err := parent.tr.Do(func() error {
			in, err := ptrace.NewInjector(parent.c.frozen.Tids[0], parent.c.gadget)
			if err != nil {
				return err
			}
			_, werr := in.Syscall(sys.SYS_WAIT4, uint64(pid), 0, sys.WALL, 0)
			return errors.Join(werr, in.Close())
		})
		if err != nil {
			errs = append(errs, fmt.Errorf("reap %d in its parent %d: %w", pid, parent.Pid, err))
		}
	}
	for i := len(t.entries) - 1; i >= 0; i-- {
		e := t.entries[i]
		pid := int(e.Pid)
		if fz := byPid[pid]; fz != nil {
			if err := fz.Kill(); err != nil {
				errs = append(errs, fmt.Errorf("kill %d: %w", pid, err))
			}
		}
		if i > 0 {
			if parent := byPid[int(e.Ppid)]; parent != nil {
				reap(parent, pid)
			}
		}
	}
	return errors.Join(errs...)
}
