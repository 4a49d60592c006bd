package protocol

import (
	"sync"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/phaul/phaul/protocol/imagepb"
	"github.com/phaul/phaul/protocol/migrationpb"
)

// Files are the schema files of imagepb and migrationpb.
var Files = []protoreflect.FileDescriptor{
	imagepb.File_image_proto, imagepb.File_shmem_proto, imagepb.File_socket_proto,
	imagepb.File_unix_socket_proto,
	migrationpb.File_migration_proto,
}

var warmOnce sync.Once

// WarmUp sets up the marshalling code of every message type in Files, once
// per program. protobuf does that lazily, the first time a type is
// marshalled or unmarshalled; for the final state of a migration that first
// time falls inside the downtime, where it cost 0.5-2 ms on each side
// (perf: makeCoderMethods, makeStructInfo, filedesc unmarshalFull). A
// migration calls it in the background when it starts.
func WarmUp() {
	warmOnce.Do(func() {
		for _, fd := range Files {
			warmMessages(fd.Messages(), nil)
		}
	})
}

// warmMessages marshals and unmarshals an empty message of every type in
// ms and of the types nested in them, map entries aside (they have no Go
// type of their own), and calls visit (when not nil) with each.
func warmMessages(ms protoreflect.MessageDescriptors, visit func(protoreflect.FullName)) {
	for i := 0; i < ms.Len(); i++ {
		md := ms.Get(i)
		warmMessages(md.Messages(), visit)
		if md.IsMapEntry() {
			continue
		}
		mt, err := protoregistry.GlobalTypes.FindMessageByName(md.FullName())
		if err != nil {
			continue
		}
		m := mt.New().Interface()
		if b, err := proto.Marshal(m); err == nil {
			_ = proto.Unmarshal(b, m)
		}
		if visit != nil {
			visit(md.FullName())
		}
	}
}
