package image

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"

	"github.com/phaul/phaul/protocol/imagepb"
	"google.golang.org/protobuf/proto"
)

// Names of the files of a checkpoint directory.
const (
	InventoryFile = "inventory.img"
	FilesFile     = "files.img"
)

// ProcessFile names the process image of process pid.
func ProcessFile(pid int) string { return "process-" + strconv.Itoa(pid) + ".img" }

// PageMapFile names the page map of process pid.
func PageMapFile(pid int) string { return "pagemap-" + strconv.Itoa(pid) + ".img" }

// PagesFile names the page data of process pid.
func PagesFile(pid int) string { return "pages-" + strconv.Itoa(pid) + ".img" }

// Dir is a checkpoint directory. Its methods read and write single files;
// Load reads and cross-checks them all.
type Dir struct {
	Path string
	// Sync makes writes fsync each file before renaming it into place, and
	// the directory after.
	Sync bool
}

// InventoryPath returns the path of the inventory.
func (d Dir) InventoryPath() string { return filepath.Join(d.Path, InventoryFile) }

// FilesPath returns the path of the file table.
func (d Dir) FilesPath() string { return filepath.Join(d.Path, FilesFile) }

// ProcessPath returns the path of the process image of pid.
func (d Dir) ProcessPath(pid int) string { return filepath.Join(d.Path, ProcessFile(pid)) }

// PageMapPath returns the path of the page map of pid.
func (d Dir) PageMapPath(pid int) string { return filepath.Join(d.Path, PageMapFile(pid)) }

// PagesPath returns the path of the page data of pid.
func (d Dir) PagesPath(pid int) string { return filepath.Join(d.Path, PagesFile(pid)) }

// writeMessage checks m with validate, frames it as kind k and writes it to
// path atomically.
func (d Dir) writeMessage(path string, k Kind, m proto.Message, validate func() error) error {
	if err := validate(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	b, err := marshalFrame(k, m)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	err = writeAtomic(path, d.Sync, func(f *os.File) error {
		_, err := f.Write(b)
		return err
	})
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// readMessage reads path as kind k into m and checks it with validate.
func readMessageFile(path string, k Kind, m proto.Message, validate func() error) error {
	if err := readMessage(path, k, m); err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	if err := validate(); err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	return nil
}

// WriteInventory writes inventory.img. A zero FormatVersion or PageSize is
// set to Version or PageSize first.
func (d Dir) WriteInventory(inv *imagepb.Inventory) error {
	if inv == nil {
		return fmt.Errorf("write %s: no inventory", d.InventoryPath())
	}
	if inv.FormatVersion == 0 {
		inv.FormatVersion = Version
	}
	if inv.PageSize == 0 {
		inv.PageSize = PageSize
	}
	return d.writeMessage(d.InventoryPath(), KindInventory, inv, func() error { return ValidateInventory(inv) })
}

// ReadInventory reads and validates inventory.img.
func (d Dir) ReadInventory() (*imagepb.Inventory, error) {
	inv := new(imagepb.Inventory)
	err := readMessageFile(d.InventoryPath(), KindInventory, inv, func() error { return ValidateInventory(inv) })
	if err != nil {
		return nil, err
	}
	return inv, nil
}

// WriteFiles writes files.img.
func (d Dir) WriteFiles(ft *imagepb.FileTable) error {
	return d.writeMessage(d.FilesPath(), KindFiles, ft, func() error { return ValidateFileTable(ft) })
}

// ReadFiles reads and validates files.img.
func (d Dir) ReadFiles() (*imagepb.FileTable, error) {
	ft := new(imagepb.FileTable)
	err := readMessageFile(d.FilesPath(), KindFiles, ft, func() error { return ValidateFileTable(ft) })
	if err != nil {
		return nil, err
	}
	return ft, nil
}

// WriteProcess writes process-PID.img for p.Pid.
func (d Dir) WriteProcess(p *imagepb.Process) error {
	return d.writeMessage(d.ProcessPath(int(p.GetPid())), KindProcess, p, func() error { return ValidateProcess(p) })
}

// ReadProcess reads and validates process-PID.img. Descriptors are checked
// against the file table by Load, not here.
func (d Dir) ReadProcess(pid int) (*imagepb.Process, error) {
	p := new(imagepb.Process)
	err := readMessageFile(d.ProcessPath(pid), KindProcess, p, func() error {
		if err := ValidateProcess(p); err != nil {
			return err
		}
		if int(p.GetPid()) != pid {
			return corruptf("file holds pid %d", p.GetPid())
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return p, nil
}

// WritePageMap writes pagemap-PID.img, checked against the pages file
// already in the directory. PageWriter.Close calls it; use it directly only
// to write a page map without a PageWriter.
func (d Dir) WritePageMap(pid int, pm *imagepb.PageMap) error {
	path := d.PageMapPath(pid)
	st, err := os.Stat(d.PagesPath(pid))
	if err != nil {
		return fmt.Errorf("write %s: pages file: %w", path, err)
	}
	return d.writeMessage(path, KindPageMap, pm, func() error { return ValidatePageMap(pm, st.Size()) })
}

// ReadPageMap reads pagemap-PID.img and validates it against the header and
// size of pages-PID.img.
func (d Dir) ReadPageMap(pid int) (*imagepb.PageMap, error) {
	f, size, err := openPagesFile(d.PagesPath(pid), pid)
	if err != nil {
		return nil, err
	}
	f.Close()
	return d.readPageMap(pid, size)
}

func (d Dir) readPageMap(pid int, pagesSize int64) (*imagepb.PageMap, error) {
	pm := new(imagepb.PageMap)
	err := readMessageFile(d.PageMapPath(pid), KindPageMap, pm, func() error { return ValidatePageMap(pm, pagesSize) })
	if err != nil {
		return nil, err
	}
	return pm, nil
}

// openPagesFile opens the pages file at path, checks that its header is
// that of pid, and returns it with its size.
func openPagesFile(path string, pid int) (*os.File, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, fmt.Errorf("read %s: %w", path, bare(err))
	}
	_, size, err := checkPagesFile(f, pid)
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("read %s: %w", path, err)
	}
	return f, size, nil
}

// checkPagesFile checks the header of the pages file f, which must be that
// of pid unless pid is 0, and that the file holds whole pages. It returns
// the pid of the header and the size of the file.
func checkPagesFile(f *os.File, pid int) (int, int64, error) {
	hdr := make([]byte, PagesHeaderSize)
	n, err := f.ReadAt(hdr, 0)
	if err != nil && err != io.EOF {
		return 0, 0, bare(err)
	}
	got, err := parsePagesHeader(hdr[:n])
	if err != nil {
		return 0, 0, err
	}
	if pid != 0 && got != pid {
		return 0, 0, corruptf("header is for pid %d, want %d", got, pid)
	}
	st, err := f.Stat()
	if err != nil {
		return 0, 0, bare(err)
	}
	if (st.Size()-PagesHeaderSize)%PageSize != 0 {
		return 0, 0, fmt.Errorf("%w: %d bytes of page data, not whole pages", ErrTruncated, st.Size()-PagesHeaderSize)
	}
	return got, st.Size(), nil
}

// Checkpoint is a checkpoint directory read and cross-checked by Load.
type Checkpoint struct {
	Dir       string
	Inventory *imagepb.Inventory
	// Files is nil in a pre-dump that saved no file table.
	Files *imagepb.FileTable
	// Processes in inventory order (parents before children).
	Processes []*Process
}

// Process is one process of a Checkpoint.
type Process struct {
	Entry *imagepb.ProcessEntry
	// State is nil for a zombie, and in a pre-dump that saved none.
	State *imagepb.Process
	// PageMap is nil for a zombie.
	PageMap *imagepb.PageMap
}

// Process returns the process pid of cp, or nil.
func (cp *Checkpoint) Process(pid int) *Process {
	for _, p := range cp.Processes {
		if int(p.Entry.GetPid()) == pid {
			return p
		}
	}
	return nil
}

// Load reads every file of the checkpoint directory dir and checks them
// against each other: every live process of the inventory has its process
// image (its pid the one listed), page map and pages file; every shared
// memory object of the file table has its contents file, fitting its runs;
// its descriptors name files of the file table, its mappings shared memory
// objects of it; its pages lie inside its mappings. A
// zombie has no files. In a pre-dump (Inventory.Predump), the file table
// and process images may be missing; page maps may not.
//
// Page data is not read: Pages.ReadRun and Chain.Verify check it.
func Load(dir string) (*Checkpoint, error) {
	d := Dir{Path: dir}
	inv, err := d.ReadInventory()
	if err != nil {
		return nil, err
	}
	cp := &Checkpoint{Dir: dir, Inventory: inv}
	if cp.Files, err = d.ReadFiles(); err != nil {
		if !inv.GetPredump() || !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		cp.Files = nil
	}
	if err := checkShmemFiles(d, cp.Files); err != nil {
		return nil, err
	}
	for _, e := range inv.GetProcesses() {
		p := &Process{Entry: e}
		cp.Processes = append(cp.Processes, p)
		if e.GetZombie() {
			continue
		}
		pid := int(e.GetPid())
		if p.PageMap, err = d.ReadPageMap(pid); err != nil {
			return nil, err
		}
		if p.State, err = d.ReadProcess(pid); err != nil {
			if !inv.GetPredump() || !errors.Is(err, fs.ErrNotExist) {
				return nil, err
			}
			p.State = nil
			continue
		}
		if cp.Files != nil {
			if err := ValidateFDs(p.State, cp.Files); err != nil {
				return nil, fmt.Errorf("load %s: %w", d.ProcessPath(pid), err)
			}
		} else if len(p.State.GetFds()) > 0 {
			return nil, fmt.Errorf("load %s: %w", d.ProcessPath(pid), corruptf("pid %d has descriptors but there is no file table", pid))
		}
		if err := validatePagesInVMAs(p.PageMap, p.State); err != nil {
			return nil, fmt.Errorf("load %s: %w", d.PageMapPath(pid), err)
		}
	}
	return cp, nil
}
