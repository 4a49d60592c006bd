package pageserver

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/phaul/phaul/pagestream"
)

// Errors of the store.
var (
	// ErrNoSpace: the memory budget refused the pages and there is no
	// spill file, or the spill file is full.
	ErrNoSpace = errors.New("no space for pages")
	// ErrStaleRound: a batch of an older round than one already applied
	// for the process.
	ErrStaleRound = errors.New("batch of an older round")
	// ErrClosed: the store was closed.
	ErrClosed = errors.New("page store closed")
)

// blockPages is the number of pages a block covers. A block is the unit of
// bookkeeping: one map entry per 64 pages (256 KiB with 4 KiB pages).
const blockPages = 64

// Bookkeeping charged to the budget besides page data: a block (struct and
// map entry) and a process.
const (
	blockMeta = 192
	procMeta  = 512
)

// Config configures a Store. The zero value of a field means its default.
type Config struct {
	// PageSize of the migrated processes (default 4096).
	PageSize int
	// Budget is the memory the store may use for pages and bookkeeping;
	// several stores may share one. nil means no limit.
	Budget *Budget
	// SpillDir, when set, is where the store keeps pages in an unlinked
	// file once the budget refuses memory. Empty means refuse the batch
	// (ErrNoSpace).
	SpillDir string
	// SpillLimit bounds the spill file in bytes (0: only the disk does).
	SpillLimit int64
	// StateOnly makes the store record what it knows of each page (data,
	// zero, absent) and the rounds, but not the data itself: the batch
	// hook takes the bytes (a target writing them straight into its
	// shadow process needs no second copy). Data pages are still charged
	// to the Budget, a page size each, since they take memory where the
	// hook puts them; there is no spilling. Walk reports data extents
	// without Data and ReadPage copies nothing.
	StateOnly bool
}

// State is what the store knows about one page.
type State int

// Page states.
const (
	// Absent: no round sent the page.
	Absent State = iota
	// Zero: the latest round said the page is all zero; it takes no memory.
	Zero
	// Data: the store holds the page's contents.
	Data
)

func (s State) String() string {
	switch s {
	case Absent:
		return "absent"
	case Zero:
		return "zero"
	case Data:
		return "data"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// Extent is a run of pages in one state, as Walk reports them.
type Extent struct {
	Addr  uint64
	Pages uint64
	// Zero extents have no Data; the pages are holes.
	Zero bool
	// Data holds the pages of a data extent. It is read-only and valid
	// only during the Walk callback.
	Data []byte
}

// Stats are a store's figures.
type Stats struct {
	Processes int
	PagesData uint64 // pages held, all processes
	PagesZero uint64 // pages known to be zero
	Batches   uint64 // batches applied
	// MemoryBytes is what the store charged to its budget (page buffers
	// and bookkeeping); SpillBytes the area of the spill file in use.
	MemoryBytes int64
	SpillBytes  int64
}

// Store keeps the pages of one migration by process and address; each
// write replaces what an earlier one stored (the latest round wins). It is
// safe for concurrent use; batches of one process are applied one at a
// time.
type Store struct {
	ps        int
	blockSize int // bytes covered by a block
	budget    *Budget
	spillDir  string
	spillMax  int64
	stateOnly bool

	mu     sync.RWMutex
	procs  map[int32]*proc
	hook   func(*pagestream.Batch) error
	closed bool

	spillMu sync.Mutex // serializes creating and closing the spill file
	spill   atomic.Pointer[spillFile]

	charged atomic.Int64 // bytes reserved from budget
	batches atomic.Uint64

	// The page stream's progress, for WaitApplied.
	seqMu     sync.Mutex
	seq       uint64        // highest batch sequence number applied
	ended     bool          // the stream ended
	streamErr error         // why, when it failed
	seqMoved  chan struct{} // closed and replaced when any of these change
}

// proc is the pages of one process.
type proc struct {
	mu      sync.Mutex
	closed  bool              // the store was closed
	blocks  map[uint64]*block // by address / blockSize
	round   uint32            // round of the last batch applied
	started bool
	data    uint64 // pages with data
	zero    uint64 // zero pages
}

// block is the state of blockPages consecutive pages. A page's data lives
// either in mem, at the slot slot[i]-1 (slots are handed out in arrival
// order, so a block filled in address order is contiguous), or, for a
// spilled block, in the spill file at file + i×page size.
type block struct {
	has, zero uint64 // pages with data; pages known to be zero
	used      uint64 // slots of mem in use
	slot      [blockPages]uint8
	mem       []byte // len = slots × page size
	file      int64  // offset of the block's area in the spill file, or -1
}

// slots is the number of page slots in blk.mem.
func (s *Store) slots(blk *block) int { return len(blk.mem) / s.ps }

// NewStore returns an empty store.
func NewStore(cfg Config) (*Store, error) {
	if cfg.PageSize == 0 {
		cfg.PageSize = 4096
	}
	if cfg.PageSize < 512 || cfg.PageSize&(cfg.PageSize-1) != 0 || cfg.PageSize > 1<<20 {
		return nil, fmt.Errorf("page store: page size %d is not a power of two in [512, 1 MiB]", cfg.PageSize)
	}
	if cfg.StateOnly && cfg.SpillDir != "" {
		return nil, fmt.Errorf("page store: a spill directory with a store that keeps no data")
	}
	if cfg.SpillLimit < 0 {
		return nil, fmt.Errorf("page store: negative spill limit %d", cfg.SpillLimit)
	}
	if cfg.SpillDir != "" {
		if st, err := os.Stat(cfg.SpillDir); err != nil {
			return nil, fmt.Errorf("page store: spill directory: %w", err)
		} else if !st.IsDir() {
			return nil, fmt.Errorf("page store: spill directory %s is not a directory", cfg.SpillDir)
		}
	}
	return &Store{
		ps:        cfg.PageSize,
		blockSize: cfg.PageSize * blockPages,
		budget:    cfg.Budget,
		spillDir:  cfg.SpillDir,
		spillMax:  cfg.SpillLimit,
		stateOnly: cfg.StateOnly,
		procs:     map[int32]*proc{},
	}, nil
}

// SetBatchHook installs h, called for every batch after the store
// recorded it, with the batch's pages: Apply calls it before returning,
// and a caller of Record makes the call Record returns. Calls for batches
// of one process whose address spans overlap come in the order the
// batches were recorded; others may come concurrently (Service writes
// several batches at once). The batch's data is valid only during the
// call. An error from h fails the batch, which stays recorded. nil
// removes the hook.
func (s *Store) SetBatchHook(h func(*pagestream.Batch) error) {
	s.mu.Lock()
	s.hook = h
	s.mu.Unlock()
}

// procFor returns the process's pages, creating them when create is set.
func (s *Store) procFor(pid int32, create bool) (*proc, func(*pagestream.Batch) error, error) {
	s.mu.RLock()
	p, hook, closed := s.procs[pid], s.hook, s.closed
	s.mu.RUnlock()
	if closed {
		return nil, nil, ErrClosed
	}
	if p != nil || !create {
		return p, hook, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, nil, ErrClosed
	}
	if p = s.procs[pid]; p == nil {
		if !s.reserve(procMeta) {
			return nil, nil, fmt.Errorf("%w: memory budget exhausted (%d bytes used)", ErrNoSpace, s.budget.Used())
		}
		p = &proc{blocks: map[uint64]*block{}}
		s.procs[pid] = p
	}
	return p, s.hook, nil
}

// Apply stores a decoded batch: data pages replace what the store had at
// their addresses, zero pages become holes. A batch of a round older than
// the last one applied for its process is refused (ErrStaleRound). When the
// budget refuses memory the batch goes to the spill file, or is refused as
// a whole (ErrNoSpace) and nothing changes. Apply does not release b. It
// is Record, the batch hook's call and Applied.
func (s *Store) Apply(b *pagestream.Batch) error {
	write, err := s.Record(b)
	if err != nil {
		return err
	}
	if err := write(); err != nil {
		return err
	}
	s.Applied(b.Seq)
	return nil
}

// Record is Apply without the batch hook: it stores what b says of each
// page and returns the hook's call for b, which the caller makes (on any
// goroutine, see SetBatchHook) before it reports the batch with Applied.
// Batches are recorded one at a time, in stream order.
func (s *Store) Record(b *pagestream.Batch) (write func() error, err error) {
	if b.PageSize() != s.ps {
		return nil, fmt.Errorf("apply batch %d: page size %d, the store's is %d", b.Seq, b.PageSize(), s.ps)
	}
	p, hook, err := s.procFor(b.Pid, true)
	if err != nil {
		return nil, fmt.Errorf("apply batch %d of %d: %w", b.Seq, b.Pid, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, fmt.Errorf("apply batch %d of %d: %w", b.Seq, b.Pid, ErrClosed)
	}
	if p.started && b.Round < p.round {
		return nil, fmt.Errorf("apply batch %d of %d: %w: round %d after round %d", b.Seq, b.Pid, ErrStaleRound, b.Round, p.round)
	}
	pl, err := s.plan(p, b)
	if err != nil {
		return nil, fmt.Errorf("apply batch %d of %d: %w", b.Seq, b.Pid, err)
	}
	if err := s.apply(p, b, pl); err != nil {
		return nil, fmt.Errorf("apply batch %d of %d: %w", b.Seq, b.Pid, err)
	}
	p.round, p.started = b.Round, true
	s.batches.Add(1)
	return func() error {
		if hook == nil {
			return nil
		}
		if err := hook(b); err != nil {
			return fmt.Errorf("batch %d of %d: hook: %w", b.Seq, b.Pid, err)
		}
		return nil
	}, nil
}

// Applied reports that the page stream's batches up to sequence number
// seq are applied, their hook calls included (WaitApplied waits for this).
func (s *Store) Applied(seq uint64) {
	s.progress(func() { s.seq = max(s.seq, seq) })
}

// progress changes the stream's progress with fn and wakes WaitApplied.
func (s *Store) progress(fn func()) {
	s.seqMu.Lock()
	fn()
	if s.seqMoved != nil {
		close(s.seqMoved)
		s.seqMoved = nil
	}
	s.seqMu.Unlock()
}

// EndStream records that the page stream feeding the store ended, with
// err when it failed: WaitApplied stops waiting for batches it did not
// apply. A store is fed by one page stream.
func (s *Store) EndStream(err error) {
	s.progress(func() { s.ended, s.streamErr = true, err })
}

// WaitApplied waits until the page stream's batches up to sequence
// number seq are applied (batch hook included; the stream applies them
// in order), and fails when the stream ends first or ctx is done.
func (s *Store) WaitApplied(ctx context.Context, seq uint64) error {
	for {
		s.seqMu.Lock()
		done, ended, err := s.seq >= seq, s.ended, s.streamErr
		if s.seqMoved == nil {
			s.seqMoved = make(chan struct{})
		}
		moved := s.seqMoved
		s.seqMu.Unlock()
		switch {
		case done:
			return nil
		case ended && err != nil:
			return fmt.Errorf("page batch %d: the page stream failed: %w", seq, err)
		case ended:
			return fmt.Errorf("page batch %d: the page stream ended without it", seq)
		}
		select {
		case <-moved:
		case <-ctx.Done():
			return fmt.Errorf("page batch %d: %w", seq, ctx.Err())
		}
	}
}

// growth is what a batch needs of one block that it adds data to.
type growth struct {
	key   uint64
	slots int   // mem slots the block needs after the batch (0: spilled)
	file  int64 // spill area given to the block, or -1
}

// plan reserves the memory (or spill space) the batch needs: bookkeeping
// for new blocks and mem slots for pages that had no data. On error it
// undoes its reservations.
func (s *Store) plan(p *proc, b *pagestream.Batch) (pl []growth, err error) {
	var charged int64
	var areas []int64
	defer func() {
		if err != nil {
			s.unreserve(charged)
			for _, a := range areas {
				s.spill.Load().free(a)
			}
		}
	}()
	newBlocks := 0
	seen := map[uint64]bool{}
	for _, r := range b.Runs {
		if r.Kind == pagestream.Gone {
			continue // forgets pages, needs no block
		}
		first, last := s.blockRange(r)
		for key := first; key <= last; key++ {
			if p.blocks[key] == nil && !seen[key] {
				newBlocks++
			}
			seen[key] = true
		}
	}
	meta := int64(newBlocks) * blockMeta
	if !s.reserve(meta) {
		return nil, fmt.Errorf("%w: memory budget exhausted (%d bytes used)", ErrNoSpace, s.budget.Used())
	}
	charged += meta

	// New data pages per block, in address order.
	var need []growth
	var count []int
	for _, r := range b.Runs {
		if r.Kind != pagestream.Data {
			continue
		}
		s.eachBlock(r, func(key uint64, i, n int) {
			blk := p.blocks[key]
			add := n
			if blk != nil {
				add = n - bits.OnesCount64(blk.has&mask(i, n))
			}
			if k := len(need) - 1; k >= 0 && need[k].key == key {
				count[k] += add
			} else {
				need = append(need, growth{key: key, file: -1})
				count = append(count, add)
			}
		})
	}
	if s.stateOnly {
		pages := 0
		for _, c := range count {
			pages += c
		}
		extra := int64(pages) * int64(s.ps)
		if !s.reserve(extra) {
			return nil, fmt.Errorf("%w: memory budget exhausted (%d bytes used)", ErrNoSpace, s.budget.Used())
		}
		charged += extra
		return need, nil // growth without slots: apply only creates blocks
	}
	for k := range need {
		blk := p.blocks[need[k].key]
		cur, used := 0, 0
		if blk != nil {
			if blk.file >= 0 {
				continue // spilled blocks have room for every page
			}
			cur, used = s.slots(blk), bits.OnesCount64(blk.used)
		}
		want := used + count[k]
		if want <= cur {
			need[k].slots = cur
			continue
		}
		want = slotsFor(want)
		if extra := int64(want-cur) * int64(s.ps); s.reserve(extra) {
			charged += extra
			need[k].slots = want
			continue
		}
		a, err := s.allocArea()
		if err != nil {
			return nil, err
		}
		areas = append(areas, a)
		need[k].file = a
	}
	return need, nil
}

// apply changes the blocks as planned.
func (s *Store) apply(p *proc, b *pagestream.Batch, pl []growth) error {
	// Blocks first: create, grow or spill what the plan says.
	for _, g := range pl {
		blk := p.blocks[g.key]
		if blk == nil {
			blk = &block{file: -1}
			p.blocks[g.key] = blk
		}
		switch {
		case g.file >= 0:
			if err := s.spillBlock(blk, g.file); err != nil {
				return err
			}
		case g.slots > s.slots(blk):
			mem := make([]byte, g.slots*s.ps)
			copy(mem, blk.mem)
			blk.mem = mem
		}
	}
	// Blocks left without data are emptied after every run is applied (a
	// later run of the batch may add data to them again), and dropped
	// when they hold no zero pages either.
	var emptied []uint64
	defer func() {
		for _, key := range emptied {
			blk := p.blocks[key]
			if blk == nil || blk.has != 0 {
				continue
			}
			s.emptyBlock(blk)
			if blk.zero == 0 {
				delete(p.blocks, key)
				s.unreserve(blockMeta)
			}
		}
	}()
	ps := s.ps
	off := 0
	for _, r := range b.Runs {
		if r.Kind != pagestream.Data {
			zero := r.Kind == pagestream.Zero
			s.eachBlock(r, func(key uint64, i, n int) {
				blk := p.blocks[key]
				if blk == nil {
					if !zero {
						return // gone pages the store never had
					}
					blk = &block{file: -1}
					p.blocks[key] = blk
				}
				m := mask(i, n)
				dropped := bits.OnesCount64(blk.has & m)
				p.data -= uint64(dropped)
				if s.stateOnly {
					s.unreserve(int64(dropped) * int64(ps))
				}
				for j := i; j < i+n; j++ {
					if blk.has&(1<<j) != 0 && blk.file < 0 {
						blk.used &^= 1 << (blk.slot[j] - 1)
						blk.slot[j] = 0
					}
				}
				blk.has &^= m
				if zero {
					p.zero += uint64(bits.OnesCount64(m &^ blk.zero))
					blk.zero |= m
				} else {
					p.zero -= uint64(bits.OnesCount64(m & blk.zero))
					blk.zero &^= m
				}
				if blk.has == 0 {
					emptied = append(emptied, key)
				}
			})
			continue
		}
		var werr error
		s.eachBlock(r, func(key uint64, i, n int) {
			blk := p.blocks[key]
			m := mask(i, n)
			p.data += uint64(bits.OnesCount64(m &^ blk.has))
			p.zero -= uint64(bits.OnesCount64(m & blk.zero))
			src := b.Data[off : off+n*ps]
			off += n * ps
			switch {
			case s.stateOnly:
				// The hook keeps the bytes.
			case blk.file >= 0:
				if werr == nil {
					if _, err := s.spill.Load().f.WriteAt(src, blk.file+int64(i*ps)); err != nil {
						werr = fmt.Errorf("write spill file: %w", err)
					}
				}
			default:
				for j := range n {
					pg := i + j
					if blk.has&(1<<pg) == 0 {
						sl := bits.TrailingZeros64(^blk.used)
						blk.used |= 1 << sl
						blk.slot[pg] = uint8(sl + 1)
					}
					sl := int(blk.slot[pg] - 1)
					copy(blk.mem[sl*ps:(sl+1)*ps], src[j*ps:(j+1)*ps])
				}
			}
			blk.has |= m
			blk.zero &^= m
		})
		if werr != nil {
			return werr
		}
	}
	return nil
}

// emptyBlock frees the data storage of a block that holds no data.
func (s *Store) emptyBlock(blk *block) {
	if blk.mem != nil {
		s.unreserve(int64(len(blk.mem)))
		blk.mem, blk.used, blk.slot = nil, 0, [blockPages]uint8{}
	}
	if blk.file >= 0 {
		s.spill.Load().free(blk.file)
		blk.file = -1
	}
}

// spillBlock moves a block's data from memory to the spill area at a.
func (s *Store) spillBlock(blk *block, a int64) error {
	for pg := range blockPages {
		if blk.has&(1<<pg) == 0 {
			continue
		}
		sl := int(blk.slot[pg] - 1)
		if _, err := s.spill.Load().f.WriteAt(blk.mem[sl*s.ps:(sl+1)*s.ps], a+int64(pg*s.ps)); err != nil {
			s.spill.Load().free(a)
			return fmt.Errorf("write spill file: %w", err)
		}
	}
	if blk.mem != nil {
		s.unreserve(int64(len(blk.mem)))
	}
	blk.mem, blk.used, blk.slot, blk.file = nil, 0, [blockPages]uint8{}, a
	return nil
}

// blockRange returns the first and last block keys a run touches.
func (s *Store) blockRange(r pagestream.Run) (uint64, uint64) {
	bs := uint64(s.blockSize)
	return r.Addr / bs, (r.Addr + r.Pages*uint64(s.ps) - 1) / bs
}

// eachBlock calls fn for each block a run touches, with the run's first
// page index in the block and its number of pages there.
func (s *Store) eachBlock(r pagestream.Run, fn func(key uint64, i, n int)) {
	ps := uint64(s.ps)
	addr, left := r.Addr, r.Pages
	for left > 0 {
		key := addr / uint64(s.blockSize)
		i := int(addr % uint64(s.blockSize) / ps)
		n := min(left, uint64(blockPages-i))
		fn(key, i, int(n))
		addr += n * ps
		left -= n
	}
}

// mask has bits [i, i+n) set.
func mask(i, n int) uint64 {
	if n >= 64 {
		return ^uint64(0)
	}
	return (uint64(1)<<n - 1) << i
}

// slotsFor rounds a slot count up to a power of two (at most blockPages),
// so that a block grows in few steps.
func slotsFor(n int) int {
	if n <= 1 {
		return 1
	}
	return min(blockPages, 1<<bits.Len(uint(n-1)))
}

func (s *Store) reserve(n int64) bool {
	if n == 0 {
		return true
	}
	if !s.budget.reserve(n) {
		return false
	}
	s.charged.Add(n)
	return true
}

func (s *Store) unreserve(n int64) {
	s.budget.release(n)
	s.charged.Add(-n)
}

// allocArea returns a free block area of the spill file, creating the file
// on first use.
func (s *Store) allocArea() (int64, error) {
	if s.spillDir == "" {
		return 0, fmt.Errorf("%w: memory budget exhausted (%d bytes used) and no spill directory", ErrNoSpace, s.budget.Used())
	}
	s.spillMu.Lock()
	defer s.spillMu.Unlock()
	sp := s.spill.Load()
	if sp == nil {
		f, err := os.CreateTemp(s.spillDir, "phaul-pages-*.spill")
		if err != nil {
			return 0, fmt.Errorf("create spill file: %w", err)
		}
		// Unlinked at once: the space returns to the disk when the store
		// closes or the process dies.
		if err := os.Remove(f.Name()); err != nil {
			f.Close()
			return 0, fmt.Errorf("unlink spill file: %w", err)
		}
		sp = &spillFile{f: f, area: int64(s.blockSize), limit: s.spillMax}
		s.spill.Store(sp)
	}
	return sp.alloc()
}

// Processes returns the PIDs the store holds pages of, in increasing order.
func (s *Store) Processes() []int32 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	pids := make([]int32, 0, len(s.procs))
	for pid := range s.procs {
		pids = append(pids, pid)
	}
	slices.Sort(pids)
	return pids
}

// Round returns the round of the last batch applied for pid, and whether
// any was.
func (s *Store) Round(pid int32) (uint32, bool) {
	p, _, err := s.procFor(pid, false)
	if err != nil || p == nil {
		return 0, false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.round, p.started
}

// Walk calls fn for the extents of pid in increasing address order: each
// maximal run of zero pages, and each run of data pages (a data extent
// never spans two 64-page blocks, so adjacent data extents may follow each
// other; in a StateOnly store they have no Data). Absent pages are skipped. Applying batches of pid waits until
// Walk returns; fn must not call Apply for pid. Walk stops at fn's first
// error and returns it.
func (s *Store) Walk(pid int32, fn func(Extent) error) error {
	p, _, err := s.procFor(pid, false)
	if err != nil {
		return fmt.Errorf("walk pages of %d: %w", pid, err)
	}
	if p == nil {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return fmt.Errorf("walk pages of %d: %w", pid, ErrClosed)
	}
	keys := make([]uint64, 0, len(p.blocks))
	for k := range p.blocks {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	ps := uint64(s.ps)
	var pend Extent // pending zero extent
	var scratch []byte
	flush := func() error {
		if pend.Pages == 0 {
			return nil
		}
		e := pend
		pend = Extent{}
		return fn(e)
	}
	for _, key := range keys {
		blk := p.blocks[key]
		base := key * uint64(s.blockSize)
		for i := 0; i < blockPages; {
			bit := uint64(1) << i
			addr := base + uint64(i)*ps
			switch {
			case blk.zero&bit != 0:
				if pend.Pages > 0 && pend.Addr+pend.Pages*ps == addr {
					pend.Pages++
				} else {
					if err := flush(); err != nil {
						return err
					}
					pend = Extent{Addr: addr, Pages: 1, Zero: true}
				}
				i++
			case blk.has&bit != 0:
				if err := flush(); err != nil {
					return err
				}
				j := i + 1
				for j < blockPages && blk.has&(1<<j) != 0 && (s.stateOnly || blk.file >= 0 || blk.slot[j] == blk.slot[j-1]+1) {
					j++
				}
				var data []byte
				switch {
				case s.stateOnly:
				case blk.file >= 0:
					if scratch == nil {
						scratch = make([]byte, s.blockSize)
					}
					data = scratch[:(j-i)*s.ps]
					if _, err := s.spill.Load().f.ReadAt(data, blk.file+int64(i*s.ps)); err != nil {
						return fmt.Errorf("walk pages of %d: read spill file: %w", pid, err)
					}
				default:
					sl := int(blk.slot[i] - 1)
					data = blk.mem[sl*s.ps : (sl+j-i)*s.ps : (sl+j-i)*s.ps]
				}
				if err := fn(Extent{Addr: addr, Pages: uint64(j - i), Data: data}); err != nil {
					return err
				}
				i = j
			default:
				i++
			}
		}
	}
	return flush()
}

// ReadPage copies the page at addr of pid into dst (one page long) when
// the store holds its data, and returns the page's state. A StateOnly
// store leaves dst alone.
func (s *Store) ReadPage(pid int32, addr uint64, dst []byte) (State, error) {
	if addr%uint64(s.ps) != 0 || len(dst) != s.ps {
		return Absent, fmt.Errorf("read page %#x of %d: want an aligned address and a %d-byte buffer", addr, pid, s.ps)
	}
	p, _, err := s.procFor(pid, false)
	if err != nil {
		return Absent, fmt.Errorf("read page %#x of %d: %w", addr, pid, err)
	}
	if p == nil {
		return Absent, nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return Absent, fmt.Errorf("read page %#x of %d: %w", addr, pid, ErrClosed)
	}
	blk := p.blocks[addr/uint64(s.blockSize)]
	if blk == nil {
		return Absent, nil
	}
	i := int(addr % uint64(s.blockSize) / uint64(s.ps))
	switch {
	case blk.zero&(1<<i) != 0:
		return Zero, nil
	case blk.has&(1<<i) == 0:
		return Absent, nil
	case s.stateOnly:
	case blk.file >= 0:
		if _, err := s.spill.Load().f.ReadAt(dst, blk.file+int64(i*s.ps)); err != nil {
			return Absent, fmt.Errorf("read page %#x of %d: read spill file: %w", addr, pid, err)
		}
	default:
		sl := int(blk.slot[i] - 1)
		copy(dst, blk.mem[sl*s.ps:(sl+1)*s.ps])
	}
	return Data, nil
}

// Stats returns the store's figures.
func (s *Store) Stats() Stats {
	s.mu.RLock()
	procs := make([]*proc, 0, len(s.procs))
	for _, p := range s.procs {
		procs = append(procs, p)
	}
	s.mu.RUnlock()
	st := Stats{Processes: len(procs), Batches: s.batches.Load(), MemoryBytes: s.charged.Load()}
	for _, p := range procs {
		p.mu.Lock()
		st.PagesData += p.data
		st.PagesZero += p.zero
		p.mu.Unlock()
	}
	if sp := s.spill.Load(); sp != nil {
		st.SpillBytes = sp.inUse()
	}
	return st
}

// Close drops every page, returns the memory to the budget and removes the
// spill file. Later calls fail with ErrClosed; Close is idempotent.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	procs := s.procs
	s.procs = nil
	s.mu.Unlock()
	// Wait for batches being applied and walks in progress.
	for _, p := range procs {
		p.mu.Lock()
		p.closed = true
		p.blocks = nil
		p.mu.Unlock()
	}
	s.unreserve(s.charged.Load())
	s.spillMu.Lock()
	defer s.spillMu.Unlock()
	if sp := s.spill.Swap(nil); sp != nil {
		if err := sp.f.Close(); err != nil {
			return fmt.Errorf("close spill file: %w", err)
		}
	}
	return nil
}

// spillFile hands out block-sized areas of an unlinked file.
type spillFile struct {
	mu    sync.Mutex
	f     *os.File
	area  int64   // bytes per area
	limit int64   // bytes; 0 for none
	next  int64   // areas ever handed out
	freed []int64 // offsets of areas given back
}

func (sp *spillFile) alloc() (int64, error) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if n := len(sp.freed); n > 0 {
		a := sp.freed[n-1]
		sp.freed = sp.freed[:n-1]
		return a, nil
	}
	if sp.limit > 0 && (sp.next+1)*sp.area > sp.limit {
		return 0, fmt.Errorf("%w: spill file limit of %d bytes reached", ErrNoSpace, sp.limit)
	}
	a := sp.next * sp.area
	sp.next++
	return a, nil
}

func (sp *spillFile) free(a int64) {
	sp.mu.Lock()
	sp.freed = append(sp.freed, a)
	sp.mu.Unlock()
}

func (sp *spillFile) inUse() int64 {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return (sp.next - int64(len(sp.freed))) * sp.area
}

// Budget is a memory limit that stores draw from. Its methods are safe for
// concurrent use; a nil *Budget has no limit.
type Budget struct {
	limit int64
	used  atomic.Int64
}

// NewBudget returns a budget of limit bytes (0 or less: no limit, only
// counting).
func NewBudget(limit int64) *Budget { return &Budget{limit: limit} }

// Limit returns the budget's limit (0: none).
func (b *Budget) Limit() int64 {
	if b == nil || b.limit < 0 {
		return 0
	}
	return b.limit
}

// Used returns the bytes currently drawn.
func (b *Budget) Used() int64 {
	if b == nil {
		return 0
	}
	return b.used.Load()
}

func (b *Budget) reserve(n int64) bool {
	if b == nil {
		return true
	}
	for {
		cur := b.used.Load()
		if b.limit > 0 && cur+n > b.limit {
			return false
		}
		if b.used.CompareAndSwap(cur, cur+n) {
			return true
		}
	}
}

func (b *Budget) release(n int64) {
	if b != nil {
		b.used.Add(-n)
	}
}
