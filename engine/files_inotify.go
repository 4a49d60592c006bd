package engine

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"syscall"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// Inotify instances
//
// fdinfo lists each watch with its descriptor (wd), mask, and the watched
// inode: number, device, and a file handle. Dump turns the handle back into
// a path with open_by_handle_at (phaul runs as root), on a mount of that
// device in the process's mount table, checks that the path leads to that
// very inode as the process sees it, and stores the path. Where the kernel
// gives no handle, the process's own links (cwd, root, exe, descriptors)
// are searched for the inode. A watched inode without a path (a file that
// was deleted and is held open elsewhere) is refused, naming it.
//
// Restore creates the instance and adds the watches in the order of their
// descriptors. The kernel numbers the watches of an instance one after the
// other, so a number that is missing (a watch removed before the dump) is
// skipped by adding a watch on a spare inode and removing it again; the
// IN_IGNORED events that removal queues are read away before the process
// runs. Each watch is added with IN_MASK_CREATE and must come back with its
// number, else restore fails. The kernel's next number after the highest
// watch is not visible in fdinfo: a watch added after restore may get a
// number that an earlier, removed watch had.
//
// Events queued and not yet read cannot be put back: dump refuses an
// instance that has unread events (FIONREAD > 0) — dump again once the
// process has read them. Events that arrive after that check and before
// the process is gone are lost.

// maxInotifyGap bounds the watch numbers restore skips per instance (two
// injected system calls each).
const maxInotifyGap = 4096

// inotifyState reads the watches of the inotify instance behind descriptor
// fd of pid.
func inotifyState(pid, fd int, info *proc.FDInfo) (*imagepb.Inotify, error) {
	ws, err := proc.ParseInotify(info)
	if err != nil {
		return nil, err
	}
	cp, err := sys.CopyFD(pid, fd)
	if err != nil {
		return nil, err
	}
	n, err := sys.Fionread(cp)
	sys.Close(cp)
	if err != nil {
		return nil, err
	}
	if n > 0 {
		return nil, unsupported("inotify instance with %d bytes of unread events (queued inotify events cannot be restored; dump again once the process has read them)", n)
	}
	res := &watchResolver{pid: pid}
	st := &imagepb.Inotify{}
	next, skipped := 1, 0
	for _, w := range ws {
		if w.Wd < next {
			return nil, fmt.Errorf("inotify watch descriptor %d in fdinfo", w.Wd)
		}
		if skipped += w.Wd - next; skipped > maxInotifyGap {
			return nil, unsupported("inotify instance whose watch %d comes after %d removed watches (restore reproduces at most %d)", w.Wd, skipped, maxInotifyGap)
		}
		next = w.Wd + 1
		path, err := res.path(w)
		if err != nil {
			return nil, err
		}
		st.Watches = append(st.Watches, &imagepb.InotifyWatch{Wd: int32(w.Wd), Mask: w.Mask, Path: path, Inode: w.Ino, Dev: w.Dev})
	}
	return st, nil
}

// watchResolver finds the paths of watched inodes as process pid sees them.
type watchResolver struct {
	pid    int
	mounts []proc.Mount
	root   string // the process's root as we see it
}

// path returns the path of the inode watched by w.
func (r *watchResolver) path(w proc.InotifyWatch) (string, error) {
	what := fmt.Sprintf("watch %d on inode %d of device %d:%d", w.Wd, w.Ino, sys.DevMajor(w.Dev), sys.DevMinor(w.Dev))
	if r.root == "" {
		root, err := os.Readlink(fmt.Sprintf("/proc/%d/root", r.pid))
		if err != nil {
			return "", fmt.Errorf("root of %d: %w", r.pid, err)
		}
		r.root = root
	}
	var tried []string
	if w.HandleType >= 0 {
		p, err := r.byHandle(w)
		if err == nil {
			return p, nil
		}
		tried = append(tried, err.Error())
	} else {
		tried = append(tried, "the filesystem gives no file handle")
	}
	if p, ok := r.byLinks(w); ok {
		return p, nil
	}
	return "", unsupported("inotify %s: no path leads to it (%s)", what, strings.Join(tried, "; "))
}

// byHandle opens w's file handle on a mount of its device and returns the
// path the kernel gives the result.
func (r *watchResolver) byHandle(w proc.InotifyWatch) (string, error) {
	if r.mounts == nil {
		ms, err := proc.ReadMountInfo(r.pid)
		if err != nil {
			return "", err
		}
		r.mounts = ms
	}
	var cands []proc.Mount
	for _, m := range r.mounts {
		if m.Dev == w.Dev {
			cands = append(cands, m)
		}
	}
	// A mount of the filesystem's root reaches every inode.
	sort.SliceStable(cands, func(i, j int) bool { return cands[i].Root == "/" && cands[j].Root != "/" })
	if len(cands) == 0 {
		return "", errors.New("the process has no mount of its device")
	}
	var first error
	for _, m := range cands {
		p, err := r.openHandle(m, w)
		if err == nil {
			return p, nil
		}
		var del deletedError
		if errors.As(err, &del) {
			return "", err // the inode has no name left anywhere
		}
		if first == nil {
			first = err
		}
	}
	return "", first
}

// deletedError reports that a watched inode is a deleted file.
type deletedError struct{ path string }

func (e deletedError) Error() string { return "it is the deleted file " + e.path }

func (r *watchResolver) openHandle(m proc.Mount, w proc.InotifyWatch) (string, error) {
	mfd, err := sys.Open(fmt.Sprintf("/proc/%d/root%s", r.pid, m.MountPoint), sys.O_RDONLY|sys.O_NONBLOCK|sys.O_CLOEXEC|sys.O_NOCTTY)
	if err != nil {
		return "", fmt.Errorf("mount %s: %w", m.MountPoint, err)
	}
	defer sys.Close(mfd)
	h, err := sys.OpenByHandleAt(mfd, w.HandleType, w.Handle, sys.O_PATH|sys.O_CLOEXEC)
	if err != nil {
		return "", fmt.Errorf("mount %s: %w", m.MountPoint, err)
	}
	defer sys.Close(h)
	link, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", h))
	if err != nil {
		return "", err
	}
	if strings.HasSuffix(link, " (deleted)") {
		return "", deletedError{strings.TrimSuffix(link, " (deleted)")}
	}
	p, ok := r.check(link, w)
	if !ok {
		return "", fmt.Errorf("its path %s leads elsewhere in the process's view", link)
	}
	return p, nil
}

// byLinks looks for the inode among the process's own links: working
// directory, root, executable, descriptors.
func (r *watchResolver) byLinks(w proc.InotifyWatch) (string, bool) {
	base := fmt.Sprintf("/proc/%d/", r.pid)
	links := []string{base + "cwd", base + "root", base + "exe"}
	if ents, err := os.ReadDir(base + "fd"); err == nil {
		for _, e := range ents {
			links = append(links, base+"fd/"+e.Name())
		}
	}
	for _, l := range links {
		if !sameInode(l, w, os.Stat) {
			continue
		}
		target, err := os.Readlink(l)
		if err != nil || !strings.HasPrefix(target, "/") || strings.HasSuffix(target, " (deleted)") {
			continue
		}
		if p, ok := r.check(target, w); ok {
			return p, true
		}
	}
	return "", false
}

// check turns link, a path as this process sees it, into the path the
// process sees, and confirms that it leads to w's inode there.
func (r *watchResolver) check(link string, w proc.InotifyWatch) (string, bool) {
	p := link
	if r.root != "/" {
		rest, ok := strings.CutPrefix(link, r.root)
		if !ok || (rest != "" && !strings.HasPrefix(rest, "/")) {
			return "", false
		}
		p = rest
		if p == "" {
			p = "/"
		}
	}
	if !sameInode(fmt.Sprintf("/proc/%d/root%s", r.pid, p), w, os.Lstat) {
		return "", false
	}
	return p, true
}

// sameInode reports whether path (stat'ed with stat) is w's inode.
func sameInode(path string, w proc.InotifyWatch, stat func(string) (os.FileInfo, error)) bool {
	fi, err := stat(path)
	if err != nil {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && st.Ino == w.Ino && st.Dev == w.Dev
}
