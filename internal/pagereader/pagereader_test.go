package pagereader

import (
	"bytes"
	"os"
	"syscall"
	"testing"

	"github.com/phaul/phaul/internal/sys"
)

// TestBatchSkipsGonePages reads eight pages of this process of which one
// was unmapped, with process_vm_readv and through /proc/PID/mem: the
// unmapped one is left out, the others come back with their contents.
func TestBatchSkipsGonePages(t *testing.T) {
	for _, readable := range []bool{true, false} {
		testBatch(t, readable)
	}
}

func testBatch(t *testing.T, readable bool) {
	const n = 8
	mem, err := sys.Mmap(-1, 0, n*PageSize, sys.PROT_READ|sys.PROT_WRITE, sys.MAP_PRIVATE|sys.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Munmap(mem)
	for i := 0; i < n; i++ {
		mem[i*PageSize] = byte(i + 1)
	}
	addr, err := sys.BufferAddr(mem)
	if err != nil {
		t.Fatal(err)
	}
	// A hole in the middle (sys.Munmap takes whole mappings only).
	if _, _, e := syscall.Syscall(syscall.SYS_MUNMAP, uintptr(addr+3*PageSize), PageSize, 0); e != 0 {
		t.Fatal(e)
	}
	rd, err := Open(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	buf := make([]byte, 4*PageSize) // two batches
	spans := []Span{{Addr: addr, Pages: n}}
	got := map[uint64]byte{}
	for len(spans) > 0 {
		var runs []Run
		runs, spans, err = rd.Batch(spans, readable, buf)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range runs {
			if len(r.Data)%PageSize != 0 {
				t.Fatalf("run at %#x of %d bytes", r.Addr, len(r.Data))
			}
			for off := 0; off < len(r.Data); off += PageSize {
				p := (r.Addr + uint64(off) - addr) / PageSize
				got[p] = r.Data[off]
				if !bytes.Equal(r.Data[off+1:off+PageSize], make([]byte, PageSize-1)) {
					t.Errorf("page %d: unexpected contents", p)
				}
			}
		}
	}
	for i := uint64(0); i < n; i++ {
		v, ok := got[i]
		switch {
		case i == 3 && ok:
			t.Errorf("unmapped page 3 was read")
		case i != 3 && !ok:
			t.Errorf("page %d was not read", i)
		case i != 3 && v != byte(i+1):
			t.Errorf("page %d holds %d", i, v)
		}
	}
}
