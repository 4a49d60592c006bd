package image

import (
	"bytes"
	"fmt"
	"sort"
	"strings"

	"github.com/phaul/phaul/protocol/imagepb"
)

// writeTree draws the process tree of cp: each process under its parent,
// with its session and group where they differ from its parent's, and
// zombies with their exit status.
func writeTree(b *bytes.Buffer, cp *Checkpoint) {
	if len(cp.Processes) < 2 {
		return
	}
	kids := map[int32][]*Process{}
	byPid := map[int32]*Process{}
	for _, p := range cp.Processes {
		byPid[p.Entry.GetPid()] = p
	}
	var roots []*Process
	for _, p := range cp.Processes {
		if parent := byPid[p.Entry.GetPpid()]; parent != nil && p.Entry.GetPid() != cp.Inventory.GetRootPid() {
			kids[p.Entry.GetPpid()] = append(kids[p.Entry.GetPpid()], p)
		} else {
			roots = append(roots, p)
		}
	}
	b.WriteString("tree\n")
	var walk func(p *Process, prefix, branch, next string)
	walk = func(p *Process, prefix, branch, next string) {
		fmt.Fprintf(b, "  %s%s%s\n", prefix, branch, treeLabel(p, byPid[p.Entry.GetPpid()]))
		ks := kids[p.Entry.GetPid()]
		for i, k := range ks {
			if i == len(ks)-1 {
				walk(k, prefix+next, "└─ ", "   ")
			} else {
				walk(k, prefix+next, "├─ ", "│  ")
			}
		}
	}
	for _, r := range roots {
		walk(r, "", "", "")
	}
}

// treeLabel describes process p, whose parent is parent (nil for the root).
func treeLabel(p, parent *Process) string {
	e := p.Entry
	var s strings.Builder
	fmt.Fprintf(&s, "%d", e.GetPid())
	switch {
	case e.GetZombie():
		fmt.Fprintf(&s, " %s [zombie, %s]", orDash(e.GetComm()), waitStatus(e.GetExitStatus()))
	case p.State != nil:
		fmt.Fprintf(&s, " %s", p.State.GetComm())
		if n := len(p.State.GetThreads()); n > 1 {
			fmt.Fprintf(&s, " (%d threads)", n)
		}
	}
	var notes []string
	switch {
	case e.GetSid() == e.GetPid():
		notes = append(notes, "session leader")
	case parent == nil || parent.Entry.GetSid() != e.GetSid():
		notes = append(notes, fmt.Sprintf("session %d", e.GetSid()))
	}
	switch {
	case e.GetPgid() == e.GetPid():
		notes = append(notes, "group leader")
	case parent == nil || parent.Entry.GetPgid() != e.GetPgid():
		notes = append(notes, fmt.Sprintf("group %d", e.GetPgid()))
	}
	if len(notes) > 0 {
		fmt.Fprintf(&s, " — %s", strings.Join(notes, ", "))
	}
	return s.String()
}

// waitStatus reads a wait(2) status the way a shell would say it.
func waitStatus(st int32) string {
	if sig := st & 0x7f; sig != 0 {
		return "killed by " + signalName(sig)
	}
	return fmt.Sprintf("exit %d", st>>8&0xff)
}

// writeShared lists the files more than one process of cp holds: open
// file descriptions inherited across fork, and both ends of pipes (and
// other pairs) that join two processes.
func writeShared(b *bytes.Buffer, cp *Checkpoint) {
	if len(cp.Processes) < 2 || cp.Files == nil {
		return
	}
	type holder struct {
		pid int32
		fd  int32
	}
	holders := map[uint32][]holder{}
	for _, p := range cp.Processes {
		for _, fd := range p.State.GetFds() {
			holders[fd.GetFileId()] = append(holders[fd.GetFileId()], holder{p.Entry.GetPid(), fd.GetFd()})
		}
	}
	files := map[uint32]*imagepb.File{}
	for _, f := range cp.Files.GetFiles() {
		files[f.GetId()] = f
	}
	procsOf := func(id uint32) map[int32]bool {
		m := map[int32]bool{}
		for _, h := range holders[id] {
			m[h.pid] = true
		}
		return m
	}
	say := func(id uint32) string {
		var parts []string
		for _, h := range holders[id] {
			parts = append(parts, fmt.Sprintf("%d fd %d", h.pid, h.fd))
		}
		return strings.Join(parts, ", ")
	}
	var lines []string
	// Pipes: the ends are two files with one pipe id.
	pipes := map[uint64][]uint32{}
	for _, f := range cp.Files.GetFiles() {
		if f.GetKind() == imagepb.FileKind_FILE_PIPE {
			pipes[f.GetPipe().GetPipeId()] = append(pipes[f.GetPipe().GetPipeId()], f.GetId())
		}
	}
	for id, ends := range pipes {
		procs := map[int32]bool{}
		var parts []string
		for _, e := range ends {
			for p := range procsOf(e) {
				procs[p] = true
			}
			dir := "write"
			if files[e].GetFlags()&0o3 == 0 {
				dir = "read"
			}
			parts = append(parts, dir+": "+say(e))
		}
		if len(procs) > 1 {
			lines = append(lines, fmt.Sprintf("pipe:[%d]  %s", id, strings.Join(parts, "; ")))
		}
	}
	for _, f := range cp.Files.GetFiles() {
		if len(procsOf(f.GetId())) > 1 {
			lines = append(lines, fmt.Sprintf("file %d (%s %s)  %s", f.GetId(), fileKind(f.GetKind()), orDash(f.GetPath()), say(f.GetId())))
		}
	}
	if len(lines) == 0 {
		return
	}
	sort.Strings(lines)
	b.WriteString("shared between processes\n")
	for _, l := range lines {
		fmt.Fprintf(b, "  %s\n", l)
	}
}
