package transport

import (
	"fmt"

	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
)

// Codec returns the protobuf codec of session gRPC clients and servers:
// gRPC's own, except that a large message is marshalled into a buffer of
// BufferPool (gRPC's codec takes one from its default pool, which clears
// it first: a page batch's megabyte, once per batch).
func Codec() encoding.CodecV2 { return codec{std: encoding.GetCodecV2(grpcproto.Name)} }

type codec struct{ std encoding.CodecV2 }

func (c codec) Name() string { return c.std.Name() }

func (c codec) Unmarshal(data mem.BufferSlice, v any) error { return c.std.Unmarshal(data, v) }

func (c codec) Marshal(v any) (mem.BufferSlice, error) {
	m, ok := v.(proto.Message)
	if !ok {
		return c.std.Marshal(v)
	}
	size := proto.Size(m)
	if mem.IsBelowBufferPoolingThreshold(size) {
		return c.std.Marshal(v)
	}
	buf := pool.Get(size)
	// UseCachedSize: the size was just computed, and the message is not
	// changed meanwhile.
	out, err := proto.MarshalOptions{UseCachedSize: true}.MarshalAppend((*buf)[:0], m)
	if err != nil {
		pool.Put(buf)
		return nil, fmt.Errorf("marshal %T: %w", v, err)
	}
	*buf = out
	return mem.BufferSlice{mem.NewBuffer(buf, pool)}, nil
}
