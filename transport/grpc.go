package transport

import (
	"context"
	"errors"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/experimental"

	"github.com/phaul/phaul/internal/fault"
)

// gRPC tuning for bulk page streams on a session: large flow-control
// windows (no slow start from 64 KiB), large buffers, so that yamux
// carries few, large frames, and buffers that are not cleared
// (BufferPool).
const (
	grpcWindow     = 16 << 20
	grpcBuffer     = 1 << 20
	grpcMaxMessage = 64 << 20
)

// GRPCServerOptions are the options a gRPC server on a session should
// have; ServeGRPC's server is expected to be built with them (and may add
// its own).
func GRPCServerOptions() []grpc.ServerOption {
	return append([]grpc.ServerOption{
		grpc.InitialWindowSize(grpcWindow),
		grpc.InitialConnWindowSize(grpcWindow),
		grpc.ReadBufferSize(grpcBuffer),
		grpc.WriteBufferSize(grpcBuffer),
		grpc.MaxRecvMsgSize(grpcMaxMessage),
		grpc.MaxSendMsgSize(grpcMaxMessage),
		experimental.BufferPool(BufferPool()),
	}, fault.ServerOptions()...) // test-only fault points; none unless armed
}

// ServeGRPC serves srv on the streams the peer opens, until the session
// or ctx ends; then it stops srv (which must serve this session only) and
// returns. It returns nil when the session ended, ctx's error when ctx
// did, and gRPC's error otherwise.
func (s *Session) ServeGRPC(ctx context.Context, srv *grpc.Server) error {
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	err := srv.Serve(s.mux)
	srv.Stop()
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case s.mux.IsClosed(), errors.Is(err, grpc.ErrServerStopped):
		return nil
	}
	return err
}

// DialGRPC returns a gRPC client whose connections are streams of the
// session. The session already authenticates and encrypts, so gRPC itself
// runs without credentials. opts are added to the defaults. Close the
// client before the session.
func (s *Session) DialGRPC(opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	base := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) { return s.Open() }),
		grpc.WithInitialWindowSize(grpcWindow),
		grpc.WithInitialConnWindowSize(grpcWindow),
		grpc.WithReadBufferSize(grpcBuffer),
		grpc.WithWriteBufferSize(grpcBuffer),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(grpcMaxMessage), grpc.MaxCallSendMsgSize(grpcMaxMessage),
			grpc.ForceCodecV2(Codec())),
		experimental.WithBufferPool(BufferPool()),
	}
	base = append(base, fault.DialOptions()...) // test-only fault points; none unless armed
	cc, err := grpc.NewClient("passthrough:///phaul-session", append(base, opts...)...)
	if err != nil {
		return nil, err
	}
	return cc, nil
}
