package tracker

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/phaul/phaul/engine/proc"
	"github.com/phaul/phaul/internal/sys"
	"github.com/phaul/phaul/protocol/imagepb"
)

// pfnMask selects the page frame number of a present pagemap entry (bits
// 0-54; visible to CAP_SYS_ADMIN only, 0 otherwise).
const pfnMask = 1<<55 - 1

// softDirtyTracker uses the kernel's soft-dirty bits (CONFIG_MEM_SOFT_DIRTY):
// writing 4 to /proc/PID/clear_refs clears them and write-protects every
// page; the first write to a page sets its bit, pagemap bit 55. New
// mappings are soft-dirty as a whole.
//
// Reading the bits and clearing them are two steps, and a page first
// written between them would be lost, so each round stops the process
// (through Control) for the pagemap read and the clear: about 10 ms per
// GiB here. The bits say nothing about a page dropped (MADV_DONTNEED) and
// read again, which maps the shared zero page with a clean bit: present
// pages of the zero page count as written (their contents, zeros, are
// cheap to record).
type softDirtyTracker struct {
	*base
	pm *Pagemap
}

func (t *softDirtyTracker) start(ctx context.Context) error {
	if err := Supported(SoftDirty); err != nil {
		return err
	}
	pm, err := OpenPagemap(t.pid)
	if err != nil {
		return err
	}
	t.pm = pm
	if err := t.ctl.Stopped(func(Syscaller) error { return clearRefs(t.pid) }); err != nil {
		return t.gone(err)
	}
	t.last = time.Now()
	return nil
}

func (t *softDirtyTracker) resume(ctx context.Context, st *imagepb.TrackerState) error {
	pm, err := OpenPagemap(t.pid)
	if err != nil {
		return err
	}
	t.pm = pm
	return nil
}

// clearRefs writes 4 to /proc/PID/clear_refs: clear the soft-dirty bits.
func clearRefs(pid int) error {
	f, err := os.OpenFile(fmt.Sprintf("/proc/%d/clear_refs", pid), os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("clear soft-dirty bits of %d: %w", pid, err)
	}
	_, err = f.WriteString("4")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("clear soft-dirty bits of %d: %w", pid, err)
	}
	return nil
}

func (t *softDirtyTracker) Round(ctx context.Context) (*Delta, error) { return t.round(ctx, nil, true) }

func (t *softDirtyTracker) FinalRound(ctx context.Context, maps []proc.Mapping) (*Delta, error) {
	return t.round(ctx, maps, false)
}

// round reads the soft-dirty bits; with rearm, it clears them.
func (t *softDirtyTracker) round(ctx context.Context, maps []proc.Mapping, rearm bool) (*Delta, error) {
	start := time.Now()
	if t.pm == nil {
		return nil, fmt.Errorf("tracking round of %d: tracker closed", t.pid)
	}
	var d *Delta
	zero := zeroPFN()
	err := t.ctl.Stopped(func(Syscaller) error {
		areas, err := areasIn(t.pid, maps)
		if err != nil {
			return err
		}
		d = t.newDelta(time.Now(), areas)
		for _, a := range areas {
			err := t.pm.Entries(a.Range, func(addr, e uint64) {
				if softDirty(e, zero) {
					d.Dirty.Add(addr, addr+PageSize)
				}
			})
			if err != nil {
				return err
			}
		}
		if !rearm {
			return nil
		}
		return clearRefs(t.pid)
	})
	if err != nil {
		return nil, fmt.Errorf("tracking round of %d: %w", t.pid, t.gone(err))
	}
	return t.finish(d, start), nil
}

// softDirty reports whether a page with pagemap entry e counts as written:
// its soft-dirty bit is set (which the kernel also reports for the pages of
// a mapping created since the last clear, present or not), or it maps the
// shared zero page (pfn zero, when known).
func softDirty(e, zero uint64) bool {
	if e&proc.PMSoftDirty != 0 {
		return true
	}
	return zero != 0 && e&proc.PMPresent != 0 && e&pfnMask == zero
}

// zeroPFN returns the page frame number of the kernel's shared zero page,
// found by reading a fresh page of our own and looking at its pagemap
// entry; 0 when it cannot be seen (no CAP_SYS_ADMIN).
var zeroPFN = sync.OnceValue(func() uint64 {
	b, err := sys.Mmap(-1, 0, PageSize, sys.PROT_READ, sys.MAP_PRIVATE|sys.MAP_ANONYMOUS)
	if err != nil {
		return 0
	}
	defer sys.Munmap(b)
	if b[0] != 0 { // the read faults in the zero page
		return 0
	}
	addr, err := sys.BufferAddr(b)
	if err != nil {
		return 0
	}
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return 0
	}
	defer f.Close()
	var e [8]byte
	if _, err := f.ReadAt(e[:], int64(addr/PageSize*8)); err != nil {
		return 0
	}
	v := binary.LittleEndian.Uint64(e[:])
	if v&proc.PMPresent == 0 {
		return 0
	}
	return v & pfnMask
})

func (t *softDirtyTracker) Park(dir string) error {
	if err := writeState(dir, t.state()); err != nil {
		return fmt.Errorf("park tracking of %d: %w", t.pid, err)
	}
	return t.Close()
}

// Stop has nothing to remove: soft-dirty bits cost the process nothing.
func (t *softDirtyTracker) Stop() error { return t.Close() }

func (t *softDirtyTracker) Close() error {
	err := t.pm.Close()
	t.pm = nil
	return err
}
