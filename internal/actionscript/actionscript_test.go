package actionscript

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/netsock"
)

func writeScript(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestRunPassesActionAndEnv(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	a := writeScript(t, dir, "a", `echo "a $PHAUL_ACTION $CRTOOLS_SCRIPT_ACTION $PHAUL_SIDE $PHAUL_PID" >> `+out+"\n")
	b := writeScript(t, dir, "b", `echo "b $PHAUL_ACTION" >> `+out+"\n")
	r, err := New([]string{a, b})
	if err != nil {
		t.Fatal(err)
	}
	r = r.With("PHAUL_SIDE=source")
	for _, act := range []Action{NetworkLock, PostDump} {
		if err := r.Run(context.Background(), act, "PHAUL_PID=42"); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	want := "a network-lock network-lock source 42\nb network-lock\na post-dump post-dump source 42\nb post-dump\n"
	if string(got) != want {
		t.Fatalf("scripts saw\n%s\nwant\n%s", got, want)
	}
}

func TestRunStopsAtFailure(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	a := writeScript(t, dir, "fails", "echo starting\necho 'no route to the balancer' >&2\nexit 3\n")
	b := writeScript(t, dir, "after", "touch "+out+"\n")
	r, err := New([]string{a, b})
	if err != nil {
		t.Fatal(err)
	}
	err = r.Run(context.Background(), PreResume)
	if err == nil {
		t.Fatal("a failing script was not reported")
	}
	for _, want := range []string{"fails", "pre-resume", "exit status 3", "no route to the balancer"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %q", err, want)
		}
	}
	if _, err := os.Stat(out); err == nil {
		t.Error("the script after a failing one ran")
	}
}

func TestRunTimeoutKillsGroup(t *testing.T) {
	dir := t.TempDir()
	pidf := filepath.Join(dir, "pid")
	s := writeScript(t, dir, "hangs", "sleep 30 &\necho $! > "+pidf+"\nwait\n")
	r, err := New([]string{s})
	if err != nil {
		t.Fatal(err)
	}
	r.Timeout = 300 * time.Millisecond
	err = r.Run(context.Background(), Rollback)
	if err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("err = %v, want a timeout", err)
	}
	b, rerr := os.ReadFile(pidf)
	if rerr != nil {
		t.Fatal(rerr)
	}
	pid := strings.TrimSpace(string(b))
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := os.ReadFile("/proc/" + pid + "/stat")
		if err != nil || strings.Contains(string(st), ") Z ") {
			break // gone (or a zombie for init to reap)
		}
		if time.Now().After(deadline) {
			t.Fatalf("the script's child %s survived the timeout", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestNewRefusesMissingOrNotExecutable(t *testing.T) {
	dir := t.TempDir()
	if _, err := New([]string{filepath.Join(dir, "nope")}); err == nil {
		t.Error("a missing script was accepted")
	}
	p := filepath.Join(dir, "plain")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := New([]string{p}); err == nil || !strings.Contains(err.Error(), "not an executable") {
		t.Errorf("err = %v, want not executable", err)
	}
	var r *Runner
	if err := r.Run(context.Background(), PostDump); err != nil {
		t.Errorf("a nil Runner: %v", err)
	}
}

func TestSocketEnv(t *testing.T) {
	ap := netip.MustParseAddrPort
	env := SocketEnv([]netsock.Endpoint{
		{Proto: netsock.TCP, TCPState: netsock.Listen, Local: ap("0.0.0.0:7000")},
		{Proto: netsock.TCP, TCPState: netsock.Listen, Local: ap("[::ffff:10.1.2.200]:7001")},
		{Proto: netsock.TCP, TCPState: netsock.Established, Local: ap("10.1.2.200:7000"), Peer: ap("10.1.2.3:40000")},
		{Proto: netsock.UDP, Local: ap("[fd00::1]:53")},
	})
	want := []string{
		"PHAUL_ADDRESSES=10.1.2.200 fd00::1",
		"PHAUL_CONNECTIONS=tcp 10.1.2.200:7000 10.1.2.3:40000",
		"PHAUL_LISTENERS=0.0.0.0:7000 10.1.2.200:7001",
	}
	if !slices.Equal(env, want) {
		t.Fatalf("SocketEnv = %q, want %q", env, want)
	}
}
