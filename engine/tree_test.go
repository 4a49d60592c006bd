package engine

import (
	"errors"
	"strings"
	"testing"

	"github.com/phaul/phaul/protocol/imagepb"
)

func TestCheckTreeIDs(t *testing.T) {
	e := func(pid, ppid, pgid, sid int32) *imagepb.ProcessEntry {
		return &imagepb.ProcessEntry{Pid: pid, Ppid: ppid, Pgid: pgid, Sid: sid}
	}
	zombie := func(x *imagepb.ProcessEntry) *imagepb.ProcessEntry { x.Zombie = true; return x }
	for _, tc := range []struct {
		name    string
		entries []*imagepb.ProcessEntry
		want    string // "" for accepted; else a part of the error
		refused bool   // ErrUnsupported
	}{
		{"lone process", []*imagepb.ProcessEntry{e(10, 1, 5, 5)}, "", false},
		{"children in the root's outside group", []*imagepb.ProcessEntry{e(10, 1, 5, 5), e(11, 10, 5, 5), e(12, 11, 5, 5)}, "", false},
		{"shell pipeline: own session, member groups", []*imagepb.ProcessEntry{
			e(10, 1, 10, 10), e(11, 10, 11, 10), e(12, 10, 11, 10), e(13, 12, 13, 10)}, "", false},
		{"child leads a new session", []*imagepb.ProcessEntry{e(10, 1, 5, 5), e(11, 10, 11, 11), e(12, 11, 11, 11)}, "", false},
		{"group led by a sibling", []*imagepb.ProcessEntry{e(10, 1, 10, 10), e(11, 10, 12, 10), e(12, 10, 12, 10)}, "", false},
		{"session of a grandparent after the parent's setsid", []*imagepb.ProcessEntry{
			e(10, 1, 10, 10), e(11, 10, 11, 11), e(12, 11, 10, 10)}, "session 10, which neither it nor its parent 11", true},
		{"group led from outside", []*imagepb.ProcessEntry{e(10, 1, 5, 5), e(11, 10, 7, 5)}, "whose leader is not in the tree", true},
		{"group led by a zombie", []*imagepb.ProcessEntry{e(10, 1, 10, 10), zombie(e(11, 10, 11, 10)), e(12, 10, 11, 10)}, "whose leader is a zombie", true},
		{"group of another session", []*imagepb.ProcessEntry{e(10, 1, 10, 10), e(11, 10, 11, 11), e(12, 10, 11, 10)}, "is in session 11, not 10", false},
		{"parent missing", []*imagepb.ProcessEntry{e(10, 1, 10, 10), e(12, 11, 10, 10)}, "parent 11 is not in the tree", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkTreeIDs(tc.entries)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error with %q", err, tc.want)
			}
			if errors.Is(err, ErrUnsupported) != tc.refused {
				t.Fatalf("errors.Is(%v, ErrUnsupported) = %v, want %v", err, !tc.refused, tc.refused)
			}
		})
	}
}
