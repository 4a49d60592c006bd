package feature

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/phaul/phaul/internal/sys"
)

// pmSoftDirty is bit 55 of a /proc/PID/pagemap entry.
const pmSoftDirty = 1 << 55

// scratch maps n private anonymous pages without transparent huge pages,
// so each page is faulted in on its own.
func scratch(n int) ([]byte, uint64, error) {
	b, err := sys.Mmap(-1, 0, n*sys.Pagesize, sys.PROT_READ|sys.PROT_WRITE, sys.MAP_PRIVATE|sys.MAP_ANONYMOUS)
	if err != nil {
		return nil, 0, err
	}
	if err := sys.Madvise(b, sys.MADV_NOHUGEPAGE); err != nil {
		_ = sys.Munmap(b)
		return nil, 0, err
	}
	addr, err := sys.BufferAddr(b)
	if err != nil {
		_ = sys.Munmap(b)
		return nil, 0, err
	}
	return b, addr, nil
}

// pagemapEntry reads the pagemap entry of the page at addr.
func pagemapEntry(pm *os.File, addr uint64) (uint64, error) {
	var e [8]byte
	off := int64(addr/uint64(sys.Pagesize)) * 8
	if _, err := pm.ReadAt(e[:], off); err != nil {
		return 0, fmt.Errorf("read %s at %#x: %w", pm.Name(), off, err)
	}
	return binary.LittleEndian.Uint64(e[:]), nil
}

// clearSoftDirty writes 4 to /proc/self/clear_refs.
func clearSoftDirty() error {
	f, err := os.OpenFile("/proc/self/clear_refs", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString("4")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// probeSoftDirty writes a fresh page and expects pagemap bit 55 set, writes
// 4 to /proc/self/clear_refs and expects it clear, writes again and expects
// it set. Without CONFIG_MEM_SOFT_DIRTY the write to clear_refs succeeds but
// the bit is never set.
func probeSoftDirty() (string, error) {
	page, addr, err := scratch(1)
	if err != nil {
		return "", err
	}
	defer sys.Munmap(page)
	pm, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return "", err
	}
	defer pm.Close()

	dirty := func() (bool, error) {
		e, err := pagemapEntry(pm, addr)
		return e&pmSoftDirty != 0, err
	}
	page[0] = 1
	if set, err := dirty(); err != nil {
		return "", err
	} else if !set {
		return "", absent("pagemap bit 55 not set by a write: CONFIG_MEM_SOFT_DIRTY off", nil)
	}
	if err := clearSoftDirty(); err != nil {
		return "", absent("writing 4 to /proc/self/clear_refs failed", err)
	}
	if set, err := dirty(); err != nil {
		return "", err
	} else if set {
		return "", absent("clear_refs=4 does not clear pagemap bit 55", nil)
	}
	page[0] = 2
	if set, err := dirty(); err != nil {
		return "", err
	} else if !set {
		return "", absent("pagemap bit 55 not set by a write after clear_refs=4", nil)
	}
	return "pagemap bit 55 set by writes, cleared by clear_refs=4", nil
}

// wpAsync is the feature set write-protect tracking asks UFFDIO_API for.
const wpAsync = sys.UFFD_FEATURE_WP_ASYNC | sys.UFFD_FEATURE_WP_UNPOPULATED

// openUserfaultfd creates a userfaultfd with the system call or, when that
// is refused (vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE), through
// /dev/userfaultfd, and last with UFFD_USER_MODE_ONLY, which phaul uses for
// non-root targets anyway. It says which way worked.
func openUserfaultfd() (int, string, error) {
	const flags = sys.O_CLOEXEC | sys.O_NONBLOCK
	fd, err := sys.Userfaultfd(flags)
	if err == nil {
		return fd, "userfaultfd(2)", nil
	}
	if errors.Is(err, sys.ENOSYS) {
		return -1, "", absent("no userfaultfd (CONFIG_USERFAULTFD off)", err)
	}
	errs := []error{err}
	if dev, derr := os.OpenFile("/dev/userfaultfd", os.O_RDWR, 0); derr != nil {
		errs = append(errs, derr)
	} else {
		fd, derr = sys.UserfaultfdFromDev(int(dev.Fd()), flags)
		dev.Close()
		if derr == nil {
			return fd, "/dev/userfaultfd", nil
		}
		errs = append(errs, derr)
	}
	fd, uerr := sys.Userfaultfd(flags | sys.UFFD_USER_MODE_ONLY)
	if uerr == nil {
		return fd, "userfaultfd(2) with UFFD_USER_MODE_ONLY", nil
	}
	errs = append(errs, uerr)
	return -1, "", absent("userfaultfd refused, also through /dev/userfaultfd and with UFFD_USER_MODE_ONLY", errors.Join(errs...))
}

// probeUffdWPAsync creates a userfaultfd, asks UFFDIO_API for
// WP_ASYNC|WP_UNPOPULATED, checks both are granted, and registers an
// anonymous page for write-protect. It never write-protects the page, so
// nothing can block on the descriptor.
func probeUffdWPAsync() (string, error) {
	fd, via, err := openUserfaultfd()
	if err != nil {
		return "", err
	}
	defer sys.Close(fd)
	api, err := sys.UffdAPI(fd, wpAsync)
	if err != nil {
		return "", absent("UFFDIO_API refused WP_ASYNC|WP_UNPOPULATED (kernel < 6.7)", err)
	}
	if api.Features&wpAsync != wpAsync {
		return "", absent(fmt.Sprintf("UFFDIO_API granted features %#x without WP_ASYNC|WP_UNPOPULATED", api.Features), nil)
	}
	page, addr, err := scratch(1)
	if err != nil {
		return "", err
	}
	defer sys.Munmap(page)
	if _, err := sys.UffdRegister(fd, addr, uint64(len(page)), sys.UFFDIO_REGISTER_MODE_WP); err != nil {
		return "", absent("UFFDIO_REGISTER for write-protect refused on anonymous memory", err)
	}
	return "via " + via + ": WP_ASYNC and WP_UNPOPULATED granted, anonymous memory registered for write-protect", nil
}

// probePagemapScan maps four pages, touches the first and the third, and
// expects PAGEMAP_SCAN for present pages to return exactly those two.
func probePagemapScan() (string, error) {
	const n = 4
	mem, addr, err := scratch(n)
	if err != nil {
		return "", err
	}
	defer sys.Munmap(mem)
	ps := uint64(sys.Pagesize)
	mem[0], mem[2*ps] = 1, 1

	pm, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return "", err
	}
	defer pm.Close()
	arg := sys.PmScanArg{
		Start:        addr,
		End:          addr + n*ps,
		CategoryMask: sys.PAGE_IS_PRESENT,
		ReturnMask:   sys.PAGE_IS_PRESENT,
	}
	vec := make([]sys.PageRegion, n)
	got, err := sys.PagemapScan(int(pm.Fd()), &arg, vec)
	if err != nil {
		return "", absent("PAGEMAP_SCAN refused (kernel < 6.7)", err)
	}
	want := []sys.PageRegion{
		{Start: addr, End: addr + ps, Categories: sys.PAGE_IS_PRESENT},
		{Start: addr + 2*ps, End: addr + 3*ps, Categories: sys.PAGE_IS_PRESENT},
	}
	if got != len(want) || vec[0] != want[0] || vec[1] != want[1] || arg.WalkEnd != arg.End {
		return "", absent(fmt.Sprintf("PAGEMAP_SCAN answered %d regions %v (walk end %#x) for pages 0 and 2 of %#x",
			got, vec[:min(got, n)], arg.WalkEnd, addr), nil)
	}
	return "found exactly the 2 present pages of a 4-page mapping", nil
}
