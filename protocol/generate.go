package protocol

//go:generate protoc --go_out=. --go_opt=module=github.com/phaul/phaul/protocol image.proto
//go:generate protoc --go_out=. --go_opt=module=github.com/phaul/phaul/protocol --go-grpc_out=. --go-grpc_opt=module=github.com/phaul/phaul/protocol migration.proto
