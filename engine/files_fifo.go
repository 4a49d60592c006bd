package engine

import (
	"fmt"
	"os"
	"syscall"

	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// FIFOs (named pipes). A descriptor of a FIFO is dumped as its path and
// open flags; the bytes queued in the FIFO are peeked with tee(2), like a
// pipe's, and saved once, with the first descriptor of that FIFO in the
// table. Restore opens the path again: first O_RDWR (which never blocks
// and counts as both a reader and a writer), so that opening the wanted
// end neither blocks nor fails with ENXIO; the helper refills the queued
// bytes when the FIFO is a new pipe (empty: the original process was the
// last to hold it open), and is closed.
//
// A FIFO that a process outside the image still holds open keeps its
// pipe, and whatever is left in it, across dump and restore: restore then
// finds bytes in it and does not add the saved ones a second time.

// fifoData saves the bytes queued in each FIFO of the table, with the
// first of its descriptors, and every descriptor's pipe capacity.
func (ft *fileTable) fifoData() error {
	type fifo struct {
		files []*imagepb.File
		read  *procFD // a descriptor open for reading, if any
		any   procFD
	}
	fifos := map[fileIdent]*fifo{}
	var order []fileIdent
	for _, d := range ft.described {
		f := ft.table.Files[d.fd.FileId-1]
		if f.Kind != imagepb.FileKind_FILE_FIFO {
			continue
		}
		k := fileIdent{f.Kind, f.Dev, f.Inode}
		e := fifos[k]
		if e == nil {
			e = &fifo{any: d}
			fifos[k] = e
			order = append(order, k)
		}
		if !containsFile(e.files, f) {
			e.files = append(e.files, f)
		}
		if e.read == nil && f.Flags&sys.O_ACCMODE != sys.O_WRONLY && f.Flags&sys.O_PATH == 0 {
			d := d
			e.read = &d
		}
	}
	for _, k := range order {
		e := fifos[k]
		data, capacity, err := peekFifo(e.read, e.any)
		if err != nil {
			return fmt.Errorf("data queued in the FIFO %s (descriptor %d of %d): %w", e.files[0].Path, e.any.fd.Fd, e.any.pid, err)
		}
		for i, f := range e.files {
			f.Fifo = &imagepb.Fifo{Capacity: int64(capacity)}
			if i == 0 {
				f.Fifo.Data = data
			}
		}
	}
	return nil
}

func containsFile(fs []*imagepb.File, f *imagepb.File) bool {
	for _, g := range fs {
		if g == f {
			return true
		}
	}
	return false
}

// peekFifo returns the bytes queued in a FIFO and its capacity, through
// read, a descriptor of it open for reading, or else through a read end
// phaul opens (O_NONBLOCK: never waits for a writer) from any, another
// descriptor of it.
func peekFifo(read *procFD, any procFD) ([]byte, int, error) {
	if read != nil {
		return peekPipe(read.pid, int(read.fd.Fd))
	}
	fd, err := sys.Open(fmt.Sprintf("/proc/%d/fd/%d", any.pid, any.fd.Fd), sys.O_RDONLY|sys.O_NONBLOCK|sys.O_CLOEXEC)
	if err != nil {
		return nil, 0, err
	}
	defer sys.Close(fd)
	return peekPipe(os.Getpid(), fd)
}

// openFifo opens the FIFO of f again by its path, with f's flags, and
// refills the bytes it held.
//
// Precondition: called on the Tracer thread.
func (r *restorer) openFifo(f *imagepb.File) (uint64, error) {
	in := r.main
	if err := in.WriteMemory(r.scratch, []byte(f.Path+"\x00")); err != nil {
		return 0, err
	}
	helper, err := in.Syscall(sys.SYS_OPENAT, atFDCWD, r.scratch, sys.O_RDWR|sys.O_NONBLOCK|sys.O_CLOEXEC)
	if err != nil {
		return 0, fmt.Errorf("open O_RDWR: %w", err)
	}
	defer func() { _, _ = in.Syscall(sys.SYS_CLOSE, helper) }()
	fi, err := os.Stat(fmt.Sprintf("/proc/%d/fd/%d", r.pid, helper))
	if err != nil {
		return 0, err
	}
	if fi.Mode().Type() != os.ModeNamedPipe {
		return 0, fmt.Errorf("%w: %s is no longer a FIFO (%s)", ErrBadImage, f.Path, fi.Mode().Type())
	}
	if err := r.refillFifo(f, helper, fi.Sys().(*syscall.Stat_t)); err != nil {
		return 0, err
	}
	fd, err := in.Syscall(sys.SYS_OPENAT, atFDCWD, r.scratch, uint64(f.Flags&openFlags)|sys.O_CLOEXEC)
	if err != nil {
		return 0, fmt.Errorf("open: %w", err)
	}
	return fd, nil
}

// refillFifo gives the FIFO open as helper in the process its capacity,
// and its queued bytes when f holds them and the pipe is empty.
//
// Precondition: called on the Tracer thread.
func (r *restorer) refillFifo(f *imagepb.File, helper uint64, st *syscall.Stat_t) error {
	data, capacity := f.GetFifo().GetData(), int(f.GetFifo().GetCapacity())
	if len(data) == 0 && capacity == 0 {
		return nil
	}
	cp, err := sys.CopyFD(r.pid, int(helper))
	if err != nil {
		return err
	}
	defer sys.Close(cp)
	queued, err := sys.Fionread(cp)
	if err != nil {
		return fmt.Errorf("bytes in the FIFO: %w", err)
	}
	if capacity > 0 {
		cur, err := sys.FcntlInt(cp, sys.F_GETPIPE_SZ, 0)
		if err == nil && cur != capacity {
			_, err = sys.FcntlInt(cp, sys.F_SETPIPE_SZ, capacity)
		}
		if err != nil {
			return fmt.Errorf("FIFO capacity %d: %w", capacity, err)
		}
	}
	if len(data) == 0 {
		return nil
	}
	if queued > 0 {
		r.log.Warn("FIFO still open outside the image: its bytes are kept, the saved ones not added",
			"path", f.Path, "inode", st.Ino, "queued", queued)
		return nil
	}
	return r.fillPipe(helper, data)
}
