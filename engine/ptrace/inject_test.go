package ptrace_test

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/engine/stub"
	"github.com/phaul/phaul/internal/sys"
)

// startStub starts a stub and arranges for it to be killed and reaped.
func startStub(t testing.TB, tr *ptrace.Tracer) *stub.Process {
	t.Helper()
	p, err := stub.Start([3]*os.File{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = sys.Kill(p.Pid, sys.SIGKILL)
		_ = tr.Do(func() error { _, _, err := sys.Wait4(p.Pid, sys.WALL); return err })
	})
	if err := p.WaitPaused(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	return p
}

func vdsoGadget(t testing.TB, pid int) uint64 {
	t.Helper()
	ms, err := proc.ReadMaps(pid)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if m.Path == "[vdso]" {
			g, err := ptrace.FindGadget(pid, m.Start, m.End)
			if err != nil {
				t.Fatal(err)
			}
			return g
		}
	}
	t.Fatal("no [vdso] mapping")
	return 0
}

func TestInjectGetpidAndMmap(t *testing.T) {
	tr := ptrace.NewTracer()
	defer tr.Close()
	p := startStub(t, tr)
	g := vdsoGadget(t, p.Pid)
	err := tr.Do(func() error {
		f, err := ptrace.Freeze(p.Pid)
		if err != nil {
			return err
		}
		in, err := ptrace.NewInjector(p.Pid, g)
		if err != nil {
			return err
		}
		got, err := in.Syscall(sys.SYS_GETPID)
		if err != nil {
			return err
		}
		if int(got) != p.Pid {
			t.Errorf("injected getpid = %d, want %d", got, p.Pid)
		}
		addr, err := in.MapScratch(8192)
		if err != nil {
			return err
		}
		if err := in.WriteMemory(addr, []byte("hello")); err != nil {
			return err
		}
		buf := make([]byte, 5)
		if err := in.ReadMemory(addr, buf); err != nil {
			return err
		}
		if string(buf) != "hello" {
			t.Errorf("read back %q", buf)
		}
		if err := in.UnmapScratch(); err != nil {
			return err
		}
		// An invalid call returns the errno.
		if _, err := in.Syscall(sys.SYS_CLOSE, 12345); !errors.Is(err, sys.Errno(9)) {
			t.Errorf("close(12345) = %v, want EBADF", err)
		}
		if err := in.Close(); err != nil {
			return err
		}
		return f.Resume(g)
	})
	if err != nil {
		t.Fatal(err)
	}
	// Resumed: the stub goes back to pause().
	if err := p.WaitPaused(5 * time.Second); err != nil {
		t.Fatal(err)
	}
}

func TestRestartRegs(t *testing.T) {
	for _, tc := range []struct {
		rax, orig   int64
		same        bool
		wantRax     int64
		wantRipBack bool
	}{
		{-514, 35, false, 35, true},
		{-512, 0, true, 0, true},
		{-516, 230, true, 219, true},
		{-516, 230, false, -4, false},
		{-4, 35, false, -4, false},
		{5, -1, false, 5, false},
	} {
		r := sys.Regs{Rax: uint64(tc.rax), Orig_rax: uint64(tc.orig), Rip: 0x1000}
		got := ptrace.RestartRegs(r, tc.same)
		if int64(got.Rax) != tc.wantRax {
			t.Errorf("rax %d orig %d same %v: rax = %d, want %d", tc.rax, tc.orig, tc.same, int64(got.Rax), tc.wantRax)
		}
		if back := got.Rip == 0x1000-2; back != tc.wantRipBack {
			t.Errorf("rax %d orig %d: rip = %#x", tc.rax, tc.orig, got.Rip)
		}
	}
}

// TestFreezeTimesOutOnUninterruptibleThread freezes a process one of whose
// threads sits in uninterruptible sleep (vfork: the parent waits in D state
// until the child execs or exits). Freeze must fail with ErrStopTimeout
// naming the state, and leave the process running.
func TestFreezeTimesOutOnUninterruptibleThread(t *testing.T) {
	if _, err := exec.LookPath("gcc"); err != nil {
		t.Skip("gcc not installed")
	}
	dir := t.TempDir()
	src := dir + "/vfork.c"
	prog := "#include <unistd.h>\nint main(void){ if (vfork()==0) { sleep(30); _exit(0); } return 0; }\n"
	if err := os.WriteFile(src, []byte(prog), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("gcc", "-o", dir+"/vfork", src).CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v: %s", err, out)
	}
	cmd := exec.Command(dir + "/vfork")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		// The vfork child too: it is in the same process group.
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	}()
	pid := cmd.Process.Pid
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if strings.Contains(string(st), ") D ") {
			break
		}
		if time.Now().After(deadline) {
			t.Skipf("could not get a thread into D state: %s", st)
		}
		time.Sleep(10 * time.Millisecond)
	}
	old := ptrace.StopTimeout
	ptrace.StopTimeout = 300 * time.Millisecond
	defer func() { ptrace.StopTimeout = old }()
	tr := ptrace.NewTracer()
	defer tr.Close()
	err := tr.Do(func() error {
		f, err := ptrace.Freeze(pid)
		if err == nil {
			_ = f.Resume(0)
		}
		return err
	})
	if !errors.Is(err, ptrace.ErrStopTimeout) || !strings.Contains(err.Error(), "state D") {
		t.Fatalf("Freeze = %v, want ErrStopTimeout naming state D", err)
	}
	// Closing the tracer lets go of the thread that never stopped.
	tr.Close()
	var st []byte
	for i := 0; i < 500; i++ {
		st, _ = os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
		if strings.Contains(string(st), "TracerPid:\t0") {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("process left traced after the tracer closed:\n%s", st)
}

// BenchmarkInjectSyscall measures one system call injected into a stopped
// process: the unit cost of every restore step.
func BenchmarkInjectSyscall(b *testing.B) {
	tr := ptrace.NewTracer()
	defer tr.Close()
	p := startStub(b, tr)
	g := vdsoGadget(b, p.Pid)
	err := tr.Do(func() error {
		f, err := ptrace.Freeze(p.Pid)
		if err != nil {
			return err
		}
		in, err := ptrace.NewInjector(p.Pid, g)
		if err != nil {
			return err
		}
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if _, err := in.Syscall(sys.SYS_GETPID); err != nil {
				return err
			}
		}
		b.StopTimer()
		if err := in.Close(); err != nil {
			return err
		}
		return f.Resume(g)
	})
	if err != nil {
		b.Fatal(err)
	}
}

// TestBatch runs several calls with one stop: results come back in order,
// the first failing call stops the batch and is named, and the thread's
// registers and SIGTRAP disposition are as before.
func TestBatch(t *testing.T) {
	tr := ptrace.NewTracer()
	defer tr.Close()
	p := startStub(t, tr)
	g := vdsoGadget(t, p.Pid)
	err := tr.Do(func() error {
		f, err := ptrace.Freeze(p.Pid)
		if err != nil {
			return err
		}
		var before sys.Regs
		if err := sys.PtraceGetRegs(p.Pid, &before); err != nil {
			return err
		}
		in, err := ptrace.NewInjector(p.Pid, g)
		if err != nil {
			return err
		}
		area, err := in.MapScratch(8192) // executable
		if err != nil {
			return err
		}
		in.UseBatchArea(area, 8192)
		// An ignored SIGTRAP, which the trap ending a batch resets.
		ign := make([]byte, 32)
		ign[0] = 1 // SIG_IGN
		if err := in.WriteMemory(area+4096, ign); err != nil {
			return err
		}
		if _, err := in.Syscall(sys.SYS_RT_SIGACTION, uint64(sys.SIGTRAP), area+4096, 0, 8); err != nil {
			return err
		}
		// More calls than one table holds: the batch goes in chunks.
		calls := make([]ptrace.Call, 300)
		for i := range calls {
			calls[i] = ptrace.Call{Nr: sys.SYS_GETPID}
		}
		calls[7] = ptrace.Call{Nr: sys.SYS_GETPPID}
		res, err := in.Batch(calls)
		if err != nil {
			return err
		}
		if len(res) != len(calls) || int(res[0]) != p.Pid || int(res[299]) != p.Pid || int(res[7]) != os.Getpid() {
			t.Errorf("batch results: %d of them, [0]=%d [7]=%d [299]=%d; want pid %d, ppid %d",
				len(res), res[0], res[7], res[299], p.Pid, os.Getpid())
		}
		// A failing call ends the batch; the calls after it do not run.
		res, err = in.Batch([]ptrace.Call{
			{Nr: sys.SYS_GETPID},
			{Nr: sys.SYS_CLOSE, Args: [6]uint64{12345}},
			{Nr: sys.SYS_MUNMAP, Args: [6]uint64{area, 8192}},
		})
		if !errors.Is(err, sys.Errno(9)) || !strings.Contains(err.Error(), "call 1 ") || len(res) != 1 {
			t.Errorf("batch with a failing call: %v (results %v), want EBADF at call 1", err, res)
		}
		if err := in.UnmapScratch(); err != nil {
			return err
		}
		if err := in.Close(); err != nil {
			return err
		}
		var after sys.Regs
		if err := sys.PtraceGetRegs(p.Pid, &after); err != nil {
			return err
		}
		// Close applies the restart of the interrupted pause().
		before = ptrace.RestartRegs(before, true)
		if after.Rip != before.Rip || after.Rsp != before.Rsp || after.Rbx != before.Rbx || after.R12 != before.R12 {
			t.Errorf("registers after the batch: rip %#x rsp %#x rbx %#x r12 %#x, before %#x %#x %#x %#x",
				after.Rip, after.Rsp, after.Rbx, after.R12, before.Rip, before.Rsp, before.Rbx, before.R12)
		}
		return f.Resume(g)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitPaused(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	// The trap that ends a batch is never delivered, and SIGTRAP is still
	// ignored.
	st, err := proc.ReadStatus(p.Pid, p.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if st.SigCgt&(1<<(sys.SIGTRAP-1)) != 0 || st.SigIgn&(1<<(sys.SIGTRAP-1)) == 0 {
		t.Errorf("SIGTRAP disposition changed: caught %#x ignored %#x", st.SigCgt, st.SigIgn)
	}
}

// BenchmarkInjectBatch measures system calls injected as a Batch, per call.
func BenchmarkInjectBatch(b *testing.B) {
	tr := ptrace.NewTracer()
	defer tr.Close()
	p := startStub(b, tr)
	g := vdsoGadget(b, p.Pid)
	err := tr.Do(func() error {
		f, err := ptrace.Freeze(p.Pid)
		if err != nil {
			return err
		}
		in, err := ptrace.NewInjector(p.Pid, g)
		if err != nil {
			return err
		}
		area, err := in.MapScratch(8192) // executable
		if err != nil {
			return err
		}
		in.UseBatchArea(area, 8192)
		calls := make([]ptrace.Call, 64)
		for i := range calls {
			calls[i] = ptrace.Call{Nr: sys.SYS_GETPID}
		}
		b.ResetTimer()
		for i := 0; i < b.N; i += len(calls) {
			if _, err := in.Batch(calls); err != nil {
				return err
			}
		}
		b.StopTimer()
		if err := in.Close(); err != nil {
			return err
		}
		return f.Resume(g)
	})
	if err != nil {
		b.Fatal(err)
	}
}

// TestBatches runs batches in two processes at once: each gets its own
// results, a failing call in one is reported without hiding the other's
// results, and both can be injected into again afterwards.
func TestBatches(t *testing.T) {
	tr := ptrace.NewTracer()
	defer tr.Close()
	ps := []*stub.Process{startStub(t, tr), startStub(t, tr)}
	gadgets := []uint64{vdsoGadget(t, ps[0].Pid), vdsoGadget(t, ps[1].Pid)}
	err := tr.Do(func() error {
		var ins []*ptrace.Injector
		for i, p := range ps {
			f, err := ptrace.Freeze(p.Pid)
			if err != nil {
				return err
			}
			defer f.Resume(gadgets[i])
			in, err := ptrace.NewInjector(p.Pid, gadgets[i])
			if err != nil {
				return err
			}
			defer in.Close()
			area, err := in.MapScratch(4096)
			if err != nil {
				return err
			}
			in.UseBatchArea(area, 4096)
			ins = append(ins, in)
		}
		res, err := ptrace.Batches(ins, [][]ptrace.Call{
			{{Nr: sys.SYS_GETPID}, {Nr: sys.SYS_GETPPID}},
			{{Nr: sys.SYS_GETPID}},
		})
		if err != nil {
			return err
		}
		if len(res) != 2 || len(res[0]) != 2 || int(res[0][0]) != ps[0].Pid || int(res[0][1]) != os.Getpid() ||
			len(res[1]) != 1 || int(res[1][0]) != ps[1].Pid {
			t.Errorf("results %v, want [[%d %d] [%d]]", res, ps[0].Pid, os.Getpid(), ps[1].Pid)
		}
		res, err = ptrace.Batches(ins, [][]ptrace.Call{
			{{Nr: sys.SYS_GETPID}, {Nr: sys.SYS_CLOSE, Args: [6]uint64{12345}}},
			{{Nr: sys.SYS_GETPID}},
		})
		if !errors.Is(err, sys.Errno(9)) || len(res[0]) != 1 || len(res[1]) != 1 || int(res[1][0]) != ps[1].Pid {
			t.Errorf("a failing call in the first: %v, results %v; want EBADF, and the second's pid %d", err, res, ps[1].Pid)
		}
		// A table too large for its area is refused; the batches already
		// set going are finished.
		if _, err := ptrace.Batches(ins, [][]ptrace.Call{{{Nr: sys.SYS_GETPID}}, make([]ptrace.Call, 100)}); err == nil {
			t.Error("a batch larger than its area was accepted")
		}
		for i, in := range ins {
			if got, err := in.Syscall(sys.SYS_GETPID); err != nil || int(got) != ps[i].Pid {
				t.Errorf("process %d after the batches: getpid %d, %v", ps[i].Pid, got, err)
			}
			if err := in.UnmapScratch(); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
