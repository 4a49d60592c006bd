package ptrace

import (
	"errors"
	"runtime"
	"sync"
)

// ErrTracerClosed is returned by Do after Close.
var ErrTracerClosed = errors.New("ptrace: tracer closed")

// init wires the main goroutine to the main thread for the program's whole
// life, so that no other goroutine, a Tracer's included, ever runs there.
// A Tracer relies on its thread exiting when it closes (the kernel then
// detaches every tracee still attached, even one that never stopped), and
// Go cannot end the main thread: it would park it instead, keeping the
// tracees attached.
func init() { runtime.LockOSThread() }

// Tracer runs functions on one goroutine locked to its OS thread, the only
// thread that may issue ptrace requests for the tracees it attached.
//
// When the Tracer is closed its thread exits, and the kernel detaches every
// tracee still attached to it: a crash of the run loop can therefore never
// leave a tracee stopped forever.
type Tracer struct {
	reqs      chan func()
	closeOnce sync.Once
	done      chan struct{}
}

// NewTracer starts a Tracer.
func NewTracer() *Tracer {
	t := &Tracer{reqs: make(chan func()), done: make(chan struct{})}
	go t.loop()
	return t
}

func (t *Tracer) loop() {
	// Never unlocked: when loop returns, the runtime retires the thread, and
	// with it every ptrace attachment made from it.
	runtime.LockOSThread()
	defer close(t.done)
	for f := range t.reqs {
		f()
	}
}

// Do runs f on the tracer thread and returns its error.
func (t *Tracer) Do(f func() error) (err error) {
	errc := make(chan error, 1)
	select {
	case <-t.done:
		return ErrTracerClosed
	default:
	}
	defer func() {
		if recover() != nil { // send on closed channel: Close raced with Do
			err = ErrTracerClosed
		}
	}()
	t.reqs <- func() {
		defer func() {
			if p := recover(); p != nil {
				errc <- panicError{p}
			}
		}()
		errc <- f()
	}
	return <-errc
}

type panicError struct{ v any }

func (p panicError) Error() string { return "ptrace: panic on tracer thread: " + stringify(p.v) }

func stringify(v any) string {
	switch x := v.(type) {
	case error:
		return x.Error()
	case string:
		return x
	default:
		return "unknown panic"
	}
}

// Close stops the tracer thread. Tracees still attached are detached by the
// kernel when the thread exits.
func (t *Tracer) Close() {
	t.closeOnce.Do(func() { close(t.reqs) })
	<-t.done
}
