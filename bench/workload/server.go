package workload

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// DefaultInterval is the time between two messages of a TCP
	// connection or two UDP datagrams when none is given.
	DefaultInterval = 5 * time.Millisecond
	// lazyPause is how long a lazy-server connection goes unread between
	// two read bursts.
	lazyPause = 300 * time.Millisecond
	// Bounds on the interval a client may ask for.
	minInterval = 100 * time.Microsecond
	maxInterval = time.Minute
)

// Server is the workload's network side: it serves the TCP protocol and
// the UDP echo described in the package comment, writing a line to its
// output for every connection that ends and every violation it sees. Its
// methods may be called from any goroutine.
type Server struct {
	out  *LineWriter
	gate pauseGate

	open      atomic.Int64
	tcpErrors atomic.Int64
	udp       atomic.Int64
	udpErrors atomic.Int64
}

// ServerStats are a Server's counters.
type ServerStats struct {
	// TCPConns is the number of TCP connections being served.
	TCPConns int64
	// TCPErrors counts the TCPERR lines written.
	TCPErrors int64
	// UDP counts the datagrams answered.
	UDP int64
	// UDPErrors counts the UDPERR lines written.
	UDPErrors int64
}

// NewServer returns a server that writes its lines to out.
func NewServer(out *LineWriter) *Server {
	return &Server{out: out}
}

// Stats returns the server's counters.
func (s *Server) Stats() ServerStats {
	return ServerStats{TCPConns: s.open.Load(), TCPErrors: s.tcpErrors.Load(), UDP: s.udp.Load(), UDPErrors: s.udpErrors.Load()}
}

// Pause holds back everything the server sends (TCP messages, bye
// answers, UDP answers) for d from now, so that clients see a stall of a
// known length. Reading goes on.
func (s *Server) Pause(d time.Duration) {
	s.gate.hold(d)
}

// ServeTCP accepts connections on ln and serves each on its own
// goroutines until ln is closed; then it closes the connections it
// serves, waits for their goroutines and returns nil. Another Accept
// error is returned (wrapped) the same way.
func (s *Server) ServeTCP(ln net.Listener) error {
	var (
		mu    sync.Mutex
		conns = map[*serverConn]struct{}{}
		wg    sync.WaitGroup
	)
	defer func() {
		mu.Lock()
		for sc := range conns {
			sc.close()
		}
		mu.Unlock()
		wg.Wait()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("accept on %v: %w", ln.Addr(), err)
		}
		sc := &serverConn{s: s, c: c, bye: make(chan uint64, 1), done: make(chan struct{})}
		mu.Lock()
		conns[sc] = struct{}{}
		mu.Unlock()
		s.open.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer s.open.Add(-1)
			sc.serve()
			mu.Lock()
			delete(conns, sc)
			mu.Unlock()
		}()
	}
}

// serverConn is one TCP connection the server serves: the goroutine that
// runs serve reads, another writes.
type serverConn struct {
	s      *Server
	c      net.Conn
	hl     hello
	bye    chan uint64   // the client's count, from the reader to the writer
	done   chan struct{} // closed by close
	closed atomic.Bool

	received atomic.Uint64 // data messages read
	errs     atomic.Int64  // TCPERR lines for this connection
}

// close closes the connection; it returns false if it was closed
// already.
func (sc *serverConn) close() bool {
	if sc.closed.Swap(true) {
		return false
	}
	close(sc.done)
	sc.c.Close()
	return true
}

// fail reports a violation on the connection.
func (sc *serverConn) fail(format string, args ...any) {
	sc.errs.Add(1)
	sc.s.tcpErrors.Add(1)
	sc.s.out.Printf("TCPERR conn=%d %s", sc.hl.id, fmt.Sprintf(format, args...))
}

// abort closes the connection after an I/O error and reports the error,
// unless the connection was closed already: then that caused the error.
func (sc *serverConn) abort(format string, args ...any) {
	if sc.close() {
		sc.fail(format, args...)
	}
}

func (sc *serverConn) serve() {
	defer sc.close()
	br := bufio.NewReaderSize(sc.c, 64<<10)
	fr := &frameReader{r: br}
	h, p, err := fr.next()
	if err == nil {
		sc.hl, err = parseHello(h, p)
	}
	if err != nil {
		if sc.close() {
			sc.s.tcpErrors.Add(1)
			sc.s.out.Printf("TCPERR conn=- peer=%v bad hello: %v", sc.c.RemoteAddr(), err)
		}
		return
	}
	switch {
	case sc.hl.interval == 0:
		sc.hl.interval = DefaultInterval
	case sc.hl.interval < minInterval || sc.hl.interval > maxInterval:
		sc.fail("interval %v out of range [%v, %v]", sc.hl.interval, minInterval, maxInterval)
		return
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		sc.write()
	}()
	sc.read(fr, br)
	wg.Wait()
}

// read checks the client's messages until its bye, which it hands to the
// writer, or until an error, which closes the connection.
func (sc *serverConn) read(fr *frameReader, br *bufio.Reader) {
	id, mode := sc.hl.id, sc.hl.mode
	var gen payloadGen
	var next uint64
	for {
		h, p, err := fr.next()
		switch {
		case errors.Is(err, io.EOF):
			sc.abort("client closed the connection before bye, after %d messages", sc.received.Load())
			return
		case err != nil:
			sc.abort("read after %d messages: %v", sc.received.Load(), err)
			return
		}
		switch h.typ {
		case frameData:
			if err := checkSeq(h.seq, next); err != nil {
				sc.fail("%v", err)
			}
			if err := gen.check(p, payloadLen(mode, id, dirUp, h.seq), id, dirUp, h.seq); err != nil {
				sc.fail("%v", err)
			}
			next = h.seq + 1
			sc.received.Add(1)
		case frameBye:
			sc.bye <- h.seq
			return
		default:
			sc.fail("unexpected frame type %d after %d messages", h.typ, sc.received.Load())
			sc.close()
			return
		}
		if mode == ModeLazyServer && br.Buffered() == 0 && !sleep(lazyPause, sc.done) {
			return
		}
	}
}

// write sends the server's messages, then the bye answer.
func (sc *serverConn) write() {
	id, mode := sc.hl.id, sc.hl.mode
	// A bulk connection sends whenever the socket takes data: its tick is
	// a closed channel, always ready.
	tick := make(chan time.Time)
	close(tick)
	var next <-chan time.Time = tick
	if mode != ModeBulk {
		t := time.NewTicker(sc.hl.interval)
		defer t.Stop()
		next = t.C
	}
	var gen payloadGen
	var buf []byte
	var sent uint64
	for {
		select {
		case <-sc.done:
			return
		case n := <-sc.bye:
			sc.finish(n, sent)
			return
		case <-next:
		}
		if !sc.s.gate.wait(sc.done) {
			return
		}
		buf = appendFrame(buf[:0], frameData, sent, gen.make(payloadLen(mode, id, dirDown, sent), id, dirDown, sent))
		if _, err := sc.c.Write(buf); err != nil {
			sc.abort("write after %d messages: %v", sent, err)
			return
		}
		sent++
	}
}

// finish answers the client's bye (it sent clientSent messages; the
// server sent sent) and closes the connection.
func (sc *serverConn) finish(clientSent, sent uint64) {
	defer sc.close()
	received := sc.received.Load()
	if received != clientSent {
		sc.fail("client sent %d messages, server received %d", clientSent, received)
	}
	if !sc.s.gate.wait(sc.done) {
		return
	}
	if _, err := sc.c.Write(byeAckFrame(received, sent)); err != nil {
		sc.abort("write bye answer: %v", err)
	}
	sc.s.out.Printf("TCPDONE conn=%d received=%d sent=%d ok=%t", sc.hl.id, received, sent, sc.errs.Load() == 0)
}

// ServeUDP answers every datagram read from pc with the same datagram,
// after checking it, until pc is closed; then it returns nil. Another
// read error is returned (wrapped).
func (s *Server) ServeUDP(pc net.PacketConn) error {
	buf := make([]byte, 64<<10)
	var gen payloadGen
	for {
		n, addr, err := pc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("read on %v: %w", pc.LocalAddr(), err)
		}
		if _, _, err := checkDatagram(buf[:n], &gen); err != nil {
			s.udpErrors.Add(1)
			s.out.Printf("UDPERR peer=%v %v", addr, err)
			continue
		}
		s.gate.wait(nil)
		if _, err := pc.WriteTo(buf[:n], addr); err != nil {
			s.udpErrors.Add(1)
			s.out.Printf("UDPERR peer=%v answer: %v", addr, err)
			continue
		}
		s.udp.Add(1)
	}
}

// pauseGate holds back senders until a time.
type pauseGate struct {
	mu    sync.Mutex
	until time.Time
}

func (g *pauseGate) hold(d time.Duration) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if u := time.Now().Add(d); u.After(g.until) {
		g.until = u
	}
}

// wait returns when the gate is open (true) or done is closed (false).
func (g *pauseGate) wait(done <-chan struct{}) bool {
	for {
		g.mu.Lock()
		d := time.Until(g.until)
		g.mu.Unlock()
		if d <= 0 {
			return true
		}
		if !sleep(d, done) {
			return false
		}
	}
}

// sleep sleeps for d; it returns false if done is closed first.
func sleep(d time.Duration, done <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-done:
		return false
	}
}
