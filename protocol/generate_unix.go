package protocol

//go:generate protoc --go_out=. --go_opt=module=github.com/phaul/phaul/protocol unix_socket.proto
