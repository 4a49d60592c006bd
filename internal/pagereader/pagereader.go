package pagereader

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/phaul/phaul/engine/ptrace"
	"github.com/phaul/phaul/internal/sys"
)

// PageSize is the size of the pages read.
const PageSize = 4096

// maxIovecs is how many ranges one process_vm_readv call takes.
const maxIovecs = 1024

// ErrProcessGone reports that the process exited (ptrace.ErrProcessGone,
// which matches ESRCH).
var ErrProcessGone = ptrace.ErrProcessGone

// Span is Pages pages of memory at Addr.
type Span struct {
	Addr  uint64
	Pages uint64
}

// Run is data read from memory at Addr (whole pages).
type Run struct {
	Addr uint64
	Data []byte
}

// Reader reads the memory of one process.
type Reader struct {
	pid int
	mem *os.File
}

// Open returns a Reader for pid.
func Open(pid int) (*Reader, error) {
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("open memory of %d: %w", pid, ErrProcessGone)
		}
		return nil, fmt.Errorf("open memory of %d: %w", pid, err)
	}
	return &Reader{pid: pid, mem: mem}, nil
}

// Close releases the reader.
func (r *Reader) Close() error { return r.mem.Close() }

// Batch reads, in order, as many pages of spans as fit in buf (whose
// length must be whole pages) and returns the runs it read, slices of buf,
// and the spans still to read. readable false reads through /proc/PID/mem.
// Pages that can no longer be read are left out of the runs.
func (r *Reader) Batch(spans []Span, readable bool, buf []byte) ([]Run, []Span, error) {
	var local [][]byte
	var remote []sys.RemoteIovec
	var taken []Span
	used := 0
	for len(spans) > 0 && used+PageSize <= len(buf) && len(remote) < maxIovecs {
		s := spans[0]
		room := uint64(len(buf)-used) / PageSize
		take := s
		if take.Pages > room {
			take.Pages = room
			spans[0] = Span{Addr: s.Addr + room*PageSize, Pages: s.Pages - room}
		} else {
			spans = spans[1:]
		}
		size := int(take.Pages * PageSize)
		local = append(local, buf[used:used+size])
		remote = append(remote, sys.RemoteIovec{Base: uintptr(take.Addr), Len: size})
		taken = append(taken, take)
		used += size
	}
	if len(taken) == 0 {
		return nil, spans, nil
	}
	if readable {
		n, err := sys.ProcessVMReadv(r.pid, local, remote)
		if errors.Is(err, sys.ESRCH) {
			return nil, spans, fmt.Errorf("read memory of %d: %w (%w)", r.pid, ErrProcessGone, err)
		}
		if err == nil && n == used {
			runs := make([]Run, len(taken))
			for i, t := range taken {
				runs[i] = Run{Addr: t.Addr, Data: local[i]}
			}
			return runs, spans, nil
		}
	}
	// Slow path: range by range, and page by page where a range fails.
	var runs []Run
	for i, t := range taken {
		got, err := r.readSpan(t, readable, local[i])
		if err != nil {
			return nil, spans, err
		}
		runs = append(runs, got...)
	}
	return runs, spans, nil
}

// readSpan reads span s into dst, leaving out the pages that cannot be
// read: it reads as far as it can in one call, skips the page it stopped
// at if /proc/PID/mem cannot read it either, and goes on after it.
func (r *Reader) readSpan(s Span, readable bool, dst []byte) ([]Run, error) {
	var runs []Run
	add := func(addr uint64, data []byte) {
		if k := len(runs) - 1; k >= 0 && runs[k].Addr+uint64(len(runs[k].Data)) == addr {
			runs[k].Data = runs[k].Data[:len(runs[k].Data)+len(data)]
			return
		}
		runs = append(runs, Run{Addr: addr, Data: data})
	}
	for off := 0; off < len(dst); {
		addr := s.Addr + uint64(off)
		n := 0
		if readable {
			got, err := sys.ProcessVMReadv(r.pid, [][]byte{dst[off:]}, []sys.RemoteIovec{{Base: uintptr(addr), Len: len(dst) - off}})
			if errors.Is(err, sys.ESRCH) {
				return nil, fmt.Errorf("read memory of %d: %w (%w)", r.pid, ErrProcessGone, err)
			}
			n = got
		}
		if n < PageSize {
			// /proc/PID/mem reads what the process may not (FOLL_FORCE),
			// up to the first page that is not there.
			got, err := r.mem.ReadAt(dst[off:], int64(addr))
			switch {
			case got == 0 && errors.Is(err, io.EOF):
				// The kernel reads nothing at all once the memory is gone.
				return nil, fmt.Errorf("read memory of %d: process exited: %w", r.pid, ErrProcessGone)
			case err == nil, errors.Is(err, io.EOF), errors.Is(err, sys.EIO), errors.Is(err, sys.EFAULT), errors.Is(err, sys.ENOMEM):
			case errors.Is(err, sys.ESRCH):
				return nil, fmt.Errorf("read memory of %d: %w (%w)", r.pid, ErrProcessGone, err)
			default:
				return nil, fmt.Errorf("read memory of %d at %#x: %w", r.pid, addr, err)
			}
			n = got
		}
		n = n / PageSize * PageSize
		if n == 0 {
			off += PageSize // not there any more: gone
			continue
		}
		add(addr, dst[off:off+n])
		off += n
	}
	return runs, nil
}
