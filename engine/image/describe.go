package image

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/phaul/phaul/protocol/imagepb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// Options select the output of Describe and DescribeFile.
type Options struct {
	// JSON prints one JSON object (the messages in protojson form) instead
	// of text for people.
	JSON bool
}

// Describe writes a view of checkpoint cp to w: the inventory, the file
// table, and per process its identity, credentials, threads, mappings (with
// the pages saved, zero and in the parent for each), descriptors, signal
// handlers and page totals. When the image has a parent, it also says which
// image every range of pages comes from (a chain that cannot be resolved is
// reported in the output, not as an error).
func Describe(w io.Writer, cp *Checkpoint, opt Options) error {
	if opt.JSON {
		return describeJSON(w, cp)
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "checkpoint %s\n", cp.Dir)
	writeInventory(&b, cp.Inventory)
	writeTree(&b, cp)
	if cp.Files != nil {
		writeFiles(&b, cp.Files)
	}
	writeShared(&b, cp)
	var total pageCounts
	var threads, vmas, live int
	for _, p := range cp.Processes {
		e := p.Entry
		if e.GetZombie() {
			fmt.Fprintf(&b, "\nzombie %d %s (ppid %d, pgid %d, sid %d) %s\n",
				e.GetPid(), orDash(e.GetComm()), e.GetPpid(), e.GetPgid(), e.GetSid(), waitStatus(e.GetExitStatus()))
			continue
		}
		live++
		fmt.Fprintf(&b, "\nprocess %d (ppid %d, pgid %d, sid %d)\n", e.GetPid(), e.GetPpid(), e.GetPgid(), e.GetSid())
		if p.State != nil {
			writeProcess(&b, p.State, cp.Files, p.PageMap)
			threads += len(p.State.GetThreads())
			vmas += len(p.State.GetVmas())
		} else {
			b.WriteString("  (no process image: pre-dump)\n")
		}
		c := countPages(p.PageMap.GetRuns(), 0, ^uint64(0))
		total.add(c)
		fmt.Fprintf(&b, "  %-12s %d runs: %s\n", "pages", len(p.PageMap.GetRuns()), c)
		if cp.Inventory.GetParent() != "" {
			writeChain(&b, cp.Dir, int(e.GetPid()))
		}
	}
	fmt.Fprintf(&b, "\ntotal: %s (%d live), %s, %s, pages %s\n",
		plural(len(cp.Processes), "process", "processes"), live,
		plural(threads, "thread", "threads"), plural(vmas, "mapping", "mappings"), total)
	_, err := w.Write(b.Bytes())
	return err
}

// DescribeFile writes a view of the single image file at path (a framed
// message file or a pages file, told apart by their magic). The content is
// shown even if it fails semantic validation; the error is returned after.
func DescribeFile(w io.Writer, path string, opt Options) error {
	var magic [8]byte
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("read %s: %w", path, bare(err))
	}
	n, _ := io.ReadFull(f, magic[:])
	f.Close()
	if bytes.Equal(magic[:n], pagesMagic) {
		return describePagesFile(w, path, opt)
	}
	if bytes.Equal(magic[:n], shmemMagic) {
		return describeShmemFile(w, path, opt)
	}
	k, payload, err := readFrame(path)
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	var m proto.Message
	var validate func() error
	var text func(*bytes.Buffer)
	switch k {
	case KindInventory:
		inv := new(imagepb.Inventory)
		m, validate, text = inv, func() error { return ValidateInventory(inv) }, func(b *bytes.Buffer) { writeInventory(b, inv) }
	case KindFiles:
		ft := new(imagepb.FileTable)
		m, validate, text = ft, func() error { return ValidateFileTable(ft) }, func(b *bytes.Buffer) { writeFiles(b, ft) }
	case KindProcess:
		p := new(imagepb.Process)
		m, validate, text = p, func() error { return ValidateProcess(p) }, func(b *bytes.Buffer) {
			fmt.Fprintf(b, "process %d\n", p.GetPid())
			writeProcess(b, p, nil, nil)
		}
	case KindPageMap:
		pm := new(imagepb.PageMap)
		m, validate, text = pm, func() error { return ValidatePageMap(pm, -1) }, func(b *bytes.Buffer) { writePageMap(b, pm) }
	}
	if err := unmarshalPayload(k, k, payload, m); err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	if opt.JSON {
		err = writeJSON(w, struct {
			File    string          `json:"file"`
			Kind    string          `json:"kind"`
			Message json.RawMessage `json:"message"`
		}{path, k.String(), protoJSON(m)})
	} else {
		var b bytes.Buffer
		fmt.Fprintf(&b, "%s: %v image, format version %d\n", path, k, Version)
		text(&b)
		_, err = w.Write(b.Bytes())
	}
	if err != nil {
		return err
	}
	if err := validate(); err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	return nil
}

func describePagesFile(w io.Writer, path string, opt Options) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("read %s: %w", path, bare(err))
	}
	defer f.Close()
	pid, size, err := checkPagesFile(f, 0)
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	data := size - PagesHeaderSize
	if opt.JSON {
		return writeJSON(w, struct {
			File      string `json:"file"`
			Kind      string `json:"kind"`
			PID       int    `json:"pid"`
			DataBytes int64  `json:"data_bytes"`
			Pages     int64  `json:"pages"`
		}{path, "pages", pid, data, data / PageSize})
	}
	_, err = fmt.Fprintf(w, "%s: pages file, format version %d\n  pid %d, %d pages of data (%s)\n",
		path, Version, pid, data/PageSize, sizeString(uint64(data)))
	return err
}

func writeInventory(b *bytes.Buffer, inv *imagepb.Inventory) {
	row := func(k, format string, args ...any) { fmt.Fprintf(b, "  %-12s %s\n", k, fmt.Sprintf(format, args...)) }
	row("format", "version %d, phaul %s, kernel %s, page size %d",
		inv.GetFormatVersion(), orDash(inv.GetPhaulVersion()), orDash(inv.GetKernelRelease()), inv.GetPageSize())
	if t := inv.GetCreatedUnixNano(); t != 0 {
		row("created", "%s", time.Unix(0, t).UTC().Format(time.RFC3339Nano))
	}
	kind := "dump"
	if inv.GetPredump() {
		kind = "pre-dump"
	}
	if inv.GetShellJob() {
		kind += ", shell job"
	}
	row("kind", "%s", kind)
	row("root", "pid %d, %s", inv.GetRootPid(), plural(len(inv.GetProcesses()), "process", "processes"))
	if inv.GetParent() != "" {
		row("parent", "%s", inv.GetParent())
	}
	row("xsave", "%#x", inv.GetXsaveFeatures())
	if s := inv.GetStats(); s != nil {
		row("stats", "%d pages scanned, %d written, %d zero, %s written, frozen %v, took %v",
			s.GetPagesScanned(), s.GetPagesWritten(), s.GetPagesZero(), sizeString(s.GetBytesWritten()),
			time.Duration(s.GetFrozenNs()), time.Duration(s.GetDurationNs()))
	}
}

func writeFiles(b *bytes.Buffer, ft *imagepb.FileTable) {
	fmt.Fprintf(b, "files (%d)\n", len(ft.GetFiles()))
	tw := table(b, "ID\tKIND\tFLAGS\tPOS\tMODE\tPATH\tDETAIL")
	for _, f := range ft.GetFiles() {
		tw.row("    %d\t%s\t%s\t%d\t%#o\t%s\t%s\n", f.GetId(), fileKind(f.GetKind()), openFlags(f.GetFlags()),
			f.GetPos(), f.GetMode(), orDash(f.GetPath()), fileDetail(f))
	}
	tw.flush()
	for _, o := range ft.GetShmem() {
		sysv := ""
		if s := o.GetSysv(); s != nil {
			sysv = fmt.Sprintf(", key %#x shmid %d removed %v", uint32(s.GetKey()), s.GetShmid(), s.GetRemoved())
		}
		fmt.Fprintf(b, "  shmem %d: %s %q, %d bytes, %d pages saved, mode %#o, seals %#x%s\n", o.GetId(),
			strings.ToLower(strings.TrimPrefix(o.GetKind().String(), "SHMEM_")), o.GetName(), o.GetSize(),
			countShmemPages(o), o.GetMode(), o.GetSeals(), sysv)
	}
}

func countShmemPages(o *imagepb.Shmem) (n uint64) {
	for _, r := range o.GetRuns() {
		n += r.GetNrPages()
	}
	return n
}

func fileDetail(f *imagepb.File) string {
	switch {
	case f.GetShmem() != 0:
		return fmt.Sprintf("shmem %d", f.GetShmem())
	case f.GetKind() == imagepb.FileKind_FILE_INHERITED:
		return fmt.Sprintf("restorer's fd %d", f.GetInheritFd())
	case f.GetPipe() != nil:
		return fmt.Sprintf("pipe %d, %d bytes queued", f.GetPipe().GetPipeId(), len(f.GetPipe().GetData()))
	case f.GetUnixSocket() != nil:
		u := f.GetUnixSocket()
		return fmt.Sprintf("unix type %d state %d socket:[%d] name %q connected %v peer %d (gone %v, external %v) listener %d, %d messages queued, %d pending (%d from outside, left out)",
			u.GetType(), u.GetState(), u.GetInode(), u.GetName(), u.GetConnected(), u.GetPeerInode(), u.GetPeerGone(), u.GetExternal(), u.GetListenerInode(), len(u.GetQueue()),
			len(u.GetPending()), u.GetPendingOutside())
	case f.GetFifo() != nil:
		return fmt.Sprintf("fifo, %d bytes queued", len(f.GetFifo().GetData()))
	case f.GetEventfd() != nil:
		return fmt.Sprintf("count %d semaphore %v", f.GetEventfd().GetCount(), f.GetEventfd().GetSemaphore())
	case f.GetEpoll() != nil:
		return fmt.Sprintf("%d targets", len(f.GetEpoll().GetTargets()))
	case f.GetTimerfd() != nil:
		t := f.GetTimerfd()
		return fmt.Sprintf("clock %d value %v interval %v", t.GetClockid(), time.Duration(t.GetValueNs()), time.Duration(t.GetIntervalNs()))
	case f.GetSignalfd() != nil:
		return fmt.Sprintf("sigmask %#x", f.GetSignalfd().GetSigmask())
	case f.GetInotify() != nil:
		var ws []string
		for _, w := range f.GetInotify().GetWatches() {
			ws = append(ws, fmt.Sprintf("%d:%s mask %#x", w.GetWd(), w.GetPath(), w.GetMask()))
		}
		return fmt.Sprintf("%d watches %s", len(ws), strings.Join(ws, ", "))
	}
	return ""
}

// writeProcess writes the state of p. ft and pm may be nil (a single file
// decoded on its own); then descriptors show file ids only and mappings no
// page counts.
func writeProcess(b *bytes.Buffer, p *imagepb.Process, ft *imagepb.FileTable, pm *imagepb.PageMap) {
	row := func(k, format string, args ...any) { fmt.Fprintf(b, "  %-12s %s\n", k, fmt.Sprintf(format, args...)) }
	row("comm", "%q", p.GetComm())
	row("exe", "%s", orDash(p.GetExe()))
	row("cwd", "%s (root %s)", orDash(p.GetCwd()), orDash(p.GetRoot()))
	if c := p.GetCreds(); c != nil {
		row("creds", "uid %s gid %s groups %v", ids(c.GetUid()), ids(c.GetGid()), c.GetGroups())
		row("caps", "eff %#x prm %#x inh %#x bnd %#x amb %#x securebits %#x",
			c.GetCapEff(), c.GetCapPrm(), c.GetCapInh(), c.GetCapBnd(), c.GetCapAmb(), c.GetSecurebits())
	}
	row("misc", "umask %04o, personality %#x, dumpable %v, no_new_privs %v, pdeath_signal %d, subreaper %v",
		p.GetUmask(), p.GetPersonality(), p.GetDumpable(), p.GetNoNewPrivs(), p.GetPdeathSignal(), p.GetChildSubreaper())
	if mm := p.GetMm(); mm != nil {
		row("mm", "code %#x-%#x data %#x-%#x brk %#x-%#x stack %#x vdso %#x",
			mm.GetStartCode(), mm.GetEndCode(), mm.GetStartData(), mm.GetEndData(),
			mm.GetStartBrk(), mm.GetBrk(), mm.GetStartStack(), mm.GetVdso())
	}

	fmt.Fprintf(b, "  threads (%d)\n", len(p.GetThreads()))
	tw := table(b, "TID\tCOMM\tRIP\tRSP\tSIGMASK\tRSEQ\tXSTATE\tPENDING")
	for _, t := range p.GetThreads() {
		tw.row("    %d\t%s\t%#016x\t%#016x\t%#016x\t%s\t%d B\t%d\n", t.GetTid(), orDash(t.GetComm()),
			t.GetRegs().GetRip(), t.GetRegs().GetRsp(), t.GetSigmask(), rseqString(t.GetRseq()),
			len(t.GetXstate()), len(t.GetPending()))
	}
	tw.flush()

	fmt.Fprintf(b, "  mappings (%d)\n", len(p.GetVmas()))
	tw = table(b, "START\tEND\tPERM\tKIND\tSAVED\tZERO\tPARENT\tPATH")
	for _, v := range p.GetVmas() {
		counts := "-\t-\t-"
		if pm != nil {
			c := countPages(pm.GetRuns(), v.GetStart(), v.GetEnd())
			counts = fmt.Sprintf("%d\t%d\t%d", c.here, c.zero, c.parent)
		}
		tw.row("    %#x\t%#x\t%s\t%s\t%s\t%s\n", v.GetStart(), v.GetEnd(), perms(v), vmaKind(v.GetKind()), counts, orDash(v.GetPath()))
	}
	tw.flush()

	fmt.Fprintf(b, "  fds (%d)\n", len(p.GetFds()))
	files := make(map[uint32]*imagepb.File)
	for _, f := range ft.GetFiles() {
		files[f.GetId()] = f
	}
	tw = table(b, "FD\tFILE\tKIND\tFLAGS\tPOS\tPATH")
	for _, fd := range p.GetFds() {
		flags := ""
		if fd.GetCloexec() {
			flags = "cloexec"
		}
		f := files[fd.GetFileId()]
		if f == nil {
			tw.row("    %d\t%d\t-\t%s\t-\t-\n", fd.GetFd(), fd.GetFileId(), orDash(flags))
			continue
		}
		if flags != "" {
			flags = openFlags(f.GetFlags()) + "|" + flags
		} else {
			flags = openFlags(f.GetFlags())
		}
		tw.row("    %d\t%d\t%s\t%s\t%d\t%s\n", fd.GetFd(), fd.GetFileId(), fileKind(f.GetKind()), flags, f.GetPos(), orDash(f.GetPath()))
	}
	tw.flush()

	var handled []*imagepb.SigAction
	for _, sa := range p.GetSigactions() {
		if sa.GetHandler() != 0 { // SIG_DFL
			handled = append(handled, sa)
		}
	}
	fmt.Fprintf(b, "  sigactions not default (%d)\n", len(handled))
	tw = table(b, "SIGNAL\tHANDLER\tFLAGS\tMASK\tRESTORER")
	for _, sa := range handled {
		handler := fmt.Sprintf("%#x", sa.GetHandler())
		if sa.GetHandler() == 1 {
			handler = "SIG_IGN"
		}
		tw.row("    %s\t%s\t%#x\t%#x\t%#x\n", signalName(sa.GetSigno()), handler, sa.GetFlags(), sa.GetMask(), sa.GetRestorer())
	}
	tw.flush()
	if n := len(p.GetSharedPending()); n > 0 {
		row("pending", "%d signals for the whole process", n)
	}
}

func writePageMap(b *bytes.Buffer, pm *imagepb.PageMap) {
	fmt.Fprintf(b, "runs (%d): %s\n", len(pm.GetRuns()), countPages(pm.GetRuns(), 0, ^uint64(0)))
	tw := table(b, "START\tEND\tPAGES\tSOURCE\tOFFSET\tCRC32C")
	for _, r := range pm.GetRuns() {
		off, crc := "-", "-"
		if r.GetSource() == imagepb.PageSource_PAGES_HERE {
			off, crc = fmt.Sprintf("%#x", r.GetFileOffset()), fmt.Sprintf("%#08x", r.GetCrc32C())
		}
		tw.row("    %#x\t%#x\t%d\t%s\t%s\t%s\n", r.GetAddr(), r.GetAddr()+r.GetNrPages()*PageSize, r.GetNrPages(), pageSource(r.GetSource()), off, crc)
	}
	tw.flush()
}

// writeChain writes where the pages of pid come from in the chain of dir.
func writeChain(b *bytes.Buffer, dir string, pid int) {
	c, err := OpenChain(dir, pid)
	if err != nil {
		fmt.Fprintf(b, "  %-12s cannot resolve: %v\n", "chain", err)
		return
	}
	defer c.Close()
	fmt.Fprintf(b, "  chain (%d images, %d extents)\n", len(c.Images), len(c.Extents))
	tw := table(b, "START\tEND\tPAGES\tFROM")
	for _, e := range c.Extents {
		from := fmt.Sprintf("%s (depth %d) at %#x", e.Dir, e.Depth, e.Offset)
		if e.Zero {
			from = fmt.Sprintf("zero (%s, depth %d)", e.Dir, e.Depth)
		}
		tw.row("    %#x\t%#x\t%d\t%s\n", e.Addr, e.End(), e.NrPages, from)
	}
	tw.flush()
}

// tableWriter writes an indented table whose header row is written with
// the first row, so that an empty table is not written at all.
type tableWriter struct {
	tw     *tabwriter.Writer
	header string
	rows   int
}

func table(w io.Writer, header string) *tableWriter {
	return &tableWriter{tw: tabwriter.NewWriter(w, 0, 0, 2, ' ', 0), header: header}
}

func (t *tableWriter) row(format string, args ...any) {
	if t.rows == 0 {
		fmt.Fprintf(t.tw, "    %s\n", t.header)
	}
	t.rows++
	fmt.Fprintf(t.tw, format, args...)
}

func (t *tableWriter) flush() { t.tw.Flush() }

// pageCounts counts pages by source.
type pageCounts struct{ here, zero, parent uint64 }

func (c *pageCounts) add(o pageCounts) {
	c.here += o.here
	c.zero += o.zero
	c.parent += o.parent
}

func (c pageCounts) String() string {
	return fmt.Sprintf("%d saved (%s), %d zero, %d in parent", c.here, sizeString(c.here*PageSize), c.zero, c.parent)
}

// countPages counts the pages of sorted runs inside [start, end).
func countPages(runs []*imagepb.PageRun, start, end uint64) pageCounts {
	var c pageCounts
	for _, r := range runsAt(runs, start, end) {
		n := (min(end, runEnd(r)) - max(start, r.GetAddr())) / PageSize
		switch r.GetSource() {
		case imagepb.PageSource_PAGES_HERE:
			c.here += n
		case imagepb.PageSource_PAGES_ZERO:
			c.zero += n
		case imagepb.PageSource_PAGES_IN_PARENT:
			c.parent += n
		}
	}
	return c
}

func sizeString(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func plural(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func ids(v []uint32) string {
	s := make([]string, len(v))
	for i, id := range v {
		s[i] = fmt.Sprint(id)
	}
	return strings.Join(s, "/")
}

func rseqString(r *imagepb.Rseq) string {
	if r.GetPointer() == 0 {
		return "-"
	}
	return fmt.Sprintf("%#x (%d B, sig %#x)", r.GetPointer(), r.GetSize(), r.GetSignature())
}

// perms renders a mapping's protection and sharing like /proc/PID/maps.
func perms(v *imagepb.VMA) string {
	const (
		protRead, protWrite, protExec = 1, 2, 4
		mapShared                     = 1
	)
	p := []byte("---p")
	if v.GetProt()&protRead != 0 {
		p[0] = 'r'
	}
	if v.GetProt()&protWrite != 0 {
		p[1] = 'w'
	}
	if v.GetProt()&protExec != 0 {
		p[2] = 'x'
	}
	k := v.GetKind()
	if v.GetFlags()&mapShared != 0 || k == imagepb.VMAKind_VMA_ANON_SHARED || k == imagepb.VMAKind_VMA_FILE_SHARED {
		p[3] = 's'
	}
	return string(p)
}

func vmaKind(k imagepb.VMAKind) string {
	return strings.ToLower(strings.TrimPrefix(k.String(), "VMA_"))
}

func fileKind(k imagepb.FileKind) string {
	return strings.ToLower(strings.TrimPrefix(k.String(), "FILE_"))
}

func pageSource(s imagepb.PageSource) string {
	switch s {
	case imagepb.PageSource_PAGES_HERE:
		return "here"
	case imagepb.PageSource_PAGES_ZERO:
		return "zero"
	case imagepb.PageSource_PAGES_IN_PARENT:
		return "parent"
	}
	return s.String()
}

// openFlags renders open(2) flags as fdinfo shows them (x86_64 values).
func openFlags(fl uint32) string {
	var parts []string
	switch fl & 0o3 {
	case 0:
		parts = append(parts, "rdonly")
	case 1:
		parts = append(parts, "wronly")
	case 2:
		parts = append(parts, "rdwr")
	default:
		parts = append(parts, "accmode3")
	}
	names := []struct {
		bit  uint32
		name string
	}{
		{0o100, "creat"}, {0o200, "excl"}, {0o400, "noctty"}, {0o1000, "trunc"},
		{0o2000, "append"}, {0o4000, "nonblock"}, {0o10000, "dsync"}, {0o20000, "async"},
		{0o40000, "direct"}, {0o100000, "largefile"}, {0o200000, "directory"},
		{0o400000, "nofollow"}, {0o1000000, "noatime"}, {0o2000000, "cloexec"},
		{0o4000000, "sync"}, {0o10000000, "path"}, {0o20000000, "tmpfile"},
	}
	rest := fl &^ 0o3
	for _, n := range names {
		if rest&n.bit != 0 {
			parts = append(parts, n.name)
			rest &^= n.bit
		}
	}
	if rest != 0 {
		parts = append(parts, fmt.Sprintf("%#o", rest))
	}
	return strings.Join(parts, "|")
}

var signalNames = [...]string{
	1: "SIGHUP", "SIGINT", "SIGQUIT", "SIGILL", "SIGTRAP", "SIGABRT", "SIGBUS", "SIGFPE",
	"SIGKILL", "SIGUSR1", "SIGSEGV", "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGTERM", "SIGSTKFLT",
	"SIGCHLD", "SIGCONT", "SIGSTOP", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGURG", "SIGXCPU",
	"SIGXFSZ", "SIGVTALRM", "SIGPROF", "SIGWINCH", "SIGIO", "SIGPWR", "SIGSYS",
}

func signalName(n int32) string {
	if n > 0 && int(n) < len(signalNames) {
		return signalNames[n]
	}
	if n >= 34 && n <= maxSignal {
		return fmt.Sprintf("SIGRTMIN+%d", n-34)
	}
	return fmt.Sprintf("signal %d", n)
}

// JSON form.

type jsonCheckpoint struct {
	Dir       string          `json:"dir"`
	Inventory json.RawMessage `json:"inventory"`
	Files     json.RawMessage `json:"files,omitempty"`
	Processes []jsonProcess   `json:"processes"`
}

type jsonProcess struct {
	PID        int32           `json:"pid"`
	Entry      json.RawMessage `json:"entry"`
	Process    json.RawMessage `json:"process,omitempty"`
	PageMap    json.RawMessage `json:"pagemap,omitempty"`
	Pages      *jsonPages      `json:"pages,omitempty"`
	Chain      []jsonExtent    `json:"chain,omitempty"`
	ChainError string          `json:"chain_error,omitempty"`
}

type jsonPages struct {
	Here     uint64 `json:"here"`
	Zero     uint64 `json:"zero"`
	InParent uint64 `json:"in_parent"`
}

type jsonExtent struct {
	Addr    uint64 `json:"addr"`
	NrPages uint64 `json:"nr_pages"`
	Zero    bool   `json:"zero,omitempty"`
	Image   string `json:"image"`
	Depth   int    `json:"depth"`
	Offset  int64  `json:"offset,omitempty"`
}

func describeJSON(w io.Writer, cp *Checkpoint) error {
	out := jsonCheckpoint{Dir: cp.Dir, Inventory: protoJSON(cp.Inventory), Processes: []jsonProcess{}}
	if cp.Files != nil {
		out.Files = protoJSON(cp.Files)
	}
	for _, p := range cp.Processes {
		jp := jsonProcess{PID: p.Entry.GetPid(), Entry: protoJSON(p.Entry)}
		if p.State != nil {
			jp.Process = protoJSON(p.State)
		}
		if p.PageMap != nil {
			jp.PageMap = protoJSON(p.PageMap)
			c := countPages(p.PageMap.GetRuns(), 0, ^uint64(0))
			jp.Pages = &jsonPages{c.here, c.zero, c.parent}
			if cp.Inventory.GetParent() != "" {
				jp.Chain, jp.ChainError = chainJSON(cp.Dir, int(p.Entry.GetPid()))
			}
		}
		out.Processes = append(out.Processes, jp)
	}
	return writeJSON(w, out)
}

func chainJSON(dir string, pid int) ([]jsonExtent, string) {
	c, err := OpenChain(dir, pid)
	if err != nil {
		return nil, err.Error()
	}
	defer c.Close()
	ext := make([]jsonExtent, 0, len(c.Extents))
	for _, e := range c.Extents {
		ext = append(ext, jsonExtent{e.Addr, e.NrPages, e.Zero, e.Dir, e.Depth, e.Offset})
	}
	return ext, ""
}

// protoJSON returns m in protojson form. Marshalling a valid message does
// not fail; should it, the error is shown in place of the message.
func protoJSON(m proto.Message) json.RawMessage {
	b, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		b, _ = json.Marshal(map[string]string{"error": err.Error()})
	}
	return b
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
