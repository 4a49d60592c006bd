package main

import (
	"encoding/binary"
	"flag"
	"fmt"
	"hash/crc32"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

const chunkSize = 64 << 10

var (
	memMiB     = flag.Int("mem", 32, "MiB of checksummed []byte")
	goroutines = flag.Int("goroutines", 200, "sleeping goroutines with their own counters")
	allocators = flag.Int("allocators", 3, "GC-heavy allocating goroutines")
	netpoll    = flag.Bool("netpoll", false, "ping-pong through os.Pipe pairs (starts the netpoller)")
	exitCode   = flag.Int("exit-code", 7, "exit status on SIGTERM")
)

// latched keeps the first failure found between checks.
var latched atomic.Pointer[string]

func latch(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	latched.CompareAndSwap(nil, &s)
}

// say prints one protocol line with a single write.
func say(format string, args ...any) {
	line := strings.ReplaceAll(fmt.Sprintf(format, args...), "\n", " ") + "\n"
	os.Stdout.WriteString(line)
}

func mix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// bigBuf is a large []byte whose 64 KiB chunks carry patterns with known
// CRCs; the mutator verifies a chunk before it rewrites it.
type bigBuf struct {
	mu   sync.Mutex
	buf  []byte
	gen  []uint64
	crcs []uint32
}

func (b *bigBuf) fillChunk(i int) {
	c := b.buf[i*chunkSize : (i+1)*chunkSize]
	seed := mix64(uint64(i)<<32 | b.gen[i])
	for k := 0; k < chunkSize; k += 8 {
		binary.LittleEndian.PutUint64(c[k:], mix64(seed+uint64(k)))
	}
	b.crcs[i] = crc32.ChecksumIEEE(c)
}

func (b *bigBuf) verifyChunk(i int) error {
	c := b.buf[i*chunkSize : (i+1)*chunkSize]
	if got := crc32.ChecksumIEEE(c); got != b.crcs[i] {
		return fmt.Errorf("buf: chunk %d (offset %d) crc %08x, want %08x", i, i*chunkSize, got, b.crcs[i])
	}
	return nil
}

func (b *bigBuf) mutate(step uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	i := int(step*7919) % len(b.gen)
	if err := b.verifyChunk(i); err != nil {
		latch("%v (mutator)", err)
	}
	b.gen[i]++
	b.fillChunk(i)
}

func (b *bigBuf) verifyAll() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := range b.gen {
		if err := b.verifyChunk(i); err != nil {
			return err
		}
	}
	return nil
}

type node struct {
	key   int
	val   uint64
	left  *node
	right *node
	blob  []byte // a second, pointer-free allocation per node
}

// allocate builds and checks a throw-away tree and map: garbage for the GC.
func allocate(id int, round uint64) error {
	m := make(map[int]*node, 2000)
	var root *node
	for k := 0; k < 2000; k++ {
		key := int(mix64(uint64(id)<<40|round<<16|uint64(k)) % 1000000)
		n := &node{key: key, val: mix64(uint64(key)), blob: make([]byte, 48+k%64)}
		n.blob[0] = byte(key)
		m[key] = n
		if root == nil {
			root = n
			continue
		}
		for p := root; ; {
			if key < p.key {
				if p.left == nil {
					p.left = n
					break
				}
				p = p.left
			} else {
				if p.right == nil {
					p.right = n
					break
				}
				p = p.right
			}
		}
	}
	for key, n := range m {
		if n.key != key || n.val != mix64(uint64(key)) || n.blob[0] != byte(key) {
			return fmt.Errorf("alloc %d: node %d holds key %d val %x", id, key, n.key, n.val)
		}
	}
	return nil
}

type state struct {
	buf        *bigBuf
	sleepers   []atomic.Uint64
	allocs     atomic.Uint64
	mutations  atomic.Uint64
	pingpongs  atomic.Uint64
	ticks      uint64
	goroutines int
	start      time.Time
	lastMono   time.Duration

	// values at the previous check
	lastTicks    uint64
	lastSleepers []uint64
	lastAllocs   uint64
	lastMuts     uint64
	lastPings    uint64
}

func (s *state) startSleepers() {
	for i := range s.sleepers {
		go func(i int) {
			var local [32]uint64 // a pattern on this goroutine's stack
			for k := range local {
				local[k] = mix64(uint64(i)<<8 | uint64(k))
			}
			d := time.Duration(5+i%45) * time.Millisecond
			for {
				time.Sleep(d)
				for k := range local {
					if local[k] != mix64(uint64(i)<<8|uint64(k)) {
						latch("goroutine %d: stack word %d is %x", i, k, local[k])
					}
				}
				s.sleepers[i].Add(1)
			}
		}(i)
	}
}

// startPingPong passes a counter back and forth through two pipes.
func (s *state) startPingPong() error {
	ar, aw, err := os.Pipe()
	if err != nil {
		return err
	}
	br, bw, err := os.Pipe()
	if err != nil {
		return err
	}
	go func() { // pong: reply n+1
		var b [8]byte
		for {
			if _, err := ar.Read(b[:]); err != nil {
				latch("pong: read: %v", err)
				return
			}
			binary.LittleEndian.PutUint64(b[:], binary.LittleEndian.Uint64(b[:])+1)
			if _, err := bw.Write(b[:]); err != nil {
				latch("pong: write: %v", err)
				return
			}
		}
	}()
	go func() { // ping
		var b [8]byte
		for n := uint64(0); ; n += 2 {
			binary.LittleEndian.PutUint64(b[:], n)
			if _, err := aw.Write(b[:]); err != nil {
				latch("ping: write: %v", err)
				return
			}
			if _, err := br.Read(b[:]); err != nil {
				latch("ping: read: %v", err)
				return
			}
			if got := binary.LittleEndian.Uint64(b[:]); got != n+1 {
				latch("ping: got %d, want %d", got, n+1)
			}
			s.pingpongs.Add(1)
			time.Sleep(time.Millisecond)
		}
	}()
	return nil
}

func (s *state) check(seq int) {
	var fails []string
	fail := func(format string, args ...any) { fails = append(fails, fmt.Sprintf(format, args...)) }
	if p := latched.Load(); p != nil {
		fail("%s", *p)
	}
	if err := s.buf.verifyAll(); err != nil {
		fail("%v", err)
	}
	if n := runtime.NumGoroutine(); n != s.goroutines {
		fail("runtime.NumGoroutine()=%d, want %d", n, s.goroutines)
	}
	mono := time.Since(s.start)
	if mono < s.lastMono {
		fail("monotonic clock went backwards: %v < %v", mono, s.lastMono)
	}
	s.lastMono = mono
	if d := time.Now().Round(0).Sub(s.start.Round(0).Add(mono)); d < -3*time.Second || d > 3*time.Second {
		fail("wall clock is %v away from the monotonic clock", d)
	}
	if seq > 1 && s.ticks < s.lastTicks {
		fail("ticker count went backwards")
	}
	// With at least 200 ms of running time (20 ticks) since the last check,
	// every goroutine must have made progress.
	ran := s.ticks - s.lastTicks
	sleepers := make([]uint64, len(s.sleepers))
	var total uint64
	for i := range s.sleepers {
		sleepers[i] = s.sleepers[i].Load()
		total += sleepers[i]
	}
	allocs, muts, pings := s.allocs.Load(), s.mutations.Load(), s.pingpongs.Load()
	if seq > 1 && ran >= 20 {
		for i, v := range sleepers {
			if v <= s.lastSleepers[i] {
				fail("goroutine %d: counter stuck at %d after %d ticks", i, v, ran)
				break
			}
		}
		if allocs <= s.lastAllocs {
			fail("allocators stuck at %d rounds", allocs)
		}
		if muts <= s.lastMuts {
			fail("mutator stuck at %d", muts)
		}
		if *netpoll && pings <= s.lastPings {
			fail("pipe ping-pong stuck at %d", pings)
		}
	}
	s.lastTicks, s.lastSleepers, s.lastAllocs, s.lastMuts, s.lastPings = s.ticks, sleepers, allocs, muts, pings
	if len(fails) > 0 {
		say("CHECK %d FAIL %s", seq, strings.Join(fails, "; "))
		return
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	say("CHECK %d OK progress=%d goroutines=%d sleeps=%d allocs=%d mutations=%d pingpongs=%d numgc=%d",
		seq, s.ticks, s.goroutines, total, allocs, muts, pings, ms.NumGC)
}

func main() {
	flag.Parse()
	usr1 := make(chan os.Signal, 1)
	term := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	signal.Notify(term, syscall.SIGTERM)

	s := &state{start: time.Now(), sleepers: make([]atomic.Uint64, *goroutines)}
	n := *memMiB << 20 / chunkSize
	s.buf = &bigBuf{buf: make([]byte, n*chunkSize), gen: make([]uint64, n), crcs: make([]uint32, n)}
	for i := 0; i < n; i++ {
		s.buf.fillChunk(i)
	}
	s.startSleepers()
	for a := 0; a < *allocators; a++ {
		go func(id int) {
			for round := uint64(0); ; round++ {
				if err := allocate(id, round); err != nil {
					latch("%v", err)
				}
				s.allocs.Add(1)
				time.Sleep(2 * time.Millisecond)
			}
		}(a)
	}
	go func() {
		for step := uint64(0); ; step++ {
			s.buf.mutate(step)
			s.mutations.Add(1)
			time.Sleep(time.Millisecond)
		}
	}()
	if *netpoll {
		if err := s.startPingPong(); err != nil {
			say("SETUP FAIL os.Pipe: %v", err)
			os.Exit(3)
		}
	}
	ticker := time.NewTicker(10 * time.Millisecond)
	defer ticker.Stop()
	s.goroutines = runtime.NumGoroutine()
	say("REGION buf %#x %d", uintptr(unsafe.Pointer(&s.buf.buf[0])), len(s.buf.buf))
	say("READY %d", os.Getpid())

	seq := 0
	for {
		select {
		case <-ticker.C:
			s.ticks++
		case <-usr1:
			seq++
			s.check(seq)
		case <-term:
			say("EXIT %d progress=%d", *exitCode, s.ticks)
			os.Exit(*exitCode)
		}
	}
}
