package feature

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/phaul/phaul/internal/sys"
)

func TestProbeRunsOnce(t *testing.T) {
	var calls atomic.Int32
	f := newFeature("test-once", "counts its runs", Optional, "yes", "no", func() (string, error) {
		calls.Add(1)
		return "ran", nil
	})
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f.Probe(); err != nil {
				t.Errorf("Probe: %v", err)
			}
			if r := f.Result(); !r.OK || r.Detail != "ran" || r.Name != "test-once" {
				t.Errorf("Result = %+v", r)
			}
		}()
	}
	wg.Wait()
	if n := calls.Load(); n != 1 {
		t.Fatalf("probe body ran %d times, want 1", n)
	}
}

func TestAbsentCachedToo(t *testing.T) {
	var calls atomic.Int32
	f := newFeature("test-absent", "always absent", Optional, "yes", "phaul falls back", func() (string, error) {
		calls.Add(1)
		return "", absent("thing missing", nil)
	})
	e1, e2 := f.Probe(), f.Probe()
	if e1 == nil || e1 != e2 {
		t.Fatalf("errors %v and %v: want the same cached error", e1, e2)
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("probe body ran %d times, want 1", n)
	}
}

func TestNotSupportedError(t *testing.T) {
	errno := os.NewSyscallError("clone3", syscall.ENOSYS)
	f := newFeature("test-errno", "", Required, "", "no restore", func() (string, error) {
		return "", absent("clone3 unavailable", errno)
	})
	err := f.Probe()
	if !errors.Is(err, ErrNotSupported) {
		t.Errorf("%v does not match ErrNotSupported", err)
	}
	if !errors.Is(err, syscall.ENOSYS) {
		t.Errorf("%v does not match ENOSYS", err)
	}
	var nse *NotSupportedError
	if !errors.As(err, &nse) || nse.Feature != "test-errno" || nse.Reason != "clone3 unavailable" {
		t.Errorf("errors.As: %#v", nse)
	}
	want := "test-errno: absent (clone3 unavailable: clone3: function not implemented): no restore"
	if err.Error() != want {
		t.Errorf("message\n got %q\nwant %q", err.Error(), want)
	}
	if r := f.Result(); r.OK || r.Detail != "clone3 unavailable" || r.Err != err {
		t.Errorf("Result = %+v", r)
	}
}

func TestProbeFailureIsNotAbsence(t *testing.T) {
	cause := errors.New("fork failed")
	f := newFeature("test-broken", "", Required, "", "", func() (string, error) { return "", cause })
	err := f.Probe()
	if errors.Is(err, ErrNotSupported) {
		t.Errorf("%v matches ErrNotSupported; a probe that could not run says nothing about the kernel", err)
	}
	if !errors.Is(err, cause) || !strings.Contains(err.Error(), "test-broken: probe failed") {
		t.Errorf("err = %v", err)
	}
}

func TestRegistry(t *testing.T) {
	required := map[string]bool{
		NamePtraceSeize: true, NameProcessVM: true, NameClone3SetTid: true,
		NamePRSetMMMap: true, NameVDSOLayout: true, NamePidfdGetfd: true,
	}
	seen := map[string]bool{}
	for _, f := range Features() {
		if seen[f.Name] {
			t.Errorf("feature %s listed twice", f.Name)
		}
		seen[f.Name] = true
		if f.Description == "" || f.Absent == "" {
			t.Errorf("%s: missing description or consequence", f.Name)
		}
		if (f.Need == Required) != required[f.Name] {
			t.Errorf("%s: need %v", f.Name, f.Need)
		}
		if g, ok := Lookup(f.Name); !ok || g != f {
			t.Errorf("Lookup(%s) = %v, %v", f.Name, g, ok)
		}
	}
	if len(seen) != 15 {
		t.Errorf("%d features, want 15", len(seen))
	}
	if _, ok := Lookup("no-such-thing"); ok {
		t.Error("Lookup found an unknown name")
	}
	if err := Check("no-such-thing"); !errors.Is(err, ErrUnknown) {
		t.Errorf("Check(unknown) = %v", err)
	}
}

// children lists the children of every thread of this process (zombies
// included).
func children(t *testing.T) []string {
	t.Helper()
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, task := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%s/children", task.Name()))
		if err != nil {
			t.Skipf("no /proc/PID/task/TID/children: %v", err)
		}
		out = append(out, strings.Fields(string(b))...)
	}
	return out
}

// The probes that start a child must kill and reap it, whatever they find.
func TestChildProbesReap(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if c := children(t); len(c) != 0 {
		t.Fatalf("children before the probes: %v", c)
	}
	for name, probe := range map[string]func() (string, error){
		NamePtraceSeize: probePtraceSeize,
		NameRseqConfig:  probeRseqConfig,
		NameProcessVM:   probeProcessVM,
		NamePidfdGetfd:  probePidfdGetfd,
	} {
		if _, err := probe(); err != nil {
			t.Errorf("%s: %v", name, err)
		}
		if c := children(t); len(c) != 0 {
			t.Errorf("%s left children %v", name, c)
		}
	}
}

// The fallback of openUserfaultfd: a userfaultfd made through
// /dev/userfaultfd must offer the same WP_ASYNC handshake as the system call.
func TestUserfaultfdThroughDevice(t *testing.T) {
	dev, err := os.OpenFile("/dev/userfaultfd", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("no usable /dev/userfaultfd: %v", err)
	}
	defer dev.Close()
	fd, err := sys.UserfaultfdFromDev(int(dev.Fd()), sys.O_CLOEXEC|sys.O_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close(fd)
	api, err := sys.UffdAPI(fd, wpAsync)
	if UffdWPAsync() == nil && (err != nil || api.Features&wpAsync != wpAsync) {
		t.Fatalf("the system call grants WP_ASYNC, the device gives %#x, %v", api.Features, err)
	}
}
