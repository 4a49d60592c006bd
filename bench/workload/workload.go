package workload

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Config describes a workload.
type Config struct {
	// MemBytes is the memory the workload fills (rounded to pages).
	MemBytes int64
	// DirtyPagesPerSec is how many pages the writers rewrite per second in
	// total (0: none).
	DirtyPagesPerSec int
	// Writers is the number of goroutines rewriting pages.
	Writers int
	// Heartbeat is the interval between heartbeat lines.
	Heartbeat time.Duration
	// Random fills memory with incompressible data instead of heap-like data.
	Random bool
	// Pause is how long the workload stops writing and heartbeating when
	// it pauses itself: once PauseAfter after READY (if PauseAfter > 0),
	// and on every SIGUSR2. It gives the bench a pause of known length
	// to measure.
	Pause time.Duration
	// PauseAfter schedules one self-pause this long after READY.
	PauseAfter time.Duration
	// Listen, when set, is the address (host:port) the workload serves
	// its TCP protocol on (see Server.ServeTCP).
	Listen string
	// UDP, when set, is the address the workload answers UDP datagrams
	// on (see Server.ServeUDP).
	UDP string
}

// LineWriter writes whole lines to an io.Writer, one Write call per line,
// from any number of goroutines. Write errors are ignored: the workload
// goes on if nobody reads its output.
type LineWriter struct {
	mu  sync.Mutex
	w   io.Writer
	buf []byte
}

// NewLineWriter returns a LineWriter writing to w.
func NewLineWriter(w io.Writer) *LineWriter {
	return &LineWriter{w: w}
}

// Printf writes one line, formatted as by fmt.Printf, adding the newline.
func (l *LineWriter) Printf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(fmt.Appendf(l.buf[:0], format, args...), '\n')
	l.w.Write(l.buf)
}

const pageSize = 4096

// state is the workload's memory: each page starts with the page index and
// a generation number, and the rest is derived from both, so that a stale
// or misplaced page is caught.
type state struct {
	mem    []byte
	gens   []atomic.Uint32 // generation each page was last written with
	random bool
}

// words calls fn with each 8-byte word the page holds after its header
// (offset, value) for generation gen; fn returns false to stop. fill and
// check share it, so what is written is exactly what is verified.
func (s *state) words(page int, gen uint32, fn func(off int, v uint64) bool) {
	seed := uint64(page)*0x9e3779b97f4a7c15 ^ uint64(gen)*0xbf58476d1ce4e5b9
	for i := 16; i < pageSize; i += 8 {
		var v uint64
		if s.random {
			seed ^= seed << 13
			seed ^= seed >> 7
			seed ^= seed << 17
			v = seed
		} else {
			// Heap-like: small integers and repeated words compress well.
			v = uint64(i/8%32) | uint64(page%7)<<32
		}
		if !fn(i, v) {
			return
		}
	}
}

func (s *state) fill(page int, gen uint32) {
	FillPage(s.mem[page*pageSize:(page+1)*pageSize], page, gen, s.random)
	s.gens[page].Store(gen)
}

// FillPage writes into p (one 4096-byte page) what the workload's page
// number page holds at generation gen: heap-like data, or random data.
// Benchmarks use it to compress what the workload migrates.
func FillPage(p []byte, page int, gen uint32, random bool) {
	p = p[:pageSize]
	binary.LittleEndian.PutUint64(p[0:], uint64(page))
	binary.LittleEndian.PutUint32(p[8:], gen)
	clear(p[12:16])
	(&state{random: random}).words(page, gen, func(off int, v uint64) bool {
		binary.LittleEndian.PutUint64(p[off:], v)
		return true
	})
}

func (s *state) check(page int) error {
	gen := s.gens[page].Load()
	p := s.mem[page*pageSize : (page+1)*pageSize]
	if got := binary.LittleEndian.Uint64(p[0:]); got != uint64(page) {
		return fmt.Errorf("page %d holds page %d's data", page, got)
	}
	if got := binary.LittleEndian.Uint32(p[8:]); got != gen {
		return fmt.Errorf("page %d has generation %d, expected %d (stale page)", page, got, gen)
	}
	bad := -1
	s.words(page, gen, func(off int, v uint64) bool {
		if binary.LittleEndian.Uint64(p[off:]) != v {
			bad = off
			return false
		}
		return true
	})
	if bad >= 0 {
		return fmt.Errorf("page %d corrupt at byte %d", page, bad)
	}
	return nil
}

// Run runs the workload, writing heartbeat and check lines to out, until a
// SIGTERM (exit status 0) or a failed check (exit status 1).
//
// Lines:
//
//	READY pid=P pages=N [tcp=ADDR] [udp=ADDR]
//	BEAT seq=S writes=W maxgap_ms=G gap_ms=g t_ms=T [tcp_conns=C tcp_errors=E udp=U udp_errors=F]
//	PAUSE ms=D
//	CHECK seq=S OK pages=N | CHECK seq=S FAIL reason
//	SETUP FAIL reason
//
// In a BEAT line, gap_ms is the time since the previous heartbeat, maxgap_ms
// the largest such gap so far, and t_ms the wall-clock time of the beat in
// milliseconds since the Unix epoch (so that a gap can be placed in time by
// another process). Gaps are measured on the monotonic clock.
//
// With Listen or UDP set, READY gives the addresses the workload serves
// on (once it does), BEAT lines end with the server's counters
// (ServerStats), and the server adds its own lines (see the package
// comment). A pause holds back what the server sends too. SETUP FAIL
// (exit status 1) means an address could not be used.
func Run(cfg Config, out io.Writer) int {
	return RunContext(context.Background(), cfg, out)
}

// RunContext is Run, also ending (exit status 0, as on SIGTERM) when ctx
// is done. It stops every goroutine it started before it returns.
func RunContext(ctx context.Context, cfg Config, out io.Writer) int {
	w := NewLineWriter(out)
	pages := int(cfg.MemBytes / pageSize)
	if pages < 1 {
		pages = 1
	}
	s := &state{mem: make([]byte, pages*pageSize), gens: make([]atomic.Uint32, pages), random: cfg.Random}
	for i := 0; i < pages; i++ {
		s.fill(i, 1)
	}
	srv, addrs, stopNet, err := startNet(cfg, w)
	if err != nil {
		w.Printf("SETUP FAIL %v", err)
		return 1
	}
	defer stopNet()
	var mu sync.Mutex // serialises writers against checks
	var writes atomic.Int64
	if cfg.Writers < 1 {
		cfg.Writers = 1
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	defer func() {
		close(done)
		wg.Wait()
	}()
	if cfg.DirtyPagesPerSec > 0 {
		per := max(cfg.DirtyPagesPerSec/cfg.Writers, 1)
		for k := 0; k < cfg.Writers; k++ {
			wg.Add(1)
			go func(k int) {
				defer wg.Done()
				tick := time.NewTicker(10 * time.Millisecond)
				defer tick.Stop()
				page := k * 7919 % pages
				for {
					select {
					case <-done:
						return
					case <-tick.C:
					}
					mu.Lock()
					for i := 0; i < max(per/100, 1); i++ {
						page = (page + 104729) % pages
						s.fill(page, s.gens[page].Load()+1)
						writes.Add(1)
					}
					mu.Unlock()
				}
			}(k)
		}
	}
	checkReq := make(chan os.Signal, 1)
	signal.Notify(checkReq, syscall.SIGUSR1)
	defer signal.Stop(checkReq)
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM)
	defer stop()
	pauseReq := make(chan os.Signal, 1)
	signal.Notify(pauseReq, syscall.SIGUSR2)
	defer signal.Stop(pauseReq)
	var pauseAt <-chan time.Time
	if cfg.PauseAfter > 0 && cfg.Pause > 0 {
		pauseAt = time.After(cfg.PauseAfter)
	}
	pause := func() {
		if cfg.Pause <= 0 {
			return
		}
		mu.Lock() // writers stop too
		if srv != nil {
			srv.Pause(cfg.Pause)
		}
		time.Sleep(cfg.Pause)
		mu.Unlock()
		w.Printf("PAUSE ms=%.1f", float64(cfg.Pause.Microseconds())/1000)
	}

	w.Printf("READY pid=%d pages=%d%s", os.Getpid(), pages, addrs)
	hb := cfg.Heartbeat
	if hb <= 0 {
		hb = 10 * time.Millisecond
	}
	tick := time.NewTicker(hb)
	defer tick.Stop()
	last := time.Now()
	var maxGap time.Duration
	seq, checks := 0, 0
	for {
		select {
		case <-ctx.Done():
			w.Printf("EXIT maxgap_ms=%.1f", float64(maxGap.Microseconds())/1000)
			return 0
		case <-checkReq:
			checks++
			mu.Lock()
			var err error
			for i := 0; i < pages && err == nil; i++ {
				err = s.check(i)
			}
			mu.Unlock()
			if err != nil {
				w.Printf("CHECK seq=%d FAIL %v", checks, err)
				return 1
			}
			w.Printf("CHECK seq=%d OK pages=%d writes=%d pid=%d", checks, pages, writes.Load(), os.Getpid())
		case <-pauseAt:
			pause()
		case <-pauseReq:
			pause()
		case <-tick.C:
			// The time of receipt, not the tick's: after a freeze the
			// first tick is delivered late, and the gap is what the
			// workload lived through.
			now := time.Now()
			seq++
			gap := now.Sub(last)
			maxGap = max(maxGap, gap)
			last = now
			var netStats string
			if srv != nil {
				st := srv.Stats()
				netStats = fmt.Sprintf(" tcp_conns=%d tcp_errors=%d udp=%d udp_errors=%d", st.TCPConns, st.TCPErrors, st.UDP, st.UDPErrors)
			}
			w.Printf("BEAT seq=%d writes=%d maxgap_ms=%.1f gap_ms=%.3f t_ms=%.3f%s", seq, writes.Load(),
				float64(maxGap.Microseconds())/1000, float64(gap.Microseconds())/1000, float64(now.UnixMicro())/1000, netStats)
		}
	}
}

// startNet starts the servers cfg asks for. It returns the server (nil if
// none), the addresses for the READY line, and a function that stops the
// servers and waits for them.
func startNet(cfg Config, w *LineWriter) (srv *Server, addrs string, stop func(), err error) {
	stop = func() {}
	if cfg.Listen == "" && cfg.UDP == "" {
		return nil, "", stop, nil
	}
	srv = NewServer(w)
	var (
		closers []io.Closer
		wg      sync.WaitGroup
	)
	stop = func() {
		for _, c := range closers {
			c.Close()
		}
		wg.Wait()
	}
	if cfg.Listen != "" {
		ln, err := net.Listen("tcp", cfg.Listen)
		if err != nil {
			return nil, "", stop, fmt.Errorf("tcp: %w", err)
		}
		closers = append(closers, ln)
		addrs += " tcp=" + ln.Addr().String()
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.ServeTCP(ln); err != nil {
				srv.tcpErrors.Add(1)
				w.Printf("TCPERR conn=- %v", err)
			}
		}()
	}
	if cfg.UDP != "" {
		pc, err := net.ListenPacket("udp", cfg.UDP)
		if err != nil {
			stop()
			return nil, "", func() {}, fmt.Errorf("udp: %w", err)
		}
		closers = append(closers, pc)
		addrs += " udp=" + pc.LocalAddr().String()
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.ServeUDP(pc); err != nil {
				srv.udpErrors.Add(1)
				w.Printf("UDPERR %v", err)
			}
		}()
	}
	return srv, addrs, stop, nil
}

// Beat is one heartbeat line.
type Beat struct {
	Seq      int
	GapMS    float64 // since the previous beat
	MaxGapMS float64 // largest gap so far
	Time     time.Time
}

// ParseBeat parses a BEAT line; ok is false for any other line.
func ParseBeat(line string) (b Beat, ok bool) {
	rest, ok := strings.CutPrefix(line, "BEAT ")
	if !ok {
		return Beat{}, false
	}
	var seen int
	for _, f := range strings.Fields(rest) {
		k, v, _ := strings.Cut(f, "=")
		x, err := strconv.ParseFloat(v, 64)
		if err != nil {
			continue
		}
		switch k {
		case "seq":
			b.Seq, seen = int(x), seen|1
		case "gap_ms":
			b.GapMS, seen = x, seen|2
		case "maxgap_ms":
			b.MaxGapMS = x
		case "t_ms":
			b.Time, seen = time.UnixMicro(int64(math.Round(x*1000))), seen|4
		}
	}
	return b, seen == 7
}

// ParseSize parses a size such as 64M, 1G, 4096 or 256MiB.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B"), "I")
	mult := int64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			mult, t = 1<<10, t[:n-1]
		case 'M':
			mult, t = 1<<20, t[:n-1]
		case 'G':
			mult, t = 1<<30, t[:n-1]
		}
	}
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("bad size %q (use e.g. 64M, 1G)", s)
	}
	return v * mult, nil
}
