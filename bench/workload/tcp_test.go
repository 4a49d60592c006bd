package workload

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/sys"
)

// TestTCPModes runs several clients in each mode for a second, on IPv4
// and IPv6, and checks that the orderly close finds every message.
func TestTCPModes(t *testing.T) {
	for _, host := range loopbacks {
		t.Run(host, func(t *testing.T) {
			t.Parallel()
			ts := startServer(t, host)
			var clients []*TCPClient
			var cfgs []TCPClientConfig
			for i := range 9 {
				cfg := TCPClientConfig{ID: uint64(100 + i), Mode: Mode(i % 3)}
				cfgs = append(cfgs, cfg)
				clients = append(clients, ts.client(t, cfg))
			}
			time.Sleep(time.Second)
			var wg sync.WaitGroup
			stats := make([]TCPStats, len(clients))
			errs := make([]error, len(clients))
			for i, c := range clients {
				wg.Go(func() { stats[i], errs[i] = c.Close(closeCtx(t)) })
			}
			wg.Wait()
			for i, st := range stats {
				cfg := cfgs[i]
				if errs[i] != nil {
					t.Errorf("client %d (%v): %v", cfg.ID, cfg.Mode, errs[i])
					continue
				}
				if st.Sent < 50 || st.Received < 10 {
					t.Errorf("client %d (%v): sent %d, received %d messages in a second", cfg.ID, cfg.Mode, st.Sent, st.Received)
				}
				if cfg.Mode == ModeBulk && st.BytesReceived < 1<<20 {
					t.Errorf("bulk client %d received only %d bytes", cfg.ID, st.BytesReceived)
				}
				want := fmt.Sprintf("TCPDONE conn=%d received=%d sent=%d ok=true", cfg.ID, st.Sent, st.Received)
				if got := ts.log.wait(t, fmt.Sprintf("TCPDONE conn=%d ", cfg.ID)); got != want {
					t.Errorf("server: %q, want %q", got, want)
				}
				t.Logf("client %d %-11v sent %4d received %5d (%8d bytes) maxgap %v", cfg.ID, cfg.Mode, st.Sent, st.Received, st.BytesReceived, st.MaxGap)
			}
			if errs := ts.log.grep("TCPERR"); len(errs) > 0 || ts.Stats().TCPErrors != 0 {
				t.Errorf("server errors:\n%s", strings.Join(errs, "\n"))
			}
		})
	}
}

// queueLen returns the bytes in a socket's receive (SIOCINQ) or send
// (SIOCOUTQ) queue.
func queueLen(t *testing.T, c net.Conn, req uint) int {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var qerr error
	if err := rc.Control(func(fd uintptr) { n, qerr = sys.IoctlSocketInt(int(fd), req) }); err != nil {
		t.Fatal(err)
	}
	if qerr != nil {
		t.Fatal(qerr)
	}
	return n
}

// TestTCPQueues checks that the modes do what they are for: a bulk
// connection keeps the server's send queue full, a lazy-server one leaves
// the client's data in the server's receive queue.
func TestTCPQueues(t *testing.T) {
	for _, tc := range []struct {
		mode Mode
		req  uint
		want int
	}{
		{ModeBulk, sys.SIOCOUTQ, 1 << 20},
		{ModeLazyServer, sys.SIOCINQ, 1},
	} {
		t.Run(tc.mode.String(), func(t *testing.T) {
			t.Parallel()
			ts := startServer(t, "127.0.0.1")
			c := ts.client(t, TCPClientConfig{ID: 1, Mode: tc.mode})
			srvConn := <-ts.conns
			largest, deadline := 0, time.Now().Add(2*time.Second)
			for largest < tc.want && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
				largest = max(largest, queueLen(t, srvConn, tc.req))
			}
			if largest < tc.want {
				t.Errorf("largest queue seen %d bytes, want at least %d", largest, tc.want)
			}
			t.Logf("largest queue %d bytes", largest)
			if _, err := c.Close(closeCtx(t)); err != nil {
				t.Error(err)
			}
		})
	}
}

// TestTCPStallIsMeasured pauses the server's sends and checks that the
// client reports the pause as its largest gap, at the right time.
func TestTCPStallIsMeasured(t *testing.T) {
	t.Parallel()
	ts := startServer(t, "127.0.0.1")
	c := ts.client(t, TCPClientConfig{ID: 5})
	time.Sleep(200 * time.Millisecond)
	pausedAt := time.Now()
	ts.Pause(200 * time.Millisecond)
	time.Sleep(400 * time.Millisecond)
	st, err := c.Close(closeCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if st.MaxGap < 200*time.Millisecond || st.MaxGap >= 400*time.Millisecond {
		t.Errorf("largest gap %v, the server paused 200ms", st.MaxGap)
	}
	// A message sent just before the pause may arrive just after it began.
	if st.GapEnd.Sub(st.GapStart) != st.MaxGap || st.GapStart.After(pausedAt.Add(DefaultInterval)) ||
		st.GapEnd.Before(pausedAt.Add(200*time.Millisecond)) {
		t.Errorf("gap from %v to %v, the pause from %v to %v", st.GapStart, st.GapEnd, pausedAt, pausedAt.Add(200*time.Millisecond))
	}
}

// rawClient speaks the protocol by hand, to send what TCPClient never
// would.
type rawClient struct {
	t   *testing.T
	c   net.Conn
	id  uint64
	gen payloadGen
}

func newRawClient(t *testing.T, ts *testServer, id uint64) *rawClient {
	r := &rawClient{t: t, c: ts.dial(t), id: id}
	r.write(hello{id: id, mode: ModeNormal}.frame())
	return r
}

func (r *rawClient) write(b []byte) {
	r.t.Helper()
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatal(err)
	}
}

// data returns data message seq as the client sends it.
func (r *rawClient) data(seq uint64) []byte {
	return appendFrame(nil, frameData, seq, r.gen.make(payloadLen(ModeNormal, r.id, dirUp, seq), r.id, dirUp, seq))
}

// bye sends a bye saying sent messages were sent and returns the
// server's answer.
func (r *rawClient) bye(sent uint64) (received, serverSent uint64) {
	r.t.Helper()
	r.write(appendFrame(nil, frameBye, sent, nil))
	fr := &frameReader{r: bufio.NewReader(r.c)}
	for {
		h, p, err := fr.next()
		if err != nil {
			r.t.Fatalf("waiting for the bye answer: %v", err)
		}
		if h.typ == frameByeAck {
			return binary.BigEndian.Uint64(p), binary.BigEndian.Uint64(p[8:])
		}
	}
}

// TestServerCatchesTampering sends the server broken streams and checks
// that it reports each.
func TestServerCatchesTampering(t *testing.T) {
	t.Parallel()
	ts := startServer(t, "127.0.0.1")
	for i, tc := range []struct {
		name   string
		frames func(r *rawClient) ([]byte, uint64) // what to send, and the count the bye gives
		want   []string                            // in TCPERR lines of the connection
		ack    uint64                              // the bye answer's count received
	}{
		{"gap", func(r *rawClient) ([]byte, uint64) {
			return append(append(r.data(0), r.data(1)...), r.data(3)...), 4
		}, []string{"got message 3, expected 2 (1 missing)", "client sent 4 messages, server received 3"}, 3},
		{"duplicate", func(r *rawClient) ([]byte, uint64) {
			return append(append(r.data(0), r.data(1)...), r.data(1)...), 2
		}, []string{"got message 1 again or out of order, expected 2", "client sent 2 messages, server received 3"}, 3},
		{"corrupt", func(r *rawClient) ([]byte, uint64) {
			b := append(r.data(0), r.data(1)...)
			b[len(b)-3] ^= 0x40
			return b, 2
		}, []string{"message 1 differs at byte"}, 2},
		{"wrong length", func(r *rawClient) ([]byte, uint64) {
			b := r.data(0)
			return appendFrame(nil, frameData, 0, append(b[headerLen:], 0)), 1
		}, []string{"message 0 has"}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := uint64(1000 + i)
			r := newRawClient(t, ts, id)
			b, n := tc.frames(r)
			r.write(b)
			if got, _ := r.bye(n); got != tc.ack {
				t.Errorf("bye answer: server received %d, want %d", got, tc.ack)
			}
			done := ts.log.wait(t, fmt.Sprintf("TCPDONE conn=%d ", id))
			if !strings.HasSuffix(done, "ok=false") {
				t.Errorf("server: %s", done)
			}
			errs := strings.Join(ts.log.grep(fmt.Sprintf("TCPERR conn=%d ", id)), "\n")
			for _, w := range tc.want {
				if !strings.Contains(errs, w) {
					t.Errorf("no TCPERR saying %q; got:\n%s", w, errs)
				}
			}
		})
	}
	t.Run("garbage", func(t *testing.T) {
		r := newRawClient(t, ts, 2000)
		r.write(append(r.data(0), "GET / HTTP/1.0\r\n\r\n"...))
		ts.log.wait(t, "TCPERR conn=2000 read after 1 messages: corrupt data: bad frame header")
	})
	t.Run("early close", func(t *testing.T) {
		r := newRawClient(t, ts, 2001)
		r.write(r.data(0))
		r.c.Close()
		ts.log.wait(t, "TCPERR conn=2001 client closed the connection before bye, after 1 messages")
	})
	t.Run("bad hello", func(t *testing.T) {
		c := ts.dial(t)
		c.Write(appendFrame(nil, frameData, 0, make([]byte, 16)))
		ts.log.wait(t, "TCPERR conn=- peer=")
	})
	if n := ts.Stats().TCPErrors; n != 9 {
		t.Errorf("server counted %d errors, want 9", n)
	}
}

// fakeServer accepts one connection on a loopback address, reads the
// hello and hands the connection to serve. It returns the address.
func fakeServer(t *testing.T, serve func(c net.Conn, fr *frameReader, hl hello)) string {
	ln := listen(t, "127.0.0.1")
	done := make(chan struct{})
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		fr := &frameReader{r: bufio.NewReader(c)}
		h, p, err := fr.next()
		if err != nil {
			return
		}
		hl, err := parseHello(h, p)
		if err != nil {
			return
		}
		serve(c, fr, hl)
	}()
	return ln.Addr().String()
}

// answerBye reads the client's messages up to its bye and answers it
// with the counts given, or the true ones when negative.
func answerBye(c net.Conn, fr *frameReader, received, sent int64) {
	var n uint64
	for {
		h, _, err := fr.next()
		if err != nil {
			return
		}
		if h.typ == frameBye {
			break
		}
		n++
	}
	if received < 0 {
		received = int64(n)
	}
	c.Write(byeAckFrame(uint64(received), uint64(sent)))
}

// TestClientCatchesTampering serves clients broken streams and checks
// that each is reported with the right error.
func TestClientCatchesTampering(t *testing.T) {
	t.Parallel()
	var gen payloadGen
	data := func(hl hello, seq uint64) []byte {
		return appendFrame(nil, frameData, seq, gen.make(payloadLen(hl.mode, hl.id, dirDown, seq), hl.id, dirDown, seq))
	}
	for _, tc := range []struct {
		name  string
		serve func(c net.Conn, fr *frameReader, hl hello)
		is    []error
		want  string
	}{
		{"gap", func(c net.Conn, fr *frameReader, hl hello) {
			c.Write(append(data(hl, 0), data(hl, 2)...))
			answerBye(c, fr, -1, 2)
		}, []error{ErrSequence}, "got message 2, expected 1 (1 missing)"},
		{"duplicate", func(c net.Conn, fr *frameReader, hl hello) {
			c.Write(append(data(hl, 0), data(hl, 0)...))
			answerBye(c, fr, -1, 2)
		}, []error{ErrSequence}, "got message 0 again or out of order, expected 1"},
		{"corrupt", func(c net.Conn, fr *frameReader, hl hello) {
			b := append(data(hl, 0), data(hl, 1)...)
			b[len(b)-1] ^= 1
			c.Write(b)
			answerBye(c, fr, -1, 2)
		}, []error{ErrCorrupt}, "message 1 differs at byte"},
		{"lost", func(c net.Conn, fr *frameReader, hl hello) {
			c.Write(data(hl, 0))
			answerBye(c, fr, -1, 2)
		}, []error{ErrCount}, "server sent 2 messages, client received 1"},
		{"lost upstream", func(c net.Conn, fr *frameReader, hl hello) {
			answerBye(c, fr, 0, 0)
		}, []error{ErrCount}, "server received 0 messages, client sent"},
		{"reset", func(c net.Conn, fr *frameReader, hl hello) {
			c.Write(data(hl, 0))
			time.Sleep(50 * time.Millisecond)
			c.(*net.TCPConn).SetLinger(0)
		}, []error{ErrClosed, syscall.ECONNRESET}, "connection reset by peer"},
		{"eof", func(c net.Conn, fr *frameReader, hl hello) {
			c.Write(data(hl, 0))
		}, []error{ErrClosed}, "server closed the connection after 1 messages, without a bye answer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			addr := fakeServer(t, tc.serve)
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			c, err := NewTCPClient(conn, TCPClientConfig{ID: 9})
			if err != nil {
				t.Fatal(err)
			}
			time.Sleep(100 * time.Millisecond)
			st, err := c.Close(closeCtx(t))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Close: %v; want an error saying %q", err, tc.want)
			}
			for _, target := range tc.is {
				if !errors.Is(err, target) {
					t.Errorf("%v is not %v", err, target)
				}
			}
			if !errors.Is(st.Err, err) {
				t.Errorf("Stats.Err %v, Close returned %v", st.Err, err)
			}
		})
	}
}

// TestClientCloseGivesUp checks that Close returns when ctx ends while
// the server does not answer.
func TestClientCloseGivesUp(t *testing.T) {
	t.Parallel()
	addr := fakeServer(t, func(c net.Conn, fr *frameReader, hl hello) {
		time.Sleep(300 * time.Millisecond)
	})
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewTCPClient(conn, TCPClientConfig{ID: 3})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := c.Close(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Close: %v, want a deadline error", err)
	}
}

func TestProtocolBasics(t *testing.T) {
	var g1, g2 payloadGen
	a := append([]byte(nil), g1.make(100, 1, dirUp, 7)...)
	if err := g2.check(a, 100, 1, dirUp, 7); err != nil {
		t.Error(err)
	}
	for _, other := range []struct {
		id  uint64
		dir byte
		seq uint64
	}{{2, dirUp, 7}, {1, dirDown, 7}, {1, dirUp, 8}} {
		if g2.check(a, 100, other.id, other.dir, other.seq) == nil {
			t.Errorf("payload of (1, up, 7) passes as %+v", other)
		}
	}
	for seq := range uint64(1000) {
		if n := payloadLen(ModeBulk, 1, dirDown, seq); n < 16<<10 || n > 64<<10 {
			t.Fatalf("bulk message of %d bytes", n)
		}
		if n := payloadLen(ModeBulk, 1, dirUp, seq); n < 16 || n > 1024 {
			t.Fatalf("client message of %d bytes", n)
		}
	}
	hl := hello{id: 42, interval: 3 * time.Millisecond, mode: ModeLazyServer}
	fr := &frameReader{r: strings.NewReader(string(hl.frame()))}
	h, p, err := fr.next()
	if err != nil {
		t.Fatal(err)
	}
	if got, err := parseHello(h, p); err != nil || got != hl {
		t.Errorf("hello %+v, %v; want %+v", got, err, hl)
	}
	for _, m := range []Mode{ModeNormal, ModeLazyServer, ModeBulk} {
		if got, err := ParseMode(m.String()); err != nil || got != m {
			t.Errorf("ParseMode(%q) = %v, %v", m.String(), got, err)
		}
	}
}
