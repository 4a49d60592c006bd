package engine

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// madviseFlags maps smaps VmFlags codes to the madvise() advice that
// recreates them, and the advice that takes it back (0: none; the THP
// advice only gives way to the other one).
var madviseFlags = []struct {
	code         string
	advice, undo uint32
}{
	{"hg", sys.MADV_HUGEPAGE, 0},
	{"nh", sys.MADV_NOHUGEPAGE, 0},
	{"dc", sys.MADV_DONTFORK, sys.MADV_DOFORK},
	{"dd", sys.MADV_DONTDUMP, sys.MADV_DODUMP},
	{"wf", sys.MADV_WIPEONFORK, sys.MADV_KEEPONFORK},
	{"mg", sys.MADV_MERGEABLE, sys.MADV_UNMERGEABLE},
}

// refusedFlags are VmFlags codes of mappings phaul cannot recreate.
var refusedFlags = map[string]string{
	"ht": "a hugetlbfs mapping",
	"pf": "a raw PFN (device) mapping",
	"io": "a memory-mapped I/O region",
	"um": "a mapping registered with userfaultfd (missing mode)",
	"uw": "a mapping registered with userfaultfd (write-protect mode)",
	"ui": "a mapping registered with userfaultfd (minor mode)",
}

// Layout returns the mappings of a running process as image VMAs: the
// layout a migration target's shadow process takes for a round. Mappings
// registered with userfaultfd are accepted (the tracker registers them);
// everything else that Dump refuses is refused here too.
func Layout(pid int) ([]*imagepb.VMA, error) {
	maps, err := proc.ReadSmaps(pid)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("mappings of %d: %w", pid, ErrProcessGone)
	}
	if err != nil {
		return nil, err
	}
	vmas, err := convertVMAs(maps, true)
	if err != nil {
		return nil, err
	}
	if err := migratable(vmas); err != nil {
		return nil, err
	}
	return vmas, nil
}

// migratable refuses what a migration cannot carry of the shared memory
// objects of a layout: a migration sends pages per process and address,
// and the shadow process maps each shared anonymous mapping as an object
// of its own. That is right for shared anonymous memory whose pages are
// each mapped once; memfds, deleted files and SysV segments, whose
// contents do not travel with a process's pages, and shared anonymous
// memory mapped at two places, are refused by name.
func migratable(vmas []*imagepb.VMA) error {
	type mapped struct {
		v        *imagepb.VMA
		from, to uint64 // bytes of the object
	}
	seen := map[uint64][]mapped{}
	for _, v := range vmas {
		switch v.Kind {
		case imagepb.VMAKind_VMA_SHMEM, imagepb.VMAKind_VMA_SYSV_SHM:
			return unsupported("mapping %#x-%#x (%s) is a shared memory object: migrating memfds, deleted files and SysV shared memory (dump and restore it instead)",
				v.Start, v.End, vmaName(v))
		case imagepb.VMAKind_VMA_ANON_SHARED:
			m := mapped{v, v.Pgoff, v.Pgoff + v.End - v.Start}
			for _, o := range seen[v.Shmid] {
				if m.from < o.to && o.from < m.to {
					return unsupported("shared anonymous memory (inode %d) is mapped at both %#x-%#x and %#x-%#x: migrating aliased shared memory",
						v.Shmid, o.v.Start, o.v.End, v.Start, v.End)
				}
			}
			seen[v.Shmid] = append(seen[v.Shmid], m)
		}
	}
	return nil
}

// uffdFlags are the VmFlags of mappings registered with userfaultfd.
var uffdFlags = map[string]bool{"um": true, "uw": true, "ui": true}

func convertVMAs(maps []proc.Mapping, tracked bool) ([]*imagepb.VMA, error) {
	out := make([]*imagepb.VMA, 0, len(maps))
	for i := range maps {
		m := &maps[i]
		v := &imagepb.VMA{Start: m.Start, End: m.End, Pgoff: m.Offset, Dev: m.Dev, Inode: m.Inode, Path: m.Path}
		if m.Read {
			v.Prot |= sys.PROT_READ
		}
		if m.Write {
			v.Prot |= sys.PROT_WRITE
		}
		if m.Exec {
			v.Prot |= sys.PROT_EXEC
		}
		if m.Shared {
			v.Flags |= sys.MAP_SHARED
		} else {
			v.Flags |= sys.MAP_PRIVATE
		}
		for _, f := range m.Flags {
			if what, bad := refusedFlags[f]; bad && !m.IsSpecial() && !(tracked && uffdFlags[f]) {
				return nil, unsupported("mapping %#x-%#x (%s) is %s", m.Start, m.End, describePath(m), what)
			}
		}
		if m.HasFlag("gd") {
			v.Flags |= sys.MAP_GROWSDOWN
		}
		for _, a := range madviseFlags {
			if m.HasFlag(a.code) {
				v.Madvise = append(v.Madvise, a.advice)
			}
		}
		switch {
		case m.Path == "[vdso]":
			v.Kind = imagepb.VMAKind_VMA_VDSO
		case m.Path == "[vvar]":
			v.Kind = imagepb.VMAKind_VMA_VVAR
		case m.Path == "[vvar_vclock]":
			v.Kind = imagepb.VMAKind_VMA_VVAR_VCLOCK
		case m.Path == "[vsyscall]":
			v.Kind = imagepb.VMAKind_VMA_VSYSCALL
		case m.Path == "[heap]":
			v.Kind = imagepb.VMAKind_VMA_HEAP
		case m.Path == "[stack]":
			v.Kind = imagepb.VMAKind_VMA_STACK
		case m.Inode == 0 && !m.Shared && (m.Path == "" || strings.HasPrefix(m.Path, "[anon:")):
			v.Kind = imagepb.VMAKind_VMA_ANON_PRIVATE
		case m.Inode != 0 && m.Shared && m.Path == "/dev/zero" && m.Deleted:
			// MAP_SHARED|MAP_ANONYMOUS: shmem the kernel names /dev/zero.
			v.Kind = imagepb.VMAKind_VMA_ANON_SHARED
			v.Path = ""
			v.Shmid = m.Inode
			v.SharedReadOnly = !m.HasFlag("mw")
		case m.Shared && m.Deleted && isSysVPath(m.Path):
			// An attached SysV segment: the inode is its shmid.
			v.Kind = imagepb.VMAKind_VMA_SYSV_SHM
			v.Shmid = m.Inode
			v.SharedReadOnly = !m.HasFlag("mw")
		case m.Inode != 0 && m.Shared && m.Deleted && strings.HasPrefix(m.Path, "/"):
			// A memfd or a deleted file: a shared memory object (shmem.go
			// checks which, and refuses what is not on tmpfs).
			v.Kind = imagepb.VMAKind_VMA_SHMEM
			v.Shmid = m.Inode
			v.SharedReadOnly = !m.HasFlag("mw")
		case m.Inode != 0 && strings.HasPrefix(m.Path, "/"):
			if err := checkMappedFile(m); err != nil {
				return nil, err
			}
			if m.Shared {
				v.Kind = imagepb.VMAKind_VMA_FILE_SHARED
			} else {
				v.Kind = imagepb.VMAKind_VMA_FILE_PRIVATE
			}
			fi, err := os.Stat(m.Path)
			if err != nil {
				return nil, fmt.Errorf("mapped file %s: %w", m.Path, err)
			}
			v.FileSize = fi.Size()
		default:
			return nil, unsupported("mapping %#x-%#x (%s)", m.Start, m.End, describePath(m))
		}
		v.Guard = v.Prot == sys.PROT_NONE
		out = append(out, v)
	}
	return out, nil
}

func describePath(m *proc.Mapping) string {
	p := m.Path
	if p == "" {
		p = "anonymous"
	}
	if m.Deleted {
		p += " (deleted)"
	}
	return p
}

// checkMappedFile refuses file mappings that cannot be opened again by path.
func checkMappedFile(m *proc.Mapping) error {
	// Shared mappings of deleted files are shared memory objects: what
	// comes here is private.
	switch {
	case strings.HasPrefix(m.Path, "/memfd:"):
		return unsupported("mapping %#x-%#x is a private mapping of a memfd (%s)", m.Start, m.End, m.Path)
	case m.Deleted:
		return unsupported("mapping %#x-%#x is a private mapping of the deleted file %s", m.Start, m.End, m.Path)
	}
	fi, err := os.Stat(m.Path)
	if err != nil {
		return fmt.Errorf("mapping %#x-%#x of %s: %w", m.Start, m.End, m.Path, err)
	}
	if !fi.Mode().IsRegular() {
		return unsupported("mapping %#x-%#x of %s (%s, not a regular file)", m.Start, m.End, m.Path, fi.Mode().Type())
	}
	return nil
}

// hasPages reports whether the contents of v belong in the process's own
// pages: memory whose only copy is the process's (private anonymous
// memory, and the copied-on-write pages of private file mappings). Shared
// memory objects keep their contents apart, once (shmem.go); only shared
// anonymous memory that is no object of the image has its pages with the
// process: in the layouts of a migration, and in images of older versions.
func hasPages(v *imagepb.VMA) bool {
	switch v.Kind {
	case imagepb.VMAKind_VMA_ANON_PRIVATE, imagepb.VMAKind_VMA_HEAP, imagepb.VMAKind_VMA_STACK, imagepb.VMAKind_VMA_FILE_PRIVATE:
		return true
	case imagepb.VMAKind_VMA_ANON_SHARED:
		return v.Shmem == 0
	}
	return false
}
