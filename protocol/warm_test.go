package protocol

import (
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// TestWarmUpCoversEveryMessage checks that the warm-up reaches every
// message type registered under phaul's schema packages: a schema file
// missing from Files, or nested types left out, fail it.
func TestWarmUpCoversEveryMessage(t *testing.T) {
	var visited, want []protoreflect.FullName
	for _, fd := range Files {
		warmMessages(fd.Messages(), func(n protoreflect.FullName) { visited = append(visited, n) })
	}
	protoregistry.GlobalTypes.RangeMessages(func(mt protoreflect.MessageType) bool {
		if d := mt.Descriptor(); strings.HasPrefix(string(d.ParentFile().Package()), "phaul.") {
			want = append(want, d.FullName())
		}
		return true
	})
	slices.Sort(visited)
	slices.Sort(want)
	if len(want) < 50 {
		t.Fatalf("only %d message types registered by the schema files", len(want))
	}
	if !slices.Equal(visited, want) {
		t.Errorf("warmed %d types, the schema files have %d:\nwarmed %v\nregistered %v", len(visited), len(want), visited, want)
	}
	WarmUp()
}
