package engine

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/netlock"
	"github.com/phaul/phaul/protocol/imagepb"
)

// safeCharDevs are character devices that hold no per-open state, so
// opening them again by path recreates the descriptor exactly.
var safeCharDevs = map[string]bool{
	"/dev/null": true, "/dev/zero": true, "/dev/full": true,
	"/dev/random": true, "/dev/urandom": true,
}

// oCloexec is O_CLOEXEC as fdinfo's flags field reports it.
const oCloexec = 0o2000000

// fileTable collects the open descriptors of a process, or of every
// process of a tree: one table, so that a description shared between
// processes is one file of it.
type fileTable struct {
	shellJob bool
	table    imagepb.FileTable
	// tcpEstablished allows established TCP connections (files_socket.go).
	tcpEstablished bool
	// sockets are phaul's copies of the dumped sockets, by inode too.
	sockets       []*dumpedSocket
	socketByInode map[uint64]*dumpedSocket
	// lock holds the packets of the process's connections; lockDone is
	// set once it was considered. pids are the processes whose sockets
	// it covers (the tree; nil: the process being described), lockPid
	// the one that names it.
	lock     *netlock.Lock
	lockDone bool
	pids     []int
	lockPid  int
	// described are the descriptors described so far, with their
	// process; seen indexes them by identity (dumpFDs).
	described []procFD
	seen      map[fileIdent][]procFD
	// unixSockets are the unix sockets of the table, extUnixSk those
	// whose peer may be outside it (files_unix.go).
	unixSockets []*dumpedUnix
	extUnixSk   ExtUnixSk
}

// procFD is a descriptor of one process of the table.
type procFD struct {
	pid int
	fd  *imagepb.FD
}

// fileIdent is what two descriptors of one open file description have in
// common; kcmp tells whether they share it.
type fileIdent struct {
	kind       imagepb.FileKind
	dev, inode uint64
}

// newFileTable returns the table a freeze with opt fills.
func newFileTable(opt FreezeOptions) *fileTable {
	return &fileTable{shellJob: opt.ShellJob, tcpEstablished: opt.TCPEstablished, lockPid: opt.Pid,
		seen: map[fileIdent][]procFD{}, extUnixSk: opt.ExtUnixSk}
}

// dumpFDs describes every descriptor of pid but skip (phaul's own in the
// process, -1 for none), refusing the kinds phaul cannot restore yet with
// an error naming the descriptor.
func (ft *fileTable) dumpFDs(pid, skip int) ([]*imagepb.FD, error) {
	fds, err := proc.ListFDs(pid)
	if err != nil {
		return nil, err
	}
	var out []*imagepb.FD
	// Descriptors that share one open file description (dup, inherited
	// across fork like `2>&1`, in this process or another of the tree)
	// must share it again after restore: same offset, same flags. kcmp
	// tells; candidates are the files with the same identity.
	for _, fd := range fds {
		if fd == skip {
			continue
		}
		f, cloexec, err := ft.describe(pid, fd)
		if err != nil {
			return nil, err
		}
		d := &imagepb.FD{Fd: int32(fd), Cloexec: cloexec}
		key := fileIdent{f.Kind, f.Dev, f.Inode}
		for _, other := range ft.seen[key] {
			same, err := sys.Kcmp(pid, other.pid, sys.KCMP_FILE, uint64(fd), uint64(other.fd.Fd))
			if err != nil {
				return nil, fmt.Errorf("compare descriptor %d of %d with %d of %d: %w", fd, pid, other.fd.Fd, other.pid, err)
			}
			if same == 0 {
				d.FileId = other.fd.FileId
				break
			}
		}
		if d.FileId == 0 {
			f.Id = uint32(len(ft.table.Files) + 1)
			ft.table.Files = append(ft.table.Files, f)
			d.FileId = f.Id
		}
		ref := procFD{pid, d}
		ft.seen[key] = append(ft.seen[key], ref)
		ft.described = append(ft.described, ref)
		out = append(out, d)
	}
	return out, nil
}

// finish checks, once every descriptor of every process was described,
// what spans descriptors: both ends of each pipe are in the table (and
// the bytes queued in it are saved).
func (ft *fileTable) finish() error {
	if err := ft.pipeData(); err != nil {
		return err
	}
	if err := ft.fifoData(); err != nil {
		return err
	}
	return ft.checkUnixPeers()
}

// pipeData checks that both ends of every pipe are in the table and saves
// the bytes queued in each pipe with its read end. The bytes are peeked
// with tee(2) from a copy of the read end taken with pidfd_getfd, so the
// process's pipe keeps them.
func (ft *fileTable) pipeData() error {
	type ends struct {
		read, write *imagepb.File
		readFd      procFD
		writeFd     procFD
	}
	pipes := map[uint64]*ends{}
	var order []uint64
	for _, d := range ft.described {
		f := ft.table.Files[d.fd.FileId-1]
		if f.Kind != imagepb.FileKind_FILE_PIPE {
			continue
		}
		e := pipes[f.Pipe.PipeId]
		if e == nil {
			e = &ends{}
			pipes[f.Pipe.PipeId] = e
			order = append(order, f.Pipe.PipeId)
		}
		if f.Flags&sys.O_ACCMODE == sys.O_RDONLY {
			e.read, e.readFd = f, d
		} else {
			e.write, e.writeFd = f, d
		}
	}
	for _, id := range order {
		e := pipes[id]
		switch {
		case e.read == nil:
			return unsupported("descriptor %d of %d is the write end of pipe:[%d], whose read end is outside (pipes to processes not dumped)", e.writeFd.fd.Fd, e.writeFd.pid, id)
		case e.write == nil:
			return unsupported("descriptor %d of %d is the read end of pipe:[%d], whose write end is outside (pipes to processes not dumped)", e.readFd.fd.Fd, e.readFd.pid, id)
		}
		data, capacity, err := peekPipe(e.readFd.pid, int(e.readFd.fd.Fd))
		if err != nil {
			return fmt.Errorf("data queued in pipe:[%d] (descriptor %d of %d): %w", id, e.readFd.fd.Fd, e.readFd.pid, err)
		}
		e.read.Pipe.Data, e.read.Pipe.Capacity = data, int64(capacity)
		e.write.Pipe.Capacity = int64(capacity)
	}
	return nil
}

// peekPipe returns the bytes queued in the pipe behind descriptor fd of
// process pid, without consuming them, and the pipe's capacity.
func peekPipe(pid, fd int) ([]byte, int, error) {
	src, err := sys.CopyFD(pid, fd)
	if err != nil {
		return nil, 0, err
	}
	defer sys.Close(src)
	capacity, err := sys.FcntlInt(src, sys.F_GETPIPE_SZ, 0)
	if err != nil {
		return nil, 0, err
	}
	r, w, err := sys.Pipe2(sys.O_CLOEXEC | sys.O_NONBLOCK)
	if err != nil {
		return nil, 0, err
	}
	defer sys.Close(r)
	defer sys.Close(w)
	if _, err := sys.FcntlInt(w, sys.F_SETPIPE_SZ, capacity); err != nil {
		return nil, 0, err
	}
	n, err := sys.Tee(src, w, capacity, sys.SPLICE_F_NONBLOCK)
	if errors.Is(err, sys.EAGAIN) {
		return nil, capacity, nil // empty
	}
	if err != nil {
		return nil, 0, err
	}
	data := make([]byte, n)
	for got := 0; got < n; {
		m, err := sys.Read(r, data[got:])
		if err != nil {
			return nil, 0, err
		}
		got += m
	}
	return data, capacity, nil
}

func (ft *fileTable) describe(pid, fd int) (*imagepb.File, bool, error) {
	link, err := proc.ReadFDLink(pid, fd)
	if err != nil {
		return nil, false, err
	}
	info, err := proc.ReadFDInfo(pid, fd)
	if err != nil {
		return nil, false, err
	}
	cloexec := info.Flags&oCloexec != 0
	f := &imagepb.File{Path: link, Flags: info.Flags &^ oCloexec, Pos: info.Pos}
	switch link {
	case "anon_inode:[eventfd]":
		ev, err := eventfdState(info)
		if err != nil {
			return nil, false, fmt.Errorf("descriptor %d of %d: %w", fd, pid, err)
		}
		f.Kind, f.Eventfd = imagepb.FileKind_FILE_EVENTFD, ev
		return f, cloexec, nil
	case "anon_inode:[eventpoll]":
		ep, err := epollState(pid, info)
		if err != nil {
			return nil, false, fmt.Errorf("descriptor %d of %d: %w", fd, pid, err)
		}
		f.Kind, f.Epoll = imagepb.FileKind_FILE_EPOLL, ep
		return f, cloexec, nil
	case "anon_inode:[timerfd]":
		t, err := timerfdState(pid, fd, info)
		if err != nil {
			return nil, false, fmt.Errorf("descriptor %d of %d: %w", fd, pid, err)
		}
		f.Kind, f.Timerfd = imagepb.FileKind_FILE_TIMERFD, t
		return f, cloexec, nil
	case "anon_inode:[signalfd]":
		s, err := signalfdState(info)
		if err != nil {
			return nil, false, fmt.Errorf("descriptor %d of %d: %w", fd, pid, err)
		}
		f.Kind, f.Signalfd = imagepb.FileKind_FILE_SIGNALFD, s
		return f, cloexec, nil
	case "anon_inode:inotify":
		n, err := inotifyState(pid, fd, info)
		if err != nil {
			return nil, false, fmt.Errorf("descriptor %d of %d: %w", fd, pid, err)
		}
		f.Kind, f.Inotify = imagepb.FileKind_FILE_INOTIFY, n
		return f, cloexec, nil
	}
	if isSocketLink(link) {
		if ft.socketByInode == nil {
			ft.socketByInode = map[uint64]*dumpedSocket{}
		}
		ok, err := ft.inetSocket(pid, fd, link, f)
		if err != nil {
			return nil, false, err
		}
		if ok {
			return f, cloexec, nil
		}
		if ok, err = ft.unixSocket(pid, fd, f); err != nil {
			return nil, false, err
		}
		if ok {
			return f, cloexec, nil
		}
	}
	if strings.HasPrefix(link, "pipe:[") {
		st, err := os.Stat(fmt.Sprintf("/proc/%d/fd/%d", pid, fd))
		if err != nil {
			return nil, false, fmt.Errorf("descriptor %d of %d: %w", fd, pid, err)
		}
		f.Kind = imagepb.FileKind_FILE_PIPE
		f.Inode = st.Sys().(*syscall.Stat_t).Ino
		f.Dev = st.Sys().(*syscall.Stat_t).Dev
		f.Pipe = &imagepb.Pipe{PipeId: f.Inode}
		return f, cloexec, nil
	}
	if !strings.HasPrefix(link, "/") {
		return nil, false, unsupported("descriptor %d (%s)%s", fd, link, kindHint(link))
	}
	if strings.HasSuffix(link, " (deleted)") {
		// A memfd or a deleted tmpfs file: a shared memory object (shmem.go).
		if err := shmemDescriptor(pid, fd, link, f); err != nil {
			return nil, false, err
		}
		return f, cloexec, nil
	}
	fi, err := os.Stat(fmt.Sprintf("/proc/%d/fd/%d", pid, fd))
	if err != nil {
		return nil, false, fmt.Errorf("descriptor %d of %d: %w", fd, pid, err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	f.Mode, f.Dev, f.Inode, f.Rdev, f.Size = st.Mode, st.Dev, st.Ino, st.Rdev, st.Size
	switch {
	case isTerminal(link, fi):
		if !ft.shellJob {
			return nil, false, unsupported("descriptor %d is the terminal %s; dump a process attached to a terminal with --shell-job", fd, link)
		}
		f.Kind = imagepb.FileKind_FILE_INHERITED
		f.InheritFd = int32(fd)
		if fd > 2 {
			f.InheritFd = 0
		}
	case fi.Mode().IsRegular():
		f.Kind = imagepb.FileKind_FILE_REGULAR
	case fi.IsDir():
		f.Kind = imagepb.FileKind_FILE_DIRECTORY
	case fi.Mode()&os.ModeCharDevice != 0:
		if !safeCharDevs[link] {
			return nil, false, unsupported("descriptor %d is the character device %s", fd, link)
		}
		f.Kind = imagepb.FileKind_FILE_CHARDEV
	case fi.Mode()&os.ModeNamedPipe != 0:
		f.Kind, f.Fifo = imagepb.FileKind_FILE_FIFO, &imagepb.Fifo{}
	default:
		return nil, false, unsupported("descriptor %d (%s, %s)", fd, link, fi.Mode().Type())
	}
	return f, cloexec, nil
}

func isTerminal(link string, fi os.FileInfo) bool {
	if fi.Mode()&os.ModeCharDevice == 0 {
		return false
	}
	return strings.HasPrefix(link, "/dev/pts/") || strings.HasPrefix(link, "/dev/tty") || link == "/dev/console"
}

// kindHint says what a non-path descriptor is, for error messages.
func kindHint(link string) string {
	switch {
	case strings.HasPrefix(link, "socket:"):
		return ": sockets are not supported yet"
	case strings.HasPrefix(link, "anon_inode:"):
		return ": " + strings.Trim(strings.TrimPrefix(link, "anon_inode:"), "[]") + " descriptors are not supported yet"
	}
	return ""
}

// openFlags are the fdinfo flags that open(2) or fcntl(F_SETFL) restore.
const openFlags = sys.O_ACCMODE | sys.O_APPEND | sys.O_NONBLOCK | sys.O_DIRECTORY | sys.O_LARGEFILE |
	0o40000 /* O_DIRECT */ | 0o10000 /* O_DSYNC */ | 0o4010000 /* O_SYNC */ | 0o1000000 /* O_NOATIME */ | sys.O_PATH

// eventfdState reads an eventfd's counter and mode from its fdinfo.
func eventfdState(info *proc.FDInfo) (*imagepb.EventFD, error) {
	cnt, ok := info.Get("eventfd-count")
	if !ok {
		return nil, fmt.Errorf("eventfd without eventfd-count in fdinfo")
	}
	n, err := strconv.ParseUint(strings.TrimSpace(cnt), 16, 64)
	if err != nil {
		return nil, fmt.Errorf("eventfd count %q: %w", cnt, err)
	}
	sem, _ := info.Get("eventfd-semaphore")
	return &imagepb.EventFD{Count: n, Semaphore: strings.TrimSpace(sem) == "1"}, nil
}

// epollState reads an epoll's interest list from its fdinfo. Every target
// must still be the descriptor it was registered as (same number, same
// inode): an epoll watching a closed or moved descriptor is refused.
func epollState(pid int, info *proc.FDInfo) (*imagepb.Epoll, error) {
	ep := &imagepb.Epoll{}
	for _, kv := range info.Extra {
		if kv[0] != "tfd" {
			continue
		}
		// "6 events: 19 data: 5b81d0  pos:0 ino:40e sdev:10"
		fields := strings.Fields(strings.NewReplacer(":", " ").Replace(kv[1]))
		vals := map[string]string{}
		if len(fields) > 0 {
			vals["tfd"] = fields[0]
		}
		for i := 1; i+1 < len(fields); i += 2 {
			vals[fields[i]] = fields[i+1]
		}
		tfd, err1 := strconv.Atoi(vals["tfd"])
		ev, err2 := strconv.ParseUint(vals["events"], 16, 32)
		data, err3 := strconv.ParseUint(vals["data"], 16, 64)
		ino, err4 := strconv.ParseUint(vals["ino"], 16, 64)
		if err := errors.Join(err1, err2, err3, err4); err != nil {
			return nil, fmt.Errorf("epoll target %q: %w", kv[1], err)
		}
		fi, err := os.Stat(fmt.Sprintf("/proc/%d/fd/%d", pid, tfd))
		if err != nil || fi.Sys().(*syscall.Stat_t).Ino != ino {
			return nil, unsupported("epoll watches descriptor %d (inode %d), which is no longer open as that descriptor", tfd, ino)
		}
		ep.Targets = append(ep.Targets, &imagepb.EpollTarget{Fd: int32(tfd), Events: uint32(ev), Data: data})
	}
	return ep, nil
}
