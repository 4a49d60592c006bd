package engine

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/engine/image"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// shadowee keeps 16 MiB with a per-page pattern and a counter thread; on
// SIGUSR1 it verifies everything and prints CHECK OK or CHECK FAIL.
const shadowee = `
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <unistd.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/personality.h>
#define PAGES 4096
static unsigned long *mem;
static volatile unsigned long ticks;
static volatile sig_atomic_t check;
static void on_usr1(int s) { (void)s; check = 1; }
static void *ticker(void *a) { (void)a; for (;;) { ticks++; usleep(1000); } return 0; }
int main(void) {
	mem = mmap(0, PAGES * 4096UL, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
	for (unsigned long p = 0; p < PAGES; p++)
		for (unsigned long i = 0; i < 512; i++) mem[p * 512 + i] = p * 1000003 + i;
	memset(mem + 7 * 512, 0, 4096); /* one zero page */
	signal(SIGUSR1, on_usr1);
	personality(ADDR_NO_RANDOMIZE); /* per thread: the ticker inherits it */
	pthread_t t; pthread_create(&t, 0, ticker, 0);
	printf("READY %d\n", getpid()); fflush(stdout);
	for (;;) {
		if (check) {
			check = 0;
			int bad = -1;
			for (unsigned long p = 0; p < PAGES && bad < 0; p++)
				for (unsigned long i = 0; i < 512; i++) {
					unsigned long want = p == 7 ? 0 : p * 1000003 + i;
					if (mem[p * 512 + i] != want) { bad = p; break; }
				}
			if (bad >= 0) printf("CHECK FAIL page %d\n", bad);
			else printf("CHECK OK ticks=%lu\n", ticks);
			fflush(stdout);
		}
		usleep(1000);
	}
}
`

func buildShadowee(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("gcc"); err != nil {
		t.Skip("gcc not installed")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "shadowee.c")
	if err := os.WriteFile(src, []byte(shadowee), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "shadowee")
	if out, err := exec.Command("gcc", "-O2", "-pthread", "-o", bin, src).CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v\n%s", err, out)
	}
	return bin
}

func waitFor(t *testing.T, path, prefix string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		f, err := os.Open(path)
		if err == nil {
			sc := bufio.NewScanner(f)
			var last string
			for sc.Scan() {
				if strings.HasPrefix(sc.Text(), prefix) {
					last = sc.Text()
				}
			}
			f.Close()
			if last != "" {
				return last
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	out, _ := os.ReadFile(path)
	t.Fatalf("no %q line; output:\n%s", prefix, out)
	return ""
}

// TestShadowFollowsRoundsAndFinishes builds a process as a migration target
// would: an earlier round's layout (with a mapping the process later drops
// and without one it later gains), stale page contents overwritten by a
// later round, zero pages, then the final state.
func TestShadowFollowsRoundsAndFinishes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	bin := buildShadowee(t)
	// Descriptors this test inherited must not leak into the workload.
	if err := sys.CloseOnExecFrom(3); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	logPath := filepath.Join(dir, "out.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(bin)
	cmd.Stdout = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	waitFor(t, logPath, "READY")

	img := filepath.Join(dir, "img")
	if _, err := Dump(context.Background(), DumpOptions{Pid: pid, Dir: img}); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait() // the PID must be free for the shadow
	cp, err := image.Load(img)
	if err != nil {
		t.Fatal(err)
	}
	p := cp.Processes[0]
	final := p.State.Vmas

	// Round 1's layout: the biggest anonymous VMA is cut in half, and an
	// extra anonymous mapping sits in a hole.
	var big *imagepb.VMA
	for _, v := range final {
		if v.Kind == imagepb.VMAKind_VMA_ANON_PRIVATE && (big == nil || v.End-v.Start > big.End-big.Start) {
			big = v
		}
	}
	var first []*imagepb.VMA
	for _, v := range final {
		if v == big {
			half := proto.Clone(big).(*imagepb.VMA)
			half.End = big.Start + (big.End-big.Start)/2/pageSize*pageSize
			// Advice the process takes back before the freeze.
			half.Madvise = append(half.Madvise, sys.MADV_DONTFORK)
			first = append(first, half)
			continue
		}
		first = append(first, v)
	}
	// Advice the process gives after round 1.
	big.Madvise = append(big.Madvise, sys.MADV_DONTDUMP)
	extra := &imagepb.VMA{Start: 0x200000000000, End: 0x200000000000 + 16*pageSize, Prot: 3,
		Flags: sys.MAP_PRIVATE, Kind: imagepb.VMAKind_VMA_ANON_PRIVATE}
	first = append(first, extra)
	sortVMAs(first)

	sh, err := NewShadow(context.Background(), ShadowOptions{Pid: pid, Vmas: first, XsaveFeatures: cp.Inventory.GetXsaveFeatures()})
	if err != nil {
		t.Fatal(err)
	}
	restored := false
	t.Cleanup(func() {
		if !restored {
			sh.Discard()
			return
		}
		_ = sys.Kill(pid, sys.SIGKILL)
		_, _, _ = sys.Wait4(pid, 0)
	})
	chain, err := image.OpenChain(img, pid)
	if err != nil {
		t.Fatal(err)
	}
	defer chain.Close()
	junk := make([]byte, 16*pageSize)
	for i := range junk {
		junk[i] = 0xa5
	}
	if err := sh.WritePages(extra.Start, junk); err != nil {
		t.Fatal(err)
	}
	// Round 1: stale contents in every page round 1's layout has.
	inFirst := func(addr uint64) bool {
		for _, v := range first {
			if addr >= v.Start && addr < v.End {
				return true
			}
		}
		return false
	}
	for _, e := range chain.Extents {
		for a := e.Addr; a < e.End(); a += pageSize {
			if inFirst(a) {
				if err := sh.WritePages(a, junk[:pageSize]); err != nil {
					t.Fatalf("stale page %#x: %v", a, err)
				}
			}
		}
	}
	// Round 1's threads: the process's, and one it has lost by the
	// freeze.
	var tids []int
	for _, th := range p.State.Threads {
		tids = append(tids, int(th.Tid))
	}
	gone := tids[len(tids)-1] + 1
	for pidFree(gone) != nil {
		gone++
	}
	// A TID in use here is refused, and nothing is created.
	if err := sh.SetThreads([]int{pid, os.Getpid()}); !errors.Is(err, ErrPidTaken) {
		t.Fatalf("SetThreads with a TID in use: %v, want ErrPidTaken", err)
	}
	if got := taskList(t, pid); !slices.Equal(got, []int{pid}) {
		t.Fatalf("threads after a refused SetThreads: %v, want only %d", got, pid)
	}
	if err := sh.SetThreads(append(slices.Clone(tids), gone)); err != nil {
		t.Fatal(err)
	}
	if got := taskList(t, pid); !slices.Equal(got, append(slices.Clone(tids), gone)) {
		t.Fatalf("threads after SetThreads: %v, want %v and %d", got, tids, gone)
	}
	// Round 2: the final layout, then every page as the image has it.
	if err := sh.SetLayout(final); err != nil {
		t.Fatal(err)
	}
	if err := sh.SetThreads(tids); err != nil {
		t.Fatal(err)
	}
	if got := taskList(t, pid); !slices.Equal(got, tids) {
		t.Fatalf("threads after the second SetThreads: %v, want %v", got, tids)
	}
	for _, e := range chain.Extents {
		if e.Zero {
			if err := sh.ZeroPages(e.Addr, e.NrPages); err != nil {
				t.Fatal(err)
			}
			continue
		}
		buf := make([]byte, e.NrPages*pageSize)
		if _, err := e.Pages.File().ReadAt(buf, e.Offset); err != nil {
			t.Fatal(err)
		}
		if err := sh.WritePages(e.Addr, buf); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := sh.Finish(context.Background(), State{Process: p.State, Files: cp.Files, Entry: p.Entry}); err != nil {
		t.Fatal(err)
	}
	restored = true
	if got := taskList(t, pid); !slices.Equal(got, tids) {
		t.Errorf("threads after Finish: %v, want %v", got, tids)
	}
	for _, tid := range tids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/personality", pid, tid))
		if err != nil || strings.TrimSpace(string(b)) != "00040000" {
			t.Errorf("thread %d: personality %q (%v), want 00040000", tid, b, err)
		}
	}
	maps, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/maps")
	if strings.Contains(string(maps), "200000000000-") {
		t.Errorf("the mapping dropped between rounds is still there:\n%s", maps)
	}
	if flags := vmFlags(t, pid, big.Start); !slices.Contains(flags, "dd") || slices.Contains(flags, "dc") {
		t.Errorf("the mapping at %#x has VmFlags %v: want dd (given after round 1), not dc (taken back)", big.Start, flags)
	}
	if err := sys.Kill(pid, sys.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	if line := waitFor(t, logPath, "CHECK"); !strings.HasPrefix(line, "CHECK OK") {
		t.Fatalf("restored process says %q", line)
	}
}

// taskList returns the TIDs of pid's threads, in increasing order.
func taskList(t *testing.T, pid int) []int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	var tids []int
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, tid)
		}
	}
	slices.Sort(tids)
	return tids
}

// vmFlags returns the VmFlags of pid's mapping that starts at start.
func vmFlags(t *testing.T, pid int, start uint64) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/smaps")
	if err != nil {
		t.Fatal(err)
	}
	// The mapping's block starts with its range; VmFlags is its last line.
	head := strconv.FormatUint(start, 16) + "-"
	found := false
	for _, line := range strings.Split(string(b), "\n") {
		found = found || strings.HasPrefix(line, head)
		if rest, ok := strings.CutPrefix(line, "VmFlags:"); ok && found {
			return strings.Fields(rest)
		}
	}
	t.Fatalf("no mapping at %#x in smaps", start)
	return nil
}

func sortVMAs(v []*imagepb.VMA) {
	for i := 1; i < len(v); i++ {
		for j := i; j > 0 && v[j].Start < v[j-1].Start; j-- {
			v[j], v[j-1] = v[j-1], v[j]
		}
	}
}

func TestSubtract(t *testing.T) {
	got := subtract(0, 100, []span{{10, 20}, {15, 30}, {50, 60}, {90, 200}})
	want := []span{{0, 10}, {30, 50}, {60, 90}}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
	if s := subtract(0, 10, nil); len(s) != 1 || s[0] != (span{0, 10}) {
		t.Errorf("no cut: %v", s)
	}
}

// TestReadviseRefusesLostTHPAdvice: THP advice can only give way to the
// other THP advice; a kept mapping that lost it is refused by name.
func TestReadviseRefusesLostTHPAdvice(t *testing.T) {
	o := &imagepb.VMA{Start: 0x10000, End: 0x20000, Madvise: []uint32{sys.MADV_HUGEPAGE}}
	v := &imagepb.VMA{Start: 0x18000, End: 0x30000}
	err := (&restorer{}).readvise(o, v)
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "0x18000-0x20000") || !strings.Contains(err.Error(), "huge page") {
		t.Fatalf("readvise: %v, want an unsupported error naming 0x18000-0x20000", err)
	}
}
