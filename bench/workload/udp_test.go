package workload

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"strings"
	"testing"
	"time"
)

// listenUDP opens a UDP socket on host's loopback, skipping the test if
// the address family is missing; the test's cleanup closes it.
func listenUDP(t *testing.T, host string) net.PacketConn {
	t.Helper()
	pc, err := net.ListenPacket("udp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Skipf("no %s: %v", host, err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc
}

// startUDPServer serves the UDP echo on host's loopback until the test
// ends.
func startUDPServer(t *testing.T, host string) (*Server, *lineLog, net.Addr) {
	t.Helper()
	pc := listenUDP(t, host)
	log := &lineLog{}
	srv := NewServer(NewLineWriter(log))
	served := make(chan error, 1)
	go func() { served <- srv.ServeUDP(pc) }()
	t.Cleanup(func() {
		pc.Close()
		if err := <-served; err != nil {
			t.Errorf("ServeUDP: %v", err)
		}
	})
	return srv, log, pc.LocalAddr()
}

// dialUDP returns a UDP socket connected to addr; the test's cleanup
// closes it.
func dialUDP(t *testing.T, addr net.Addr) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP("udp", nil, addr.(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestUDPEcho runs a client against the echo with a pause of the server
// in the middle, on IPv4 and IPv6.
func TestUDPEcho(t *testing.T) {
	for _, host := range loopbacks {
		t.Run(host, func(t *testing.T) {
			t.Parallel()
			srv, log, addr := startUDPServer(t, host)
			c, err := NewUDPClient(dialUDP(t, addr), 0)
			if err != nil {
				t.Fatal(err)
			}
			time.Sleep(200 * time.Millisecond)
			srv.Pause(150 * time.Millisecond)
			time.Sleep(350 * time.Millisecond)
			st, err := c.Close(closeCtx(t))
			if err != nil {
				t.Fatal(err)
			}
			if st.Sent < 50 || st.Answered != st.Sent || st.Lost != 0 || st.Refused != 0 {
				t.Errorf("%+v", st)
			}
			if st.MaxGap < 150*time.Millisecond || st.MaxGap >= 350*time.Millisecond {
				t.Errorf("largest gap %v, the server paused 150ms", st.MaxGap)
			}
			if got := srv.Stats(); got.UDP != st.Answered || got.UDPErrors != 0 {
				t.Errorf("server %+v, client answered %d; lines:\n%s", got, st.Answered, log)
			}
		})
	}
}

// TestUDPServerCatchesTampering sends the echo a corrupt datagram.
func TestUDPServerCatchesTampering(t *testing.T) {
	t.Parallel()
	srv, log, addr := startUDPServer(t, "127.0.0.1")
	c := dialUDP(t, addr)
	var gen payloadGen
	d := appendDatagram(nil, &gen, 1, 0)
	d[len(d)-1] ^= 1
	if _, err := c.Write(d); err != nil {
		t.Fatal(err)
	}
	line := log.wait(t, "UDPERR")
	if !strings.Contains(line, "message 0 differs at byte") || srv.Stats().UDPErrors != 1 {
		t.Errorf("%s; %+v", line, srv.Stats())
	}
}

// TestUDPClientCatchesTampering answers a client wrongly in several
// ways.
func TestUDPClientCatchesTampering(t *testing.T) {
	for _, tc := range []struct {
		name   string
		answer func(p []byte) [][]byte
		is     error
		want   string
	}{
		{"corrupt", func(p []byte) [][]byte {
			p[headerLen+9] ^= 1
			return [][]byte{p}
		}, ErrCorrupt, "differs at byte 1"},
		{"twice", func(p []byte) [][]byte { return [][]byte{p, p} }, ErrSequence, "answered twice"},
		{"never sent", func(p []byte) [][]byte {
			var gen payloadGen
			h, _ := parseHeader(p)
			id := binary.BigEndian.Uint64(p[headerLen:])
			return [][]byte{appendDatagram(nil, &gen, id, h.seq+1000)}
		}, ErrSequence, "never sent"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			pc := listenUDP(t, "127.0.0.1")
			go func() {
				buf := make([]byte, 64<<10)
				for {
					n, addr, err := pc.ReadFrom(buf)
					if err != nil {
						return
					}
					for _, a := range tc.answer(append([]byte(nil), buf[:n]...)) {
						pc.WriteTo(a, addr)
					}
				}
			}()
			c, err := NewUDPClient(dialUDP(t, pc.LocalAddr()), 0)
			if err != nil {
				t.Fatal(err)
			}
			time.Sleep(50 * time.Millisecond)
			// Wrong answers do not count: Close waits for the right ones
			// until ctx ends.
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			defer cancel()
			_, err = c.Close(ctx)
			if !errors.Is(err, tc.is) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Close: %v; want %v saying %q", err, tc.is, tc.want)
			}
		})
	}
}

// TestUDPClientCountsLosses checks that datagrams nobody answers are
// counted as lost, not as errors, and that Close waits no longer than
// its context.
func TestUDPClientCountsLosses(t *testing.T) {
	t.Parallel()
	pc := listenUDP(t, "127.0.0.1") // reads nothing
	c, err := NewUDPClient(dialUDP(t, pc.LocalAddr()), 0)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	st, err := c.Close(ctx)
	if err != nil || st.Sent == 0 || st.Lost != st.Sent || st.Answered != 0 {
		t.Errorf("%+v, %v", st, err)
	}
	if d := time.Since(start); d > udpGrace/2 {
		t.Errorf("Close took %v", d)
	}
}
