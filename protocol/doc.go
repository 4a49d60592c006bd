// Package protocol owns phaul's wire and image schemas: the .proto files,
// the Go code generated from them (imagepb for checkpoint images,
// migrationpb for the migration services), and the rules of the migration
// handshake: protocol versions and what a target checks in a Hello before
// it accepts a migration (NegotiateHello).
//
// Generated code is committed; `go generate ./protocol` rebuilds it (needs
// protoc, protoc-gen-go and protoc-gen-go-grpc).
package protocol
