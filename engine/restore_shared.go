package engine

import (
	"fmt"
	"os"

	"github.com/phaul/phaul/internal/sys"
)

// Objects that more than one descriptor (or mapping) of a restore refers
// to are created once, in the first process that needs one of them, and
// handed to the others as the same kernel object: the read end of a pipe
// whose write end was just made, the other end of a socket pair, an open
// file description inherited across fork, a shared memory object.
//
// phaul keeps a copy of each such object in a sharedFiles pool (taken out
// of the process that created it with pidfd_getfd) until every process of
// the restore is prepared; a process that needs it installs the copy with
// pidfd_getfd from phaul (restorer.install). The copies are closed when the
// restore is prepared or fails: from then on only the processes hold them.

// sharedKind tells what a sharedKey's id numbers.
type sharedKind int

const (
	// sharedFile: an open file description of the image (File.Id).
	sharedFile sharedKind = iota
	// sharedPipeRead, sharedPipeWrite: an end of a pipe (Pipe.PipeId).
	sharedPipeRead
	sharedPipeWrite
	// sharedSocket: a socket by the inode it had at dump time.
	sharedSocket
	// sharedMemory: a shared memory object (VMA.Shmid).
	sharedMemory
)

// sharedKey names an object in a sharedFiles pool.
type sharedKey struct {
	kind sharedKind
	id   uint64
}

// sharedFiles is phaul's pool of objects shared between the descriptors
// and mappings of one restore. It is used on the Tracer thread only.
type sharedFiles struct {
	fds map[sharedKey]int
	// unix is what the restore knows of its unix sockets (restore_unix.go).
	unix *unixRestore
}

func newSharedFiles() *sharedFiles { return &sharedFiles{fds: map[sharedKey]int{}} }

// put takes ownership of fd, phaul's descriptor of the object k. An object
// already in the pool keeps its first copy.
func (s *sharedFiles) put(k sharedKey, fd int) {
	if _, ok := s.fds[k]; ok {
		_ = sys.Close(fd)
		return
	}
	s.fds[k] = fd
}

// get returns phaul's descriptor of k, still owned by the pool.
func (s *sharedFiles) get(k sharedKey) (int, bool) {
	fd, ok := s.fds[k]
	return fd, ok
}

// close closes every copy in the pool.
func (s *sharedFiles) close() {
	for k, fd := range s.fds {
		_ = sys.Close(fd)
		delete(s.fds, k)
	}
}

// share puts a copy of descriptor fd of the process into the pool as k.
//
// Precondition: called on the Tracer thread.
func (r *restorer) share(k sharedKey, fd uint64) error {
	cp, err := sys.CopyFD(r.pid, int(fd))
	if err != nil {
		return fmt.Errorf("keep a copy of descriptor %d: %w", fd, err)
	}
	r.shared.put(k, cp)
	return nil
}

// fromShared installs the pool's object k in the process; ok is false when
// the pool does not hold k.
//
// Precondition: called on the Tracer thread.
func (r *restorer) fromShared(k sharedKey) (fd uint64, ok bool, err error) {
	ours, ok := r.shared.get(k)
	if !ok {
		return 0, false, nil
	}
	fd, err = r.install(ours)
	return fd, true, err
}

// install gives the process a new close-on-exec descriptor of phaul's
// descriptor ours: the same open file description.
//
// Precondition: called on the Tracer thread.
func (r *restorer) install(ours int) (uint64, error) {
	in := r.main
	pidfd, err := in.Syscall(sys.SYS_PIDFD_OPEN, uint64(os.Getpid()), 0)
	if err != nil {
		return 0, fmt.Errorf("pidfd_open(phaul): %w", err)
	}
	fd, err := in.Syscall(sys.SYS_PIDFD_GETFD, pidfd, uint64(ours), 0)
	if _, cerr := in.Syscall(sys.SYS_CLOSE, pidfd); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return 0, fmt.Errorf("pidfd_getfd: %w", err)
	}
	return fd, nil
}
