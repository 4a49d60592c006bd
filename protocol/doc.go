// Package protocol owns phaul's wire and image schemas: the .proto files and
// the Go code generated from them (imagepb for checkpoint images). Generated
// code is committed; `go generate ./protocol` rebuilds it (needs protoc and
// protoc-gen-go).
package protocol
