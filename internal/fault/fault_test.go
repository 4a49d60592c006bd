package fault

import (
	"context"
	"errors"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"
)

// arm arms spec for the test.
func arm(t *testing.T, spec string) {
	t.Helper()
	a, err := parse(spec)
	if err != nil {
		t.Fatal(err)
	}
	old := armed
	armed = a
	t.Cleanup(func() { armed = old })
}

func TestUnarmed(t *testing.T) {
	if Armed() {
		t.Skipf("%s is set in the environment", Env)
	}
	if err := Point("target.Commit"); err != nil {
		t.Fatal(err)
	}
	b := []byte{1, 2, 3}
	if err := Data(SourceBatch, b); err != nil || b[1] != 2 {
		t.Fatal(err, b)
	}
	if len(ServerOptions()) != 0 || len(DialOptions()) != 0 {
		t.Fatal("interceptors installed while unarmed")
	}
	Track(nil)()
	if n := testing.AllocsPerRun(100, func() { _ = Point("target.Commit") }); n != 0 {
		t.Errorf("an unarmed point allocates %v times", n)
	}
}

func TestParse(t *testing.T) {
	for _, bad := range []string{
		"target.Commit", "nowhere=exit", "target.Commit=explode", "target.Commit@0=exit",
		"target.Commit@x=exit", "target.Commit=error:eperm", "target.Commit=sleep", "target.Commit=sleep:-1s",
		"target.Commit=corrupt", "source.batch=corrupt:1", "target.Commit=exit:now", ",", "target.Freeze=stall:1s",
	} {
		if _, err := parse(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	a, err := parse("target.Commit@2=exit, source.batch=corrupt,target.Restore.handled=error:enomem,source.Freeze=sleep:10ms")
	if err != nil {
		t.Fatal(err)
	}
	if len(a) != 4 || a["target.Commit"].rules[0].nth != 2 || a["target.Restore.handled"].rules[0].errno != syscall.ENOMEM {
		t.Errorf("parsed %+v", a)
	}
}

func TestActions(t *testing.T) {
	arm(t, "target.Restore@2=error:enomem,target.Commit=error,source.batch@1=corrupt,source.Freeze=sleep:50ms,source.Commit=hang")
	if err := Point("target.Restore"); err != nil {
		t.Fatalf("first hit: %v", err)
	}
	err := Point("target.Restore")
	if !errors.Is(err, ErrInjected) || !errors.Is(err, syscall.ENOMEM) || !strings.Contains(err.Error(), "cannot allocate memory") {
		t.Fatalf("second hit: %v", err)
	}
	if err := Point("target.Restore"); err != nil {
		t.Fatalf("third hit: %v", err)
	}
	for range 2 {
		if err := Point("target.Commit"); !errors.Is(err, ErrInjected) {
			t.Fatalf("every hit: %v", err)
		}
	}
	b := make([]byte, 8)
	_ = Data(SourceBatch, b)
	if b[4] == 0 {
		t.Error("corrupt did not flip a byte")
	}
	b[4] = 0
	_ = Data(SourceBatch, b)
	if b[4] != 0 {
		t.Error("corrupt@1 fired twice")
	}
	start := time.Now()
	if err := Point("source.Freeze"); err != nil || time.Since(start) < 50*time.Millisecond {
		t.Errorf("sleep: %v after %v", err, time.Since(start))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := PointContext(ctx, "source.Commit"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("hang: %v", err)
	}
}

func TestCut(t *testing.T) {
	arm(t, "target.Commit.handled=cut")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	peer := <-accepted
	defer peer.Close()
	forget := Track(peer)
	defer forget()
	if err := Point("target.Commit.handled"); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("read after the cut: %v, want a reset", err)
	}
}

// TestStall: a stall outlasts its request's cancellation (a hang does
// not).
func TestStall(t *testing.T) {
	release := make(chan struct{})
	stalled = release
	t.Cleanup(func() { stalled = nil })
	arm(t, "target.Freeze=stall,target.Restore=hang")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := PointContext(ctx, "target.Restore"); !errors.Is(err, context.Canceled) {
		t.Errorf("hang with its request cancelled: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- PointContext(ctx, "target.Freeze") }()
	select {
	case err := <-done:
		t.Fatalf("stall ended with its request cancelled: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("stall released: %v", err)
	}
}
