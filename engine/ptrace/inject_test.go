package ptrace_test

import (
	"errors"
	"os"
	"testing"
	"time"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/engine/stub"
	"github.com/phaul/phaul/internal/sys"
)

// startStub starts a stub and arranges for it to be killed and reaped.
func startStub(t *testing.T, tr *ptrace.Tracer) *stub.Process {
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

func vdsoGadget(t *testing.T, pid int) uint64 {
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
