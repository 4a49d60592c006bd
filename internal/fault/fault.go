package fault

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/phaul/phaul/internal/sys"
)

// Env is the environment variable that arms fault points.
const Env = "PHAUL_FAULT"

// The points outside the gRPC interceptors.
const (
	// SourceBatch is a page batch on the source, after its checksum: a
	// data point (corrupt flips a byte the checksum covers).
	SourceBatch = "source.batch"
	// TargetBatch is a page batch on the target, before it is applied.
	TargetBatch = "target.batch"
	// TargetRestore is the target's restore, before the shadows take
	// their final state (in Freeze with restore set, or Restore).
	TargetRestore = "target.restore"
	// TargetReady is the target's restore done, the shadows ready,
	// before it answers.
	TargetReady = "target.ready"
)

// methods are the Control service's methods: the interceptor points.
var methods = []string{"Hello", "StartMigration", "BeginRound", "RoundDone", "Freeze", "Restore", "Commit", "Confirm", "Abort"}

// Points returns the name of every fault point.
func Points() []string {
	out := []string{SourceBatch, TargetBatch, TargetRestore, TargetReady}
	for _, m := range methods {
		out = append(out, "source."+m, "source."+m+".answered", "target."+m, "target."+m+".handled")
	}
	return out
}

// ErrInjected is matched (errors.Is) by every error an armed point returns.
var ErrInjected = errors.New("injected fault")

// Error is the error of an "error" action.
type Error struct {
	Point string
	// Errno is the error the step fails with (0: none).
	Errno syscall.Errno
}

func (e *Error) Error() string {
	if e.Errno != 0 {
		return fmt.Sprintf("%v (fault injected at %s)", e.Errno, e.Point)
	}
	return "fault injected at " + e.Point
}

// Unwrap makes the error match ErrInjected and its errno.
func (e *Error) Unwrap() []error {
	if e.Errno != 0 {
		return []error{ErrInjected, e.Errno}
	}
	return []error{ErrInjected}
}

// rule is one armed fault.
type rule struct {
	spec   string // as written, for the announcement
	nth    uint64 // fire at this hit only; 0: at every hit
	action string
	dur    time.Duration
	errno  syscall.Errno
}

// point is the rules of one point and its hit counter.
type point struct {
	hits  atomic.Uint64
	rules []*rule
}

// armed is nil unless PHAUL_FAULT is set; read-only after init.
var armed map[string]*point

// stalled is what a "stall" waits for: nil, which blocks for ever (a test
// of this package sets a channel it closes).
var stalled chan struct{}

func init() {
	spec := os.Getenv(Env)
	if spec == "" {
		return
	}
	a, err := parse(spec)
	if err != nil {
		fmt.Fprintf(os.Stderr, "phaul: %s: %v\n", Env, err)
		os.Exit(2)
	}
	armed = a
}

var errnos = map[string]syscall.Errno{"enomem": syscall.ENOMEM, "enospc": syscall.ENOSPC, "eio": syscall.EIO}

// parse reads a PHAUL_FAULT value.
func parse(spec string) (map[string]*point, error) {
	known := Points()
	out := map[string]*point{}
	for _, item := range strings.Split(spec, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		name, act, ok := strings.Cut(item, "=")
		if !ok {
			return nil, fmt.Errorf("%q: want POINT[@N]=ACTION", item)
		}
		r := &rule{spec: item}
		if n, count, ok := strings.Cut(name, "@"); ok {
			v, err := strconv.ParseUint(count, 10, 64)
			if err != nil || v == 0 {
				return nil, fmt.Errorf("%q: hit number %q is not a positive integer", item, count)
			}
			name, r.nth = n, v
		}
		if !slices.Contains(known, name) {
			return nil, fmt.Errorf("%q: unknown point %q (known: %s)", item, name, strings.Join(known, " "))
		}
		action, arg, hasArg := strings.Cut(act, ":")
		r.action = action
		switch action {
		case "exit", "cut", "hang", "stall":
			if hasArg {
				return nil, fmt.Errorf("%q: %s takes no argument", item, action)
			}
		case "corrupt":
			if hasArg || name != SourceBatch {
				return nil, fmt.Errorf("%q: corrupt takes no argument and applies to data points (%s) only", item, SourceBatch)
			}
		case "error":
			if hasArg {
				e, ok := errnos[arg]
				if !ok {
					return nil, fmt.Errorf("%q: unknown error %q (want enomem, enospc or eio)", item, arg)
				}
				r.errno = e
			}
		case "sleep":
			d, err := time.ParseDuration(arg)
			if err != nil || d <= 0 {
				return nil, fmt.Errorf("%q: sleep needs a positive duration", item)
			}
			r.dur = d
		default:
			return nil, fmt.Errorf("%q: unknown action %q (want exit, error, cut, sleep, hang, stall or corrupt)", item, action)
		}
		p := out[name]
		if p == nil {
			p = &point{}
			out[name] = p
		}
		p.rules = append(p.rules, r)
	}
	if len(out) == 0 {
		return nil, errors.New("no rule")
	}
	return out, nil
}

// Armed reports whether PHAUL_FAULT armed any point in this process.
func Armed() bool { return armed != nil }

// Point is the fault point name, on a path without a request context. It
// returns the error of an "error" rule that fires, nil otherwise.
func Point(name string) error {
	if armed == nil {
		return nil
	}
	return hit(context.Background(), name, nil)
}

// PointContext is the fault point name on a request's path: "hang" and
// "sleep" end early when ctx is done (returning ctx's error).
func PointContext(ctx context.Context, name string) error {
	if armed == nil {
		return nil
	}
	return hit(ctx, name, nil)
}

// Data is the data point name over b: a "corrupt" rule that fires flips a
// byte of b. Other actions act as at Point.
func Data(name string, b []byte) error {
	if armed == nil {
		return nil
	}
	return hit(context.Background(), name, b)
}

func hit(ctx context.Context, name string, data []byte) error {
	p := armed[name]
	if p == nil {
		return nil
	}
	n := p.hits.Add(1)
	for _, r := range p.rules {
		if r.nth != 0 && r.nth != n {
			continue
		}
		fmt.Fprintf(os.Stderr, "phaul: fault injected: %s (hit %d, pid %d)\n", r.spec, n, os.Getpid())
		switch r.action {
		case "exit":
			_ = sys.Kill(os.Getpid(), sys.SIGKILL)
			select {} // the kill is on its way
		case "error":
			return &Error{Point: name, Errno: r.errno}
		case "cut":
			cutAll()
		case "sleep":
			select {
			case <-time.After(r.dur):
			case <-ctx.Done():
				return ctx.Err()
			}
		case "hang":
			<-ctx.Done()
			return ctx.Err()
		case "stall":
			<-stalled // never closed outside tests
			return ctx.Err()
		case "corrupt":
			if len(data) > 0 {
				data[len(data)/2] ^= 0x5a
			}
		}
	}
	return nil
}

// conns are the connections a "cut" resets.
var conns struct {
	sync.Mutex
	m map[*net.Conn]struct{}
}

// Track registers c (a TCP connection) to be reset by a "cut" rule and
// returns the func that forgets it. Unarmed, it does nothing.
func Track(c net.Conn) (forget func()) {
	if armed == nil {
		return func() {}
	}
	key := &c
	conns.Lock()
	if conns.m == nil {
		conns.m = map[*net.Conn]struct{}{}
	}
	conns.m[key] = struct{}{}
	conns.Unlock()
	return func() {
		conns.Lock()
		delete(conns.m, key)
		conns.Unlock()
	}
}

// cutAll resets every tracked connection: SO_LINGER 0 makes close send a
// RST, which the peer sees at once, as after a crash of the network path.
func cutAll() {
	conns.Lock()
	defer conns.Unlock()
	for key := range conns.m {
		if tc, ok := (*key).(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		_ = (*key).Close()
		delete(conns.m, key)
	}
}
