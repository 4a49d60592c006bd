package engine

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// newInotify returns an inotify instance of this process, closed at the
// end of the test.
func newInotify(t *testing.T) int {
	t.Helper()
	fd, err := sys.InotifyInit1(sys.IN_CLOEXEC | sys.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sys.Close(fd) })
	return fd
}

func addWatch(t *testing.T, fd int, path string, mask uint32) int {
	t.Helper()
	wd, err := sys.InotifyAddWatch(fd, path, mask)
	if err != nil {
		t.Fatal(err)
	}
	return wd
}

// drain reads every queued event of fd.
func drain(t *testing.T, fd int) {
	t.Helper()
	b := make([]byte, 64<<10)
	for {
		if _, err := sys.Read(fd, b); errors.Is(err, sys.EAGAIN) {
			return
		} else if err != nil {
			t.Fatal(err)
		}
	}
}

func dumpInotify(t *testing.T, fd int) (*imagepb.Inotify, error) {
	t.Helper()
	info, err := proc.ReadFDInfo(os.Getpid(), fd)
	if err != nil {
		t.Fatal(err)
	}
	return inotifyState(os.Getpid(), fd, info)
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("open_by_handle_at needs CAP_DAC_READ_SEARCH")
	}
}

// TestInotifyState dumps watches on directories and a file, with a hole
// in the watch descriptors, and checks the paths found from their handles.
func TestInotifyState(t *testing.T) {
	needRoot(t)
	dir := t.TempDir()
	a, gone, b, file := filepath.Join(dir, "a"), filepath.Join(dir, "gone"), filepath.Join(dir, "b"), filepath.Join(dir, "b", "file")
	for _, d := range []string{a, gone, b} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(file, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	fd := newInotify(t)
	wa := addWatch(t, fd, a, sys.IN_CREATE|sys.IN_DELETE)
	wg := addWatch(t, fd, gone, sys.IN_CREATE)
	wb := addWatch(t, fd, b, sys.IN_ALL_EVENTS)
	wf := addWatch(t, fd, file, sys.IN_MODIFY|sys.IN_ONESHOT)
	if err := sys.InotifyRmWatch(fd, wg); err != nil {
		t.Fatal(err)
	}
	drain(t, fd)
	st, err := dumpInotify(t, fd)
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		wd   int
		path string
		mask uint32
	}{{wa, a, sys.IN_CREATE | sys.IN_DELETE}, {wb, b, sys.IN_ALL_EVENTS}, {wf, file, sys.IN_MODIFY | sys.IN_ONESHOT}}
	if len(st.Watches) != len(want) {
		t.Fatalf("dumped %v", st)
	}
	for i, w := range want {
		got := st.Watches[i]
		if int(got.Wd) != w.wd || got.Path != w.path || got.Mask != w.mask || got.Inode == 0 {
			t.Errorf("watch %d dumped as %v, want %d on %s mask %#x", i, got, w.wd, w.path, w.mask)
		}
	}
}

// TestInotifyStateRefuses covers what dump must refuse: unread events, and
// a watched file that no longer has a path.
func TestInotifyStateRefuses(t *testing.T) {
	needRoot(t)
	t.Run("unread-events", func(t *testing.T) {
		dir := t.TempDir()
		fd := newInotify(t)
		addWatch(t, fd, dir, sys.IN_CREATE)
		if err := os.WriteFile(filepath.Join(dir, "new"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := dumpInotify(t, fd)
		if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "unread events") {
			t.Errorf("dump with a queued event: %v", err)
		}
	})
	t.Run("deleted-file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "doomed")
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close() // keeps the inode, and the watch, alive
		fd := newInotify(t)
		wd := addWatch(t, fd, path, sys.IN_MODIFY)
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		drain(t, fd)
		_, err = dumpInotify(t, fd)
		if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "inotify watch "+strconv.Itoa(wd)) ||
			!strings.Contains(err.Error(), "doomed") {
			t.Errorf("dump of a watch on a deleted file: %v", err)
		}
		t.Logf("refused: %v", err)
	})
}

// TestInotifyStateWithoutHandle watches a procfs directory, for which the
// kernel gives no usable file handle: the path is found among the
// process's descriptors.
func TestInotifyStateWithoutHandle(t *testing.T) {
	needRoot(t)
	const path = "/proc/sys/kernel"
	d, err := os.Open(path)
	if err != nil {
		t.Skip(err)
	}
	defer d.Close()
	fd := newInotify(t)
	wd := addWatch(t, fd, path, sys.IN_ATTRIB)
	st, err := dumpInotify(t, fd)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Watches) != 1 || int(st.Watches[0].Wd) != wd || st.Watches[0].Path != path {
		t.Errorf("dumped %v", st)
	}
}
