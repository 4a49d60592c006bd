package fault

import (
	"context"
	"errors"
	"strings"
	"syscall"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// method returns the method name of a gRPC full method name
// ("/phaul.migration.v1.Control/Commit" gives "Commit").
func method(full string) string { return full[strings.LastIndexByte(full, '/')+1:] }

// ServerOptions returns the interceptor of the target's points
// (target.METHOD, target.METHOD.handled) when PHAUL_FAULT is set, and
// nothing otherwise.
func ServerOptions() []grpc.ServerOption {
	if armed == nil {
		return nil
	}
	return []grpc.ServerOption{grpc.ChainUnaryInterceptor(serverInterceptor)}
}

func serverInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	name := "target." + method(info.FullMethod)
	if err := PointContext(ctx, name); err != nil {
		return nil, grpcError(err)
	}
	resp, err := handler(ctx, req)
	if ferr := PointContext(ctx, name+".handled"); ferr != nil {
		return nil, grpcError(ferr)
	}
	return resp, err
}

// DialOptions returns the interceptor of the source's points
// (source.METHOD, source.METHOD.answered) when PHAUL_FAULT is set, and
// nothing otherwise.
func DialOptions() []grpc.DialOption {
	if armed == nil {
		return nil
	}
	return []grpc.DialOption{grpc.WithChainUnaryInterceptor(clientInterceptor)}
}

func clientInterceptor(ctx context.Context, full string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	name := "source." + method(full)
	if err := PointContext(ctx, name); err != nil {
		return err
	}
	err := invoker(ctx, full, req, reply, cc, opts...)
	if ferr := PointContext(ctx, name+".answered"); ferr != nil && err == nil {
		return ferr
	}
	return err
}

// grpcError turns a point's error into the status a handler would return.
func grpcError(err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return status.FromContextError(err).Err()
	}
	code := codes.Internal
	if errors.Is(err, syscall.ENOMEM) || errors.Is(err, syscall.ENOSPC) {
		code = codes.ResourceExhausted
	}
	return status.Error(code, err.Error())
}
