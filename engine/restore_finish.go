package engine

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// resume detaches every thread of the prepared process: it runs.
//
// Precondition: called on the Tracer thread.
func (r *restorer) resume() error {
	for _, tid := range r.created {
		if err := sys.PtraceDetach(tid, 0); err != nil {
			return fmt.Errorf("detach thread %d: %w", tid, err)
		}
	}
	return nil
}

// prepare restores everything but memory contents and creates the other
// threads; the process stays stopped, ready to resume.
//
// Precondition: called on the Tracer thread.
func (r *restorer) prepare() error {
	in := r.main
	t0 := time.Now()
	// Mappings were made writable for their pages to be written; now give
	// them their own protection.
	var prot calls
	for _, v := range r.vmas {
		if !isKernelVMA(v.Kind) && widen(v) {
			prot.add(fmt.Sprintf("mprotect %#x-%#x", v.Start, v.End), sys.SYS_MPROTECT, v.Start, v.End-v.Start, uint64(v.Prot))
		}
	}
	if _, err := prot.run(in); err != nil {
		return err
	}
	steps := []struct {
		what string
		fn   func() error
	}{
		{"memory layout fields", r.setMM},
		{"identity", r.setIdentity},
		{"network lock", r.lockNet},
		{"descriptors", r.setFiles},
		{"signal handlers", r.setSigactions},
		{"timers and limits", r.setTimers},
		{"threads", r.createThreads},
		{"thread state", r.setThreads},
		{"pending signals", r.queueSignals},
	}
	timing := []any{"mprotect", time.Since(t0)}
	for _, s := range steps {
		t := time.Now()
		if err := s.fn(); err != nil {
			return fmt.Errorf("restore %s: %w", s.what, err)
		}
		timing = append(timing, s.what, time.Since(t))
	}
	r.log.Debug("prepared", timing...)
	if err := in.UnmapScratch(); err != nil {
		return err
	}
	return in.Close()
}

// setIdentity restores the session and process group, working directory,
// root, umask, personality and no_new_privs.
//
// Precondition: called on the Tracer thread.
func (r *restorer) setIdentity() error {
	in, p := r.main, r.img
	entry := r.entry
	// One batch: the paths go to the scratch first.
	const pathMax = 4096
	rootAt, cwdAt := r.scratch, r.scratch+pathMax
	for _, path := range []string{p.Root, p.Cwd} {
		if len(path) >= pathMax {
			return fmt.Errorf("%w: path of %d bytes", ErrBadImage, len(path))
		}
	}
	if err := errors.Join(in.WriteMemory(rootAt, ptrace.CString(p.Root)), in.WriteMemory(cwdAt, ptrace.CString(p.Cwd))); err != nil {
		return err
	}
	var c calls
	switch {
	case r.idsSet:
		// Set when the process was created (restore_tree.go).
	case r.shellJob:
		// A shell job joins the restorer's session and terminal.
	case entry.GetSid() == int32(r.pid):
		c.add("setsid", sys.SYS_SETSID)
	case entry.GetPgid() == int32(r.pid):
		c.add("setpgid", sys.SYS_SETPGID, 0, 0)
	}
	if p.Root != "/" {
		c.add("chroot "+p.Root, sys.SYS_CHROOT, rootAt)
	}
	c.add("chdir "+p.Cwd, sys.SYS_CHDIR, cwdAt)
	c.add("umask", sys.SYS_UMASK, uint64(p.Umask))
	c.add(fmt.Sprintf("personality %#x", p.Personality), sys.SYS_PERSONALITY, uint64(p.Personality))
	if p.NoNewPrivs {
		c.add("no_new_privs", sys.SYS_PRCTL, sys.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
	}
	_, err := c.run(in)
	return err
}

// setFiles makes the process's descriptor table the image's.
//
// Precondition: called on the Tracer thread.
func (r *restorer) setFiles() error {
	in := r.main
	files := map[uint32]*imagepb.File{}
	for _, f := range r.files.GetFiles() {
		files[f.Id] = f
	}
	// The stub's stdio (the restorer's own, for a shell job) is parked above
	// every descriptor of the image, then everything else is closed.
	base := 3
	for _, fd := range r.img.Fds {
		base = max(base, int(fd.Fd)+1)
	}
	open, err := proc.ListFDs(r.pid)
	if err != nil {
		return err
	}
	var c calls
	for i := 0; i < 3; i++ {
		c.add(fmt.Sprintf("park stdio %d", i), sys.SYS_DUP3, uint64(i), uint64(base+i), sys.O_CLOEXEC)
	}
	for _, fd := range open {
		if fd < base || fd > base+2 {
			c.add(fmt.Sprintf("close stub descriptor %d", fd), sys.SYS_CLOSE, uint64(fd))
		}
	}
	if _, err := c.run(in); err != nil {
		return err
	}
	// The calls that place descriptors are queued and run as few batches
	// (fdBatch); kinds that need the kernel's answers on the way
	// (sockets, pipes, ...) run what is queued first.
	b := &fdBatch{r: r, used: map[int]bool{base: true, base + 1: true, base + 2: true}}
	opened := map[uint32]int32{}   // file id -> first descriptor restored for it
	inherited := map[uint32]bool{} // file ids another process made (it set them up)
	for _, fd := range listenersFirst(r.img.Fds, files) {
		f := files[fd.FileId]
		if f == nil {
			return fmt.Errorf("%w: descriptor %d refers to missing file %d", ErrBadImage, fd.Fd, fd.FileId)
		}
		var flags uint64
		if fd.Cloexec {
			flags = sys.O_CLOEXEC
		}
		if f.Kind == imagepb.FileKind_FILE_INHERITED {
			if f.InheritFd < 0 || f.InheritFd > 2 {
				return fmt.Errorf("%w: descriptor %d inherits stdio %d", ErrBadImage, fd.Fd, f.InheritFd)
			}
			b.add(fmt.Sprintf("descriptor %d from the restorer's stdio", fd.Fd), sys.SYS_DUP3, uint64(base+int(f.InheritFd)), uint64(fd.Fd), flags)
			b.used[int(fd.Fd)] = true
			continue
		}
		if first, ok := opened[fd.FileId]; ok {
			// Another descriptor of the same open file description.
			b.add(fmt.Sprintf("descriptor %d: dup3 of %d", fd.Fd, first), sys.SYS_DUP3, uint64(first), uint64(fd.Fd), flags)
			b.used[int(fd.Fd)] = true
			continue
		}
		opened[fd.FileId] = fd.Fd
		// An open file description another process of the image made
		// first (inherited across fork), or this process makes for others.
		key := sharedKey{sharedFile, uint64(fd.FileId)}
		if _, made := r.shared.get(key); !made && !r.sharedIDs[fd.FileId] && pathKinds[f.Kind] {
			if err := b.open(fd, f); err != nil {
				return err
			}
			continue
		}
		if err := b.flush(); err != nil {
			return err
		}
		tmp, ok, err := r.fromShared(key)
		if ok {
			inherited[fd.FileId] = true
		}
		if !ok && err == nil {
			if tmp, err = r.openFile(f); err == nil && r.sharedIDs[fd.FileId] {
				err = r.share(key, tmp)
			}
		}
		if err != nil {
			return fmt.Errorf("descriptor %d (%s): %w", fd.Fd, f.Path, err)
		}
		if err := b.resync(); err != nil {
			return err
		}
		b.place(fd, int(tmp))
	}
	for i := 0; i < 3; i++ {
		b.add("close parked stdio", sys.SYS_CLOSE, uint64(base+i))
		delete(b.used, base+i)
	}
	// Epoll interest lists, once every watched descriptor exists.
	ev := make([]byte, 12) // struct epoll_event is packed on x86_64
	for _, fd := range r.img.Fds {
		f := files[fd.FileId]
		if f.Kind != imagepb.FileKind_FILE_EPOLL || opened[fd.FileId] != fd.Fd || inherited[fd.FileId] {
			continue
		}
		for _, t := range f.GetEpoll().GetTargets() {
			binary.LittleEndian.PutUint32(ev[0:], t.Events)
			binary.LittleEndian.PutUint64(ev[4:], t.Data)
			at, err := b.arg(ev)
			if err != nil {
				return err
			}
			b.add(fmt.Sprintf("epoll %d: watch descriptor %d", fd.Fd, t.Fd), sys.SYS_EPOLL_CTL, uint64(fd.Fd), sys.EPOLL_CTL_ADD, uint64(t.Fd), at)
		}
	}
	return b.flush()
}

// pathKinds are the kinds of file openFile opens by path alone: fdBatch
// opens them in its batch.
var pathKinds = map[imagepb.FileKind]bool{
	imagepb.FileKind_FILE_REGULAR: true, imagepb.FileKind_FILE_CHARDEV: true, imagepb.FileKind_FILE_DIRECTORY: true,
}

// fdBatch queues the calls that rebuild a descriptor table and runs them
// as one batch, instead of two stops of the process per call. A call that
// makes a descriptor (openat) returns the lowest one free: fdBatch follows
// which are in use, so that the calls after it can name the descriptor
// before it exists, and checks the kernel's answers when the batch has
// run. The arguments the calls point at (paths, epoll events) go to the
// thread slots of the scratch memory, unused until setThreads.
type fdBatch struct {
	r      *restorer
	c      calls
	used   map[int]bool // descriptors in use once the queued calls have run
	expect map[int]int  // queued call -> the descriptor it must return
	args   []byte       // written at r.scratch+scratchSlots
}

// fdArgsSize is how much memory the arguments of one batch may take.
const fdArgsSize = restoreScratchSize - scratchSlots

func (b *fdBatch) add(name string, nr uint64, args ...uint64) { b.c.add(name, nr, args...) }

// arg queues data for a call and returns its address in the process.
func (b *fdBatch) arg(data []byte) (uint64, error) {
	if len(b.args)+len(data) > fdArgsSize {
		if err := b.flush(); err != nil {
			return 0, err
		}
	}
	at := b.r.scratch + scratchSlots + uint64(len(b.args))
	b.args = append(b.args, data...)
	return at, nil
}

// lowest returns the lowest descriptor free once the queued calls have run.
func (b *fdBatch) lowest() int {
	fd := 0
	for b.used[fd] {
		fd++
	}
	return fd
}

// open queues the opening of f, a file of pathKinds, as descriptor fd.
func (b *fdBatch) open(fd *imagepb.FD, f *imagepb.File) error {
	at, err := b.arg(ptrace.CString(f.Path))
	if err != nil {
		return err
	}
	tmp := b.lowest()
	if b.expect == nil {
		b.expect = map[int]int{}
	}
	b.expect[len(b.c.list)] = tmp
	b.add(fmt.Sprintf("descriptor %d (%s): open", fd.Fd, f.Path), sys.SYS_OPENAT, atFDCWD, at, uint64(f.Flags&openFlags)|sys.O_CLOEXEC)
	b.used[tmp] = true
	if f.Kind == imagepb.FileKind_FILE_REGULAR && f.Pos != 0 {
		b.add(fmt.Sprintf("descriptor %d (%s): seek to %d", fd.Fd, f.Path, f.Pos), sys.SYS_LSEEK, uint64(tmp), uint64(f.Pos), 0)
	}
	b.place(fd, tmp)
	return nil
}

// place queues the moving of tmp, a new descriptor (close-on-exec), to
// its place in the image, fd.
func (b *fdBatch) place(fd *imagepb.FD, tmp int) {
	if tmp != int(fd.Fd) {
		var flags uint64
		if fd.Cloexec {
			flags = sys.O_CLOEXEC
		}
		b.add(fmt.Sprintf("descriptor %d: dup3 of %d", fd.Fd, tmp), sys.SYS_DUP3, uint64(tmp), uint64(fd.Fd), flags)
		b.add(fmt.Sprintf("descriptor %d: close %d", fd.Fd, tmp), sys.SYS_CLOSE, uint64(tmp))
		delete(b.used, tmp)
		b.used[int(fd.Fd)] = true
	} else if !fd.Cloexec {
		b.add(fmt.Sprintf("descriptor %d: clear close-on-exec", fd.Fd), sys.SYS_FCNTL, uint64(tmp), sys.F_SETFD, 0)
	}
}

// resync reads which descriptors are in use from the process, after
// calls that did not go through the batch; nothing may be queued.
func (b *fdBatch) resync() error {
	fds, err := proc.ListFDs(b.r.pid)
	if err != nil {
		return err
	}
	clear(b.used)
	for _, fd := range fds {
		b.used[fd] = true
	}
	return nil
}

// flush runs the queued calls and checks the descriptors they made.
func (b *fdBatch) flush() error {
	if len(b.c.list) == 0 {
		return nil
	}
	in := b.r.main
	if len(b.args) > 0 {
		if err := in.WriteMemory(b.r.scratch+scratchSlots, b.args); err != nil {
			return err
		}
	}
	res, err := b.c.run(in)
	for i, got := range res {
		if want, ok := b.expect[i]; ok && int(got) != want {
			// A descriptor this restore did not account for: the calls
			// after it named the wrong one.
			return fmt.Errorf("%s: got descriptor %d, expected %d", b.c.names[i], got, want)
		}
	}
	b.c, b.args, b.expect = calls{}, b.args[:0], nil
	return err
}

// listenersFirst returns fds with the descriptors of TCP and unix
// listeners first, otherwise in order: a listener binds its port before
// the connections it accepted take the same port (in repair mode, which
// forces the reuse), so that its bind does not conflict with them when it
// lacks SO_REUSEADDR; a unix listener exists before the connections that
// are made through it again (restore_unix.go).
// Any order of restoring is safe: a temporary descriptor is the lowest free
// one and never one already placed.
func listenersFirst(fds []*imagepb.FD, files map[uint32]*imagepb.File) []*imagepb.FD {
	out := make([]*imagepb.FD, 0, len(fds))
	isListener := func(fd *imagepb.FD) bool {
		f := files[fd.FileId]
		return (f.GetKind() == imagepb.FileKind_FILE_INET_SOCKET && f.GetInetSocket().GetTcpState() == sys.TCP_LISTEN) ||
			(f.GetKind() == imagepb.FileKind_FILE_UNIX_SOCKET && f.GetUnixSocket().GetState() == unixListening)
	}
	for _, fd := range fds {
		if isListener(fd) {
			out = append(out, fd)
		}
	}
	for _, fd := range fds {
		if !isListener(fd) {
			out = append(out, fd)
		}
	}
	return out
}

// openFile opens f in the process and positions it; it returns the new
// descriptor (close-on-exec).
//
// Precondition: called on the Tracer thread.
func (r *restorer) openFile(f *imagepb.File) (uint64, error) {
	in := r.main
	switch f.Kind {
	case imagepb.FileKind_FILE_REGULAR, imagepb.FileKind_FILE_CHARDEV, imagepb.FileKind_FILE_DIRECTORY:
	case imagepb.FileKind_FILE_MEMFD:
		return r.openShmemFile(f)
	case imagepb.FileKind_FILE_EVENTFD:
		return r.openEventfd(f)
	case imagepb.FileKind_FILE_PIPE:
		return r.openPipe(f)
	case imagepb.FileKind_FILE_TIMERFD:
		return r.openTimerfd(f)
	case imagepb.FileKind_FILE_SIGNALFD:
		return r.openSignalfd(f)
	case imagepb.FileKind_FILE_INOTIFY:
		return r.openInotify(f)
	case imagepb.FileKind_FILE_INET_SOCKET:
		return r.openInetSocket(f)
	case imagepb.FileKind_FILE_UNIX_SOCKET:
		return r.openUnixSocket(f)
	case imagepb.FileKind_FILE_FIFO:
		return r.openFifo(f)
	case imagepb.FileKind_FILE_EPOLL:
		fd, err := in.Syscall(sys.SYS_EPOLL_CREATE1, sys.O_CLOEXEC)
		if err != nil {
			return 0, fmt.Errorf("epoll_create1: %w", err)
		}
		return fd, nil
	default:
		return 0, fmt.Errorf("%w: file kind %v", ErrUnsupported, f.Kind)
	}
	if err := in.WriteMemory(r.scratch, ptrace.CString(f.Path)); err != nil {
		return 0, err
	}
	flags := uint64(f.Flags&openFlags) | sys.O_CLOEXEC
	fd, err := in.Syscall(sys.SYS_OPENAT, atFDCWD, r.scratch, flags)
	if err != nil {
		return 0, fmt.Errorf("open: %w", err)
	}
	if f.Kind == imagepb.FileKind_FILE_REGULAR && f.Pos != 0 {
		if _, err := in.Syscall(sys.SYS_LSEEK, fd, uint64(f.Pos), 0); err != nil {
			return 0, fmt.Errorf("seek to %d: %w", f.Pos, err)
		}
	}
	return fd, nil
}

// setSigactions installs the signal handlers.
//
// Precondition: called on the Tracer thread.
func (r *restorer) setSigactions() error {
	acts := r.img.Sigactions
	if len(acts) > 64 {
		return fmt.Errorf("%w: %d signal handlers", ErrBadImage, len(acts))
	}
	buf := make([]byte, 32*len(acts))
	var c calls
	for i, a := range acts {
		b := buf[32*i:]
		binary.LittleEndian.PutUint64(b[0:], a.Handler)
		binary.LittleEndian.PutUint64(b[8:], a.Flags)
		binary.LittleEndian.PutUint64(b[16:], a.Restorer)
		binary.LittleEndian.PutUint64(b[24:], a.Mask)
		c.add(fmt.Sprintf("signal %d", a.Signo), sys.SYS_RT_SIGACTION, uint64(a.Signo), r.scratch+scratchSigactions+uint64(32*i), 0, 8)
	}
	if err := r.main.WriteMemory(r.scratch+scratchSigactions, buf); err != nil {
		return err
	}
	_, err := c.run(r.main)
	return err
}

// setTimers restores interval timers and resource limits.
//
// Precondition: called on the Tracer thread.
func (r *restorer) setTimers() error {
	in := r.main
	for _, t := range r.img.Itimers {
		b := make([]byte, 32)
		put := func(o int, us int64) {
			binary.LittleEndian.PutUint64(b[o:], uint64(us/1e6))
			binary.LittleEndian.PutUint64(b[o+8:], uint64(us%1e6))
		}
		put(0, t.IntervalUs)
		put(16, t.ValueUs)
		if err := in.WriteMemory(r.scratch, b); err != nil {
			return err
		}
		if _, err := in.Syscall(sys.SYS_SETITIMER, uint64(t.Which), r.scratch, 0); err != nil {
			return fmt.Errorf("setitimer %d: %w", t.Which, err)
		}
	}
	for _, l := range r.img.Rlimits {
		lim := sys.Rlimit{Cur: l.Cur, Max: l.Max}
		if _, err := sys.Prlimit(r.pid, int(l.Resource), &lim); err != nil {
			return fmt.Errorf("resource limit %d: %w", l.Resource, err)
		}
	}
	return nil
}

// threadFlags are the clone flags of a thread of the same process.
const threadFlags = sys.CLONE_VM | sys.CLONE_FS | sys.CLONE_FILES | sys.CLONE_SIGHAND | sys.CLONE_THREAD | sys.CLONE_SYSVSEM

// createThreads gives the process the threads of the image (syncThreads).
//
// Precondition: called on the Tracer thread.
func (r *restorer) createThreads() error {
	tids := make([]int, len(r.img.Threads))
	for i, th := range r.img.Threads {
		tids[i] = int(th.Tid)
	}
	return r.syncThreads(tids)
}

// syncThreads makes the threads of the process those of tids, the main
// thread's first: threads created before (Shadow.SetThreads) and not in
// tids exit, and those missing are cloned with their TID, from the main
// thread in batches. Every new thread starts in a ptrace stop, and stays
// there until setThreads gives it its state. The others keep theirs (none
// yet: only setThreads sets any).
//
// Precondition: called on the Tracer thread.
func (r *restorer) syncThreads(tids []int) error {
	if len(tids) == 0 || tids[0] != r.pid {
		return fmt.Errorf("%w: the thread list does not start with the main thread", ErrBadImage)
	}
	want := map[int]bool{}
	for _, tid := range tids[1:] {
		want[tid] = true
	}
	kept := []int{r.pid}
	for _, tid := range r.created[1:] {
		if want[tid] {
			kept = append(kept, tid)
			continue
		}
		if err := r.exitThread(tid); err != nil {
			return fmt.Errorf("thread %d, gone at the source: %w", tid, err)
		}
	}
	r.created = kept
	var missing []int
	for _, tid := range tids[1:] {
		if !slices.Contains(r.created, tid) {
			missing = append(missing, tid)
		}
	}
	const perBatch = (scratchBatch - scratchClone) / cloneArgsSize
	in := r.main
	for rest := missing; len(rest) > 0; {
		chunk := rest[:min(len(rest), perBatch)]
		rest = rest[len(chunk):]
		buf := make([]byte, cloneArgsSize*len(chunk))
		var c calls
		for i, tid := range chunk {
			at := r.scratch + scratchClone + uint64(cloneArgsSize*i)
			copy(buf[cloneArgsSize*i:], cloneArgs(threadFlags, 0, at+88))
			binary.LittleEndian.PutUint32(buf[cloneArgsSize*i+88:], uint32(tid))
			c.add(fmt.Sprintf("clone3 thread %d", tid), sys.SYS_CLONE3, at, 88)
		}
		if err := in.WriteMemory(r.scratch+scratchClone, buf); err != nil {
			return err
		}
		res, err := c.run(in)
		for i, got := range res {
			if int(got) != chunk[i] {
				return fmt.Errorf("clone3 gave TID %d, asked for %d", got, chunk[i])
			}
			r.created = append(r.created, int(got))
		}
		if err != nil {
			if errors.Is(err, sys.EEXIST) {
				return pidFree(chunk[len(res)])
			}
			return err
		}
	}
	for _, tid := range missing {
		// A new thread starts in a ptrace stop (auto-attached).
		for {
			st, err := ptrace.Wait(tid)
			if err != nil {
				return err
			}
			if st.Exited() {
				return fmt.Errorf("new thread %d died: %s", tid, st)
			}
			if st.IsEventStop() {
				break
			}
			if err := sys.PtraceCont(tid, 0); err != nil {
				return err
			}
		}
	}
	return nil
}

// exitThread makes the stopped thread tid, one the restore created, exit,
// and reaps it: its TID is free again when it returns.
//
// Precondition: called on the Tracer thread.
func (r *restorer) exitThread(tid int) error {
	in, err := ptrace.NewInjector(tid, r.gadget)
	if err != nil {
		return err
	}
	_, err = in.Syscall(sys.SYS_EXIT, 0)
	switch {
	case errors.Is(err, ptrace.ErrProcessGone):
		return nil
	case err == nil:
		return errors.New("exit returned")
	}
	return fmt.Errorf("exit: %w", err)
}

// setThreads gives every thread, the main one too, its state (threadCalls)
// with the threads side by side: each has a slot of the scratch area for
// its arguments and batch, and the batches run at once, threadSlots
// threads at a time. Their registers and signal masks are set when their
// injectors close (the main thread's at the end of the restore).
//
// Precondition: called on the Tracer thread, the other threads created.
func (r *restorer) setThreads() error {
	threads := r.img.Threads
	for first := 0; first < len(threads); first += threadSlots {
		group := threads[first:min(len(threads), first+threadSlots)]
		ins := make([]*ptrace.Injector, 0, len(group))
		lists := make([]calls, 0, len(group))
		err := func() (err error) {
			defer func() {
				for _, in := range ins {
					if in == r.main {
						in.UseBatchArea(r.scratch+scratchBatch, scratchSlots-scratchBatch)
						continue
					}
					if cerr := in.Close(); err == nil {
						err = cerr
					}
				}
			}()
			for i, th := range group {
				in := r.main
				if first+i > 0 {
					var err error
					if in, err = r.injector(int(th.Tid)); err != nil {
						return err
					}
				}
				ins = append(ins, in)
				slot := r.scratch + scratchSlots + uint64(threadSlotSize*i)
				in.UseBatchArea(slot+threadSlotBatch, threadSlotSize-threadSlotBatch)
				c, err := r.threadCalls(in, th, slot)
				if err != nil {
					return fmt.Errorf("thread %d: %w", th.Tid, err)
				}
				lists = append(lists, c)
			}
			batches := make([][]ptrace.Call, len(lists))
			for i, c := range lists {
				batches[i] = c.list
			}
			res, err := ptrace.Batches(ins, batches)
			if err != nil {
				for i, c := range lists {
					if n := len(res[i]); n < len(c.list) {
						err = fmt.Errorf("thread %d: %s: %w", group[i].Tid, c.names[n], err)
						break
					}
				}
				return err
			}
			for i, th := range group {
				if err := r.finishThread(ins[i], th); err != nil {
					return fmt.Errorf("thread %d: %w", th.Tid, err)
				}
			}
			return nil
		}()
		if err != nil {
			return err
		}
	}
	return nil
}

// threadCalls prepares the calls that give the thread behind in the state
// of th: clear-child-tid, robust list, alternate stack, rseq, name,
// credentials; their arguments go to the thread's scratch slot. Pending
// signals are queued here, by the thread itself, before it drops
// privileges: the calls before them run first.
//
// Precondition: called on the Tracer thread.
func (r *restorer) threadCalls(in *ptrace.Injector, th *imagepb.Thread, slot uint64) (calls, error) {
	var c calls
	c.add("set_tid_address", sys.SYS_SET_TID_ADDRESS, th.ClearChildTid)
	if th.RobustList != 0 {
		c.add("set_robust_list", sys.SYS_SET_ROBUST_LIST, th.RobustList, th.RobustListLen)
	}
	if as := th.Altstack; as != nil && as.Flags&sys.SS_DISABLE == 0 {
		b := make([]byte, 24)
		binary.LittleEndian.PutUint64(b[0:], as.Sp)
		binary.LittleEndian.PutUint32(b[8:], uint32(as.Flags)&(1<<31)) // keep SS_AUTODISARM only
		binary.LittleEndian.PutUint64(b[16:], as.Size)
		if err := in.WriteMemory(slot, b); err != nil {
			return c, err
		}
		c.add("sigaltstack", sys.SYS_SIGALTSTACK, slot, 0)
	}
	if rs := th.Rseq; rs != nil {
		// No critical section can be in progress in a frozen thread's
		// restored image: clear rseq_cs so the kernel does not abort one.
		if err := in.WriteMemory(rs.Pointer+8, make([]byte, 8)); err != nil {
			return c, err
		}
		c.add("rseq", sys.SYS_RSEQ, rs.Pointer, uint64(rs.Size), 0, uint64(rs.Signature))
	}
	if err := in.WriteMemory(slot+64, ptrace.CString(th.Comm)); err != nil {
		return c, err
	}
	c.add("thread name", sys.SYS_PRCTL, sys.PR_SET_NAME, slot+64)
	if th.Tid != int32(r.pid) {
		// Each thread has its own, inherited when it is cloned: a thread
		// a shadow created before setIdentity has the stub's.
		c.add(fmt.Sprintf("personality %#x", r.img.Personality), sys.SYS_PERSONALITY, uint64(r.img.Personality))
		if r.img.NoNewPrivs {
			c.add("no_new_privs", sys.SYS_PRCTL, sys.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
		}
	}
	if len(th.Pending) > 0 {
		if _, err := c.run(in); err != nil {
			return c, err
		}
		c = calls{}
		for _, si := range th.Pending {
			if err := r.queueSignal(in, si, true); err != nil {
				return c, err
			}
		}
	}
	if err := r.setCreds(in, &c); err != nil {
		return c, fmt.Errorf("credentials: %w", err)
	}
	return c, nil
}

// finishThread sets the extended state of the thread behind in, and the
// registers and signal mask its injector restores when it closes.
//
// Precondition: called on the Tracer thread.
func (r *restorer) finishThread(in *ptrace.Injector, th *imagepb.Thread) error {
	if len(th.Xstate) > 0 {
		if err := sys.PtraceSetRegSet(in.Tid, sys.NT_X86_XSTATE, th.Xstate); err != nil {
			return fmt.Errorf("xstate: %w", err)
		}
	}
	in.SetBase(ptrace.RestartRegs(regsFromImage(th.Regs), false))
	in.SetMask(th.Sigmask)
	return nil
}

// queueSignals queues the process-wide signals that were pending at dump
// time, from the main thread: the kernel accepts siginfo that claims to come
// from the kernel or from kill() only when a process queues it to itself.
//
// Precondition: called on the Tracer thread.
func (r *restorer) queueSignals() error {
	for _, si := range r.img.SharedPending {
		if err := r.queueSignal(r.main, si, false); err != nil {
			return err
		}
	}
	return nil
}

// queueSignal queues si from the thread behind in: to the whole process, or
// to that thread itself (the kernel requires the thread-directed kind to be
// queued by the receiving thread).
//
// Precondition: called on the Tracer thread.
func (r *restorer) queueSignal(in *ptrace.Injector, si *imagepb.SigInfo, toThread bool) error {
	if len(si.Raw) != sys.SiginfoSize {
		return fmt.Errorf("%w: siginfo of %d bytes", ErrBadImage, len(si.Raw))
	}
	at := r.scratch + 2048
	if err := in.WriteMemory(at, si.Raw); err != nil {
		return err
	}
	var err error
	if toThread {
		_, err = in.Syscall(sys.SYS_RT_TGSIGQUEUEINFO, uint64(r.pid), uint64(in.Tid), uint64(si.Signo), at)
	} else {
		_, err = in.Syscall(sys.SYS_RT_SIGQUEUEINFO, uint64(r.pid), uint64(si.Signo), at)
	}
	if err != nil {
		return fmt.Errorf("queue signal %d for thread %d: %w", si.Signo, in.Tid, err)
	}
	return nil
}

// openEventfd creates an eventfd with the image's counter and mode.
//
// Precondition: called on the Tracer thread.
func (r *restorer) openEventfd(f *imagepb.File) (uint64, error) {
	in := r.main
	flags := uint64(sys.EFD_CLOEXEC)
	if f.Flags&sys.O_NONBLOCK != 0 {
		flags |= sys.EFD_NONBLOCK
	}
	if f.GetEventfd().GetSemaphore() {
		flags |= sys.EFD_SEMAPHORE
	}
	fd, err := in.Syscall(sys.SYS_EVENTFD2, 0, flags)
	if err != nil {
		return 0, fmt.Errorf("eventfd2: %w", err)
	}
	if n := f.GetEventfd().GetCount(); n != 0 {
		b := make([]byte, 8)
		binary.LittleEndian.PutUint64(b, n)
		if err := in.WriteMemory(r.scratch, b); err != nil {
			return 0, err
		}
		if _, err := in.Syscall(sys.SYS_WRITE, fd, r.scratch, 8); err != nil {
			return 0, fmt.Errorf("eventfd counter: %w", err)
		}
	}
	return fd, nil
}

// openPipe returns a descriptor for one end of a pipe of the image. The
// first end met creates the pipe, refills it with the data it held, and
// parks the other end above every descriptor of the image until its turn.
//
// Precondition: called on the Tracer thread.
func (r *restorer) openPipe(f *imagepb.File) (uint64, error) {
	in := r.main
	id := f.GetPipe().GetPipeId()
	this, other := sharedKey{sharedPipeRead, id}, sharedKey{sharedPipeWrite, id}
	if f.Flags&sys.O_ACCMODE != sys.O_RDONLY {
		this, other = other, this
	}
	// The end made with the other one, in this process or another.
	if fd, ok, err := r.fromShared(this); ok || err != nil {
		if err != nil {
			return 0, err
		}
		return fd, r.setFlags(fd, f.Flags)
	}
	if _, err := in.Syscall(sys.SYS_PIPE2, r.scratch, sys.O_CLOEXEC); err != nil {
		return 0, fmt.Errorf("pipe2: %w", err)
	}
	b := make([]byte, 8)
	if err := in.ReadMemory(r.scratch, b); err != nil {
		return 0, err
	}
	rfd, wfd := uint64(binary.LittleEndian.Uint32(b[0:])), uint64(binary.LittleEndian.Uint32(b[4:]))
	if c := f.GetPipe().GetCapacity(); c > 0 {
		if _, err := in.Syscall(sys.SYS_FCNTL, wfd, sys.F_SETPIPE_SZ, uint64(c)); err != nil {
			return 0, fmt.Errorf("pipe capacity %d: %w", c, err)
		}
	}
	if data := f.GetPipe().GetData(); len(data) > 0 {
		if err := r.fillPipe(wfd, data); err != nil {
			return 0, err
		}
	}
	mine, theirs := rfd, wfd
	if this.kind == sharedPipeWrite {
		mine, theirs = wfd, rfd
	}
	// The other end waits in phaul's pool for whoever has it.
	if err := r.share(other, theirs); err != nil {
		return 0, err
	}
	if _, err := in.Syscall(sys.SYS_CLOSE, theirs); err != nil {
		return 0, err
	}
	return mine, r.setFlags(mine, f.Flags)
}

// fillPipe writes data into the pipe whose write end is descriptor wfd of
// the new process, through a copy of that end taken with pidfd_getfd.
func (r *restorer) fillPipe(wfd uint64, data []byte) error {
	w, err := sys.CopyFD(r.pid, int(wfd))
	if err != nil {
		return err
	}
	defer sys.Close(w)
	for len(data) > 0 {
		n, err := sys.Write(w, data)
		if err != nil {
			return fmt.Errorf("refill pipe: %w", err)
		}
		data = data[n:]
	}
	return nil
}

// setFlags sets the file status flags (O_NONBLOCK, O_APPEND, ...) of fd.
//
// Precondition: called on the Tracer thread.
func (r *restorer) setFlags(fd uint64, flags uint32) error {
	if _, err := r.main.Syscall(sys.SYS_FCNTL, fd, sys.F_SETFL, uint64(flags&(sys.O_NONBLOCK|sys.O_APPEND))); err != nil {
		return fmt.Errorf("fcntl(F_SETFL): %w", err)
	}
	return nil
}

// lastCap is the highest capability number this kernel knows.
var lastCap = sync.OnceValue(func() int {
	b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err != nil {
		return 40
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 40
	}
	return n
})

// sameCreds reports whether a thread with status st has the credentials c.
func sameCreds(c *imagepb.Credentials, st *proc.Status) bool {
	return slices.Equal(c.Uid, st.Uid[:]) && slices.Equal(c.Gid, st.Gid[:]) && slices.Equal(c.Groups, st.Groups) &&
		c.CapEff == st.CapEff && c.CapPrm == st.CapPrm && c.CapInh == st.CapInh && c.CapBnd == st.CapBnd && c.CapAmb == st.CapAmb
}

// setCreds adds to cl the calls that give the thread behind in the
// process's credentials: groups, gids, uids and capability sets.
// Credentials are per thread in the kernel, and each thread drops root's
// privileges only after the privileged steps of its restore are done.
//
// Precondition: called on the Tracer thread.
func (r *restorer) setCreds(in *ptrace.Injector, cl *calls) error {
	c := r.img.GetCreds()
	if c == nil || len(c.Uid) != 4 || len(c.Gid) != 4 {
		return nil
	}
	if r.stubStatus == nil {
		st, err := proc.ReadStatus(r.pid, in.Tid)
		if err != nil {
			return err
		}
		r.stubStatus = st
	}
	if sameCreds(c, r.stubStatus) {
		return nil // what the thread has from the restorer
	}
	if len(c.Groups) > 1024 {
		return fmt.Errorf("%w: %d supplementary groups", ErrBadImage, len(c.Groups))
	}
	for capNo := 0; capNo <= lastCap(); capNo++ {
		if c.CapBnd&(1<<uint(capNo)) == 0 {
			cl.add("drop capability from bounding set", sys.SYS_PRCTL, sys.PR_CAPBSET_DROP, uint64(capNo))
		}
	}
	groups := make([]byte, 4*len(c.Groups))
	for i, g := range c.Groups {
		binary.LittleEndian.PutUint32(groups[4*i:], g)
	}
	hdr := make([]byte, 8+24)
	binary.LittleEndian.PutUint32(hdr[0:], sys.LINUX_CAPABILITY_VERSION_3)
	for i, set := range []uint64{c.CapEff, c.CapPrm, c.CapInh} {
		binary.LittleEndian.PutUint32(hdr[8+4*i:], uint32(set))
		binary.LittleEndian.PutUint32(hdr[8+12+4*i:], uint32(set>>32))
	}
	capAt, groupsAt := r.scratch+3072, r.scratch+scratchGroups
	if err := errors.Join(in.WriteMemory(groupsAt, groups), in.WriteMemory(capAt, hdr)); err != nil {
		return err
	}
	cl.add("setgroups", sys.SYS_SETGROUPS, uint64(len(c.Groups)), groupsAt)
	cl.add("setresgid", sys.SYS_SETRESGID, uint64(c.Gid[0]), uint64(c.Gid[1]), uint64(c.Gid[2]))
	cl.add("setfsgid", sys.SYS_SETFSGID, uint64(c.Gid[3]))
	// Keep the permitted set across the uid change; capset below trims it.
	cl.add("keep capabilities", sys.SYS_PRCTL, sys.PR_SET_KEEPCAPS, 1)
	cl.add("setresuid", sys.SYS_SETRESUID, uint64(c.Uid[0]), uint64(c.Uid[1]), uint64(c.Uid[2]))
	cl.add("setfsuid", sys.SYS_SETFSUID, uint64(c.Uid[3]))
	cl.add("capset", sys.SYS_CAPSET, capAt, capAt+8)
	cl.add("clear keep-capabilities", sys.SYS_PRCTL, sys.PR_SET_KEEPCAPS, 0)
	for capNo := 0; capNo <= lastCap(); capNo++ {
		if c.CapAmb&(1<<uint(capNo)) != 0 {
			cl.add("raise ambient capability", sys.SYS_PRCTL, sys.PR_CAP_AMBIENT, sys.PR_CAP_AMBIENT_RAISE, uint64(capNo))
		}
	}
	return nil
}
