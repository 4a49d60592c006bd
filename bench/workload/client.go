package workload

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	// A bulk client reads at most bulkReadChunk bytes, then sleeps
	// bulkReadPause: slower than the server writes, so the server's send
	// queue stays full.
	bulkReadChunk = 8 << 10
	bulkReadPause = time.Millisecond
	// udpGrace bounds how long UDPClient.Close waits for answers.
	udpGrace = time.Second
)

// gapMeter tracks the largest gap between two events.
type gapMeter struct {
	last       time.Time
	max        time.Duration
	start, end time.Time
}

func (g *gapMeter) note(now time.Time) {
	if !g.last.IsZero() {
		if gap := now.Sub(g.last); gap > g.max {
			g.max, g.start, g.end = gap, g.last, now
		}
	}
	g.last = now
}

// TCPClientConfig configures a TCPClient.
type TCPClientConfig struct {
	// ID names the connection in the server's lines and seeds the
	// payloads.
	ID uint64
	// Mode is what the connection exercises.
	Mode Mode
	// Interval is the time between two messages of the client, and of
	// the server unless in bulk mode (DefaultInterval when 0).
	Interval time.Duration
}

// TCPStats is what a TCPClient has seen so far.
type TCPStats struct {
	// Sent and Received count data messages; the bytes count whole
	// frames.
	Sent, Received           int64
	BytesSent, BytesReceived int64
	// MaxGap is the largest time between two messages received from the
	// server (in bulk mode: between two reads that returned data): the
	// stall the client saw. It ran from GapStart to GapEnd.
	MaxGap           time.Duration
	GapStart, GapEnd time.Time
	// Err is the first error: ErrSequence, ErrCorrupt, ErrClosed or
	// ErrCount, wrapped with what happened.
	Err error
}

// TCPClient is the client end of a connection to the workload's TCP
// server: it sends a message every interval, checks every message the
// server sends, and measures the largest gap between them.
type TCPClient struct {
	conn net.Conn
	cfg  TCPClientConfig

	stop       chan struct{} // closed by Close: the writer sends bye
	writerDone chan struct{}
	readerDone chan struct{}
	byeSent    atomic.Bool
	drain      atomic.Bool // a bulk client stops throttling its reads

	mu       sync.Mutex
	st       TCPStats
	gaps     gapMeter
	acked    bool
	ackRecv  uint64 // the server's count of messages received
	ackSent  uint64 // the server's count of messages sent
	once     sync.Once
	closeSt  TCPStats
	closeErr error
}

// NewTCPClient starts a client on conn, a connection to the workload's
// TCP server that the caller made: it sends the hello and starts the
// goroutines that write and read. The client owns conn from then on;
// Close closes it.
func NewTCPClient(conn net.Conn, cfg TCPClientConfig) (*TCPClient, error) {
	if cfg.Interval == 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.Interval < minInterval || cfg.Interval > maxInterval {
		return nil, fmt.Errorf("tcp client %d: interval %v out of range [%v, %v]", cfg.ID, cfg.Interval, minInterval, maxInterval)
	}
	if int(cfg.Mode) >= len(modeNames) {
		return nil, fmt.Errorf("tcp client %d: unknown %v", cfg.ID, cfg.Mode)
	}
	if _, err := conn.Write(hello{id: cfg.ID, interval: cfg.Interval, mode: cfg.Mode}.frame()); err != nil {
		return nil, fmt.Errorf("tcp client %d: send hello: %w", cfg.ID, err)
	}
	c := &TCPClient{conn: conn, cfg: cfg, stop: make(chan struct{}),
		writerDone: make(chan struct{}), readerDone: make(chan struct{})}
	c.st.BytesSent = headerLen + helloLen
	go c.write()
	go c.read()
	return c, nil
}

// Stats returns what the client has seen so far.
func (c *TCPClient) Stats() TCPStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.st
	st.MaxGap, st.GapStart, st.GapEnd = c.gaps.max, c.gaps.start, c.gaps.end
	return st
}

// setErr records err unless an error is already recorded.
func (c *TCPClient) setErr(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.st.Err == nil {
		c.st.Err = err
	}
}

// Close ends the connection in order: it stops sending, sends a bye
// giving the number of messages sent, reads what the server still sends
// up to its answer (the number of messages it received and sent), closes
// the connection and checks both counts. It returns the final stats and
// the first error: a message lost, duplicated, reordered or corrupt, the
// connection closed or reset early, or ctx done before the answer.
// Calling Close again returns the same.
func (c *TCPClient) Close(ctx context.Context) (TCPStats, error) {
	c.once.Do(func() {
		c.closeErr = c.close(ctx)
		c.closeSt = c.Stats()
	})
	return c.closeSt, c.closeErr
}

func (c *TCPClient) close(ctx context.Context) error {
	defer func() {
		c.conn.Close()
		<-c.writerDone
		<-c.readerDone
	}()
	c.drain.Store(true)
	close(c.stop)
	// Give up on ctx; the deferred Close stops the goroutines.
	giveUp := func(what string) error {
		err := fmt.Errorf("tcp client %d: %s: %w", c.cfg.ID, what, ctx.Err())
		c.setErr(err)
		return c.Stats().Err
	}
	select {
	case <-c.writerDone:
	case <-ctx.Done():
		return giveUp("send bye")
	}
	if c.Stats().Err != nil && !c.byeSent.Load() {
		return c.Stats().Err
	}
	select {
	case <-c.readerDone:
	case <-ctx.Done():
		return giveUp("wait for the bye answer")
	}
	c.mu.Lock()
	acked, recv, sent := c.acked, c.ackRecv, c.ackSent
	c.mu.Unlock()
	st := c.Stats()
	switch {
	case st.Err != nil:
	case !acked:
		c.setErr(fmt.Errorf("%w: tcp client %d: no bye answer", ErrClosed, c.cfg.ID))
	case recv != uint64(st.Sent):
		c.setErr(fmt.Errorf("%w: tcp client %d: server received %d messages, client sent %d", ErrCount, c.cfg.ID, recv, st.Sent))
	case sent != uint64(st.Received):
		c.setErr(fmt.Errorf("%w: tcp client %d: server sent %d messages, client received %d", ErrCount, c.cfg.ID, sent, st.Received))
	}
	return c.Stats().Err
}

// write sends a message every interval, and the bye when Close asks.
func (c *TCPClient) write() {
	defer close(c.writerDone)
	id, mode := c.cfg.ID, c.cfg.Mode
	t := time.NewTicker(c.cfg.Interval)
	defer t.Stop()
	var gen payloadGen
	var buf []byte
	var seq uint64
	for {
		select {
		case <-c.stop:
			c.byeSent.Store(true)
			if _, err := c.conn.Write(appendFrame(buf[:0], frameBye, seq, nil)); err != nil {
				c.byeSent.Store(false)
				c.setErr(fmt.Errorf("%w: tcp client %d: send bye: %w", ErrClosed, id, resetOnPipe(err)))
			}
			return
		case <-t.C:
		}
		buf = appendFrame(buf[:0], frameData, seq, gen.make(payloadLen(mode, id, dirUp, seq), id, dirUp, seq))
		if _, err := c.conn.Write(buf); err != nil {
			c.setErr(fmt.Errorf("%w: tcp client %d: send message %d: %w", ErrClosed, id, seq, resetOnPipe(err)))
			return
		}
		seq++
		c.mu.Lock()
		c.st.Sent++
		c.st.BytesSent += int64(len(buf))
		c.mu.Unlock()
	}
}

// read checks the server's messages up to its bye answer.
func (c *TCPClient) read() {
	defer close(c.readerDone)
	id, mode := c.cfg.ID, c.cfg.Mode
	var r io.Reader = c.conn
	if mode == ModeBulk {
		r = slowReader{c}
	}
	fr := &frameReader{r: bufio.NewReaderSize(r, 64<<10)}
	var gen payloadGen
	var next uint64
	for {
		h, p, err := fr.next()
		switch {
		case errors.Is(err, ErrCorrupt):
			c.setErr(fmt.Errorf("tcp client %d: after %d messages: %w", id, next, err))
			return
		case errors.Is(err, io.EOF):
			c.setErr(fmt.Errorf("%w: tcp client %d: server closed the connection after %d messages, without a bye answer", ErrClosed, id, next))
			return
		case err != nil:
			c.setErr(fmt.Errorf("%w: tcp client %d: read after %d messages: %w", ErrClosed, id, next, err))
			return
		}
		switch h.typ {
		case frameData:
			now := time.Now()
			if err := checkSeq(h.seq, next); err != nil {
				c.setErr(fmt.Errorf("tcp client %d: %w", id, err))
			}
			if err := gen.check(p, payloadLen(mode, id, dirDown, h.seq), id, dirDown, h.seq); err != nil {
				c.setErr(fmt.Errorf("tcp client %d: %w", id, err))
			}
			next = h.seq + 1
			c.mu.Lock()
			c.st.Received++
			c.st.BytesReceived += int64(headerLen + len(p))
			if mode != ModeBulk {
				c.gaps.note(now)
			}
			c.mu.Unlock()
		case frameByeAck:
			if !c.byeSent.Load() || len(p) != byeAckLen {
				c.setErr(fmt.Errorf("%w: tcp client %d: unexpected bye answer of %d bytes", ErrCorrupt, id, len(p)))
				return
			}
			c.mu.Lock()
			c.acked = true
			c.ackRecv, c.ackSent = binary.BigEndian.Uint64(p), binary.BigEndian.Uint64(p[8:])
			c.st.BytesReceived += int64(headerLen + len(p))
			c.mu.Unlock()
			return
		default:
			c.setErr(fmt.Errorf("%w: tcp client %d: unexpected frame type %d after %d messages", ErrCorrupt, id, h.typ, next))
			return
		}
	}
}

// slowReader is a bulk client's reader: short reads with a pause after
// each (until Close drains the connection), every read that returns data
// counting as an event for the gap meter.
type slowReader struct{ c *TCPClient }

func (r slowReader) Read(p []byte) (int, error) {
	drain := r.c.drain.Load()
	if !drain && len(p) > bulkReadChunk {
		p = p[:bulkReadChunk]
	}
	n, err := r.c.conn.Read(p)
	if n > 0 {
		r.c.mu.Lock()
		r.c.gaps.note(time.Now())
		r.c.mu.Unlock()
	}
	if !drain && err == nil {
		time.Sleep(bulkReadPause)
	}
	return n, err
}

// UDPStats is what a UDPClient has seen so far.
type UDPStats struct {
	// Sent counts the datagrams sent, Answered the correct answers.
	Sent, Answered int64
	// Lost is Sent - Answered once Close has waited for the answers (0
	// before).
	Lost int64
	// Refused counts sends and reads that failed with ECONNREFUSED (no
	// socket at the server's address, as an ICMP error reported).
	Refused int64
	// MaxGap is the largest time between two answers, from GapStart to
	// GapEnd.
	MaxGap           time.Duration
	GapStart, GapEnd time.Time
	// Err is the first wrong answer (ErrCorrupt, or ErrSequence for an
	// answer to a datagram never sent or answered twice) or read error
	// (ErrClosed).
	Err error
}

// UDPClient sends numbered datagrams to the workload's UDP echo and
// checks the answers. Datagrams may be lost or answered out of order:
// Close counts what was lost; only wrong answers are errors.
type UDPClient struct {
	conn     *net.UDPConn
	id       uint64
	interval time.Duration

	stop       chan struct{}
	writerDone chan struct{}
	readerDone chan struct{}

	mu       sync.Mutex
	st       UDPStats
	gaps     gapMeter
	answered []bool // by sequence number: sent (or tried) and answered
	once     sync.Once
	closeSt  UDPStats
	closeErr error
}

// NewUDPClient starts a client on conn, a UDP socket connected to the
// workload's UDP echo: it sends a datagram every interval
// (DefaultInterval when 0) and reads the answers. The client owns conn;
// Close closes it.
func NewUDPClient(conn *net.UDPConn, interval time.Duration) (*UDPClient, error) {
	if interval == 0 {
		interval = DefaultInterval
	}
	if interval < minInterval || interval > maxInterval {
		return nil, fmt.Errorf("udp client: interval %v out of range [%v, %v]", interval, minInterval, maxInterval)
	}
	c := &UDPClient{conn: conn, id: rand.Uint64(), interval: interval, stop: make(chan struct{}),
		writerDone: make(chan struct{}), readerDone: make(chan struct{})}
	go c.write()
	go c.read()
	return c, nil
}

// Stats returns what the client has seen so far.
func (c *UDPClient) Stats() UDPStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.st
	st.MaxGap, st.GapStart, st.GapEnd = c.gaps.max, c.gaps.start, c.gaps.end
	return st
}

func (c *UDPClient) setErr(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.st.Err == nil {
		c.st.Err = err
	}
}

// Close stops sending, waits until every datagram sent is answered, ctx
// is done or a second has passed, closes the socket and returns the
// final stats (Lost set) and the first wrong answer. Calling Close again
// returns the same.
func (c *UDPClient) Close(ctx context.Context) (UDPStats, error) {
	c.once.Do(func() {
		close(c.stop)
		<-c.writerDone
		c.waitAnswers(ctx)
		c.conn.Close()
		<-c.readerDone
		c.mu.Lock()
		c.st.Lost = c.st.Sent - c.st.Answered
		c.mu.Unlock()
		c.closeSt = c.Stats()
		c.closeErr = c.closeSt.Err
	})
	return c.closeSt, c.closeErr
}

// waitAnswers waits until every datagram sent is answered, ctx is done or
// udpGrace has passed.
func (c *UDPClient) waitAnswers(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, udpGrace)
	defer cancel()
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for {
		if st := c.Stats(); st.Answered >= st.Sent {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (c *UDPClient) write() {
	defer close(c.writerDone)
	t := time.NewTicker(c.interval)
	defer t.Stop()
	var gen payloadGen
	var buf []byte
	for seq := uint64(0); ; seq++ {
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
		buf = appendDatagram(buf[:0], &gen, c.id, seq)
		c.mu.Lock()
		c.answered = append(c.answered, false)
		c.mu.Unlock()
		_, err := c.conn.Write(buf)
		c.mu.Lock()
		switch {
		case err == nil:
			c.st.Sent++
		case errors.Is(err, syscall.ECONNREFUSED):
			c.st.Refused++
		case c.st.Err == nil:
			c.st.Err = fmt.Errorf("%w: udp client: send datagram %d: %w", ErrClosed, seq, err)
		}
		c.mu.Unlock()
		if err != nil && !errors.Is(err, syscall.ECONNREFUSED) {
			return
		}
	}
}

func (c *UDPClient) read() {
	defer close(c.readerDone)
	buf := make([]byte, 64<<10)
	var gen payloadGen
	for {
		n, err := c.conn.Read(buf)
		switch {
		case errors.Is(err, syscall.ECONNREFUSED):
			c.mu.Lock()
			c.st.Refused++
			c.mu.Unlock()
			continue
		case errors.Is(err, net.ErrClosed):
			return
		case err != nil:
			c.setErr(fmt.Errorf("%w: udp client: read: %w", ErrClosed, err))
			return
		}
		now := time.Now()
		id, seq, err := checkDatagram(buf[:n], &gen)
		if err == nil && id != c.id {
			err = fmt.Errorf("%w: answer for client %#x, this is %#x", ErrCorrupt, id, c.id)
		}
		if err != nil {
			c.setErr(fmt.Errorf("udp client: %w", err))
			continue
		}
		c.mu.Lock()
		switch {
		case seq >= uint64(len(c.answered)):
			err = fmt.Errorf("%w: udp client: answer to datagram %d, never sent", ErrSequence, seq)
		case c.answered[seq]:
			err = fmt.Errorf("%w: udp client: datagram %d answered twice", ErrSequence, seq)
		default:
			c.answered[seq] = true
			c.st.Answered++
			c.gaps.note(now)
		}
		if err != nil && c.st.Err == nil {
			c.st.Err = err
		}
		c.mu.Unlock()
	}
}

// resetOnPipe names a broken pipe on send as the reset it is: the client
// never shuts its side down before the bye, so EPIPE means the connection
// was reset (the writer merely noticed before the reader).
func resetOnPipe(err error) error {
	if errors.Is(err, syscall.EPIPE) {
		return fmt.Errorf("%w (%w)", syscall.ECONNRESET, err)
	}
	return err
}
