package e2e

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/testutil"
	"github.com/phaul/phaul/protocol/imagepb"
)

// The shmem fixture (testdata/shmem.c) is built on first use.
var (
	shmemOnce sync.Once
	shmemBin  artifact
	shmemSeq  atomic.Int32
)

// startShmem starts the shmem fixture with a tag and SysV key of its own;
// the test's cleanup removes what it leaves behind in /dev/shm and the
// SysV segment, after the workload is gone.
func startShmem(tb testing.TB, args ...string) *testutil.Workload {
	tb.Helper()
	shmemOnce.Do(func() {
		out := filepath.Join(buildDir, "shmem")
		err := testutil.CompileC(filepath.Join(testdata, "shmem.c"), out)
		shmemBin = artifact{argv: []string{out}, err: err}
	})
	if err := shmemBin.err; err != nil {
		if errors.Is(err, testutil.ErrNoTool) {
			tb.Skipf("fixture shmem: %v", err)
		}
		tb.Fatalf("fixture shmem did not build: %v", err)
	}
	needPhaul(tb)
	n := shmemSeq.Add(1)
	tag := fmt.Sprintf("phaul-e2e-%d-%d", selfPid, n)
	key := 0x50480000 | (selfPid&0xfff)<<4 | int(n&0xf)
	if id, err := sys.ShmGet(key, 0, 0); err == nil {
		tb.Fatalf("SysV key %#x is in use (shmid %d)", key, id)
	}
	// Registered before the workload's own cleanup, so it runs after it.
	tb.Cleanup(func() {
		leftovers, _ := filepath.Glob("/dev/shm/" + tag + "-*")
		sems, _ := filepath.Glob("/dev/shm/sem." + tag + "-*")
		for _, p := range append(leftovers, sems...) {
			os.Remove(p)
		}
		if id, err := sys.ShmGet(key, 0, 0); err == nil {
			if err := sys.ShmRemove(id); err != nil {
				tb.Errorf("remove SysV segment %d: %v", id, err)
			}
		}
	})
	argv := append(append([]string(nil), shmemBin.argv...), append([]string{"--tag", tag, "--sysv-key", strconv.Itoa(key)}, args...)...)
	return testutil.StartWorkload(tb, argv, &testutil.Options{Name: "shmem"})
}

// checkShmemImage checks that the image saved each shared memory object
// once, apart from the process's pages: six objects of the expected
// kinds, named by the mappings and descriptors, and no page of theirs in
// the process's page map.
func checkShmemImage(t *testing.T, dir string, pid int) {
	t.Helper()
	cp, err := image.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[imagepb.ShmemKind]int{}
	for _, o := range cp.Files.GetShmem() {
		kinds[o.GetKind()]++
	}
	want := map[imagepb.ShmemKind]int{
		imagepb.ShmemKind_SHMEM_ANON: 1, imagepb.ShmemKind_SHMEM_MEMFD: 2,
		imagepb.ShmemKind_SHMEM_DELETED_FILE: 2, imagepb.ShmemKind_SHMEM_SYSV: 1,
	}
	if fmt.Sprint(kinds) != fmt.Sprint(want) {
		t.Errorf("shared memory objects by kind: %v, want %v", kinds, want)
	}
	p := cp.Process(pid)
	users := map[uint32]int{}
	for _, v := range p.State.GetVmas() {
		if v.GetShmem() == 0 {
			continue
		}
		users[v.GetShmem()]++
		for _, r := range p.PageMap.GetRuns() {
			if r.GetAddr() < v.GetEnd() && v.GetStart() < r.GetAddr()+r.GetNrPages()*4096 {
				t.Errorf("pages of the shared mapping %#x-%#x are in the process's page map too", v.GetStart(), v.GetEnd())
			}
		}
	}
	for _, f := range cp.Files.GetFiles() {
		if f.GetShmem() != 0 {
			users[f.GetShmem()]++
		}
	}
	for _, o := range cp.Files.GetShmem() {
		if got, want := users[o.GetId()], shmemUsers(o); got != want {
			t.Errorf("shared memory object %d (%v %q) has %d mappings and descriptors, want %d", o.GetId(), o.GetKind(), o.GetName(), got, want)
		}
	}
}

// shmemUsers is how many mappings and descriptors of the fixture share o.
func shmemUsers(o *imagepb.Shmem) int {
	switch {
	case o.GetKind() == imagepb.ShmemKind_SHMEM_ANON:
		return 5 // 4 mappings (cut, moved, mapped again whole) and a descriptor
	case o.GetKind() == imagepb.ShmemKind_SHMEM_SYSV:
		return 4 // 3 mappings of the first attachment, 1 of the second
	case o.GetName() == "phaul-shm":
		return 3 // 2 mappings and a descriptor
	case o.GetName() == "phaul-shm-ro", strings.HasSuffix(o.GetName(), "-del"):
		return 2 // a mapping and a descriptor
	}
	return 1 // the semaphore: a mapping
}

// TestDumpRestoreShm dumps a process holding a memfd mapped twice and
// open, a write-sealed memfd, a deleted /dev/shm file mapped and open, a
// semaphore whose file was unlinked, a POSIX shared memory object with its
// name, a SysV segment attached twice, and shared anonymous memory cut,
// moved and mapped again; it restores it and has it check that every
// object kept its contents, size, seals, names and offsets, and that the
// mappings and descriptors of each still share it. The SysV segment lives
// on after the dump (it was not removed), so restore takes it as it is:
// same shmid, and still the one the original process created.
func TestDumpRestoreShm(t *testing.T) {
	w := startShmem(t)
	pre := w.MustCheck(t)
	shmid := field(t, pre, "shmid")
	before := takeSnapshot(t, w.Pid)
	dir := imageDir(t)
	dumpAndWaitGone(t, w, dir)
	checkShmemImage(t, dir, w.Pid)
	ds, err := sys.ShmStat(int(shmid))
	if err != nil || ds.Nattch != 0 {
		t.Fatalf("the SysV segment after the dump: %+v, %v", ds, err)
	}
	restoreDetached(t, w, dir)
	compareSnapshots(t, w, before, takeSnapshot(t, w.Pid), snapOpts{})
	checkAfterRestore(t, w, pre)
	post := w.MustCheck(t)
	if got := field(t, post, "shmid"); got != shmid {
		t.Errorf("SysV shmid %d after restore, want %d", got, shmid)
	}
	if cpid := field(t, post, "sysv_cpid"); cpid != int64(w.Pid) {
		t.Errorf("the SysV segment was made by %d, want the original one (made by %d)", cpid, w.Pid)
	}
}

// TestDumpRestoreShmSysVRemoved removes the SysV segment between dump and
// restore: restore makes it again with the same shmid and contents.
func TestDumpRestoreShmSysVRemoved(t *testing.T) {
	w := startShmem(t)
	pre := w.MustCheck(t)
	shmid := field(t, pre, "shmid")
	dir := imageDir(t)
	dumpAndWaitGone(t, w, dir)
	if err := sys.ShmRemove(int(shmid)); err != nil {
		t.Fatal(err)
	}
	if _, err := sys.ShmStat(int(shmid)); err == nil {
		t.Fatalf("SysV segment %d still there after IPC_RMID", shmid)
	}
	restoreDetached(t, w, dir)
	checkAfterRestore(t, w, pre)
	post := w.MustCheck(t)
	if got := field(t, post, "shmid"); got != shmid {
		t.Errorf("SysV shmid %d after restore, want %d", got, shmid)
	}
	if cpid := field(t, post, "sysv_cpid"); cpid == int64(w.Pid) {
		t.Errorf("the SysV segment's creator is still the original process %d: it was not made again", cpid)
	}
}

// TestShmUnsupported covers what dump refuses, naming it, with the process
// left running: a hugetlbfs memfd, and a private mapping of a memfd.
func TestShmUnsupported(t *testing.T) {
	for _, tc := range []struct {
		kind     string
		patterns []string
	}{
		{"hugetlb", []string{`descriptor \d+ \(/memfd:phaul-huge \(deleted\)\) is on hugetlbfs`, `not supported`}},
		{"private-memfd", []string{`mapping 0x[0-9a-f]+-0x[0-9a-f]+ is a private mapping of a memfd \(/memfd:phaul-shm\)`, `not supported`}},
	} {
		t.Run(tc.kind, func(t *testing.T) {
			w := startShmem(t, "--refuse", tc.kind)
			w.MustCheck(t)
			before := takeSnapshot(t, w.Pid)
			r := runPhaul(t, w, "dump", "-t", strconv.Itoa(w.Pid), "-D", imageDir(t))
			r.mustFail(t, w, tc.patterns...)
			if w.OriginalExited() {
				t.Fatalf("the failed dump killed the process: %v", w.ExitState())
			}
			assertResumed(t, w, 0)
			compareSnapshots(t, w, before, takeSnapshot(t, w.Pid), snapOpts{})
			requireProgress(t, w, "after the failed dump")
			w.MustCheck(t)
		})
	}
}
