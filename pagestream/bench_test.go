package pagestream_test

import (
	"context"
	"sync"
	"testing"

	"google.golang.org/grpc"

	"github.com/phaul/phaul/pageserver"
	"github.com/phaul/phaul/pagestream"
	"github.com/phaul/phaul/protocol/migrationpb"
	"github.com/phaul/phaul/transport"
)

// benchPages is the source memory the benchmarks send, repeated: 64 MiB of
// heap-like pages, every other one incompressible.
var benchPages = sync.OnceValue(func() []byte { return heapLike(42, 64<<20/pageSize) })

// BenchmarkStream sends 1 GiB per op from a Sender to a page store over a
// real loopback TCP connection (yamux, gRPC; mutual TLS where named): one
// stream, one pre-copy round of 1 GiB per op. A first, untimed round fills
// the store, so the timed rounds measure the stream, not the page faults of
// fresh memory on the target (BenchmarkStoreFresh measures those). It
// reports the page rate (MB/s of pages) and the bytes on the wire.
//
//	go test -run - -bench Stream -benchtime 5x ./pagestream
func BenchmarkStream(b *testing.B) {
	for _, tls := range []bool{false, true} {
		for _, c := range pagestream.Codecs() {
			name := pagestream.CodecName(c)
			if tls {
				name += "/tls"
			}
			b.Run(name, func(b *testing.B) { benchStream(b, c, tls) })
		}
	}
}

func benchStream(b *testing.B, c pagestream.Codec, withTLS bool) {
	const total = 1 << 30
	src := benchPages()
	var srvTLS, cliTLS transport.TLSFiles
	if withTLS {
		srvTLS, cliTLS = benchCerts(b)
	}
	store, err := pageserver.NewStore(pageserver.Config{})
	if err != nil {
		b.Fatal(err)
	}
	defer store.Close()
	svc, err := pageserver.NewService(pageserver.ServiceConfig{
		Lookup: func(string) (*pageserver.Store, error) { return store, nil },
	})
	if err != nil {
		b.Fatal(err)
	}
	l, err := transport.Listen(transport.ServerConfig{Listen: "127.0.0.1:0", Config: transport.Config{TLS: srvTLS, Logger: quietLogger()}})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		l.Serve(ctx, func(ctx context.Context, s *transport.Session) {
			g := grpc.NewServer(append(transport.GRPCServerOptions(), pageserver.GRPCServerOptions()...)...)
			migrationpb.RegisterPagesServer(g, svc)
			s.ServeGRPC(ctx, g)
		})
	})
	defer wg.Wait()
	defer cancel()
	sess, err := transport.Dial(ctx, transport.ClientConfig{Address: l.Addr().String(), Config: transport.Config{TLS: cliTLS, Logger: quietLogger()}})
	if err != nil {
		b.Fatal(err)
	}
	defer sess.Close()
	cc, err := sess.DialGRPC()
	if err != nil {
		b.Fatal(err)
	}
	defer cc.Close()
	s, err := pagestream.Open(ctx, migrationpb.NewPagesClient(cc), "bench", pagestream.SenderConfig{Codec: c})
	if err != nil {
		b.Fatal(err)
	}
	round := func(r uint32) {
		k := s.Sink(1, r)
		const chunk = 8 << 20 // what a pre-dump round reads at once
		for off := 0; off < total; off += chunk {
			at := (off + int(r)*chunk) % len(src) // other contents each round
			if err := k.WritePages(0x7f0000000000+uint64(off), src[at:at+chunk]); err != nil {
				b.Fatal(err)
			}
		}
		if err := k.Done(); err != nil {
			b.Fatal(err)
		}
	}
	round(0)
	before := s.Stats()
	b.SetBytes(total)
	b.ReportAllocs()
	var r uint32
	for b.Loop() {
		r++
		round(r)
	}
	st := s.Stats().Sub(before)
	if err := s.Close(); err != nil {
		b.Fatal(err)
	}
	if st.RawBytes != uint64(b.N)*total {
		b.Fatalf("%d bytes arrived, want %d", st.RawBytes, uint64(b.N)*total)
	}
	b.ReportMetric(float64(st.WireBytes)/float64(b.N), "wire-B/op")
	b.ReportMetric(float64(st.WireBytes)/float64(st.RawBytes), "wire/raw")
	b.ReportMetric(st.WireRate()/1e6, "wire-MB/s")
}

// BenchmarkStoreFresh measures applying 1 GiB of decoded batches to an
// empty store: the cost of fresh memory on the target.
func BenchmarkStoreFresh(b *testing.B) {
	src := benchPages()
	const batch = 1 << 20
	var batches []*pagestream.Batch
	enc, _ := pagestream.NewEncoder(pagestream.CodecNone, 1)
	d, _ := pagestream.NewDecoder(pagestream.CodecNone, pagestream.DefaultLimits())
	for off := 0; off < len(src); off += batch {
		m := pagestream.BuildBatch(enc, nil, d.Next(), 1, 0, []pagestream.Run{{Addr: uint64(off), Pages: batch / pageSize}}, src[off:off+batch])
		bt, err := d.Decode(m)
		if err != nil {
			b.Fatal(err)
		}
		batches = append(batches, bt)
	}
	b.SetBytes(1 << 30)
	for b.Loop() {
		store, err := pageserver.NewStore(pageserver.Config{})
		if err != nil {
			b.Fatal(err)
		}
		for rep := range (1 << 30) / len(src) {
			for _, bt := range batches {
				bt.Runs[0].Addr = uint64(rep*len(src)) + bt.Runs[0].Addr%uint64(len(src))
				if err := store.Apply(bt); err != nil {
					b.Fatal(err)
				}
			}
		}
		b.StopTimer()
		store.Close()
		b.StartTimer()
	}
}

// BenchmarkEncode measures compression on one core: zero-page detection,
// checksum and codec, per 1 MiB batch of the benchmark pages.
//
//	go test -run - -bench Encode ./pagestream
func BenchmarkEncode(b *testing.B) {
	src := benchPages()
	for _, c := range pagestream.Codecs() {
		b.Run(pagestream.CodecName(c), func(b *testing.B) {
			enc, err := pagestream.NewEncoder(c, 1)
			if err != nil {
				b.Fatal(err)
			}
			defer enc.Close()
			dst := make([]byte, 2<<20)
			const batch = 1 << 20
			b.SetBytes(batch)
			var wire int
			for i := 0; b.Loop(); i++ {
				off := (i * batch) % len(src)
				m := pagestream.BuildBatch(enc, dst[:0], 1, 1, 0, []pagestream.Run{{Addr: 0, Pages: batch / pageSize}}, src[off:off+batch])
				wire += len(m.Payload)
			}
			b.ReportMetric(float64(wire)/float64(b.N)/batch, "wire/raw")
		})
	}
}

// BenchmarkDecode measures the target's side on one core: checks,
// decompression into a pooled buffer, checksum.
func BenchmarkDecode(b *testing.B) {
	src := benchPages()
	for _, c := range pagestream.Codecs() {
		b.Run(pagestream.CodecName(c), func(b *testing.B) {
			enc, err := pagestream.NewEncoder(c, 1)
			if err != nil {
				b.Fatal(err)
			}
			defer enc.Close()
			const batch = 1 << 20
			var msgs []*migrationpb.PageBatch
			for off := 0; off < 16*batch; off += batch {
				msgs = append(msgs, pagestream.BuildBatch(enc, nil, 0, 1, 0, []pagestream.Run{{Addr: 0, Pages: batch / pageSize}}, src[off:off+batch]))
			}
			d, err := pagestream.NewDecoder(c, pagestream.DefaultLimits())
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(batch)
			for i := 0; b.Loop(); i++ {
				m := msgs[i%len(msgs)]
				m.Seq = d.Next()
				bt, err := d.Decode(m)
				if err != nil {
					b.Fatal(err)
				}
				bt.Release()
			}
		})
	}
}
