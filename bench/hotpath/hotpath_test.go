package hotpath

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/bench/workload"
	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/internal/pagereader"
	"github.com/phaul/phaul/pageserver"
	"github.com/phaul/phaul/pagestream"
)

const pageSize = 4096

// childEnv makes the test binary a memory holder: it maps the number of
// MiB the variable says, fills them with the workload's heap-like data,
// prints the address, and then obeys stdin: "drop" gives the pages back
// (MADV_DONTNEED) so that the next writes meet fresh pages.
const childEnv = "PHAUL_HOTPATH_CHILD_MIB"

func TestMain(m *testing.M) {
	if v := os.Getenv(childEnv); v != "" {
		os.Exit(child(v))
	}
	os.Exit(m.Run())
}

func child(v string) int {
	mib, err := strconv.Atoi(v)
	if err != nil {
		return 2
	}
	mem, err := syscall.Mmap(-1, 0, mib<<20, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		fmt.Println("ERR", err)
		return 1
	}
	for i := 0; i < len(mem)/pageSize; i++ {
		workload.FillPage(mem[i*pageSize:], i, 1, false)
	}
	fmt.Printf("ADDR %p\n", &mem[0])
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		if sc.Text() == "drop" {
			if err := syscall.Madvise(mem, syscall.MADV_DONTNEED); err != nil {
				fmt.Println("ERR", err)
				continue
			}
		}
		fmt.Println("ok")
	}
	return 0
}

// holder is a child process holding memory at addr.
type holder struct {
	cmd  *exec.Cmd
	in   io.WriteCloser
	out  *bufio.Reader
	pid  int
	addr uint64
	size int
}

func startHolder(b *testing.B, mib int) *holder {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+strconv.Itoa(mib))
	in, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	h := &holder{cmd: cmd, in: in, out: bufio.NewReader(outPipe), pid: cmd.Process.Pid, size: mib << 20}
	b.Cleanup(func() {
		_ = syscall.Kill(h.pid, syscall.SIGCONT)
		in.Close()
		_ = cmd.Wait()
	})
	line, err := h.out.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "ADDR ") {
		b.Fatalf("memory holder: %q, %v", line, err)
	}
	if h.addr, err = strconv.ParseUint(strings.TrimSpace(line[5:]), 0, 64); err != nil {
		b.Fatal(err)
	}
	return h
}

// drop makes the holder give its pages back and waits until it has.
func (h *holder) drop(b *testing.B) {
	if _, err := io.WriteString(h.in, "drop\n"); err != nil {
		b.Fatal(err)
	}
	if line, err := h.out.ReadString('\n'); err != nil || line != "ok\n" {
		b.Fatalf("drop: %q, %v", line, err)
	}
}

// stop stops the holder (as a frozen or shadow process is) and waits
// until it is.
func (h *holder) stop(b *testing.B) {
	if err := syscall.Kill(h.pid, syscall.SIGSTOP); err != nil {
		b.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; {
		st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", h.pid))
		if i := strings.LastIndexByte(string(st), ')'); i > 0 && i+2 < len(st) && st[i+2] == 'T' {
			return
		}
		if time.Now().After(deadline) {
			b.Fatal("the holder did not stop")
		}
		time.Sleep(time.Millisecond)
	}
}

// pages returns n pages of the workload's data (its first pages).
func pages(n int, random bool) []byte { return pagesAt(0, n, random) }

// pagesAt returns n pages of the workload's data from page first on.
func pagesAt(first, n int, random bool) []byte {
	buf := make([]byte, n*pageSize)
	for i := 0; i < n; i++ {
		workload.FillPage(buf[i*pageSize:], first+i, 1, random)
	}
	return buf
}

// BenchmarkPageRead reads 64 MiB of a live process in 8 MiB batches (the
// pre-copy rounds' batch size), with process_vm_readv and through
// /proc/PID/mem.
func BenchmarkPageRead(b *testing.B) {
	const mib = 64
	h := startHolder(b, mib)
	for _, mode := range []struct {
		name     string
		readable bool
	}{{"process_vm_readv", true}, {"proc_mem", false}} {
		b.Run(mode.name, func(b *testing.B) {
			rd, err := pagereader.Open(h.pid)
			if err != nil {
				b.Fatal(err)
			}
			defer rd.Close()
			buf := make([]byte, 8<<20)
			b.SetBytes(mib << 20)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				spans := []pagereader.Span{{Addr: h.addr, Pages: mib << 20 / pageSize}}
				for len(spans) > 0 {
					runs, rest, err := rd.Batch(spans, mode.readable, buf)
					if err != nil {
						b.Fatal(err)
					}
					if len(runs) == 0 {
						b.Fatal("nothing read")
					}
					spans = rest
				}
			}
		})
	}
}

// BenchmarkCompress compresses 1 MiB batches (the sender's batch size) of
// the workload's heap-like and random pages with each codec, reporting
// the ratio raw/compressed. How well s2 compresses the workload's
// heap-like pages swings with the batch's position in the workload (2× to
// 57×: its match finder skips ahead on them), so the batches are 16
// slices taken across a 256 MiB workload, in turn.
func BenchmarkCompress(b *testing.B) {
	const n, slices = 256, 16
	for _, data := range []struct {
		name   string
		random bool
	}{{"heap", false}, {"random", true}} {
		var raws [][]byte
		for k := 0; k < slices; k++ {
			raws = append(raws, pagesAt(k*(65536/slices), n, data.random))
		}
		for _, codec := range []pagestream.Codec{pagestream.CodecS2, pagestream.CodecZstd} {
			b.Run(data.name+"/"+pagestream.CodecName(codec), func(b *testing.B) {
				enc, err := pagestream.NewEncoder(codec, 1)
				if err != nil {
					b.Fatal(err)
				}
				defer enc.Close()
				dst := make([]byte, 0, 2*n*pageSize) // room for any codec's worst case
				var in, out int
				b.SetBytes(n * pageSize)
				for i := 0; i < b.N; i++ {
					raw := raws[i%slices]
					c, _ := enc.Encode(dst, raw)
					in, out = in+len(raw), out+len(c)
				}
				b.ReportMetric(float64(in)/float64(out), "ratio")
			})
		}
	}
}

// BenchmarkDecode checks and decompresses 1 MiB heap-like batches (from
// the middle of a 256 MiB workload) as the target's page service does.
func BenchmarkDecode(b *testing.B) {
	raw := pagesAt(32768, 256, false)
	runs := []pagestream.Run{{Addr: 0x10000000, Pages: 256, Kind: pagestream.Data}}
	for _, codec := range pagestream.Codecs() {
		b.Run(pagestream.CodecName(codec), func(b *testing.B) {
			enc, err := pagestream.NewEncoder(codec, 1)
			if err != nil {
				b.Fatal(err)
			}
			defer enc.Close()
			dec, err := pagestream.NewDecoder(codec, pagestream.DefaultLimits())
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(raw)))
			b.StopTimer()
			for i := 0; i < b.N; i++ {
				m := pagestream.BuildBatch(enc, nil, dec.Next(), 1, 0, runs, raw)
				b.StartTimer()
				bt, err := dec.Decode(m)
				b.StopTimer()
				if err != nil {
					b.Fatal(err)
				}
				bt.Release()
			}
		})
	}
}

// BenchmarkStoreApply stores 1 MiB batches into the target's page store:
// "first" into pages never seen (the store grows, on memory fresh from
// the kernel), "again" over pages it holds (a later round).
func BenchmarkStoreApply(b *testing.B) {
	const n = 256
	raw := pages(n, false)
	enc, err := pagestream.NewEncoder(pagestream.CodecNone, 1)
	if err != nil {
		b.Fatal(err)
	}
	// 128 MiB of address space, revisited when the store has it all.
	const span = (128 << 20) / (n * pageSize)
	for _, again := range []bool{false, true} {
		name := "first"
		if again {
			name = "again"
		}
		b.Run(name, func(b *testing.B) {
			dec, err := pagestream.NewDecoder(pagestream.CodecNone, pagestream.DefaultLimits())
			if err != nil {
				b.Fatal(err)
			}
			var st *pageserver.Store
			// A new store starts on memory fresh from the kernel, as in a
			// new target: the old one's is handed back first.
			newStore := func() {
				if st != nil {
					st.Close()
					st = nil
				}
				debug.FreeOSMemory()
				if st, err = pageserver.NewStore(pageserver.Config{}); err != nil {
					b.Fatal(err)
				}
			}
			// apply stores one batch; only Apply runs with the timer on.
			apply := func(i int, round uint32) {
				b.StopTimer()
				runs := []pagestream.Run{{Addr: 0x7f0000000000 + uint64(i%span)*n*pageSize, Pages: n, Kind: pagestream.Data}}
				bt, err := dec.Decode(pagestream.BuildBatch(enc, nil, dec.Next(), 1, round, runs, raw))
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if err := st.Apply(bt); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				bt.Release()
				b.StartTimer()
			}
			newStore()
			defer func() { st.Close() }()
			if again {
				for i := 0; i < span; i++ {
					apply(i, 0)
				}
			}
			b.SetBytes(n * pageSize)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if !again && i > 0 && i%span == 0 {
					b.StopTimer()
					newStore()
					b.StartTimer()
				}
				round := uint32(0)
				if again {
					round = uint32(1 + i/span)
				}
				apply(i, round)
			}
		})
	}
}

// BenchmarkRestoreWrite writes 1 MiB at a time into a stopped process, as
// restore fills the shadow process: into pages it has (a later round) and
// into fresh pages (the first round: every page faults in).
func BenchmarkRestoreWrite(b *testing.B) {
	const mib = 256
	const chunk = 1 << 20
	data := pages(chunk/pageSize, false)
	h := startHolder(b, mib)
	for _, fresh := range []bool{false, true} {
		name := "populated"
		if fresh {
			name = "fresh"
		}
		b.Run(name, func(b *testing.B) {
			if fresh {
				h.drop(b)
			}
			h.stop(b)
			b.SetBytes(chunk)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				off := uint64(i%(mib<<20/chunk)) * chunk
				if fresh && i > 0 && off == 0 {
					b.StopTimer()
					_ = syscall.Kill(h.pid, syscall.SIGCONT)
					h.drop(b)
					h.stop(b)
					b.StartTimer()
				}
				if err := ptrace.WriteMemory(h.pid, h.addr+off, data); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			_ = syscall.Kill(h.pid, syscall.SIGCONT)
		})
	}
}
