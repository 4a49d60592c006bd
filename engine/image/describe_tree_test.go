package image

import (
	"bytes"
	"strings"
	"testing"

	"github.com/phaul/phaul/protocol/imagepb"
)

func TestDescribeTree(t *testing.T) {
	proc := func(pid, ppid, pgid, sid int32, comm string, fds ...*imagepb.FD) *Process {
		return &Process{Entry: &imagepb.ProcessEntry{Pid: pid, Ppid: ppid, Pgid: pgid, Sid: sid},
			State: &imagepb.Process{Pid: pid, Comm: comm, Threads: []*imagepb.Thread{{Tid: pid}}, Fds: fds}}
	}
	fd := func(n int32, id uint32) *imagepb.FD { return &imagepb.FD{Fd: n, FileId: id} }
	zombie := &Process{Entry: &imagepb.ProcessEntry{Pid: 11, Ppid: 10, Pgid: 10, Sid: 10, Zombie: true, ExitStatus: 9, Comm: "worker"}}
	cp := &Checkpoint{
		Inventory: &imagepb.Inventory{RootPid: 10},
		Files: &imagepb.FileTable{Files: []*imagepb.File{
			{Id: 1, Kind: imagepb.FileKind_FILE_REGULAR, Path: "/log"},
			{Id: 2, Kind: imagepb.FileKind_FILE_PIPE, Flags: 1, Pipe: &imagepb.Pipe{PipeId: 77}},
			{Id: 3, Kind: imagepb.FileKind_FILE_PIPE, Flags: 0, Pipe: &imagepb.Pipe{PipeId: 77}},
			{Id: 4, Kind: imagepb.FileKind_FILE_REGULAR, Path: "/private"},
		}},
		Processes: []*Process{
			proc(10, 1, 10, 10, "server", fd(1, 1), fd(4, 2), fd(5, 4)),
			zombie,
			proc(12, 10, 12, 10, "worker", fd(1, 1), fd(3, 3)),
			proc(13, 12, 12, 10, "helper"),
		},
	}
	var b bytes.Buffer
	writeTree(&b, cp)
	writeShared(&b, cp)
	want := []string{
		"tree",
		"  10 server — session leader, group leader",
		"  ├─ 11 worker [zombie, killed by SIGKILL]",
		"  └─ 12 worker — group leader",
		"     └─ 13 helper",
		"shared between processes",
		"  file 1 (regular /log)  10 fd 1, 12 fd 1",
		"  pipe:[77]  write: 10 fd 4; read: 12 fd 3",
		"",
	}
	if got := b.String(); got != strings.Join(want, "\n") {
		t.Errorf("got\n%s\nwant\n%s", got, strings.Join(want, "\n"))
	}
}
