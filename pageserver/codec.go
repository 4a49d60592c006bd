package pageserver

import (
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	protobuf "google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/protocol/migrationpb"
	"github.com/phaul/phaul/transport"
)

// GRPCServerOptions are the options of a gRPC server carrying the page
// service: a codec that leaves a batch's payload where gRPC received it
// (in a pooled buffer) instead of copying it into a fresh allocation, the
// largest cost of receiving pages after the copy into the store. Other
// messages, and servers without the option, work as usual.
func GRPCServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.ForceServerCodecV2(wireCodec{std: stdCodec()})}
}

// stdCodec is the sessions' proto codec.
func stdCodec() encoding.CodecV2 { return transport.Codec() }

// wireCodec is the standard proto codec, except for PageStreamRequest:
// the payload of its batch aliases the received buffer, which is kept in
// held until Service is done with the message (releaseWire).
type wireCodec struct{ std encoding.CodecV2 }

// held maps a received *PageStreamRequest to the buffer its payload
// aliases.
var held sync.Map

func (c wireCodec) Name() string                                { return c.std.Name() }
func (c wireCodec) Marshal(v any) (mem.BufferSlice, error)      { return c.std.Marshal(v) }
func (c wireCodec) Unmarshal(data mem.BufferSlice, v any) error { return c.unmarshal(data, v) }

func (c wireCodec) unmarshal(data mem.BufferSlice, v any) error {
	req, ok := v.(*migrationpb.PageStreamRequest)
	if !ok {
		return c.std.Unmarshal(data, v)
	}
	buf := data.MaterializeToBuffer(transport.BufferPool())
	b := buf.ReadOnlyData()
	rest, payload, ok := splitPayload(b)
	if !ok {
		defer buf.Free()
		return protobuf.Unmarshal(b, req)
	}
	if err := protobuf.Unmarshal(rest, req); err != nil {
		buf.Free()
		return err
	}
	if req.GetBatch() == nil { // an open after the batch: the oneof took it
		buf.Free()
		return protobuf.Unmarshal(b, req)
	}
	req.GetBatch().Payload = payload
	held.Store(req, buf)
	return nil
}

// releaseWire frees the buffer a received message's payload aliases, if
// any. The message's payload must not be used after.
func releaseWire(m *migrationpb.PageStreamRequest) {
	if buf, ok := held.LoadAndDelete(m); ok {
		buf.(mem.Buffer).Free()
	}
}

// Field numbers of PageStreamRequest.batch and PageBatch.payload.
const (
	fieldBatch   = 2
	fieldPayload = 6
)

// splitPayload takes an encoded PageStreamRequest holding one batch apart:
// it returns the message without the batch's payload (a new, small
// encoding) and the payload (a subslice of b). For anything unusual — no
// batch, several batch fields to merge, several payload fields, malformed
// input — it returns ok = false and the caller decodes b as it is, so the
// result is always what proto.Unmarshal(b) gives.
func splitPayload(b []byte) (rest, payload []byte, ok bool) {
	var batch []byte
	var before, after []byte // top-level fields around the batch
	seen := false
	for off := 0; off < len(b); {
		num, typ, n := protowire.ConsumeTag(b[off:])
		if n < 0 {
			return nil, nil, false
		}
		m := protowire.ConsumeFieldValue(num, typ, b[off+n:])
		if m < 0 {
			return nil, nil, false
		}
		field := b[off : off+n+m]
		switch {
		case num == fieldBatch && typ == protowire.BytesType && !seen:
			v, k := protowire.ConsumeBytes(b[off+n:])
			if k < 0 {
				return nil, nil, false
			}
			batch, seen = v, true
		case num == fieldBatch:
			return nil, nil, false
		case seen:
			after = append(after, field...)
		default:
			before = append(before, field...)
		}
		off += n + m
	}
	if !seen {
		return nil, nil, false
	}
	var inner []byte
	found := false
	for off := 0; off < len(batch); {
		num, typ, n := protowire.ConsumeTag(batch[off:])
		if n < 0 {
			return nil, nil, false
		}
		m := protowire.ConsumeFieldValue(num, typ, batch[off+n:])
		if m < 0 {
			return nil, nil, false
		}
		if num == fieldPayload {
			v, k := protowire.ConsumeBytes(batch[off+n:])
			if typ != protowire.BytesType || k < 0 || found {
				return nil, nil, false
			}
			payload, found = v, true
		} else {
			inner = append(inner, batch[off:off+n+m]...)
		}
		off += n + m
	}
	if !found {
		return nil, nil, false
	}
	rest = append(before, protowire.AppendTag(nil, fieldBatch, protowire.BytesType)...)
	rest = protowire.AppendBytes(rest, inner)
	rest = append(rest, after...)
	return rest, payload, true
}
