package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/phaul/phaul/bench/workload"
	"github.com/phaul/phaul/internal/pagereader"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/internal/topology"
	"github.com/phaul/phaul/pagestream"
	"github.com/phaul/phaul/predump"
)

// BoundFactor is the total-time target: a migration should take at most
// this many times its bandwidth bound (Bandwidth.Bound).
const BoundFactor = 1.3

// Bandwidth is what this machine can do at each stage a page goes through
// in a migration, measured once per session before the runs: reading a
// process's memory, the link between the source and the target host, and
// compressing pages. Rates are in MB/s (10^6 bytes per second) of raw
// (uncompressed) memory; 0 means not measured.
type Bandwidth struct {
	// ReadMBps is how fast process_vm_readv copies populated memory, in
	// batches of ReadBatchBytes as a pre-copy round reads them.
	ReadMBps  float64 `json:"read_MBps"`
	ReadBytes int64   `json:"read_bytes"`
	// LinkMBps is the TCP throughput of one connection from the source
	// host to the target host, timed on the receiving side.
	LinkMBps  float64 `json:"link_MBps"`
	LinkBytes int64   `json:"link_bytes"`
	// Compress holds the page codec's throughput for each codec and data
	// kind the session's runs use (none for compress=none), on pages
	// drawn from the session's largest workload.
	Compress []CompressRate `json:"compress,omitempty"`
}

// CompressRate is a codec's throughput on one kind of workload data.
type CompressRate struct {
	// Codec is s2 or zstd; Data is the workload's page contents, heap or
	// random.
	Codec string `json:"codec"`
	Data  string `json:"data"`
	// MBps is raw input bytes per second of wall time.
	MBps  float64 `json:"compress_MBps"`
	Bytes int64   `json:"bytes"`
	// Ratio is the compressed size over the raw size.
	Ratio float64 `json:"ratio"`
}

// Sizes of the measurements: at least 256 MiB read (in pre-copy batches),
// 512 MiB over the link, 256 MiB compressed per codec and data kind.
const (
	ReadMeasureBytes     = 256 << 20
	LinkMeasureBytes     = 512 << 20
	CompressMeasureBytes = 256 << 20
	// ReadBatchBytes is the batch a pre-copy round reads at once.
	ReadBatchBytes = predump.BatchSize
	// compressSampleBytes is how much distinct workload data the
	// compression measurement cycles over.
	compressSampleBytes = 64 << 20
)

// Bound is the bandwidth bound of one migration.
type Bound struct {
	// MS is the memory size over the slowest stage's rate, in ms.
	MS float64
	// Limit names the slowest stage: "read", "link" or "compress".
	Limit string
}

// Bound returns the bandwidth bound of migrating mem bytes of data (heap
// or random) with codec (s2, zstd, none; "" is phaul's default): mem over
// the slowest of the read, link and compression rates. compress=none has
// no compression stage. It is not known (false) for an unknown memory
// size or a rate that was not measured.
func (bw *Bandwidth) Bound(mem int64, codec, data string) (Bound, bool) {
	if bw == nil || mem <= 0 || bw.ReadMBps <= 0 || bw.LinkMBps <= 0 {
		return Bound{}, false
	}
	rate, limit := bw.ReadMBps, "read"
	if bw.LinkMBps < rate {
		rate, limit = bw.LinkMBps, "link"
	}
	if codec == "" {
		codec = pagestream.CodecName(pagestream.DefaultCodec)
	}
	if codec != "none" {
		c, ok := bw.compressRate(codec, data)
		if !ok {
			return Bound{}, false
		}
		if c < rate {
			rate, limit = c, "compress"
		}
	}
	return Bound{MS: float64(mem) / (rate * 1e3), Limit: limit}, true
}

func (bw *Bandwidth) compressRate(codec, data string) (float64, bool) {
	for _, c := range bw.Compress {
		if c.Codec == codec && c.Data == data && c.MBps > 0 {
			return c.MBps, true
		}
	}
	return 0, false
}

// boundRun sets run's bound and its total over the bound (successful runs
// of the built-in workload only).
func boundRun(bw *Bandwidth, run *Run) {
	if run.Err != "" || run.TotalMS <= 0 {
		return
	}
	if b, ok := bw.Bound(run.MemBytes, run.Variant.Compress, run.Workload); ok {
		run.BoundMS, run.BoundRatio = b.MS, run.TotalMS/b.MS
	}
}

// String is a one-line account: "read 5000 MB/s, link 2000 MB/s,
// compress s2/heap 3000 MB/s (ratio 0.05)".
func (bw *Bandwidth) String() string {
	rate := func(v float64) string {
		if v <= 0 {
			return "–"
		}
		return formatMBps(v) + " MB/s"
	}
	parts := []string{"read " + rate(bw.ReadMBps), "link " + rate(bw.LinkMBps)}
	for _, c := range bw.Compress {
		parts = append(parts, fmt.Sprintf("compress %s/%s %s (ratio %.2f)", c.Codec, c.Data, rate(c.MBps), c.Ratio))
	}
	return strings.Join(parts, ", ")
}

// compressKind is a codec and a data kind to measure.
type compressKind struct {
	codec  string
	random bool
}

// compressKinds lists the codecs and data kinds the runs of cases use,
// the default codec on heap data first.
func compressKinds(cases []runCase) []compressKind {
	var out []compressKind
	for _, random := range []bool{false, true} {
		for _, codec := range []string{"s2", "zstd"} {
			for _, c := range cases {
				cc := c.v.Compress
				if cc == "" {
					cc = pagestream.CodecName(pagestream.DefaultCodec)
				}
				if c.userCmd == "" && c.v.Random == random && cc == codec {
					out = append(out, compressKind{codec: codec, random: random})
					break
				}
			}
		}
	}
	return out
}

// measureBandwidth measures the rates the runs of cases depend on, the
// link between from and to. A rate that cannot be measured is left at 0
// with a note; only the context's end is an error.
func measureBandwidth(ctx context.Context, from, to *topology.Host, cases []runCase, res *Results) (*Bandwidth, error) {
	bw := &Bandwidth{}
	note := func(what string, err error) error {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		res.Notes = append(res.Notes, fmt.Sprintf("Bandwidth: the %s rate could not be measured (no bound): %v.", what, err))
		return nil
	}
	if r, err := MeasureRead(ctx, ReadMeasureBytes); err != nil {
		if err := note("read", err); err != nil {
			return bw, err
		}
	} else {
		bw.ReadMBps, bw.ReadBytes = r, ReadMeasureBytes
	}
	if r, err := MeasureLink(ctx, from, to, LinkMeasureBytes); err != nil {
		if err := note("link", err); err != nil {
			return bw, err
		}
	} else {
		bw.LinkMBps, bw.LinkBytes = r, LinkMeasureBytes
	}
	var mem int64
	for _, c := range cases {
		mem = max(mem, c.mem)
	}
	for _, k := range compressKinds(cases) {
		codec, err := pagestream.ParseCodec(k.codec)
		if err == nil {
			var c CompressRate
			if c, err = MeasureCompress(ctx, codec, k.random, mem, CompressMeasureBytes); err == nil {
				bw.Compress = append(bw.Compress, c)
				continue
			}
		}
		if err := note("compress "+k.codec, err); err != nil {
			return bw, err
		}
	}
	return bw, ctx.Err()
}

// MeasureRead returns how fast phaul reads a process's memory, in MB/s:
// n bytes (whole pages) of populated anonymous memory of this process,
// read with process_vm_readv through package pagereader in batches of
// ReadBatchBytes, as a pre-copy round reads them.
func MeasureRead(ctx context.Context, n int64) (float64, error) {
	n = n / pagereader.PageSize * pagereader.PageSize
	if n <= 0 {
		return 0, fmt.Errorf("read %d bytes: nothing to read", n)
	}
	mem, err := sys.Mmap(-1, 0, int(n), sys.PROT_READ|sys.PROT_WRITE, sys.MAP_PRIVATE|sys.MAP_ANONYMOUS|sys.MAP_POPULATE)
	if err != nil {
		return 0, err
	}
	defer sys.Munmap(mem)
	for i := 0; i < len(mem); i += pagereader.PageSize {
		mem[i] = byte(i>>12) | 1 // populated, not the zero page
	}
	addr, err := sys.BufferAddr(mem)
	if err != nil {
		return 0, err
	}
	rd, err := pagereader.Open(os.Getpid())
	if err != nil {
		return 0, err
	}
	defer rd.Close()
	buf := make([]byte, ReadBatchBytes)
	for i := 0; i < len(buf); i += pagereader.PageSize {
		buf[i] = 1 // fault the buffer in before the clock starts
	}
	spans := []pagereader.Span{{Addr: addr, Pages: uint64(n) / pagereader.PageSize}}
	read := 0
	start := time.Now()
	for len(spans) > 0 {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		runs, rest, err := rd.Batch(spans, true, buf)
		if err != nil {
			return 0, err
		}
		for _, r := range runs {
			read += len(r.Data)
		}
		spans = rest
	}
	elapsed := time.Since(start)
	if int64(read) != n {
		return 0, fmt.Errorf("read %d of %d bytes", read, n)
	}
	return mbps(n, elapsed), nil
}

// MeasureLink returns the TCP throughput from host from to host to, in
// MB/s: n bytes through one connection to to's address, timed on the
// receiving side from the accept to the last byte. A nil host is this
// network namespace, with the loopback address.
func MeasureLink(ctx context.Context, from, to *topology.Host, n int64) (float64, error) {
	addr := "127.0.0.1"
	if to != nil {
		addr = to.Addr
	}
	var ln net.Listener
	if err := inHost(to, func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(addr, "0"))
		return err
	}); err != nil {
		return 0, fmt.Errorf("listen on the target: %w", err)
	}
	defer ln.Close()
	// The sender connects and writes n bytes; the receiver times them.
	sent := make(chan error, 1)
	var conns sync.WaitGroup
	var out net.Conn
	conns.Go(func() {
		err := inHost(from, func() (err error) {
			out, err = net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
			return err
		})
		if err != nil {
			_ = ln.Close() // the accept below gives up
			sent <- fmt.Errorf("connect from the source: %w", err)
			return
		}
		defer out.Close()
		chunk := make([]byte, 1<<20)
		for left := n; left > 0; {
			k, err := out.Write(chunk[:min(int64(len(chunk)), left)])
			if err != nil {
				sent <- fmt.Errorf("send: %w", err)
				return
			}
			left -= int64(k)
		}
		sent <- nil
	})
	defer conns.Wait()
	stop := context.AfterFunc(ctx, func() { _ = ln.Close() })
	defer stop()
	in, err := ln.Accept()
	if err != nil {
		if serr := <-sent; serr != nil {
			err = serr
		}
		return 0, errors.Join(err, ctx.Err())
	}
	defer in.Close()
	stopIn := context.AfterFunc(ctx, func() { _ = in.Close() })
	defer stopIn()
	start := time.Now()
	buf := make([]byte, 1<<20)
	var got int64
	for got < n {
		k, err := in.Read(buf)
		got += int64(k)
		if err != nil {
			if errors.Is(err, io.EOF) && got >= n {
				break
			}
			_ = in.Close() // the sender gives up
			return 0, errors.Join(fmt.Errorf("received %d of %d bytes: %w", got, n, err), ctx.Err())
		}
	}
	elapsed := time.Since(start)
	if err := <-sent; err != nil {
		return 0, err
	}
	return mbps(n, elapsed), nil
}

// inHost runs fn in host h's network namespace, or here when h is nil.
func inHost(h *topology.Host, fn func() error) error {
	if h == nil {
		return fn()
	}
	return h.Do(fn)
}

// MeasureCompress returns the page codec's throughput on the built-in
// workload's pages (random or heap-like, as workload.FillPage writes
// them), as a migration's sender compresses them: batches of
// pagestream.DefaultBatchBytes built (checksum and payload) by
// pagestream.DefaultWorkers goroutines sharing one pagestream.Encoder. It
// compresses n bytes in all, cycling over up to compressSampleBytes of
// batches taken evenly from a workload of mem bytes, and reports raw input
// bytes per second of wall time.
//
// S2's ratio and speed on heap-like pages depend much on where a batch
// starts among the workload's pages (1.2 to 4 GB/s on one core, to 49% or
// to 12%), and where a migration's batches start depends on the
// process's memory layout: the sample's batches start at page offsets
// spread over a batch, so that the figure is the average over those
// alignments.
func MeasureCompress(ctx context.Context, codec pagestream.Codec, random bool, mem, n int64) (CompressRate, error) {
	const batch = pagestream.DefaultBatchBytes
	const batchPages = batch / pagereader.PageSize
	data := "heap"
	if random {
		data = "random"
	}
	out := CompressRate{Codec: pagestream.CodecName(codec), Data: data}
	batches := int(n / batch)
	if batches < 1 {
		return out, fmt.Errorf("compress %d bytes: less than a batch", n)
	}
	// The sample's batches: the workload's, evenly spread, at offsets
	// spread over a batch.
	memBatches := max(int(mem/batch), 1)
	sampleBatches := min(compressSampleBytes/batch, batches, memBatches)
	sample := make([]byte, sampleBatches*batch)
	for b := range sampleBatches {
		first := b*memBatches/sampleBatches*batchPages + b*batchPages/sampleBatches
		for p := range batchPages {
			workload.FillPage(sample[(b*batchPages+p)*pagereader.PageSize:], first+p, 1, random)
		}
	}
	enc, err := pagestream.NewEncoder(codec, pagestream.DefaultWorkers)
	if err != nil {
		return out, err
	}
	defer enc.Close()
	runs := []pagestream.Run{{Pages: batch / pagereader.PageSize, Kind: pagestream.Data}}
	var next atomic.Int64
	var wire atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range pagestream.DefaultWorkers {
		wg.Go(func() {
			dst := make([]byte, 0, 2*batch)
			for i := next.Add(1) - 1; i < int64(batches) && ctx.Err() == nil; i = next.Add(1) - 1 {
				off := i * batch % int64(len(sample))
				m := pagestream.BuildBatch(enc, dst, uint64(i+1), 1, 0, runs, sample[off:off+batch])
				wire.Add(int64(len(m.GetPayload())))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := ctx.Err(); err != nil {
		return out, err
	}
	out.Bytes = int64(batches) * batch
	out.MBps = mbps(out.Bytes, elapsed)
	out.Ratio = float64(wire.Load()) / float64(out.Bytes)
	return out, nil
}

func mbps(n int64, d time.Duration) float64 {
	if d <= 0 {
		d = time.Nanosecond
	}
	return float64(n) / d.Seconds() / 1e6
}

// formatMBps formats a rate for the report ("–" when not measured).
func formatMBps(v float64) string {
	if v <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.0f", v)
}
