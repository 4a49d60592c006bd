package workload

import (
	"context"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fields returns the key=value words of a line.
func fields(line string) map[string]string {
	m := map[string]string{}
	for _, f := range strings.Fields(line) {
		if k, v, ok := strings.Cut(f, "="); ok {
			m[k] = v
		}
	}
	return m
}

// TestRunServesNetwork runs the workload with its servers, talks to them,
// and checks READY, BEAT and the shutdown on ctx.
func TestRunServesNetwork(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	log := &lineLog{}
	status := make(chan int, 1)
	go func() {
		status <- RunContext(ctx, Config{MemBytes: 1 << 20, Heartbeat: 10 * time.Millisecond,
			Listen: "127.0.0.1:0", UDP: "127.0.0.1:0"}, log)
	}()
	ready := fields(log.wait(t, "READY "))
	conn, err := net.Dial("tcp", ready["tcp"])
	if err != nil {
		t.Fatal(err)
	}
	tc, err := NewTCPClient(conn, TCPClientConfig{ID: 1})
	if err != nil {
		t.Fatal(err)
	}
	uaddr, err := net.ResolveUDPAddr("udp", ready["udp"])
	if err != nil {
		t.Fatal(err)
	}
	uconn, err := net.DialUDP("udp", nil, uaddr)
	if err != nil {
		t.Fatal(err)
	}
	uc, err := NewUDPClient(uconn, 0)
	if err != nil {
		t.Fatal(err)
	}
	// A second connection stays open: the workload closes it when it ends.
	conn2, err := net.Dial("tcp", ready["tcp"])
	if err != nil {
		t.Fatal(err)
	}
	open, err := NewTCPClient(conn2, TCPClientConfig{ID: 2, Mode: ModeBulk})
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close(context.Background())
	time.Sleep(300 * time.Millisecond)
	if _, err := tc.Close(closeCtx(t)); err != nil {
		t.Error(err)
	}
	ust, err := uc.Close(closeCtx(t))
	if err != nil || ust.Lost != 0 {
		t.Errorf("udp: %+v, %v", ust, err)
	}
	if done := log.wait(t, "TCPDONE conn=1 "); !strings.HasSuffix(done, "ok=true") {
		t.Error(done)
	}

	// A beat after both closes shows one connection and the answers.
	deadline := time.Now().Add(5 * time.Second)
	for {
		beats := log.grep("BEAT ")
		last := beats[len(beats)-1]
		b, ok := ParseBeat(last)
		f := fields(last)
		udp, _ := strconv.ParseInt(f["udp"], 10, 64)
		if ok && f["tcp_conns"] == "1" && udp == ust.Answered {
			if f["tcp_errors"] != "0" || f["udp_errors"] != "0" || b.Seq < 1 {
				t.Errorf("beat %q", last)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no beat with 1 connection and %d datagrams; last %q", ust.Answered, last)
		}
		time.Sleep(10 * time.Millisecond)
	}

	cancel()
	select {
	case st := <-status:
		if st != 0 {
			t.Errorf("exit status %d", st)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return when its context ended")
	}
	log.wait(t, "EXIT ")
	if _, err := open.Close(closeCtx(t)); err == nil {
		t.Error("a connection open when the workload ended closed in order")
	}
	if errs := log.grep("TCPERR"); len(errs) > 0 {
		t.Errorf("server errors:\n%s", strings.Join(errs, "\n"))
	}
}

func TestRunSetupFails(t *testing.T) {
	t.Parallel()
	ln := listen(t, "127.0.0.1")
	defer ln.Close()
	for _, cfg := range []Config{{Listen: "256.0.0.1:1"}, {Listen: ln.Addr().String()},
		{Listen: "127.0.0.1:0", UDP: "127.0.0.1:x"}} {
		log := &lineLog{}
		if st := RunContext(context.Background(), cfg, log); st != 1 || len(log.grep("SETUP FAIL ")) != 1 {
			t.Errorf("%+v: status %d, lines:\n%s", cfg, st, log)
		}
	}
}
